"""Docs that run: every Python block and every `loraforge` command line of README.md and docs/*.md.

Each page runs top to bottom in its own empty working directory, as a reader would type it: Python blocks share
one namespace per page, command lines go through the real CLI (in-process, click's CliRunner) and must exit 0.
A moved function, a renamed flag or a changed default that breaks an example fails here. How blocks are found
and marked, and the mappings below (HUB_MODELS, CAPS, PY_CAPS): tests/doc_snippets.py. What is changed:

- Models. Hub ids of models (HUB_MODELS) and `models/SmolLM2-135M-Instruct` (what examples/quickstart.sh writes)
  are a tiny random Llama with a character-level tokenizer and a chat template (`doc_model`): no network, and
  seconds instead of minutes. Its answers are noise; what is checked is that the example runs.
- Sizes (CAPS). Expensive knobs are lowered to at most the cap, and added when the line leaves them at a default
  made for a GPU: `train` runs 1 step of 2 prompts x 2 responses of at most 4 tokens; `eval` decodes at most 4
  tokens; `init` ranks are at most 16 (the tiny model's matrices are 32 x 64 and up). `train` also gets
  `--no-dynamic-sampling`, since a random model gets every answer wrong and DAPO's dynamic sampling would give up.
  Python keyword arguments of the same names (`steps=20`, `max_new_tokens=1024`, ...) are capped alike.
- Inputs a page names without making them (STOCK): `adapters/rlpo`, `out/rlpo`, `my_gsm8k.jsonl`, a trained run
  `runs/...`: made for the page when a block reads them and does not write them itself.

A new page or block is picked up by being there. A block that needs a GPU or the network is marked
`<!-- docs-test: check-only (why) -->` before its fence: its imports and flags are still checked.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
from doc_snippets import (
    HUB_MODELS,
    LOCAL_MODELS,
    ROOT,
    Block,
    Command,
    capped_args,
    capped_source,
    check_flags,
    check_imports,
    commands,
    doc_pages,
    read_blocks,
)

STOCK_ADAPTERS = {"adapters/rlpo": "rlpo", "out/rlpo": "rlpo", "out/pissa": "pissa", "out/milora": "milora"}
STOCK_RUNS = {"runs/rlpo": "rlpo", "runs/lora": "rlpo", "runs/milora": "milora"}
BENCH_ROWS = [
    {"id": "a", "problem": "What is 2 + 3?", "answer": "5"},
    {"id": "b", "problem": "What is 7 - 4?", "answer": "3"},
]
DAPO_ROWS = [
    {"prompt": [{"role": "user", "content": r["problem"]}], "reward_model": {"ground_truth": r["answer"]}}
    for r in BENCH_ROWS
]
STOCK_FILES = {"my_gsm8k.jsonl": BENCH_ROWS, "my_problems.jsonl": BENCH_ROWS, "dapo-math-17k.parquet": DAPO_ROWS}


# ------------------------------------------------------------------------------------------------
# inputs a page names without making them
def outputs_of(cmd_args: list[str]) -> set[str]:
    outs = set()
    for i, a in enumerate(cmd_args[:-1]):
        if a in ("-o", "--output", "--json", "--plots", "--samples-out"):
            outs.add(cmd_args[i + 1])
    return outs


def python_outputs(source: str) -> set[str]:
    """String arguments a Python block writes to: init_adapter/save_init's OUT, output=/output_dir= keywords."""
    outs = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", getattr(node.func, "attr", ""))
        if name in ("init_adapter", "save_init") and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
            outs.add(node.args[1].value)
        outs |= {
            k.value.value
            for k in node.keywords
            if k.arg in ("out", "output", "output_dir") and isinstance(k.value, ast.Constant)
        }
    return outs


def provide_stock(names: list[str], writes: set[str], model: Path) -> None:
    """Make, in the current directory, each stock input NAMES refer to (a name or a path under it) that is not
    there yet and is not among WRITES."""
    for stock in [*STOCK_ADAPTERS, *STOCK_RUNS, *STOCK_FILES]:
        used = any(n == stock or n.startswith(stock + "/") for n in names)
        if not used or Path(stock).exists() or any(w == stock or w.startswith(stock + "/") for w in writes):
            continue
        if stock.endswith(".parquet"):  # DAPO-Math-17k's format
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(STOCK_FILES[stock]), stock)
        elif stock in STOCK_FILES:
            Path(stock).write_text("".join(json.dumps(r) + "\n" for r in STOCK_FILES[stock]))
        elif stock in STOCK_ADAPTERS:
            _init(model, stock, STOCK_ADAPTERS[stock])
        else:
            _trained_run(model, stock, STOCK_RUNS[stock])


def _init(model: Path, out: str, method: str) -> None:
    from loraforge import InitConfig, init_adapter

    init_adapter(str(model), out, InitConfig(method=method, r=8))


def _trained_run(model: Path, out: str, method: str) -> None:
    """Two steps of `loraforge train` from a METHOD init (RUN_DIR with metrics, checkpoints, adapter/)."""
    from loraforge.rl.config import TrainConfig
    from loraforge.rl.trainer import train

    init = f".stock/{method}"
    if not Path(init).exists():
        _init(model, init, method)
    base = str(Path(init) / "base") if (Path(init) / "base").exists() else str(model)
    cfg = TrainConfig(
        model=base,
        adapter=init,
        data="synthetic:level=1",
        reward="number",
        output_dir=out,
        steps=2,
        prompt_batch=2,
        mini_batch=2,
        group_size=2,
        max_response_length=4,
        overlong_buffer=1,
        dynamic_sampling=False,
        save_every=1,
        tensorboard=False,
    )
    train(cfg, echo=lambda line: None)


# ------------------------------------------------------------------------------------------------
# running a block
def run_command(cmd: Command, model: Path) -> None:
    from click.testing import CliRunner

    from loraforge.cli import main

    check_flags(cmd)
    if cmd.synopsis or cmd.launcher or cmd.block.marker:
        return
    args = capped_args(cmd.args, model)
    provide_stock(args, outputs_of(args), model)
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, (
        f"{cmd.block.where}: `loraforge {' '.join(args)}` exited {result.exit_code}:\n{result.output}"
    )


def run_python(block: Block, namespace: dict, model: Path) -> None:
    check_imports(block.text, block.where)
    if block.marker:
        return
    source = capped_source(block.text, model)
    strings = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    provide_stock(strings, python_outputs(source), model)
    exec(compile(source, block.where, "exec"), namespace)


def check_run_by(block: Block) -> None:
    """A block another test runs: that test exists and reads this page."""
    if block.lang == "python":
        check_imports(block.text, block.where)
    test = ROOT / block.marker_detail.split()[0]
    assert test.is_file(), f"{block.where}: the marker names {test}, which does not exist"
    assert block.page.name in test.read_text(), f"{block.where}: {test} does not read {block.page.name}"


PAGES = doc_pages()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_runs_as_written(page, doc_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for local in LOCAL_MODELS:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(doc_model, local)
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in read_blocks(page):
        if block.marker == "run by":
            check_run_by(block)
        elif block.lang == "python":
            run_python(block, namespace, doc_model)
            ran += 1
        else:
            for cmd in commands(block):
                run_command(cmd, doc_model)
                ran += 1
    if page.name in ("README.md", "train.md"):
        assert ran, f"{page}: no block found; the reader of the docs is broken"


def test_reader_finds_markers_synopses_and_continuations(tmp_path):
    """The reader itself, on a page written here: what counts as a command, a synopsis, a marked block."""
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n"
        "```bash\n"
        "pip install x\n"
        "loraforge init org/m --method rlpo \\\n    -r 4 -o out  # a comment\n"
        "python -m loraforge verify out\n"
        "```\n\n"
        "<!-- docs-test: check-only (needs a GPU) -->\n\n"
        "```\n"
        "loraforge push OUT REPO_ID [--private]\n"
        "                           [--dry-run]\n"
        "accelerate launch --num_processes 2 -m loraforge train --steps 3\n"
        "```\n"
    )
    first, second = read_blocks(page)
    assert first.marker is None and second.marker == "check-only" and second.marker_detail == "(needs a GPU)"
    init, verify = commands(first)
    assert init.args == ["init", "org/m", "--method", "rlpo", "-r", "4", "-o", "out"] and not init.synopsis
    assert verify.args == ["verify", "out"]
    push, launch = commands(second)
    assert push.synopsis and push.args[-1] == "[--dry-run]"
    assert launch.launcher and launch.args == ["train", "--steps", "3"]
    check_flags(push)
    with pytest.raises(AssertionError, match="has no option --no-such-flag"):
        check_flags(Command(first, "x", ["init", "M", "--no-such-flag"]))
    assert capped_args(["train", "--steps", "50", "--model", HUB_MODELS[0]], Path("/m")) == [
        "train",
        "--steps",
        "1",
        "--model",
        "/m",
        "--prompt-batch",
        "2",
        "--mini-batch",
        "2",
        "--group-size",
        "2",
        "--max-response-length",
        "4",
        "--overlong-buffer",
        "1",
        "--no-dynamic-sampling",
    ]
    assert capped_source('f("x", steps=20, r=32)', Path("/m")) == 'f("x", steps=1, r=16)'
    with pytest.raises(ModuleNotFoundError):
        check_imports("from loraforge.rl.no_such_module import x\n", "page.md:1")
    with pytest.raises(ImportError):
        check_imports("from loraforge.rl.rewards import dapo_score\n", "page.md:1")  # moved in 0.2.0


def test_no_block_installs_loraforge_from_the_package_index():
    """loraforge is not on the package index: a block that says `pip install -e '.[train]'` fails for every
    reader who copies it; the pages install from a clone (`pip install -e '.[train]'`)."""
    import shlex

    wrong = []
    for page in doc_pages():
        for block in read_blocks(page):
            for line in block.text.splitlines():
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:
                    continue
                if words[:2] == ["pip", "install"] or words[1:3] == ["-m", "pip"]:
                    if any(w == "loraforge" or w.startswith("loraforge[") for w in words):
                        wrong.append(f"{block.where}: {line.strip()}")
    assert not wrong, "install from a clone, not the index:\n" + "\n".join(wrong)


def test_changelog_lists_each_change_once():
    """Within one version, no bullet is repeated (0.2.0 listed verify's client checks twice)."""
    import re

    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    for version in re.split(r"^## ", text, flags=re.M)[1:]:
        body = "\n".join(line for line in version.splitlines()[1:] if not line.startswith("#"))
        bullets = [" ".join(b.split()) for b in re.split(r"^- ", body, flags=re.M)[1:]]
        repeated = {b for b in bullets if bullets.count(b) > 1}
        assert not repeated, f"CHANGELOG {version.splitlines()[0]}: listed twice: {sorted(repeated)}"
