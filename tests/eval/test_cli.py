"""`loraforge eval` on the saved bigram model: exit codes, the table, the files, the error messages."""

import json

import pytest
from click.testing import CliRunner

from loraforge.cli import main


def run(*args):
    return CliRunner().invoke(main, ["eval", *args])


def test_eval_command_end_to_end(model_dir, greedy_file, tmp_path):
    out = tmp_path / "report.json"
    r = run(
        "--model",
        str(model_dir),
        "--bench",
        str(greedy_file),
        "--prompt-template",
        "raw",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "-o",
        str(out),
    )
    assert r.exit_code == 0, r.output
    assert "pass@1" in r.output and "60.00" in r.output and "math-verify" in r.output
    report = json.loads(out.read_text())
    res = report["benchmarks"]["tiny"]
    assert res["metrics"][0] == {**res["metrics"][0], "metric": "pass@1", "k": 1, "n": 1, "score": pytest.approx(0.6)}
    assert res["model"]["name_or_path"] == str(model_dir) and res["model"]["adapter"] is None
    assert res["settings"]["max_new_tokens"] == 4 and res["time_s"]["total"] >= 0
    assert report["config"]["prompt_template"] == "raw"
    samples = [json.loads(x) for x in (tmp_path / "report.samples.jsonl").read_text().splitlines()]
    assert {"prompt", "response", "extracted", "correct", "gold"} <= set(samples[0])
    assert sum(s["correct"] for s in samples) == 3


@pytest.mark.parametrize("held", ["report.json", "report.samples.jsonl"])
def test_a_second_eval_writing_the_same_files_fails_at_once(model_dir, greedy_file, tmp_path, held):
    """Two evals with one -o both ran to the end and the last replaced the other's report. Now the first holds
    a lock on each file it writes (here: this process, as another eval would), and the second stops at once."""
    import os

    from loraforge.core.atomic import DirLock

    out = tmp_path / "report.json"
    out.write_text("{}")  # the first run's report, say: kept
    with DirLock(tmp_path / held):
        r = run("--model", str(model_dir), "--bench", str(greedy_file), "--max-new-tokens", "2", "-o", str(out))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"Another loraforge command (pid {os.getpid()}) is writing {tmp_path / held} right now" in r.output
    assert "loading" not in r.output  # refused before the model loaded
    assert out.read_text() == "{}" and not (tmp_path / "report.samples.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.json", greedy_file.name])  # locks gone


def test_eval_command_with_adapter(model_dir, greedy_file, tmp_path):
    # A fresh LoRA adapter (B = 0) leaves the model's answers unchanged: the same 3 of 5.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adir = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(adir))
    out = tmp_path / "report.json"
    r = run(
        "--model",
        str(model_dir),
        "--adapter",
        str(adir),
        "--bench",
        str(greedy_file),
        "--prompt-template",
        "raw",
        "--max-new-tokens",
        "4",
        "--scorer",
        "dapo",
        "-o",
        str(out),
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["benchmarks"]["tiny"]
    assert res["metrics"][0]["score"] == pytest.approx(0.4)  # DAPO: 2 of 5
    assert res["model"]["adapter"] == str(adir) and len(res["model"]["adapter_sha256"]) == 64


@pytest.mark.parametrize(
    "args, words",
    [
        (["--bench", "gsm9k"], "neither a known benchmark (gsm8k, math500, aime22, aime23, aime24)"),
        (
            ["--bench", "BENCH", "--samples", "2", "--k", "1,4", "--temperature", "1"],
            "--k 4 is larger than --samples 2",
        ),
        (["--bench", "BENCH", "--k", "2"], "--k 2 is larger than the 1 samples per problem of tiny"),
        (["--bench", "BENCH", "--k", "one"], "--k 'one': expected comma-separated int values"),
        (["--bench", "BENCH", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--bench", "NOANSWER"], "row 1 has no `answer` field"),
    ],
)
def test_eval_command_errors(model_dir, greedy_file, tmp_path, write_jsonl, args, words):
    noanswer = write_jsonl(tmp_path / "na.jsonl", [{"problem": "what is two plus three", "solution": "5"}])
    args = [str(greedy_file) if a == "BENCH" else str(noanswer) if a == "NOANSWER" else a for a in args]
    r = run("--model", str(model_dir), *args, "-o", str(tmp_path / "r.json"))
    assert r.exit_code == 1, r.output
    assert words in r.output and "Traceback" not in r.output


def test_eval_command_on_the_synthetic_heldout_split(model_dir, tmp_path):
    # The bigram machine knows no digits: every response is "hmm", which the number scorer grades 0;
    # what is checked is that the held-out problems, their golds and the scorer reach the report.
    from loraforge.tasks.synthetic import synthetic_rows

    spec = "synthetic:level=1-3,n=6,split=heldout"
    out = tmp_path / "heldout.json"
    r = run(
        "--model", str(model_dir), "--bench", spec, "--scorer", "number", "--prompt-template", "raw", "-o", str(out)
    )
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    res = report["benchmarks"][spec]
    assert report["scorer"] == "number" and res["metrics"][0]["score"] == 0.0
    samples = [json.loads(x) for x in (tmp_path / "heldout.samples.jsonl").read_text().splitlines()]
    assert [s["gold"] for s in samples] == [row["answer"] for row in synthetic_rows(n=6, level=(1, 3), split="heldout")]
    assert not any(s["correct"] for s in samples)


def test_eval_greedy_rides_along_with_sampling(model_dir, greedy_file, tmp_path):
    # The greedy response decoded in the sampling pass scores what a greedy run scores (3 of 5, as in
    # test_eval_command_end_to_end); the 4 samples per problem are counted apart from it.
    out = tmp_path / "both.json"
    r = run(
        "--model",
        str(model_dir),
        "--bench",
        str(greedy_file),
        "--prompt-template",
        "raw",
        "--max-new-tokens",
        "4",
        "--samples",
        "4",
        "--temperature",
        "1",
        "--greedy",
        "-o",
        str(out),
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["benchmarks"]["tiny"]
    metrics = {m["metric"]: m for m in res["metrics"]}
    assert metrics["greedy"]["score"] == pytest.approx(0.6) and metrics["greedy"]["n"] == 1
    assert set(metrics) == {"pass@1", "pass@4", "mean@4", "greedy"}
    assert res["counts"]["samples"] == 20 and sum(res["counts"]["greedy_correct_per_problem"][0]) == 3
    samples = [json.loads(x) for x in (tmp_path / "both.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 25 and sum(s["greedy"] for s in samples) == 5
    sampled_correct = sum(s["correct"] for s in samples if not s["greedy"])
    assert res["counts"]["correct"] == sampled_correct
    assert metrics["mean@4"]["score"] == pytest.approx(sampled_correct / 20)


def test_greedy_with_temperature_zero_is_refused(model_dir, greedy_file, tmp_path):
    r = run("--model", str(model_dir), "--bench", str(greedy_file), "--greedy", "-o", str(tmp_path / "r.json"))
    assert r.exit_code == 1 and "drop --greedy, or sample with --temperature > 0" in r.output


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_eval_refuses_an_adapter_with_a_non_finite_factor(model_dir, greedy_file, tmp_path, value):
    """A B = 0 adapter with one NaN in lora_A: B (A x) is 0 * NaN = NaN, every logit NaN, and every sampled token
    the vocabulary's last; eval scored that 0 and wrote the report, exit 0. Now the one tensor check
    (adapters/writers) runs on the loaded factors: one line naming the tensor, and no report."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    adir = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(adir))
    tensors = load_file(adir / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key][1, 3] = value
    save_file(tensors, adir / "adapter_model.safetensors")
    out = tmp_path / "report.json"
    r = run("--model", str(model_dir), "--adapter", str(adir), "--bench", str(greedy_file), "-o", str(out))
    errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]  # progress lines aside
    assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "non-finite value(s) (NaN or inf), the first at row 1, column 3" in errors[0] and "lora_A" in errors[0]
    assert not out.exists() and not (tmp_path / "report.samples.jsonl").exists()
