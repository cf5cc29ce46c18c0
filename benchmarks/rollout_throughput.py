"""Rollout and update throughput of `loraforge train`'s engines: tokens/s of generation with the
transformers rollout (and vLLM on a CUDA machine when vllm is installed) and of the training update,
on a randomly initialised model with a real model's shapes and a LoRA r=16 adapter on all linear layers.

    python benchmarks/rollout_throughput.py                       # CPU: SmolLM2-135M shapes, small settings
    python benchmarks/rollout_throughput.py --write               # ... and record it in benchmarks/RESULTS.md
    python benchmarks/rollout_throughput.py --device cuda --write # GPU: transformers vs vLLM (at most --time-limit s)

Rollout: P prompts of --prompt-tokens random tokens, G samples each, exactly --new-tokens new tokens
(EOS is masked out so every row runs to the limit and the counts are comparable); tokens/s counts
generated tokens only. Update: one forward + backward of the trainer's log-prob computation over the same
rows in micro-batches of --micro-batch rows (the work of one PPO mini-batch), response tokens per second.
vLLM: LLM(enable_lora=True) with the adapter as a LoRARequest (a new id per sync, as --rollout vllm does);
the first generate after a sync is timed separately ("sync + first call"), then --repeats timed calls.
Nothing is downloaded: weights are random, prompts are token ids.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))
import report  # noqa: E402

SECTION = "## Rollout throughput"
SHAPES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": dict(
        arch="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen2.5-1.5B-Instruct (the paper's 1.5B runs use DeepSeek-R1-Distill-Qwen-1.5B, same shapes)
    "qwen2.5-1.5b": dict(
        arch="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StubTokenizer:
    """What loraforge.sampling.generation needs from a tokenizer when prompts are token ids."""

    pad_token_id = 0
    eos_token_id = None  # no EOS: every row runs to --new-tokens

    def decode(self, ids, skip_special_tokens=True):
        return ""


def build_model(shape: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    cls, cfg_cls = (LlamaForCausalLM, LlamaConfig) if arch == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    torch.manual_seed(0)
    cfg = cfg_cls(**spec, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with torch.device(device):  # initialise in place (a 1.5B model initialised on CPU takes minutes)
        return cls(cfg).to(dtype=dtype).eval()


def add_lora(model, r: int = 16, alpha: int = 32):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():  # a trained-looking adapter (B != 0), so the LoRA path really computes
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    return peft


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_transformers(model, prompts, G, L, micro, repeats, device):
    from loraforge.rl.policy import response_logprobs
    from loraforge.sampling.generation import SamplingParams, generate

    tok = StubTokenizer()
    params = SamplingParams(n=G, max_new_tokens=L, temperature=1.0)
    model.generation_config.eos_token_id = None  # run every row to L tokens
    gen = torch.Generator(device=device).manual_seed(0)
    generate(model, tok, [p[:8] for p in prompts[:1]], SamplingParams(n=1, max_new_tokens=2), generator=gen)  # warm-up
    roll = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = generate(model, tok, prompts, params, generator=gen)
        _sync(device)
        roll.append((sum(out.lengths), time.perf_counter() - t))
    # update: log-probs + backward over the same rows, micro-batch by micro-batch
    trainable = [p for p in model.parameters() if p.requires_grad]
    upd = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        tokens = 0
        for i in range(0, out.response_ids.shape[0], micro):
            batch = {
                "prompt_ids": out.prompt_ids[i : i + micro],
                "prompt_mask": out.prompt_mask[i : i + micro],
                "response_ids": out.response_ids[i : i + micro],
                "response_mask": out.response_mask[i : i + micro],
            }
            logp, _ = response_logprobs(model, batch, 1.0)
            mask = batch["response_mask"].to(logp.device)
            (-(logp * mask).sum() / mask.sum()).backward()
            tokens += int(mask.sum())
        _sync(device)
        upd.append((tokens, time.perf_counter() - t))
        for p in trainable:
            p.grad = None
    return roll, upd


def bench_vllm(model, base_dir: Path, prompts, G, L, repeats, dtype_name, gpu_memory):
    from vllm import LLM
    from vllm import SamplingParams as VSampling
    from vllm.lora.request import LoRARequest

    tmp = base_dir.parent
    llm = LLM(
        model=str(base_dir),
        skip_tokenizer_init=True,
        enable_lora=True,
        max_lora_rank=16,
        max_loras=1,
        dtype=dtype_name,
        gpu_memory_utilization=gpu_memory,
        seed=0,
        max_model_len=max(len(p) for p in prompts) + L + 8,
    )
    sp = VSampling(n=G, temperature=1.0, max_tokens=L, ignore_eos=True, detokenize=False, logprobs=0)
    batch = [{"prompt_token_ids": p} for p in prompts]
    t = time.perf_counter()
    model.save_pretrained(str(tmp / "adapter_v2"))  # an adapter-only sync, as --rollout vllm does each step
    req = LoRARequest("bench-v2", 2, str(tmp / "adapter_v2"))
    llm.generate(batch, sp, lora_request=req, use_tqdm=False)
    first = time.perf_counter() - t
    roll = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.generate(batch, sp, lora_request=req, use_tqdm=False)
        roll.append((sum(len(c.token_ids) for o in outs for c in o.outputs), time.perf_counter() - t))
    return roll, first


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, {torch.get_num_threads()} threads"


def rate(pairs) -> tuple[float, float]:
    """(mean tokens/s over repeats, mean seconds)."""
    tps = [n / s for n, s in pairs]
    return sum(tps) / len(tps), sum(s for _, s in pairs) / len(pairs)


def write_results(path: Path, rows: list[dict], header: str) -> None:
    """Merge this run's rows into the section's table in place: a row of the same (device, engine, shape,
    settings) is replaced, other rows are kept, and so are the section's notes after the table and the
    sections around it. A file without the section gets it at the end."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    cols = ["date", "device", "engine", "part", "shape", "P x G x new (prompt)", "tokens/s", "s/call", "load avg"]
    old_rows: list[list[str]] = []
    notes = ""
    before, after = text.rstrip("\n") + "\n\n", ""
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        end = nxt + 1 if nxt >= 0 else len(text)
        lines = text[start:end].splitlines()
        table_lines = [i for i, line in enumerate(lines) if line.startswith("|")]
        for i in table_lines:
            cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            if len(cells) == len(cols) and cells[0] not in ("date", "---"):
                old_rows.append(cells)
        if table_lines:
            notes = "\n".join(lines[table_lines[-1] + 1 :]).strip("\n")
        before, after = text[:start], text[end:]
    new = [[r[c] for c in cols] for r in rows]
    keys = {tuple(r[1:6]) for r in new}
    kept = [r for r in old_rows if tuple(r[1:6]) not in keys]
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
        "| " + " | ".join(r) + " |" for r in kept + new
    ]
    section = f"{SECTION}\n\n{header}\n\n" + "\n".join(table) + "\n" + (f"\n{notes}\n" if notes else "")
    path.write_text(before + section + (f"\n{after}" if after else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="default: smollm2-135m on CPU, qwen2.5-1.5b on CUDA"
    )
    ap.add_argument("--prompts", type=int, default=None, help="P (default 2 on CPU, 32 on CUDA)")
    ap.add_argument("--group-size", type=int, default=None, help="G (default 4 on CPU, 8 on CUDA)")
    ap.add_argument(
        "--new-tokens", type=int, default=None, help="new tokens per sample (default 32 on CPU, 256 on CUDA)"
    )
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default 32 on CPU, 256 on CUDA)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on CPU (default 1: on a shared machine, threads that wait for busy cores "
        "made generation 30x slower in our measurements)",
    )
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM even when it is installed")
    ap.add_argument("--vllm-gpu-memory", type=float, default=0.5)
    ap.add_argument("--time-limit", type=float, default=480, help="skip the parts that would start after this many s")
    ap.add_argument(
        "--write",
        nargs="?",
        const=str(ROOT / "benchmarks" / "RESULTS.md"),
        default=None,
        help="record the figures in this markdown file (default benchmarks/RESULTS.md)",
    )
    ap.add_argument("--json", default=None, help="also write the raw figures as JSON here")
    a = ap.parse_args(argv)
    out_json = report.ResultFile(a.json) if a.json else None  # a taken or unwritable path: refused before the runs
    cuda = a.device.startswith("cuda")
    shape = a.shape or ("qwen2.5-1.5b" if cuda else "smollm2-135m")
    P = a.prompts or (32 if cuda else 2)
    G = a.group_size or (8 if cuda else 4)
    L = a.new_tokens or (256 if cuda else 32)
    PL = a.prompt_tokens or (256 if cuda else 32)
    dtype_name = a.dtype or ("bfloat16" if cuda else "float32")
    if a.threads or not cuda:
        torch.set_num_threads(a.threads or 1)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU"
    mach = machine()
    print(
        f"device: {device_name} ({mach}); shape {shape}, P {P} x G {G} x {L} new tokens, prompt {PL}, {dtype_name}",
        flush=True,
    )

    base = build_model(shape, getattr(torch, dtype_name), a.device)
    want_vllm = cuda and not a.no_vllm
    if want_vllm:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vllm is not installed: pip install -e '.[vllm]' to compare", flush=True)
            want_vllm = False
    base_dir = None
    if want_vllm:  # vLLM loads the base from a directory: save it before the LoRA layers are injected
        base_dir = Path(tempfile.mkdtemp(prefix="lf-vllm-bench-")) / "base"
        base.save_pretrained(str(base_dir))
    model = add_lora(base)
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[shape]["vocab_size"]
    prompts = [torch.randint(2, vocab, (PL,), generator=g).tolist() for _ in range(P)]
    results, rows = {}, []
    date = time.strftime("%Y-%m-%d")
    setting = f"{P} x {G} x {L} ({PL})"

    def row(engine, part, tps, secs):
        la = os.getloadavg()
        threads = torch.get_num_threads()
        cpu_label = f"CPU ({os.cpu_count()} cores, {threads} thread{'s' if threads > 1 else ''})"
        rows.append(
            {
                "date": date,
                "device": device_name if cuda else cpu_label,
                "engine": engine,
                "part": part,
                "shape": shape,
                "P x G x new (prompt)": setting,
                "tokens/s": f"{tps:.1f}",
                "s/call": f"{secs:.2f}",
                "load avg": f"{la[0]:.2f}",
            }
        )
        print(f"{engine:>12} {part:<20} {tps:10.1f} tokens/s   {secs:.2f} s/call   (load avg {la[0]:.2f})", flush=True)

    roll, upd = bench_transformers(model, prompts, G, L, a.micro_batch, a.repeats, a.device)
    results["transformers"] = {"rollout": roll, "update": upd}
    row("transformers", "rollout", *rate(roll))
    row("transformers", "update (fwd+bwd)", *rate(upd))
    if want_vllm:
        if time.perf_counter() - t_start > a.time_limit * 0.5:
            print("skipping vLLM: the time limit is near", flush=True)
        else:
            model.to("cpu")  # leave the GPU to vLLM
            torch.cuda.empty_cache()
            vroll, first = bench_vllm(model, base_dir, prompts, G, L, a.repeats, dtype_name, a.vllm_gpu_memory)
            results["vllm"] = {"rollout": vroll, "sync_and_first_call_s": first}
            row("vllm", "rollout", *rate(vroll))
            row("vllm", "adapter sync + 1st", P * G * L / first, first)
    load1 = os.getloadavg()
    print(f"load average {load0[0]:.2f} -> {load1[0]:.2f}; {time.perf_counter() - t_start:.0f} s in all", flush=True)
    if out_json:
        out_json.write(
            {
                "device": device_name,
                "machine": mach,
                "shape": shape,
                "P": P,
                "G": G,
                "new_tokens": L,
                "prompt_tokens": PL,
                "dtype": dtype_name,
                "results": results,
                "loadavg": [load0, load1],
            }
        )
    if a.write:
        header = (
            "`python benchmarks/rollout_throughput.py [--device cuda] --write`: random weights with the named model's "
            "shapes, LoRA r=16 on all linear layers, rows run to the full length (EOS masked). Rollout = generated "
            "tokens/s (loraforge.sampling.generation, or vLLM with the adapter as a LoRARequest); update = response "
            "tokens/s of one forward+backward of the trainer's log-probs in micro-batches of 8 rows. Mean over the "
            "repeats after a warm-up. Load average: 1-minute, at the end of the part; above the core count it means "
            "other jobs shared the CPU, and the CPU figures are then lower bounds. Update tokens/s counts response "
            f"tokens; the prompt tokens are computed too. Machine of the latest run: {mach}."
        )
        write_results(Path(a.write), rows, header)
        print(f"recorded in {a.write}", flush=True)


if __name__ == "__main__":
    main()
