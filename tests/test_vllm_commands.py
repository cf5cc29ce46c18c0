"""Every vLLM serving command loraforge prints or documents starts vLLM with our adapter: `--enable-lora`,
`--max-lora-rank` at least the adapter's rank and a value vLLM accepts, and the right base (the residual base for
residualised methods, the original model for B0 = 0 methods and converted adapters). Where vLLM is importable,
its own adapter checks (`PEFTHelper.validate_legal` against the `LoRAConfig` the printed flags give) run on the
adapters loraforge wrote."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from adapter_helpers import fake_train, one_torch_thread  # noqa: F401 (autouse fixture)
from click.testing import CliRunner

from loraforge.cli import main
from loraforge.core.clients import VLLM_LORA_RANKS, vllm_serve_command

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"vllm serve [^`\n#]*")


def parse(command: str) -> dict:
    """base, max_lora_rank and {name: path} of one `vllm serve` command; every flag loraforge relies on present."""
    argv = shlex.split(command)
    assert argv[:2] == ["vllm", "serve"], command
    assert "--enable-lora" in argv, f"no --enable-lora: {command}"
    assert argv.count("--max-lora-rank") == 1, f"no --max-lora-rank: {command}"
    rank = int(argv[argv.index("--max-lora-rank") + 1])
    assert rank in VLLM_LORA_RANKS, f"--max-lora-rank {rank} is not a value vLLM accepts: {command}"
    modules = dict(m.split("=", 1) for m in argv[argv.index("--lora-modules") + 1 :] if not m.startswith("--"))
    return {"base": argv[2], "rank": rank, "modules": modules}


def commands_in(text: str) -> list[dict]:
    return [parse(c) for c in COMMAND.findall(text)]


def test_every_documented_command_serves():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = {p.name: commands_in(p.read_text()) for p in docs}
    assert sum(len(c) for c in found.values()) >= 5, found
    # the README's rank-32 adapters in out/, each line exactly what loraforge's rule prints
    readme = (ROOT / "README.md").read_text()
    for base, adapter, rank, name in [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "out/rlpo", 32, "rlpo"),
        ("out/pissa/base", "out/pissa", 32, "pissa"),  # residualised: its own base
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "out/pissa-converted", 64, "pissa"),  # convert doubles r
    ]:
        assert vllm_serve_command(base, adapter, rank, name) in readme


@pytest.fixture(scope="module")
def written(tiny_models, tmp_path_factory):
    """Adapters written by the CLI and what it printed: rlpo r = 1 (vLLM's smallest accepted value is 8 on every
    release), pissa r = 17 (served with 32), and that pissa adapter trained and converted (r = 34, served with 64)."""
    root = tmp_path_factory.mktemp("vllm")
    model = str(tiny_models["llama"])
    out = {}
    for name, method, r in [("rlpo", "rlpo", 1), ("pissa", "pissa", 17)]:
        res = CliRunner().invoke(main, ["init", model, "--method", method, "-r", str(r), "-o", str(root / name)])
        assert res.exit_code == 0, res.output
        verify = CliRunner().invoke(main, ["verify", str(root / name)])
        assert verify.exit_code == 0, verify.output
        out[name] = {"dir": root / name, "r": r, "init": res.output, "verify": verify.output}
    trained = fake_train(root / "pissa", root / "pissa" / "base", root / "trained")
    res = CliRunner().invoke(main, ["convert", str(trained), "--init", str(root / "pissa"), "-o", str(root / "conv")])
    assert res.exit_code == 0, res.output
    out["converted"] = {"dir": root / "conv", "r": 34, "convert": res.output}
    out["model"] = model
    return out


def _one(text: str) -> dict:
    (command,) = commands_in(text)
    return command


def test_printed_commands_serve_each_adapter(written):
    model = written["model"]
    rlpo, pissa, conv = written["rlpo"], written["pissa"], written["converted"]
    # init and verify print the same line; the card carries it
    for source in ("init", "verify"):
        assert _one(rlpo[source]) == {"base": model, "rank": 8, "modules": {"adapter": str(rlpo["dir"])}}
        assert _one(pissa[source]) == {
            "base": str(pissa["dir"] / "base"),
            "rank": 32,
            "modules": {"adapter": str(pissa["dir"])},
        }
    assert "NOT the original" in pissa["verify"] and "NOT the original" in pissa["init"]
    # the card names the adapter directory DIR (it travels: downloaded, pushed)
    assert _one((rlpo["dir"] / "README.md").read_text()) == {"base": model, "rank": 8, "modules": {"adapter": "DIR"}}
    assert _one((pissa["dir"] / "README.md").read_text()) == {
        "base": "DIR/base",
        "rank": 32,
        "modules": {"adapter": "DIR"},
    }
    # convert: the doubled rank on the original model
    assert _one(conv["convert"]) == {"base": model, "rank": 64, "modules": {"adapter": str(conv["dir"])}}
    assert _one((conv["dir"] / "README.md").read_text())["rank"] == 64


def test_ranks_vllm_cannot_serve_get_no_command():
    assert vllm_serve_command("b", "a", 512).endswith("--max-lora-rank 512 --lora-modules adapter=a")
    line = vllm_serve_command("b", "a", 513)
    assert "vllm serve" not in line and "cannot serve" in line and "512" in line


def test_vllm_own_checks_accept_our_adapters(written):
    """vLLM's PEFTHelper on the adapter directories, with the LoRAConfig the printed --max-lora-rank gives."""
    peft_helper = pytest.importorskip("vllm.lora.peft_helper", reason="vLLM is not installed (Linux + CUDA package)")
    from vllm.config.lora import LoRAConfig

    for name, printed in [("rlpo", "init"), ("pissa", "init"), ("converted", "convert")]:
        ad = written[name]
        helper = peft_helper.PEFTHelper.from_local_dir(str(ad["dir"]), max_position_embeddings=None)
        assert helper.r == ad["r"]
        helper.validate_legal(LoRAConfig(max_lora_rank=_one(ad[printed])["rank"]))
    # without the flag, vLLM's default 16 refuses the rank-17 and rank-34 adapters: why the flag is printed
    for name in ("pissa", "converted"):
        helper = peft_helper.PEFTHelper.from_local_dir(str(written[name]["dir"]), max_position_embeddings=None)
        with pytest.raises(ValueError, match="greater than max_lora_rank 16"):
            helper.validate_legal(LoRAConfig())
