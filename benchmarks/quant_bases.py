"""Quantized (4-bit) bases per method: weight error, logit error, subspace overlap, train-step memory.

What is measured, on one model (SmolLM2-135M-Instruct from a directory, or a RANDOM checkpoint with
Qwen2.5 shapes from checkpoints.py: random weights do not have pretrained spectra, so its numbers say
what the shapes do, not what a pretrained 1.5B does):

- weights: for each method, `loraforge init` writes the adapter (r 16 by default); for every target
  module, the relative error ||Q(base) + s B0 A0 - W||_F / ||W||_F, where base is W for B0 = 0
  methods and the residual base for pissa, milora, olora, olora-tail, and Q is the quantization
  `train --quantize` loads the base with (loraforge.models.quantize.quantize_dequantize: bitsandbytes'
  own functions). Max and median over modules. With --quant-aware also the adapters `loraforge init
  --quantize` writes.
- logits: the same adapters through PEFT on the base loaded with transformers' BitsAndBytesConfig
  (float32 compute), against the original float32 model: the relative error of centred logits
  (ship.client_check.logit_error) on 4 x 32 fixed random tokens, max over positions.
- overlap: for every target module, the principal angles between the top-r (rlpo) and bottom-r nonzero
  (rlmo) right singular subspaces of W and of Q(W) (float64 SVDs, torch.linalg.svd): the mean cos^2
  (= ||V_W^T V_Q||_F^2 / r, 1 = the same subspace, r/n = a random one) and the smallest cos.
- memory: a 1-step `loraforge train` run (rlpo adapter, 2 prompts x 4, 16 response tokens), each in a fresh
  process: RSS once the policy is loaded, and the peak RSS of the training step alone (VmHWM reset after loading),
  --dtype float32 / bfloat16 against --quantize nf4 (with float32 or bfloat16 for the rest). CPU: RSS, not GPU
  memory; it counts the mapped checkpoint pages too.

    python benchmarks/quant_bases.py --model models/SmolLM2-135M-Instruct
    python benchmarks/quant_bases.py --preset qwen2.5-1.5b --layers 4
    python benchmarks/quant_bases.py --preset tiny --parts weights,overlap     # seconds: checks the script
    python benchmarks/quant_bases.py --table benchmarks/results/quant_bases-smollm2.json   # markdown tables
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402

PARTS = ("weights", "logits", "overlap", "memory")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a local checkpoint directory (e.g. SmolLM2-135M-Instruct)")
    p.add_argument("--preset", default=None, choices=list(checkpoints.QWEN2_PRESETS), help="random Qwen2.5 shapes")
    p.add_argument("--layers", type=int, default=None, help="blocks of the random checkpoint [preset's]")
    p.add_argument("--tokenizer", default=None, help="tokenizer for the memory part of a random checkpoint")
    p.add_argument("--r", type=int, default=16, help="adapter rank [%(default)s]")
    p.add_argument("--quantize", default="nf4", help="nf4, fp4 or int8 [%(default)s]")
    p.add_argument("--methods", default="all", help="comma-separated loraforge methods [all]")
    p.add_argument("--quant-aware", action="store_true", help="also the adapters of `init --quantize`")
    p.add_argument(
        "--quant-aware-methods",
        default="rlpo,rlmo,pissa,olora",
        help="methods whose `init --quantize` differs from the plain init [%(default)s]",
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)} [all]")
    p.add_argument("--workdir", default=None, help="where adapters are written [a temporary directory]")
    p.add_argument("--json", default=None, help="results file [benchmarks/results/quant_bases-<time>.json]")
    return p.parse_args(argv)


def model_dir(args) -> Path:
    if args.model:
        return Path(args.model)
    if not args.preset:
        raise SystemExit("give --model DIR or --preset NAME")
    suffix = f"-L{args.layers}" if args.layers else ""
    path = Path(tempfile.gettempdir()) / "loraforge-bench" / f"{args.preset}{suffix}-random"
    checkpoints.write_random_checkpoint(path, args.preset, num_hidden_layers=args.layers)
    return path


def write_adapters(model: Path, methods, r: int, workdir: Path, quantize: str | None) -> dict[str, Path]:
    """`loraforge init` of every method (reused when already written with the same settings)."""
    from loraforge import InitConfig, init_adapter

    out = {}
    for method in methods:
        path = workdir / (f"{method}-{quantize}" if quantize else method)
        if not (path / "loraforge.json").exists():
            extra = {"quantize": quantize} if quantize else {}
            init_adapter(str(model), str(path), InitConfig(method=method, r=r, device="cpu", **extra))
        out[method] = path
    return out


def weight_errors(model: Path, adapter: Path, quantize: str) -> dict:
    """Per module ||Q(base) + s B0 A0 - W|| / ||W|| (for B0 = 0 methods: ||Q(W) - W|| / ||W||)."""
    from loraforge.adapters.directory import load_adapter
    from loraforge.models.quantize import quantize_dequantize
    from loraforge.models.weights import open_model_weights

    a = load_adapter(adapter)
    names = a.modules
    original = open_model_weights(str(model), names)
    base = open_model_weights(str(a.base_dir), names) if a.base_dir and a.base_dir.is_dir() else original
    rel = []
    for name in names:
        W = original.matrix(name)
        A, B = (t.double() for t in a.factors(name))
        stored = base.stored(name)
        Qb = quantize_dequantize(stored.T if base.targets[name].transposed else stored, quantize).double()
        rel.append(float((Qb + a.scaling * (B @ A) - W).norm() / W.norm()))
    return {"max": max(rel), "median": statistics.median(rel), "modules": len(rel), "per_module": rel}


PROBE_TEXT = [
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Answer: 72",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "def add(a, b):\n    return a + b\n\nprint(add(17, 25))  # prints 42",
    "Let x be a real number such that 3x + 5 = 20. Then 3x = 15, so x = 5. Answer: 5",
]


def probe(model: Path, vocab: int):
    """Token ids to compare logits on: PROBE_TEXT through the model's tokenizer (4 rows of 24 tokens), or
    seeded random ids when the checkpoint has no tokenizer (random checkpoints)."""
    import torch

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model))
        rows = [tok(t)["input_ids"][:24] for t in PROBE_TEXT]
        if min(len(r) for r in rows) == 24:
            return torch.tensor(rows)
    except (OSError, ValueError):
        pass
    return torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(0))


def reference_logits(model: Path):
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    tokens = probe(model, ref.config.vocab_size)
    with torch.no_grad():
        return tokens, ref(tokens).logits


def logit_errors(want, got) -> dict:
    """Per position: the relative error of the centred logits, and KL(original || quantized) of the
    next-token distributions (nats); medians and maxima over the 4 x 24 positions."""
    import torch

    ref = want.double() - want.double().mean(-1, keepdim=True)
    diff = got.double() - got.double().mean(-1, keepdim=True) - ref
    rel = (diff.norm(dim=-1) / ref.norm(dim=-1)).flatten()
    lp, lq = torch.log_softmax(want.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).flatten()
    return {
        "rel_median": float(rel.median()),
        "rel_max": float(rel.max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


def quantized_logit_error(adapter: Path | None, model: Path, quantize: str, tokens, want) -> dict:
    """PEFT's logits on the base loaded in QUANTIZE (adapter None: the bare quantized original)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.adapters.directory import load_adapter
    from loraforge.models.quantize import bnb_config

    base_dir = model
    if adapter is not None:
        a = load_adapter(adapter)
        base_dir = a.base_dir if a.base_dir and a.base_dir.is_dir() else model
    base = AutoModelForCausalLM.from_pretrained(
        str(base_dir),
        dtype=torch.float32,
        quantization_config=bnb_config(quantize, torch.float32),
        device_map={"": "cpu"},
    )
    net = base
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        got = net.eval()(tokens).logits
    return logit_errors(want, got)


def subspace_overlap(model: Path, names: list[str], quantize: str, r: int) -> dict:
    """Principal angles between W's and Q(W)'s top-r and bottom-r nonzero right singular subspaces."""
    import torch

    from loraforge.models.quantize import quantize_dequantize
    from loraforge.models.weights import open_model_weights

    weights = open_model_weights(str(model), names)
    keys = ("mean_cos2", "min_cos", "energy_ratio")
    rows = {side: {k: [] for k in keys} for side in ("top", "bottom")}
    rows["random"] = []
    for name in names:
        W = weights.matrix(name)
        Q = quantize_dequantize(W.to(weights.dtype(name)), quantize).double()
        Vw, Vq = _right_vectors(W), _right_vectors(Q)
        for side, sl in (("top", slice(0, r)), ("bottom", slice(-r, None))):
            cos = torch.linalg.svdvals(Vw[:, sl].T @ Vq[:, sl])
            rows[side]["mean_cos2"].append(float((cos**2).mean()))
            rows[side]["min_cos"].append(float(cos.min()))
            # energy of Q(W) on W's subspace against on its own: top <= 1 (1: W's top directions are Q(W)'s),
            # bottom >= 1 (1: W's minor directions are as minor for Q(W) as its own minor directions)
            rows[side]["energy_ratio"].append(float((Q @ Vw[:, sl]).norm() ** 2 / (Q @ Vq[:, sl]).norm() ** 2))
        rows["random"].append(r / W.shape[1])
    summary = {
        side: {f"{k}_{f.__name__}": f(rows[side][k]) for k in keys for f in (statistics.median, min, max)}
        for side in ("top", "bottom")
    }
    summary["random_subspace_mean_cos2_median"] = statistics.median(rows["random"])
    summary["modules"] = len(names)
    summary["per_module"] = {"names": list(names), **{k: rows[k] for k in ("top", "bottom")}}
    return summary


def _right_vectors(W):
    """V (n, k) of W's thin float64 SVD, restricted to its numerical rank k (as loraforge defines it)."""
    import torch

    _, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = int((S > max(W.shape) * torch.finfo(torch.float32).eps * S[0]).sum())
    return Vh[:k].T


def _status_mib() -> dict[str, float]:
    """VmRSS and VmHWM (the peak since start or since the last reset) of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) / 1024
    return out


def memory_worker(spec: dict) -> dict:
    """One `loraforge train` run of one step, in this (fresh) process: RSS once the policy is loaded, the peak while
    loading, and the peak of the training step alone (VmHWM reset through /proc/self/clear_refs after loading)."""
    from loraforge.rl.config import TrainConfig
    from loraforge.rl.trainer import Trainer

    marks: dict[str, float] = {}

    class Measured(Trainer):
        def setup(self):
            super().setup()
            st = _status_mib()
            marks.update(loaded_rss_mib=st["VmRSS"], load_peak_mib=st["VmHWM"])
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: what follows is the step's peak

    cfg = TrainConfig(
        model=spec["model"], adapter=spec["adapter"], tokenizer=spec.get("tokenizer"), data="synthetic:level=1-3",
        reward="number", output_dir=spec["out"], steps=1, prompt_batch=2, mini_batch=2, group_size=4,
        max_response_length=16, overlong_buffer=0, device="cpu", tensorboard=False, dynamic_sampling=False,
        dtype=spec["dtype"], quantize=spec.get("quantize"), save_every=0,
    )  # fmt: skip
    started = time.perf_counter()
    Measured(cfg, echo=lambda s: None).run()
    marks.update(step_peak_mib=_status_mib()["VmHWM"], seconds=time.perf_counter() - started)
    return marks


def memory_runs(model: Path, adapter: Path, tokenizer: str | None, workdir: Path, cases) -> dict:
    """memory_worker per (label, dtype, quantize) in CASES, each in a fresh process (peaks do not mix)."""
    import shutil
    import subprocess

    out = {}
    for label, dtype, quantize in cases:
        run_dir = workdir / f"train-{label}"
        shutil.rmtree(run_dir, ignore_errors=True)
        spec = dict(model=str(model), adapter=str(adapter), tokenizer=tokenizer, out=str(run_dir), dtype=dtype)
        spec["quantize"] = quantize
        cmd = [sys.executable, __file__, "--memory-worker", json.dumps(spec)]
        env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        out[label] = json.loads(lines[-1]) if res.returncode == 0 and lines else {"error": res.stderr[-2000:]}
        print(f"memory {label}: {out[label]}", flush=True)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-worker"]:
        machine.ensure_loraforge_importable()
        print(json.dumps(memory_worker(json.loads(argv[1]))), flush=True)
        return 0
    if argv[:1] == ["--table"]:
        print(markdown(json.loads(Path(argv[1]).read_text())))
        return 0
    args = parse_args(argv)
    out_json = report.ResultFile(args.json or f"benchmarks/results/quant_bases-{time.strftime('%Y%m%d-%H%M%S')}.json")
    machine.ensure_loraforge_importable()
    from loraforge.inits.methods import METHODS

    parts = [p for p in args.parts.split(",") if p]
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    model = model_dir(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lf-quant-"))
    results = {"machine": machine.machine_info(), "args": vars(args), "model": str(model), "started": time.time()}
    variants = [None] + ([args.quantize] if args.quant_aware else [])
    if "weights" in parts or "logits" in parts:
        weights_and_logits(args, parts, methods, model, workdir, variants, results)
    if "overlap" in parts:
        from loraforge.adapters.directory import load_adapter

        names = load_adapter(write_adapters(model, ["rlpo"], args.r, workdir, None)["rlpo"]).modules
        results["overlap"] = subspace_overlap(model, names, args.quantize, args.r)
        print("overlap", {k: v for k, v in results["overlap"].items() if k != "per_module"}, flush=True)
    if "memory" in parts:
        rlpo = write_adapters(model, ["rlpo"], args.r, workdir, None)["rlpo"]
        q = args.quantize
        cases = [("float32", "float32", None), ("bfloat16", "bfloat16", None)]
        cases += [(q, "float32", q), (f"{q}+bf16", "bfloat16", q)]  # label, --dtype, --quantize
        results["memory"] = memory_runs(model, rlpo, args.tokenizer, workdir, cases)
    results["finished"] = time.time()
    results["load_avg_end"] = list(os.getloadavg())
    path = out_json.write(results)
    print(f"wrote {path}")
    return 0


def weights_and_logits(args, parts, methods, model: Path, workdir: Path, variants, results: dict) -> None:
    """The weights and logits parts. B0 = 0 methods start from Q(W) itself (their base is W and s B0 A0 = 0), with or
    without --quantize: measured once, on the first of them, and reported for each."""
    from loraforge.inits.methods import METHODS

    aware = [m for m in args.quant_aware_methods.split(",") if m in methods]
    adapters = {v: write_adapters(model, aware if v else methods, args.r, workdir, v) for v in variants}
    results["weights"] = {str(v): {} for v in variants}
    if "logits" in parts:
        tokens, want = reference_logits(model)
        results["logits_plain"] = quantized_logit_error(None, model, args.quantize, tokens, want)
        results["logits"] = {str(v): {} for v in variants}
    plain = None  # Q(W) against W, per module
    for v in variants:
        for method, path in adapters[v].items():
            residual = METHODS[method].residual
            if "weights" in parts:
                if residual or plain is None:
                    errors = weight_errors(model, path, args.quantize)
                    plain = errors if not residual else plain
                results["weights"][str(v)][method] = errors if residual else plain
            if "logits" in parts:  # B0 = 0: the bare quantized original
                lg = quantized_logit_error(path, model, args.quantize, tokens, want) if residual else None
                results["logits"][str(v)][method] = lg or results["logits_plain"]
            print(method, v, _brief(results, str(v), method), flush=True)


def _brief(results: dict, variant: str, method: str) -> str:
    w = results.get("weights", {}).get(variant, {}).get(method)
    lg = results.get("logits", {}).get(variant, {}).get(method)
    parts = []
    if w:
        parts.append(f"weight rel err max {w['max']:.4f} median {w['median']:.4f}")
    if lg is not None:
        parts.append(f"logits rel median {lg['rel_median']:.4f} KL mean {lg['kl_mean']:.4f}")
    return json.dumps(parts)


def markdown(results: dict) -> str:
    """The tables docs/quantized.md shows, from a results file: per method, W vs Q(W) subspaces, memory."""
    out = []
    if "weights" in results:
        out += ["| method | `init` | weight error, median (max) | logit error, median (max) | KL nats, mean (max) |"]
        out += ["|---|---|---|---|---|"]
        for variant, methods in results["weights"].items():
            flag = "plain" if variant == "None" else f"`--quantize {variant}`"
            for method, w in methods.items():
                lg = results.get("logits", {}).get(variant, {}).get(method)
                cells = [f"{w['median']:.4f} ({w['max']:.4f})"]
                cells += (
                    [f"{lg['rel_median']:.3f} ({lg['rel_max']:.3f})", f"{lg['kl_mean']:.3f} ({lg['kl_max']:.3f})"]
                    if lg
                    else ["", ""]
                )
                out.append(f"| {method} | {flag} | " + " | ".join(cells) + " |")
    if "overlap" in results:
        ov = results["overlap"]
        out += [
            "",
            "| right singular subspace | mean cos^2, median (min to max) | min cos, median | energy ratio, median |",
        ]
        out += ["|---|---|---|---|"]
        for side in ("top", "bottom"):
            o = ov[side]
            c2 = f"{o['mean_cos2_median']:.3f} ({o['mean_cos2_min']:.3f} to {o['mean_cos2_max']:.3f})"
            out.append(f"| {side} | {c2} | {o['min_cos_median']:.3f} | {o['energy_ratio_median']:.3f} |")
        out.append(f"| a random subspace | {ov['random_subspace_mean_cos2_median']:.3f} | | |")
    if "memory" in results:
        out += ["", "| train step | RSS once loaded (MiB) | peak while loading | peak of the step | seconds |"]
        out += ["|---|---|---|---|---|"]
        for label, m in results["memory"].items():
            if "error" in m:
                out.append(f"| {label} | failed | | | |")
                continue
            row = (m["loaded_rss_mib"], m["load_peak_mib"], m["step_peak_mib"], m["seconds"])
            out.append(f"| {label} | {row[0]:.0f} | {row[1]:.0f} | {row[2]:.0f} | {row[3]:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
