"""`python -m loraforge.models.smollm2 [DEST]`: help, and a DEST that holds something else is refused, never deleted.

The write itself (GGUF file to model directory) is tests/test_smollm2_gguf.py's; here the command line and the
destination rules, with a tiny real model standing in for the minutes of dequantising.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import build_tiny, make_tokenizer

from loraforge.models import smollm2


def test_help_prints_usage_and_writes_nothing(tmp_path):
    # A newcomer's first try: `--help` once wrote a model into a directory named "--help".
    out = subprocess.run(
        [sys.executable, "-m", "loraforge.models.smollm2", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "usage: python -m loraforge.models.smollm2" in out.stdout and "DEST" in out.stdout.upper()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["project", "file", "half-copied model"])
def test_a_taken_dest_is_refused_in_one_line_and_kept(tmp_path, capsys, kind):
    dest = tmp_path / "dest"
    if kind == "file":
        dest.write_text("notes")
        before = {dest: "notes"}
    else:
        dest.mkdir()
        name = "config.json" if kind == "half-copied model" else "train.py"
        (dest / name).write_text("mine")
        before = {dest / name: "mine"}
    with pytest.raises(SystemExit) as exc:
        smollm2.main([str(dest)])
    message = str(exc.value.code)
    assert message.startswith("Error: ") and "\n" not in message
    assert f"{dest} already exists" in message and "Nothing was changed" in message
    for path, text in before.items():
        assert path.read_text() == text
    assert sorted(os.listdir(tmp_path)) == ["dest"]  # no staging directory left either


@pytest.fixture
def tiny():
    return build_tiny("llama"), make_tokenizer()


def test_write_takes_an_absent_or_empty_dest(tmp_path, tiny):
    absent, empty = tmp_path / "a" / "model", tmp_path / "b" / "model"
    empty.mkdir(parents=True)
    for dest in (absent, empty):
        assert smollm2._write(dest, *tiny) == dest
        assert (dest / "config.json").exists() and (dest / "model.safetensors").exists()
        assert os.listdir(dest.parent) == ["model"]


def test_write_keeps_a_model_another_writer_put_there_first(tmp_path, tiny, monkeypatch):
    # Two processes writing the same model (two test workers, two quickstarts): the one that renames second
    # finds the first's complete directory there, keeps it, and leaves no staging directory behind.
    dest = tmp_path / "model"
    real_claim = smollm2.atomic.claim
    model, tokenizer = tiny

    def first_writer_wins(staging, out, was):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "first.txt").write_text("first")
        return real_claim(staging, out, was)

    monkeypatch.setattr(smollm2.atomic, "claim", first_writer_wins)
    assert smollm2._write(dest, *tiny) == dest
    assert (dest / "first.txt").read_text() == "first" and (dest / "model.safetensors").exists()
    assert os.listdir(tmp_path) == ["model"]


def test_write_refuses_when_dest_is_taken_by_something_else_meanwhile(tmp_path, tiny, monkeypatch):
    dest = tmp_path / "model"
    real_claim = smollm2.atomic.claim

    def someone_else(staging, out, was):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return real_claim(staging, out, was)

    monkeypatch.setattr(smollm2.atomic, "claim", someone_else)
    with pytest.raises(smollm2.atomic.ClaimLost):
        smollm2._write(dest, *tiny)
    assert os.listdir(dest) == ["theirs.txt"] and os.listdir(tmp_path) == ["model"]
