"""The reader fuzz test: every kind of file loraforge reads back, damaged every way a careless user, a flaky
disk or a hostile file would, given to the command that reads it.

File kinds and the command that reads each: metrics.jsonl (`plot`, `train --resume`), samples.jsonl, a run's
config.json, a checkpoint's state.json, trainer_state.pt and lineage record, the KL reference (`train --resume`),
a --config YAML file (`train --config`), a trained adapter's lineage record (`convert`), loraforge.json
(`verify`; every command opens an adapter through the same `load_adapter`), adapter_config.json (`inspect`,
`train --adapter`). Damage: truncated, bad bytes, a directory in place of the file, not an object, extra keys,
and for each of a set of keys (nested ones too) a value of the wrong kind and the key missing; for the logs a
torn line, a bad byte on a line, rows with a wrong-kind or missing step, a null value, a 17 MB line; for YAML
invalid syntax, numbers as text, a key given twice, an alias bomb.

Each case asserts: never a traceback; exit 0 (tolerated: the rows or keys that read are used, and what was left
out is named) or exit 1 with one line `Error: ...`, as pinned per case; and every input the command only reads
(model, init, trained adapter, and for plot, convert, verify and inspect the directories holding the damaged
file) is unchanged, byte for byte. The fast suite runs each kind truncated, with a bad byte and as a directory
(39 cases); the rest is marked slow. `train --resume` writes its run directory (it cuts the logs to the resumed
step, sets damaged checkpoints aside), so there the inputs checked are the model and the init.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rl_helpers import answer_scorer
from test_trainer import tiny_cfg

from loraforge.cli import main
from loraforge.rl.trainer import train

# ------------------------------------------------------------------------------------------------
# damage


def swap(value):
    """A value of another kind than VALUE: what a hand edit or another tool's writer leaves."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return str(value)  # "2": what PyYAML or a spreadsheet makes of a number
    if isinstance(value, str):
        return 12345
    if isinstance(value, list):
        return {"x": value}
    if isinstance(value, dict):
        return list(value)  # `files` as a list: the case convert once crashed on
    return {"x": None}


def json_mutations(data: dict, keys: list[str]) -> dict[str, bytes]:
    """name -> damaged bytes, for a JSON object file holding DATA; KEYS: paths (a/b) of keys to damage one by one."""
    raw = json.dumps(data, indent=2).encode()
    out = {
        "truncated": raw[: len(raw) // 2],
        "bad bytes": raw[: len(raw) // 3] + b"\xff\xfe\x00" + raw[len(raw) // 3 :],
        "empty": b"",
        "not an object": b"[1, 2, 3]",
        "extra keys": json.dumps({**data, "zz_extra": {"a": [1]}}).encode(),
        "null": b"null",
    }
    for path in keys:
        for how in ("wrong type", "missing", "null"):
            changed = json.loads(raw)
            *parents, last = path.split("/")
            node = changed
            for p in parents:
                node = node[p]
            if how == "missing":
                del node[last]
            else:
                node[last] = swap(node[last]) if how == "wrong type" else None
            out[f"{path}: {how}"] = json.dumps(changed).encode()
    return out


def jsonl_mutations(lines: list[dict]) -> dict[str, bytes]:
    raw = [json.dumps(r).encode() for r in lines]

    def join(rows):
        return b"\n".join(rows) + b"\n"

    first = dict(lines[0])
    return {
        "torn last line": join(raw)[:-9],
        "bad bytes on a line": join([raw[0][:5] + b"\xff" + raw[0][5:]] + raw[1:]),
        "step a string": join([json.dumps({**first, "step": "1"}).encode()] + raw[1:]),
        "step true": join([json.dumps({**first, "step": True}).encode()] + raw[1:]),
        "step missing": join([json.dumps({k: v for k, v in first.items() if k != "step"}).encode()] + raw[1:]),
        "reward null": join([json.dumps({**first, "reward": None}).encode()] + raw[1:]),
        "values of other kinds": join([json.dumps({k: swap(v) for k, v in first.items()}).encode()] + raw[1:]),
        "extra keys": join([json.dumps({**first, "zz_extra": [1]}).encode()] + raw[1:]),
        "a line not an object": join([b"[1, 2]"] + raw),
        "empty": b"",
        "over-long line": join(raw) + b'{"step": 1, "x": "' + b"a" * (17 * 2**20) + b'"}\n',
    }


def torch_mutations(blob: dict, raw: bytes) -> dict[str, bytes]:
    import io

    def saved(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    return {
        "truncated": raw[: len(raw) // 2],
        "bad bytes": raw[:100] + b"\xff" * 64 + raw[164:],
        "empty": b"",
        "not a dict": saved([1, 2, 3]),
        "optimizer: wrong type": saved({**blob, "optimizer": [1]}),
        "rng.torch: wrong type": saved({**blob, "rng": {**blob["rng"], "torch": "seed"}}),
        "rng: missing": saved({k: v for k, v in blob.items() if k != "rng"}),
        "scheduler: missing": saved({k: v for k, v in blob.items() if k != "scheduler"}),
        "optimizer state: another adapter's": saved(
            {
                **blob,
                "optimizer": {
                    **blob["optimizer"],
                    "param_groups": [{**blob["optimizer"]["param_groups"][0], "params": [0]}],
                },
            }
        ),
        "extra keys": saved({**blob, "zz_extra": torch.zeros(2)}),
    }


def yaml_mutations(base: dict) -> dict[str, bytes]:
    import yaml

    def dump(d):
        return yaml.safe_dump(d, sort_keys=False).encode()

    raw = dump(base)
    return {
        "truncated": raw[: len(raw) // 2],
        "bad bytes": raw[:10] + b"\xff\xfe" + raw[10:],
        "empty": b"",
        "not a mapping": b"- a\n- b\n",
        "invalid YAML": raw + b"steps: [1,\n",
        "lr: 5e-6 (a string to PyYAML)": raw.replace(b"lr: 0.01", b"lr: 5e-6"),
        "lr: text": raw.replace(b"lr: 0.01", b"lr: fast"),
        "steps: 1.5": dump({**base, "steps": 1.5}),
        "steps: .inf": dump({**base, "steps": float("inf")}),
        "adapter: a number": dump({**base, "adapter": 5}),
        "dynamic_sampling: maybe": dump({**base, "dynamic_sampling": "maybe"}),
        "adapter: missing": dump({k: v for k, v in base.items() if k != "adapter"}),
        "a key given twice": raw + b"lr: 0.5\n",
        "a key not a name": raw + b"1: 2\n",
        "extra keys": raw + b"zz_extra: 1\n",
        "alias bomb": b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nmodel: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
    }


# ------------------------------------------------------------------------------------------------
# running a case


def tree_hash(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]) if root.is_dir() else [root]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def put(path: Path, damage: bytes | None) -> None:
    """Write DAMAGE at PATH (None: a directory in place of the file)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if damage is None:
        path.mkdir()
        (path / "x").write_text("a directory where a file should be")
    else:
        path.write_bytes(damage)


def run_cli(args: list, unchanged: list[Path]) -> str:
    """Run `loraforge ARGS`: 'ok' (exit 0) or 'refused' (exit 1, or 2 for a usage error; one `Error:` line, the
    last); never a traceback, never a changed input."""
    before = tree_hash(*unchanged)
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError(
            "traceback:\n" + "".join(traceback.format_exception(result.exception)) + result.output[-2000:]
        )
    assert tree_hash(*unchanged) == before, "an input changed"
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output[-2000:])
    if result.exit_code == 0:
        return "ok"
    # exit 1: the library refused; exit 2: click's usage error (a --config that is a directory, say)
    lines = result.output.rstrip("\n").splitlines()
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output[-2000:]
    return "refused"


# ------------------------------------------------------------------------------------------------
# the inputs: a finished 2-step GRPO run (a KL reference, and a checkpoint to fall back to), a pissa init of
# a tiny llama and an adapter "trained" from it with a lineage record


@pytest.fixture(scope="module")
def run_template(model_dir, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-run")
    run = root / "run"
    cfg = tiny_cfg(model_dir, adapter_dir, run, steps=2, save_every=1, algo="grpo", keep_checkpoints=0)
    train(cfg, scorer=answer_scorer, echo=lambda s: None)
    assert (run / "reference_adapter.safetensors").is_file() and (run / "samples.jsonl").is_file()
    return run


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    from adapter_helpers import fake_train
    from conftest import save_tiny

    from loraforge import InitConfig, init_adapter
    from loraforge.adapters.lineage import LINEAGE_FILE, LINEAGE_FORMAT, init_record

    root = tmp_path_factory.mktemp("fuzz-convert")
    model = save_tiny("llama", root / "llama")
    init = init_adapter(str(model), root / "init", InitConfig(method="pissa", r=4)).out
    trained = fake_train(init, init / "base", root / "trained")
    record = {"format": LINEAGE_FORMAT, "init": init_record(str(init))}
    (trained / LINEAGE_FILE).write_text(json.dumps(record, indent=2))
    return model, init, trained


# ------------------------------------------------------------------------------------------------
# the file kinds: (inputs, the damaged file, its format, the command that reads it, keys damaged one by one)

CONFIG_KEYS = ["lr", "adapter", "dynamic_sampling"]
STATE_KEYS = ["step", "data/cursor", "skipped"]
LINEAGE_KEYS = ["init/path", "init/files", "init/files/adapter_model.safetensors"]
MANIFEST_KEYS = ["r", "base", "source/model_id", "modules", "files"]
ADAPTER_CONFIG_KEYS = ["r", "lora_alpha", "target_modules"]
CKPT = "checkpoints/step_000002"  # the newest: damaged, --resume falls back to step 1
KINDS = {
    "plot/metrics.jsonl": ("run", "metrics.jsonl", "jsonl", "plot", []),
    "resume/metrics.jsonl": ("run", "metrics.jsonl", "jsonl", "resume", []),
    "resume/samples.jsonl": ("run", "samples.jsonl", "jsonl", "resume", []),
    "resume/config.json": ("run", "config.json", "json", "resume", CONFIG_KEYS),
    "resume/state.json": ("run", f"{CKPT}/state.json", "json", "resume", STATE_KEYS),
    "resume/trainer_state.pt": ("run", f"{CKPT}/trainer_state.pt", "torch", "resume", []),
    "resume/lineage": ("run", f"{CKPT}/adapter/loraforge-lineage.json", "json", "resume", LINEAGE_KEYS),
    "resume/KL reference": ("run", "reference_adapter.safetensors", "bytes", "resume", []),
    "train/--config YAML": ("yaml", "run.yaml", "yaml", "train", []),
    "convert/lineage": ("pair", "trained/loraforge-lineage.json", "json", "convert", LINEAGE_KEYS),
    "verify/loraforge.json": ("pair", "init/loraforge.json", "json", "verify", MANIFEST_KEYS),
    "inspect/adapter_config.json": ("pair", "trained/adapter_config.json", "json", "inspect", ADAPTER_CONFIG_KEYS),
    "train/adapter_config.json": ("adapter", "adapter/adapter_config.json", "json", "train", ADAPTER_CONFIG_KEYS),
}

JSON_NAMES = ["truncated", "bad bytes", "not an object", "extra keys"]
JSONL_NAMES = [
    "torn last line", "bad bytes on a line", "step a string", "step missing", "reward null",
    "values of other kinds", "extra keys", "over-long line",
]  # fmt: skip
TORCH_NAMES = [
    "truncated", "bad bytes", "not a dict", "optimizer: wrong type", "rng: missing",
    "optimizer state: another adapter's", "extra keys",
]  # fmt: skip
BYTES_NAMES = ["truncated", "bad bytes"]
YAML_NAMES = [
    "truncated", "bad bytes", "not a mapping", "invalid YAML", "lr: 5e-6 (a string to PyYAML)", "lr: text",
    "steps: 1.5", "adapter: a number", "adapter: missing", "a key given twice", "extra keys", "alias bomb",
]  # fmt: skip
# the cases run by `pytest -m "not slow"`: every kind truncated or torn, with a bad byte, and as a directory
FAST = {"truncated", "torn last line", "bad bytes", "bad bytes on a line", "a directory"}


def mutation_names(fmt: str, keys: list[str]) -> list[str]:
    names = {"json": JSON_NAMES, "jsonl": JSONL_NAMES, "torch": TORCH_NAMES, "bytes": BYTES_NAMES}.get(fmt, YAML_NAMES)
    per_key = [f"{k}: {how}" for k in keys for how in ("wrong type", "missing")] if fmt == "json" else []
    return [*names, *per_key, "a directory"]


def damage_for(fmt: str, keys: list[str], path: Path, name: str) -> bytes | None:
    if name == "a directory":
        return None
    raw = path.read_bytes()
    if fmt == "json":
        return json_mutations(json.loads(raw), keys)[name]
    if fmt == "jsonl":
        return jsonl_mutations([json.loads(ln) for ln in raw.splitlines() if ln.strip()])[name]
    if fmt == "torch":
        return torch_mutations(torch.load(path, weights_only=True), raw)[name]
    if fmt == "bytes":
        return {"truncated": raw[: len(raw) // 2], "bad bytes": raw[:8] + b"\xff" * 16 + raw[24:], "empty": b""}[name]
    return yaml_mutations(_yaml_base(path))[name]


def _yaml_base(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def build_case(kind: str, name: str, tmp_path: Path, run_template, trained_pair, model_dir, adapter_dir):
    """(the command line, the inputs that must not change) with the damage in place."""
    inputs, rel, fmt, command, keys = KINDS[kind]
    if inputs == "run":
        root = tmp_path / "run"
        shutil.copytree(run_template, root)
        readonly = [model_dir, adapter_dir] + ([root] if command == "plot" else [])
    elif inputs == "pair":
        model, init, trained = trained_pair
        root = tmp_path
        shutil.copytree(init, root / "init")
        shutil.copytree(trained, root / "trained")
        readonly = [model, root / "init", root / "trained"]
    elif inputs == "adapter":
        root = tmp_path
        shutil.copytree(adapter_dir, root / "adapter")
        readonly = [model_dir, root / "adapter"]
    else:
        root = tmp_path
        # the cheap settings first: a truncated file keeps them and loses what a run needs (model, adapter...)
        cfg = {"steps": 1, "lr": 0.01, "max_response_length": 1, "group_size": 2, "prompt_batch": 1}
        cfg |= {"mini_batch": 1, "overlong_buffer": 0, "dynamic_sampling": False, "tensorboard": False}
        cfg |= {"model": str(model_dir), "adapter": str(adapter_dir), "data": "synthetic:n=8,max=2,style=bare"}
        cfg |= {"output_dir": str(tmp_path / "out")}
        import yaml

        (root / rel).write_text(yaml.safe_dump(cfg, sort_keys=False))
        readonly = [model_dir, adapter_dir]
    put(root / rel, damage_for(fmt, keys, root / rel, name))
    if command == "resume":
        args = ["train", "--resume", root]
    elif command == "plot":
        args = ["plot", root, "-o", tmp_path / "curves.png"]
    elif command == "train" and inputs == "adapter":
        args = ["train", "--model", model_dir, "--adapter", root / "adapter", "-o", tmp_path / "out", *CHEAP]
    elif command == "train":
        args = ["train", "--config", root / rel, "--max-gen-batches", "0", "--reward", "rl_helpers:answer_scorer"]
    elif command == "convert":
        args = ["convert", root / "trained", "--init", root / "init", "-o", tmp_path / "converted"]
    elif command == "verify":
        args = ["verify", root / "init"]
    else:
        args = ["inspect", root / "trained", "--init", root / "init"]
    return args, readonly


CHEAP = "--data synthetic:n=8,max=2,style=bare --steps 1 --max-response-length 1 --group-size 2 --prompt-batch 1"
CHEAP = [*CHEAP.split(), "--mini-batch", "1", "--overlong-buffer", "0", "--no-dynamic-sampling", "--no-tensorboard"]
CHEAP += ["--reward", "rl_helpers:answer_scorer"]
CASES = [
    pytest.param(kind, name, id=f"{kind}:{name}", marks=() if name in FAST else pytest.mark.slow)
    for kind, (_, _, fmt, _, keys) in KINDS.items()
    for name in mutation_names(fmt, keys)
]
# What each case must give. "ok": tolerated, exit 0 (a log keeps the lines that read and names the others; a
# damaged newest checkpoint is set aside and the one before used; a damaged KL reference is rebuilt; a number
# written as text is a number; extra keys pass); everything else "refused": one line, exit 1 (2 for click's
# usage error). A checkpoint's files: always ok (the fall-back); a log: ok unless it is a directory.
EVERY, ALL = "every damage but a directory", "every damage"
OK = {
    "plot/metrics.jsonl": EVERY,
    "resume/metrics.jsonl": EVERY,
    "resume/samples.jsonl": EVERY,
    # a number or switch written as text is read as one; a missing setting takes its default, with a note
    "resume/config.json": {f"{k}: {how}" for k in ("lr", "dynamic_sampling") for how in ("wrong type", "missing")},
    "resume/state.json": ALL,
    "resume/trainer_state.pt": ALL,
    "resume/lineage": ALL,
    "resume/KL reference": EVERY,
    "train/--config YAML": {"lr: 5e-6 (a string to PyYAML)"},
    "convert/lineage": {"extra keys"},
    "verify/loraforge.json": {"extra keys"},
    "inspect/adapter_config.json": {"extra keys"},
    "train/adapter_config.json": {"extra keys"},
}


def expected(kind: str, name: str) -> str:
    ok = OK[kind]
    if ok == ALL or (ok == EVERY and name != "a directory"):
        return "ok"
    return "ok" if isinstance(ok, set) and name in ok else "refused"


@pytest.mark.parametrize("kind, name", CASES)
def test_a_damaged_file_is_tolerated_or_one_line_and_no_input_changes(
    kind, name, tmp_path, run_template, trained_pair, model_dir, adapter_dir, record_property
):
    args, readonly = build_case(kind, name, tmp_path, run_template, trained_pair, model_dir, adapter_dir)
    got = run_cli(args, readonly)
    record_property("outcome", got)
    print(f"OUTCOME {kind} | {name} | {got}")
    assert got == expected(kind, name)
