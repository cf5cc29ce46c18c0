"""A 2-step `loraforge train` on a device, end to end through the CLI: a tiny random Llama with a character
tokenizer is written, a LoRA-RLPO adapter made for it by `loraforge init`, and trained for --steps on the synthetic
task (`--rollout transformers`, or `--rollout vllm` when vLLM imports). It checks the CUDA path runs (bf16 weights
on the GPU, sampling, the loss, the optimizer, a checkpoint), not speed: the model is tiny.

    python benchmarks/gpu_train_smoke.py --device cuda --dtype bfloat16 [--rollout vllm] --json F
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
import processes  # noqa: E402
import report  # noqa: E402

CHARS = list("0123456789+-*=: ")


def write_tiny_model(dest: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A random Llama (hidden 64) and a character tokenizer (<pad> 0, <eos> 1, <unk> 2, then CHARS)."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(dest))
    fast.save_pretrained(str(dest))
    return dest


def cli(*args: str, timeout: float) -> dict:
    res = processes.run_measured([sys.executable, "-m", "loraforge", *args], timeout=timeout)
    return {
        "rc": res["rc"],
        "wall_s": res["wall_s"],
        "timed_out": res["timed_out"],
        "tail": processes.tail(res["stderr"] + res["stdout"], 1500),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rollout", default="transformers")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=240)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = report.ResultFile(args.json) if args.json else None  # a taken or unwritable path: refused now
    machine.ensure_loraforge_importable()
    started = time.perf_counter()
    result = {"benchmark": "gpu_train_smoke", "args": vars(args)}
    if args.rollout == "vllm":
        probe = subprocess.run(
            [sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
        )
        if probe.returncode != 0:
            result["skipped"] = "vllm does not import here: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
            print(result["skipped"])
            return _done(result, out)
        result["vllm"] = probe.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="lf-train-smoke-") as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "model")
        left = lambda: args.timeout_s - (time.perf_counter() - started)  # noqa: E731
        result["init"] = cli(
            "init",
            str(model),
            "--method",
            "rlpo",
            "-r",
            "4",
            "--device",
            args.device,
            "-o",
            str(tmp / "adapter"),
            timeout=left(),
        )
        if result["init"]["rc"] == 0:
            run = tmp / "run"
            result["train"] = cli(
                "train", "--model", str(model), "--adapter", str(tmp / "adapter"), "-o", str(run),
                "--data", "synthetic:n=60,max=2,style=bare", "--reward", "number", "--prompt-batch", "4",
                "--mini-batch", "2", "--group-size", "4", "--max-response-length", "4", "--overlong-buffer", "0",
                "--no-dynamic-sampling",
                "--steps", str(args.steps), "--save-every", "1", "--device", args.device, "--dtype", args.dtype,
                "--rollout", args.rollout, "--vllm-gpu-memory", "0.3", "--no-tensorboard", timeout=left(),
            )  # fmt: skip
            metrics = run / "metrics.jsonl"
            rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
            result["steps_logged"] = len(rows)
            result["metrics"] = rows
            result["ok"] = result["train"]["rc"] == 0 and len(rows) == args.steps
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2, default=str))
    return _done(result, out)


def _done(result: dict, out: report.ResultFile | None) -> int:
    if out:
        out.write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
