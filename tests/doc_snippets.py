"""The code in README.md and docs/*.md, read the way tests/test_docs.py runs it (and tests/rl/test_trl_recipe.py runs
the README's TRL recipe).

What is read: every fenced block. A ```python block is code; in any other block, a line whose command is
`loraforge`, `python -m loraforge`, or `accelerate launch ... -m loraforge` / `torchrun ... -m loraforge` is a
command line (backslash continuations joined; an indented `[--flag ...]` line continues a synopsis). Other
lines (pip, vllm, bash, output samples) are not commands.

A marker, an HTML comment on the line before the block's opening fence (blank lines between are allowed), changes
how it is checked:

    <!-- docs-test: check-only (needs a GPU) -->        Python: compiled, and its imports run and must find every
                                                        name; commands: only their sub-command and flags are checked
    <!-- docs-test: run by tests/rl/test_trl_recipe.py -->  run by that test (which must exist and read this block);
                                                        here: compiled and imports checked

A command line with placeholders (an all-caps word such as MODEL or RUN_DIR, `[`, `|` or `...`) is a synopsis:
its sub-command and flags are checked, it is not run.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*docs-test:\s*(check-only|run by)\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]+$")
LAUNCHERS = ("accelerate", "torchrun")


def doc_pages() -> list[Path]:
    """README.md and every docs/*.md (a new page is picked up by being there)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None = None  # "check-only" or "run by"
    marker_detail: str = ""

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


@dataclass
class Command:
    """A `loraforge` command line from a block: its arguments after `loraforge` (sub-command first)."""

    block: Block
    text: str
    args: list[str] = field(default_factory=list)
    launcher: bool = False  # started by accelerate launch / torchrun

    @property
    def synopsis(self) -> bool:
        return any(
            PLACEHOLDER.match(a) or any(c in a for c in "[]|") or "..." in a or a.startswith("<") for a in self.args
        )


def read_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(2)
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        block = Block(page, start + 1, lang, "\n".join(lines[start + 1 : j]) + "\n")
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = MARKER.search(lines[k]) if k >= 0 else None
        if mark:
            block.marker, block.marker_detail = mark.group(1), mark.group(2)
        blocks.append(block)
        i = j + 1
    return blocks


def _logical_lines(text: str) -> list[str]:
    """Backslash continuations joined; an indented line starting with `[` continues the line before (synopses)."""
    out: list[str] = []
    joining = False
    for raw in text.splitlines():
        stripped = raw.strip()
        if joining or (out and raw[:1].isspace() and stripped.startswith("[")):
            out[-1] = out[-1] + " " + stripped
        else:
            out.append(stripped)
        joining = out[-1].endswith("\\")
        if joining:
            out[-1] = out[-1][:-1].rstrip()
    return out


def commands(block: Block) -> list[Command]:
    """The `loraforge` command lines of a non-Python block."""
    found = []
    for line in _logical_lines(block.text):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: not a shell line (an output sample)
            continue
        if not words:
            continue
        launcher = words[0] in LAUNCHERS
        if words[0] == "loraforge":
            args = words[1:]
        elif re.fullmatch(r"python3?", words[0]) and words[1:3] == ["-m", "loraforge"]:
            args = words[3:]
        elif launcher and "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["loraforge"]:
            args = words[words.index("-m") + 2 :]
        else:
            continue
        found.append(Command(block, line, args, launcher))
    return found


def import_names(source: str) -> list[tuple[str, str | None]]:
    """(module, name) for every import statement of SOURCE (name None for `import module`)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.module, a.name) for a in node.names]
    return out


def check_imports(source: str, where: str) -> None:
    """Compile SOURCE, import what it imports and find every imported name: a moved function fails here."""
    import importlib

    compile(source, where, "exec")
    for module, name in import_names(source):
        mod = importlib.import_module(module)
        if name is not None and not hasattr(mod, name):
            importlib.import_module(f"{module}.{name}")  # a submodule, or ImportError naming what is missing


def option_names(command) -> set[str]:
    return {o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}


def check_flags(cmd: Command) -> None:
    """The sub-command exists and every flag the line names is one of its options (`--a/--no-a`, `[--a X]`,
    `--a|b` and `--a=X` forms included)."""
    import click

    from loraforge.cli import main

    sub = cmd.args[0] if cmd.args else ""
    with click.Context(main) as ctx:
        command = main.get_command(ctx, sub)
    assert command is not None, f"{cmd.block.where}: `loraforge {sub}` is not a command ({cmd.text})"
    known = option_names(command) | {"--help"}
    for arg in cmd.args[1:]:
        for piece in re.split(r"[\[\]|]", arg):
            for flag in piece.split("/"):
                flag = flag.split("=")[0]
                if re.match(r"^--?[A-Za-z]", flag):
                    assert flag in known, f"{cmd.block.where}: `loraforge {sub}` has no option {flag} ({cmd.text})"


# ------------------------------------------------------------------------------------------------
# the model every example runs on (tests/conftest.py's `doc_model` fixture)
def build_doc_model(path: Path) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, fp32) with a one-token-per-character tokenizer of printable
    ASCII and a plain chat template, saved to PATH: any prompt tokenizes, and sampled text holds digits, so
    rewards that read numbers vary."""
    import torch
    from conftest import word_level_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = word_level_tokenizer(chars, split="chars")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------
# what a block becomes before it runs: Hub models -> the doc model, expensive knobs capped
HUB_MODELS = [
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
]
LOCAL_MODELS = ["models/SmolLM2-135M-Instruct"]  # the quickstart's directory: a link to the doc model

# flag -> cap, per command; "add": flags given when the line does not set them (a default sized for a GPU)
CAPS = {
    "train": {
        "--steps": 1,
        "--prompt-batch": 2,
        "--mini-batch": 2,
        "--group-size": 2,
        "--max-response-length": 4,
        "--overlong-buffer": 1,
        "--save-every": 1,
    },
    "eval": {"--max-new-tokens": 4, "--samples": 2, "--limit": 2},
    "init": {"-r": 16},
}
ADD = {
    "train": [
        "--steps",
        "--prompt-batch",
        "--mini-batch",
        "--group-size",
        "--max-response-length",
        "--overlong-buffer",
    ],
    "eval": ["--max-new-tokens"],
}
# Hub ids that name a repository to write to or to record, not a model to load: kept as they are
NOT_LOADED = {"push": ("--base-model", "--base-repo")}
# lines that only write files (`train --backend verl` writes a verl job): run with their own sizes
UNCAPPED = [("train", "--backend", "verl")]
ADD_SWITCHES = {"train": ("--no-dynamic-sampling", ("--dynamic-sampling", "--no-dynamic-sampling", "--resume"))}
# keyword arguments added to a call that does not set them (the Python form of ADD_SWITCHES)
PY_ADD = {"TrainConfig(": "dynamic_sampling=False"}
PY_CAPS = {
    "steps": 1,
    "overlong_buffer": 1,
    "max_new_tokens": 4,
    "max_response_length": 4,
    "max_completion_length": 4,
    "prompt_batch": 2,
    "group_size": 2,
    "samples": 2,
    "limit": 2,
    "r": 16,
}


def capped_args(args: list[str], model: Path) -> list[str]:
    """A command's arguments with Hub model ids replaced by the doc model and CAPS applied."""
    sub = args[0]
    keep = NOT_LOADED.get(sub, ())
    out = [str(model) if a in HUB_MODELS and args[i - 1] not in keep else a for i, a in enumerate(args)]
    if any(s == sub and any(args[i : i + 2] == [f, v] for i in range(len(args))) for s, f, v in UNCAPPED):
        return out
    caps = CAPS.get(sub, {})
    for i, a in enumerate(out[:-1]):
        if a in caps and re.fullmatch(r"\d+", out[i + 1]):
            out[i + 1] = str(min(int(out[i + 1]), caps[a]))
    if "--resume" not in out:
        out += [x for f in ADD.get(sub, []) if f not in out for x in (f, str(caps[f]))]
    if sub in ADD_SWITCHES:
        switch, unless = ADD_SWITCHES[sub]
        if not any(u in out for u in unless):
            out.append(switch)
    return out


def capped_source(source: str, model: Path) -> str:
    """A Python block with Hub model ids replaced by the doc model and PY_CAPS applied to keyword arguments."""
    for hub in HUB_MODELS:
        source = source.replace(f'"{hub}"', repr(str(model)))
    for call, kwarg in PY_ADD.items():
        if kwarg.split("=")[0] + "=" not in source:
            source = source.replace(call, f"{call}{kwarg}, ")
    for key, cap in PY_CAPS.items():
        source = re.sub(rf"\b({key})=(\d+)\b", lambda m, cap=cap: f"{m.group(1)}={min(int(m.group(2)), cap)}", source)
    return source
