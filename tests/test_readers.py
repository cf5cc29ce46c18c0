"""The validated readers (core/readers.py), typed settings (core/settings.py), the one finite and non-zero check
on written tensors (adapters/writers.tensor_problem) and prompts cut by characters before tokenisation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loraforge.core.errors import LoraforgeError
from loraforge.core.readers import INT, NUMBER, OBJECT, TEXT, Key, at_least, problems, read_json, read_jsonl

SCHEMA = {
    "step": Key(INT, test=at_least(0), expect="an integer >= 0"),
    "name": Key(TEXT, required=False, null=True),
    "files": Key(OBJECT, values=Key(TEXT)),
}


# --- JSON objects: one line naming the file, the line or the key ---------------------------------


def test_a_good_object_reads_and_extra_keys_pass_through(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"step": 3, "files": {"w": "x"}, "newer": [1]}))
    assert read_json(path, "a record", SCHEMA) == {"step": 3, "files": {"w": "x"}, "newer": [1]}


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"step": 1,\n "files": {', r"a.json: line 2 column 12: not valid JSON"),
        (b'{"step": 1, "files": {}}\n\xff', r"a.json: line 2 is not UTF-8 text \(byte 0xff at offset 25\)"),
        (b'{"step": "2", "files": {}}', r'a.json: key step is a string \("2"\), expected an integer'),
        (b'{"step": true, "files": {}}', r"key step is true, expected an integer"),
        (b'{"step": -1, "files": {}}', r"key step is a number \(-1\), expected an integer >= 0"),
        (b'{"step": 1, "files": ["w"]}', r"key files is a list, expected an object"),
        (b'{"step": 1, "files": {"w": 5}}', r"key files.w is a number \(5\), expected a string"),
        (b'{"files": {}}', r"key step is missing"),
        (b"[1]", r"the top level is a list, expected an object"),
        (b"", r"line 1 column 1: not valid JSON"),
        (b"[" * 100_000, r"nested too deeply to read|not valid JSON"),
    ],
)
def test_a_damaged_object_is_one_line_naming_file_and_place(tmp_path, content, message):
    path = tmp_path / "a.json"
    path.write_bytes(content)
    with pytest.raises(LoraforgeError, match=message) as e:
        read_json(path, "a record", SCHEMA)
    assert "\n" not in str(e.value) and "a record is damaged" in str(e.value) or "not UTF-8" in str(e.value)


def test_a_directory_a_missing_file_and_a_huge_file_are_one_line(tmp_path):
    (tmp_path / "d.json").mkdir()
    with pytest.raises(LoraforgeError, match=r"d.json is a directory, expected a record \(a file\)"):
        read_json(tmp_path / "d.json", "a record")
    with pytest.raises(LoraforgeError, match=r"no.json: no such file, expected a record"):
        read_json(tmp_path / "no.json", "a record")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2048)
    with pytest.raises(LoraforgeError, match=r"big.json is 2,048 bytes, more than a record can be \(1,024\)"):
        read_json(big, "a record", max_bytes=1024)


def test_a_device_or_a_pipe_in_place_of_the_file_is_one_line_not_an_endless_read(tmp_path):
    import os

    (tmp_path / "zero.json").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(LoraforgeError, match=r"zero.json is not a regular file \(a device or a pipe\?\)"):
        read_json(tmp_path / "zero.json", "a record")
    with pytest.raises(LoraforgeError, match=r"pipe.jsonl is not a regular file"):
        read_jsonl(tmp_path / "pipe.jsonl", "a log", {})


def test_nan_and_infinity_are_numbers_as_python_writes_them():
    assert problems({"x": math.nan}, {"x": Key(NUMBER)}) == []
    assert problems({"x": True}, {"x": Key(NUMBER)}) == ["key x is true, expected a number"]


# --- JSON lines: the rows that read, and the lines left out named --------------------------------


def test_jsonl_keeps_the_rows_that_read_and_names_every_line_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        b'{"step": 1, "reward": 0.5}',
        b'{"step": 2, "reward": null}',  # the value is left out, the row kept
        b'{"step": "3", "reward": 0.1}',  # a string step: the row is dropped
        b'{"step": 4, "rew\xff": 1}',  # a bad byte: that line only
        b"[4]",
        b"",
        b'{"step": 5, "reward": 0.25, "new_key": "kept"}',
        b'{"step": 6, "rew',  # torn by a kill
    ]
    path.write_bytes(b"\n".join(lines))
    got = read_jsonl(path, "a log", {"step": Key(INT)}, optional_keys={"reward": Key(NUMBER)})
    assert got.rows == [{"step": 1, "reward": 0.5}, {"step": 2}, {"step": 5, "reward": 0.25, "new_key": "kept"}]
    assert got.linenos == [1, 2, 7]
    assert [n for n, _ in got.dropped] == [3, 4, 5, 8]
    assert got.cleared == [(2, "key reward is null, expected a number")]
    summary = got.summary()
    assert summary.startswith(f"warning: {path}: 4 line(s) dropped (line 3: key step is a string")
    assert "1 value(s) ignored (line 2: key reward is null" in summary and "\n" not in summary


def test_jsonl_drops_an_over_long_line_without_holding_it(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "x": "' + b"a" * 5000 + b'"}\n{"step": 3}\n')
    got = read_jsonl(path, "a log", {"step": Key(INT)}, max_line=1000)
    assert [r["step"] for r in got.rows] == [1, 3]
    assert got.dropped == [(2, "longer than any row loraforge writes")]


def test_jsonl_missing_is_empty_and_a_directory_is_one_line(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl", "a log", {}).rows == []
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(LoraforgeError, match="d.jsonl is a directory, expected a log"):
        read_jsonl(tmp_path / "d.jsonl", "a log", {})


# --- settings typed wherever they come from --------------------------------------------------------


@dataclass
class S:
    lr: float = 1e-5
    steps: int = 10
    flag: bool | None = None
    name: str = ""
    beta: float | None = None


@pytest.mark.parametrize(
    "key, value, want",
    [
        ("lr", "5e-6", 5e-6),  # PyYAML 1.1 reads `lr: 5e-6` as this string
        ("lr", " 1E-5 ", 1e-5),
        ("lr", 3, 3.0),
        ("steps", "200", 200),
        ("steps", 1e3, 1000),
        ("steps", "1e3", 1000),
        ("flag", "yes", True),
        ("flag", "OFF", False),
        ("flag", 1, True),
        ("flag", None, None),
        ("beta", None, None),
        ("name", "x", "x"),
        ("name", Path("a/b"), "a/b"),  # TrainConfig(adapter=Path(...)) from Python
    ],
)
def test_settings_convert_what_means_one_value(key, value, want):
    from loraforge.core.settings import typed_values

    got = typed_values(S, {key: value}, "run.yaml")[key]
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", "fast", r"run.yaml line 4: lr is the text 'fast', expected a finite number; fix that value"),
        ("lr", float("nan"), r"lr is float nan, expected a finite number"),
        ("lr", "inf", r"lr is the text 'inf', expected a finite number"),
        ("lr", True, r"lr is bool True, expected a finite number"),
        ("steps", 2.5, r"steps is float 2.5, expected a whole number"),
        ("steps", None, r"steps is null, expected a whole number"),
        ("flag", "maybe", r"flag is the text 'maybe', expected true or false or null"),
        ("name", 0.9, r"name is float 0.9, expected text \(quote it\)"),
        ("name", [[1] * 3] * 3, r"name is a list, expected text"),
        # past 64 bits: torch cannot seed with it (a ValueError traceback), and float() of it overflowed
        ("steps", 2**63, r"steps is int 9223372036854775808, expected a whole number \(64-bit\)"),
        ("steps", "1" + "0" * 400, r"steps is the text '1000.*, expected a whole number \(64-bit\)"),
        ("steps", 10**400, r"steps is int 1000.*, expected a whole number \(64-bit\)"),
        ("steps", 1e300, r"steps is float 1e\+300, expected a whole number \(64-bit\)"),
        ("lr", 10**400, r"lr is int 1000.*, expected a finite number"),
    ],
)
def test_settings_refuse_the_rest_in_one_line(key, value, message):
    from loraforge.core.settings import typed_values

    with pytest.raises(LoraforgeError, match=message):
        typed_values(S, {key: value}, "run.yaml", {"lr": 4})


def test_train_config_is_typed_from_yaml_json_and_python(tmp_path):
    from loraforge.cli.train_options import build_config
    from loraforge.rl.config import TrainConfig

    (tmp_path / "run.yaml").write_text("adapter: a\ndata: synthetic\noutput_dir: o\nlr: 5e-6\nsteps: '20'\n")
    cfg = build_config({"steps": None}, str(tmp_path / "run.yaml"))
    assert cfg.lr == 5e-6 and cfg.steps == 20
    assert TrainConfig(adapter="a", data="d", output_dir="o", lr="5e-6").resolved().lr == 5e-6
    cfg.save(tmp_path / "config.json")
    edited = json.loads((tmp_path / "config.json").read_text()) | {"lr": "1e-4"}
    (tmp_path / "config.json").write_text(json.dumps(edited, indent=2))
    assert TrainConfig.load(tmp_path / "config.json").lr == 1e-4
    (tmp_path / "config.json").write_text(json.dumps(edited | {"steps": "many"}, indent=2))
    line = [i for i, ln in enumerate((tmp_path / "config.json").read_text().splitlines(), 1) if '"steps"' in ln][0]
    with pytest.raises(LoraforgeError, match=rf"config.json line {line}: steps is the text 'many'"):
        TrainConfig.load(tmp_path / "config.json")


@pytest.mark.parametrize(
    "text, message",
    [
        (b"lr: [1,\n", r"run.yaml line 2 column 1: not valid YAML"),
        (b"lr: 0.1\nlr: 0.2\n", r"run.yaml line 2: lr is given twice \(also line 1\)"),
        (b"1: 2\n", r"run.yaml: the key 1 is not a name"),
        (b"lr: 1\n\xff: 2\n", r"run.yaml: line 2 is not UTF-8 text"),
        (b"- a\n", r"expected a mapping of keys to values, found list"),
        (b"lr: fast\n", r"--config .*run.yaml line 1: lr is the text 'fast'"),
        # PyYAML's int() of 5,000 digits raises ValueError, outside YAMLError: it was a traceback
        (b"steps: " + b"9" * 5000 + b"\n", r"--config .*run.yaml: a value cannot be read"),
        (b"seed: " + b"9" * 400 + b"\n", r"--config .*run.yaml line 1: seed is int 9999.*whole number \(64-bit\)"),
    ],
)
def test_a_bad_config_file_is_one_line(tmp_path, text, message):
    from loraforge.cli.train_options import build_config

    (tmp_path / "run.yaml").write_bytes(text)
    with pytest.raises(LoraforgeError, match=message):
        build_config({}, str(tmp_path / "run.yaml"))


# --- the one finite and non-zero check on every tensor written ----------------------------------


def test_tensor_check_names_the_tensor_row_and_expert():
    from loraforge.adapters.writers import check_tensor, tensor_problem

    A = torch.randn(4 * 3, 5)  # a stack of 3 experts, r = 4: expert e owns rows 4e..4e+3
    B = torch.zeros(6, 4 * 3)  # B0 = 0 is allowed
    assert tensor_problem("x.lora_A.weight", A, 3) is None and tensor_problem("x.lora_B.weight", B, 3) is None
    A[9, 2] = float("nan")  # row 9 = expert 2
    assert tensor_problem("x.lora_A.weight", A, 3) == (
        "x.lora_A.weight has 1 non-finite value(s) (NaN or inf), the first at row 9, column 2 (expert 2 of 3)"
    )
    B[1, 7] = float("inf")  # column 7 = expert 7 % 3 = 1 (PEFT's B columns interleave the experts)
    assert "row 1, column 7 (expert 1 of 3)" in tensor_problem("x.lora_B.weight", B, 3)
    A = torch.randn(4, 5)
    A[2] = 0  # a dead row of A: no gradient, no contribution, ever
    assert tensor_problem("x.lora_A.weight", A) == "x.lora_A.weight has 1 all-zero row(s), the first row 2"
    assert tensor_problem("x.lora_B.weight", A) is None  # only A must have no zero row
    with pytest.raises(LoraforgeError, match=r"^init: x.lora_A.weight has 1 all-zero row.*nothing was written"):
        check_tensor("x.lora_A.weight", A, what="init")


def test_the_writer_refuses_a_nan_factor_and_leaves_no_file(tmp_path):
    from loraforge.adapters.writers import write_adapter_weights

    bad = torch.randn(4, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(LoraforgeError, match=r"base_model.model.m.lora_A.weight has 1 non-finite"):
        write_adapter_weights(tmp_path / "w.safetensors", {"m": (bad, torch.zeros(8, 4))})


# --- memory bounded by the settings: prompts cut by characters before tokenisation ----------------


def test_a_long_prompt_is_cut_by_characters_and_keeps_the_same_tokens():
    from conftest import word_level_tokenizer

    from loraforge.sampling.generation import CUT_SLACK_TOKENS, max_token_chars, prompt_ids

    real = word_level_tokenizer(["a", "bb", "ccc"])
    calls = []

    class Spy:  # the tokenizer, counting the characters it is handed
        def get_vocab(self):
            return real.get_vocab()

        def __call__(self, text, **kw):
            calls.append(len(text))
            return real(text, **kw)

    tok = Spy()
    bound = max_token_chars(tok)
    assert bound == 2 * max(len(t) for t in real.get_vocab())
    text = " ".join(["a", "bb", "ccc"] * 20_000)  # 120k characters
    full = real(text, add_special_tokens=False)["input_ids"][-10:]
    assert prompt_ids(tok, text, 10) == full
    assert calls == [(10 + CUT_SLACK_TOKENS) * bound]  # what was tokenised: the tail, not 120k characters
    calls.clear()
    short = "a bb ccc"
    assert prompt_ids(tok, short, 10) == real(short, add_special_tokens=False)["input_ids"] and calls == [8]


def test_a_row_past_a_sane_size_is_skipped_with_a_count(tmp_path):
    from loraforge.rl.data import MAX_ROW_CHARS, load_examples

    huge = {"prompt": "x" * (MAX_ROW_CHARS + 1), "answer": "1"}
    rows = [{"prompt": "1+1=", "answer": "2"}, huge, {"prompt": "2+2=", "answer": "4"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    got = load_examples(str(path), echo=lines.append)
    assert [(e.prompt, e.row) for e in got] == [("1+1=", 0), ("2+2=", 2)]  # .row counts from 0; messages from 1
    assert lines == [f"warning: --data {path}: skipped 1 row(s) longer than 1,000,000 characters (row 2: 1,000,002)"]
    path.write_text(json.dumps(huge) + "\n")
    with pytest.raises(LoraforgeError, match="every row is longer than 1,000,000 characters"):
        load_examples(str(path))


# --- a whole number no file loraforge writes holds: every JSON reader, one line or tolerated -----------

HUGE = "1" + "0" * 5000  # Python's int() refuses more than 4,300 digits with a ValueError (not a JSONDecodeError)
BIG = "1" + "0" * 400  # parses, but float() of it overflows and torch cannot hold it


@pytest.mark.parametrize("digits", [HUGE, BIG], ids=["5000 digits", "400 digits"])
def test_a_huge_whole_number_is_refused_by_every_json_reader_in_one_line(tmp_path, digits):
    """Each reader of a JSON file loraforge reads back: the number is read as a float (inf past 1.8e308), so a
    key that wants an integer refuses it in one line and a log drops the line; before, a 5,000-digit number
    was a ValueError traceback in every one of them (plot, verify, inspect, train --resume, eval --bench)."""
    from loraforge.adapters.directory import _residual_dir as residual_dir
    from loraforge.core.rowfiles import read_row_file
    from loraforge.models.checkpoint import parse_header
    from loraforge.models.source import read_json_object

    obj = tmp_path / "a.json"
    obj.write_text(f'{{"step": {digits}, "files": {{}}}}')
    with pytest.raises(LoraforgeError, match=r"a.json: key step is a number \((inf|1e\+400)\), expected an integer"):
        read_json(obj, "a record", SCHEMA)
    assert read_json_object(obj, "a config")["step"] == float(digits)

    log = tmp_path / "metrics.jsonl"
    log.write_text(f'{{"step": 1}}\n{{"step": {digits}}}\n')
    got = read_jsonl(log, "a log", {"step": Key(INT)})
    assert got.rows == [{"step": 1}] and got.dropped[0][0] == 2

    rows = tmp_path / "bench.jsonl"
    rows.write_text(f'{{"problem": "p", "answer": {digits}}}\n')
    assert read_row_file(rows) == [{"problem": "p", "answer": float(digits)}]

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).replace(
        "[0, 4]", f"[0, {digits}]"
    )
    blob = header.encode()
    (tmp_path / "m.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0" * 4)
    with pytest.raises(LoraforgeError, match="m.safetensors"):
        parse_header(tmp_path / "m.safetensors")

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "loraforge.json").write_text(f'{{"base": {digits}}}')
    with pytest.raises(LoraforgeError, match=r"loraforge.json: expected a JSON object whose \"base\""):
        residual_dir(adapter)


def test_a_manifest_that_is_not_an_object_is_one_line(tmp_path):
    """`loraforge.json` holding a JSON list: `.get("base")` on it was an AttributeError traceback."""
    from loraforge.adapters.directory import _residual_dir as residual_dir

    (tmp_path / "loraforge.json").write_text("[1, 2]")
    with pytest.raises(LoraforgeError, match=r"loraforge.json: expected a JSON object .* found list"):
        residual_dir(tmp_path)
