"""A corpus of broken checkpoints, generated from the tiny models: every one makes `loraforge init` exit 1
with one line naming the broken file, before any output is written; none passes, none ends in a traceback."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraforge.cli import main

Q = "model.layers.0.self_attn.q_proj.weight"  # tiny llama: 64 x 64 bf16 (4 heads x 16, hidden 64)


def read_raw(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_header(change):
    """A case that rewrites the header of model.safetensors with CHANGE(header, body) -> (header, body)."""

    def apply(model: Path) -> str:
        f = model / "model.safetensors"
        write_raw(f, *change(*read_raw(f)))
        return "model.safetensors"

    return apply


def edit_entry(key: str, **fields):
    def change(header, body):
        header[key].update(fields)
        return header, body

    return edit_header(change)


def raw_bytes(data: bytes):
    def apply(model: Path) -> str:
        (model / "model.safetensors").write_bytes(data)
        return "model.safetensors"

    return apply


def last_key(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def shifted_last(delta: int):
    def change(header, body):
        k = last_key(header)
        b, e = header[k]["data_offsets"]
        header[k]["data_offsets"] = [b + delta, e + delta]
        return header, body

    return change


def overlap(header, body):
    # o_proj is 64 x 64 like q_proj: point it at q_proj's bytes (an overlap, and a gap where it was)
    header["model.layers.0.self_attn.o_proj.weight"]["data_offsets"] = list(header[Q]["data_offsets"])
    return header, body


def tensors_edit(change):
    """A case that re-saves model.safetensors after CHANGE(tensors) (a consistent file, wrong content)."""

    def apply(model: Path) -> str:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(model / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
        return "model.safetensors"

    return apply


def nan_weight(tensors):
    tensors[Q][3, 5] = float("nan")


def drop_block_module(tensors):
    del tensors["model.layers.1.self_attn.q_proj.weight"]


def extra_block(tensors):
    tensors["model.layers.2.self_attn.q_proj.weight"] = tensors[Q].clone()


def text_file(name: str, text: bytes):
    def apply(model: Path) -> str:
        (model / name).write_bytes(text)
        return name

    return apply


SINGLE = {
    "empty file": raw_bytes(b""),
    "4 bytes": raw_bytes(b"\0\0\0\0"),
    "header length past the end": raw_bytes(struct.pack("<Q", 10**6) + b"{}      "),
    "header length 2^62": raw_bytes(struct.pack("<Q", 2**62) + b"{}      "),
    "header not JSON": raw_bytes(struct.pack("<Q", 8) + b"notjson!"),
    "header not UTF-8": raw_bytes(struct.pack("<Q", 8) + b"\xff" * 8),
    "header a JSON list": raw_bytes(struct.pack("<Q", 8) + b"[]      "),
    "entry without offsets": edit_entry(Q, data_offsets=None),
    "shape not a list of ints": edit_entry(Q, shape=["64", 64]),
    "offsets backwards": edit_header(lambda h, b: (h | {Q: h[Q] | {"data_offsets": h[Q]["data_offsets"][::-1]}}, b)),
    "truncated data": edit_header(lambda h, b: (h, b[:-100])),
    "bytes after the last tensor": edit_header(lambda h, b: (h, b + b"\0" * 16)),
    "overlapping tensors": edit_header(overlap),
    "last tensor past the end": edit_header(shifted_last(1000)),
    "gap before the last tensor": edit_header(lambda h, b: shifted_last(8)(h, b + b"\0" * 8)),
    "shape needs other bytes": edit_entry(Q, shape=[64, 32]),
    "integer dtype target": edit_entry(Q, dtype="I16"),
    "unknown dtype": edit_entry(Q, dtype="F4"),
    "float8 target": edit_entry(Q, dtype="F8_E4M3", shape=[64, 128]),
    "shape disagrees with config": edit_entry(Q, shape=[128, 32]),
    "block module missing": tensors_edit(drop_block_module),
    "block beyond the config": tensors_edit(extra_block),
    "NaN weight": lambda model: tensors_edit(nan_weight)(model) and "model.layers.0.self_attn.q_proj has non-finite",
    "config.json not JSON": text_file("config.json", b'{"model_type": "llama",'),
    "config.json a list": text_file("config.json", b"[1, 2]"),
    "config.json not UTF-8": text_file("config.json", b"\xff\xfe{}"),
}


def index_edit(change):
    def apply(model: Path) -> str:
        f = model / "model.safetensors.index.json"
        f.write_text(json.dumps(change(json.loads(f.read_text()))))
        return "model.safetensors.index.json"

    return apply


def wrong_shard(index):
    wm = index["weight_map"]
    key = next(k for k in wm if "q_proj" in k)
    wm[key] = next(s for s in wm.values() if s != wm[key])
    return index


SHARDED = {
    "index maps a key to the wrong shard": index_edit(wrong_shard),
    "index without weight_map": index_edit(lambda i: {"metadata": i["metadata"]}),
    "index names a missing shard": index_edit(lambda i: i | {"weight_map": i["weight_map"] | {Q: "nope.safetensors"}}),
    "index points outside the model": index_edit(lambda i: i | {"weight_map": {k: "../x" for k in i["weight_map"]}}),
    "index not JSON": text_file("model.safetensors.index.json", b"{"),
}


def run_init(model: Path, out: Path):
    return CliRunner().invoke(
        main, ["init", str(model), "--method", "pissa", "-r", "4", "-o", str(out)], catch_exceptions=True
    )


def assert_clear_refusal(result, names: str, out: Path) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert names in lines[0], lines[0]
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


@pytest.mark.parametrize("case", list(SINGLE))
def test_a_broken_single_file_checkpoint_is_refused(tiny_models, tmp_path, case):
    model = shutil.copytree(tiny_models["llama"], tmp_path / "model")
    names = SINGLE[case](model)
    assert_clear_refusal(run_init(model, tmp_path / "out"), names, tmp_path / "out")


@pytest.mark.parametrize("case", list(SHARDED))
def test_a_broken_sharded_checkpoint_is_refused(tiny_models, tmp_path, case):
    model = shutil.copytree(tiny_models["qwen2"], tmp_path / "model")
    names = SHARDED[case](model)
    assert_clear_refusal(run_init(model, tmp_path / "out"), names, tmp_path / "out")


def test_the_corpus_is_what_the_readme_counts():
    # README "Reliability" quotes this count; keep them in step.
    assert len(SINGLE) + len(SHARDED) == 31


@pytest.mark.parametrize(
    "case", ["header not JSON", "truncated data", "bytes after the last tensor", "header length 2^62"]
)
def test_verify_reports_a_damaged_adapter_file_in_one_line(tiny_models, tmp_path, case):
    runner = CliRunner()
    out = tmp_path / "init"
    assert (
        runner.invoke(
            main, ["init", str(tiny_models["llama"]), "--method", "rlpo", "-r", "4", "-o", str(out)]
        ).exit_code
        == 0
    )
    adapter = out / "adapter_model.safetensors"
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(adapter, fake / "model.safetensors")
    SINGLE[case](fake)
    shutil.copy(fake / "model.safetensors", adapter)
    r = runner.invoke(main, ["verify", str(out)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "adapter_model.safetensors" in lines[0], r.output
