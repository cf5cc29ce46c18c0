"""Init speed: loraforge vs PEFT, end to end from the checkpoint on disk to the files written.

What is measured, same checkpoint, same machine, runs alternating between cases
(round i runs the cases in order, round i+1 in reverse: A B B A ..., so drift hits all alike):

- in-process ("inproc"): one Python process, imports done once, --warmup runs of each case
  excluded. loraforge: `init_adapter(model, out, InitConfig(method, r, svd))`. PEFT:
  `from_pretrained(dtype as stored)` + `get_peft_model(LoraConfig(r, alpha=2r, all-linear,
  init_lora_weights=pissa | pissa_niter_16))` + `save_pretrained` of the adapter + `unload()` and
  `save_pretrained` of the residual base. Wall time (perf_counter), CPU time (process_time), and
  torch.cuda.max_memory_allocated when the decomposition runs on a GPU.
- whole process ("process"): what a user waits for, imports included: the `loraforge init`
  console script vs `python benchmarks/workers.py peft_init ...` (the PEFT code above), each a
  fresh process. Wall time, CPU time (user+sys) and peak RSS (ru_maxrss from wait4 = VmHWM, counting file pages mapped).
- captured energy of the fast path: for every --energy-every'th block and each of its target
  modules, ||W Q||_F^2 / ||W||_F^2 with Q an orthonormal basis of the row space of the adapter's A0
  (= V_r for rlpo; pissa's rows are V_r scaled, QR removes the scale), against the float64
  reference sum(s_1..s_r ^2) / ||W||_F^2 (torch.linalg.svdvals in float64). Reports the mean and
  max relative shortfall of loraforge `--svd fast` pissa, PEFT pissa_niter_16, and loraforge
  exact rlpo / pissa when they ran (exactness: the target is 1e-6).

Prints a table (median seconds, ratio vs PEFT pissa and vs PEFT pissa_niter_16, peak RSS), the
init speed targets (benchmarks/README.md) as PASS/FAIL, and writes every raw timing to a JSON file.

    python benchmarks/init_speed.py                                  # everything, 3 repeats
    python benchmarks/init_speed.py --repeats 1 --cases rlpo --quick  # a quick check
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402
import machine  # noqa: E402
import processes  # noqa: E402
import report  # noqa: E402
import workers  # noqa: E402

if TYPE_CHECKING:
    import torch

# what examples/quickstart.sh writes (`python -m loraforge.models.smollm2 models/SmolLM2-135M-Instruct` alone)
DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct")

# case name -> (side, settings)
CASES = {
    "pissa": ("loraforge", {"method": "pissa", "svd": "exact"}),
    "rlpo": ("loraforge", {"method": "rlpo", "svd": "exact"}),
    "rlmo": ("loraforge", {"method": "rlmo", "svd": "exact"}),
    "pissa-fast": ("loraforge", {"method": "pissa", "svd": "fast"}),
    "peft-pissa": ("peft", {"init": "pissa"}),
    "peft-pissa_niter_16": ("peft", {"init": "pissa_niter_16"}),
}
REF, REF_FAST = "peft-pissa", "peft-pissa_niter_16"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="local checkpoint directory (safetensors) [%(default)s]")
    p.add_argument("--r", type=int, default=32, help="adapter rank [%(default)s]")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case and mode [%(default)s]")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per case before timing (both modes) [%(default)s]"
    )
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma list of {', '.join(CASES)}; {REF} (and {REF_FAST} with pissa-fast) are added as references [all]",
    )
    p.add_argument("--modes", default="inproc,process", help="inproc, process or both [%(default)s]")
    p.add_argument("--device", default="auto", help="where decompositions run: auto (cuda if present), cpu, cuda")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="use a copy of the checkpoint truncated to its first N blocks (both sides), for quick checks",
    )
    p.add_argument("--quick", action="store_true", help="shorthand for --layers 4 --repeats 1 --warmup 0")
    p.add_argument(
        "--energy-every", type=int, default=5, help="energy check on every Nth block (0: skip) [%(default)s]"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (and OMP_NUM_THREADS of the children)")
    p.add_argument("--workdir", default=None, help="scratch directory for outputs [a temp dir]")
    p.add_argument("--json", default=None, help="raw results file [benchmarks/results/init_speed-<time>.json]")
    p.add_argument("--timeout", type=float, default=1800, help="per whole-process run, seconds [%(default)s]")
    args = p.parse_args(argv)
    if args.quick:
        args.layers = args.layers or 4
        args.repeats, args.warmup = 1, 0
    return args


def select_cases(spec: str) -> list[str]:
    cases = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if REF not in cases:
        cases.append(REF)
    if "pissa-fast" in cases and REF_FAST not in cases:
        cases.append(REF_FAST)
    return cases


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --------------------------------------------------------------------------- one run


def run_inproc(case: str, model: str, out: Path, r: int, device: str) -> dict:
    """One end-to-end run in this process; returns seconds, CPU seconds, GPU peak, phases."""
    import torch

    side, settings = CASES[case]
    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if side == "loraforge":
        phases = workers.loraforge_init(model, str(out), settings["method"], r, device, settings["svd"])
    else:
        phases = workers.peft_init(model, str(out), r, settings["init"], device)
    if cuda:
        torch.cuda.synchronize()
    rec = {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "phases": phases}
    if cuda:
        rec["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return rec


def process_command(case: str, model: str, out: Path, r: int, device: str) -> list[str]:
    """The command a user runs: `loraforge init ...`, or `python -c "<PEFT code>"`."""
    side, settings = CASES[case]
    if side == "loraforge":
        cmd = [
            *machine.loraforge_cli(),
            "init",
            model,
            "--method",
            settings["method"],
            "-r",
            str(r),
            "-o",
            str(out),
            "--device",
            device,
        ]
        return cmd + (["--svd", "fast"] if settings["svd"] == "fast" else [])
    return workers.command("peft_init", [model, str(out), r, settings["init"], device])


def run_process(case: str, model: str, out: Path, r: int, device: str, env: dict, timeout: float) -> dict:
    res = processes.run_measured(process_command(case, model, out, r, device), env=env, timeout=timeout)
    if res["rc"] != 0:
        raise RuntimeError(
            f"{case} failed (rc={res['rc']}, timed_out={res['timed_out']}):\n{processes.tail(res['stderr'])}"
        )
    return {
        "seconds": res["wall_s"],
        "cpu_s": res["cpu_s"],
        "peak_rss_mib": res["peak_rss_mib"],
        "sampled_peak_hwm_mib": res["sampled_peak_hwm_mib"],
        "sampled_peak_anon_mib": res["sampled_peak_anon_mib"],
        "sampled_peak_file_mib": res["sampled_peak_file_mib"],
    }


# --------------------------------------------------------------------------- alternation


def alternate(
    mode: str, cases: list[str], args, model: str, device: str, work: Path, env: dict, keep: dict[str, Path]
) -> list[dict]:
    """Warm-up rounds (excluded), then --repeats rounds; order reversed every other round.
    The last timed in-process output of each case is kept in KEEP for the energy check."""
    records = []
    total_rounds = args.warmup + args.repeats
    for rnd in range(total_rounds):
        order = cases if rnd % 2 == 0 else cases[::-1]
        warm = rnd < args.warmup
        for case in order:
            out = work / mode / f"{case}-{rnd}"
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            if mode == "inproc":
                rec = run_inproc(case, model, out, args.r, device)
            else:
                rec = run_process(case, model, out, args.r, device, env, args.timeout)
            rec.update(
                {
                    "mode": mode,
                    "case": case,
                    "round": rnd,
                    "warmup": warm,
                    "load_avg_1m": os.getloadavg()[0],
                    "loraforge_commit": machine.loraforge_commit(),
                }
            )
            records.append(rec)
            label = "warm-up" if warm else f"round {rnd - args.warmup + 1}/{args.repeats}"
            print(
                f"  [{mode} {label}] {case:<22} {rec['seconds']:8.2f} s"
                + (f"  rss {rec['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in rec else ""),
                flush=True,
            )
            if not warm and rnd == total_rounds - 1 and mode == "inproc":
                keep[case] = out
            else:
                shutil.rmtree(out, ignore_errors=True)
    return records


# --------------------------------------------------------------------------- energy


def _checkpoint_reader(model: str):
    """name -> tensor reader over a safetensors checkpoint (single file or sharded)."""
    from safetensors import safe_open

    handles = {}
    index = {}
    for f in sorted(Path(model).glob("*.safetensors")):
        h = safe_open(str(f), "pt")
        handles[f.name] = h
        index.update({k: h for k in h.keys()})
    return index


def _adapter_A(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.endswith(".lora_A.weight"):
            name = k[: -len(".lora_A.weight")]
            name = name[len("base_model.model.") :] if name.startswith("base_model.model.") else name
            out[name] = v
    return out


def captured_energy(model: str, adapters: dict[str, Path], r: int, every: int) -> dict:
    """Mean/max relative shortfall of captured energy of each adapter vs float64 SVD, on blocks
    0, EVERY, 2*EVERY, ... (see the module docstring)."""
    import torch

    weights = _checkpoint_reader(model)
    As = {label: _adapter_A(d) for label, d in adapters.items()}
    names = sorted(set.intersection(*(set(a) for a in As.values())))
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    chosen = [n for n in names if (m := layer_re.search(n)) is None or int(m.group(1)) % every == 0]
    per = {label: [] for label in adapters}
    ref_energy = []
    for name in chosen:
        key = name + ".weight"
        if key not in weights:
            continue
        W = weights[key].get_tensor(key).double()
        A0 = As[next(iter(As))][name]
        if W.shape[1] != A0.shape[1]:  # Conv1D layout
            W = W.T
        total = (W * W).sum()
        ref = (torch.linalg.svdvals(W)[:r] ** 2).sum() / total
        ref_energy.append(float(ref))
        for label, a in As.items():
            Q, _ = torch.linalg.qr(a[name].double().T)  # orthonormal basis of A0's row space
            e = (W @ Q).pow(2).sum() / total
            per[label].append(float((ref - e) / ref))
    summary = {
        "modules_checked": len(ref_energy),
        "blocks_every": every,
        "reference_energy_mean": sum(ref_energy) / max(len(ref_energy), 1),
        "modules_in_adapter": {label: len(a) for label, a in As.items()},
    }
    for label, xs in per.items():
        summary[label] = {"mean_rel_shortfall": sum(xs) / max(len(xs), 1), "max_rel_shortfall": max(xs, default=None)}
    return summary


def energy_step(args, model: str, device: str, work: Path, keep: dict[str, Path], cases: list[str]) -> dict | None:
    """Captured energy of pissa-fast vs PEFT pissa_niter_16 (+ exact rlpo/pissa if they ran).
    Reuses the last in-process outputs; makes missing ones once (untimed)."""
    if args.energy_every <= 0:
        return None
    wanted = ["pissa-fast", REF_FAST] + [c for c in ("rlpo", "pissa") if c in cases]
    for case in wanted:
        if case not in keep:
            out = work / "energy" / case
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"  [energy] making {case} once (untimed)", flush=True)
            run_inproc(case, model, out, args.r, device)
            keep[case] = out
    return captured_energy(model, {c: keep[c] for c in wanted}, args.r, args.energy_every)


# --------------------------------------------------------------------------- report


def summarise(records: list[dict], cases: list[str], modes: list[str]) -> list[dict]:
    rows = []
    for mode in modes:
        med = {}
        for case in cases:
            timed = [r for r in records if r["mode"] == mode and r["case"] == case and not r["warmup"]]
            if not timed:
                continue
            med[case] = report.median([r["seconds"] for r in timed])
            row = {
                "mode": mode,
                "case": case,
                "n": len(timed),
                "median_s": med[case],
                "min_s": min(r["seconds"] for r in timed),
                "median_cpu_s": report.median([r["cpu_s"] for r in timed]),
            }
            rss = [
                r["peak_rss_mib"] for r in records if r["mode"] == mode and r["case"] == case and "peak_rss_mib" in r
            ]
            row["peak_rss_mib"] = max(rss) if rss else None
            gpu = [r["gpu_peak_mib"] for r in timed if "gpu_peak_mib" in r]
            row["gpu_peak_mib"] = max(gpu) if gpu else None
            rows.append(row)
        for row in rows:
            if row["mode"] == mode:
                row["x_vs_peft_pissa"] = med[REF] / row["median_s"] if REF in med else None
                row["x_vs_peft_niter16"] = med[REF_FAST] / row["median_s"] if REF_FAST in med else None
    return rows


def check_targets(rows: list[dict], energy: dict | None) -> list[dict]:
    """The init speed targets (benchmarks/README.md), as read here: speed-ups are median(PEFT) /
    median(loraforge) on the same run; whole process: exact cases vs PEFT pissa, pissa-fast vs PEFT
    pissa_niter_16, <= 0.5x."""
    get = {(r["mode"], r["case"]): r for r in rows}
    out = []

    def add(name, value, ok):
        if value is not None:
            out.append({"target": name, "value": value, "pass": bool(ok)})

    for case, need in (("pissa", 3.0), ("rlpo", 3.0), ("rlmo", 2.0)):
        x = get.get(("inproc", case), {}).get("x_vs_peft_pissa")
        add(f"inproc {case} >= {need}x faster than PEFT pissa", x, x is not None and x >= need)
    x = get.get(("inproc", "pissa-fast"), {}).get("x_vs_peft_niter16")
    add("inproc pissa-fast >= 1x PEFT pissa_niter_16", x, x is not None and x >= 1.0)
    if energy and "pissa-fast" in energy and REF_FAST in energy:
        a, b = energy["pissa-fast"]["mean_rel_shortfall"], energy[REF_FAST]["mean_rel_shortfall"]
        add("pissa-fast energy shortfall < PEFT pissa_niter_16's", a, a < b)
    for case in ("rlpo", "pissa"):
        if energy and case in energy:
            v = energy[case]["max_rel_shortfall"]
            add(f"exact {case} energy within 1e-6 of float64 SVD", v, v is not None and abs(v) <= 1e-6)
    for case in ("pissa", "rlpo", "rlmo", "pissa-fast"):
        row = get.get(("process", case))
        ref, label = ("x_vs_peft_niter16", REF_FAST) if case == "pissa-fast" else ("x_vs_peft_pissa", REF)
        x = row.get(ref) if row else None
        add(f"process {case} at most half of {label}'s time (x >= 2)", x, x is not None and x >= 2.0)
    return out


def print_report(rows, energy, targets) -> None:
    def f(v, spec):
        return "" if v is None else format(v, spec)

    print("\n== init speed (median of timed runs; x = PEFT median / this median) ==")
    print(
        report.table(
            [
                [
                    r["mode"],
                    r["case"],
                    r["n"],
                    f(r["median_s"], ".2f"),
                    f(r["min_s"], ".2f"),
                    f(r["median_cpu_s"], ".1f"),
                    f(r["x_vs_peft_pissa"], ".2f"),
                    f(r["x_vs_peft_niter16"], ".2f"),
                    f(r["peak_rss_mib"], ".0f"),
                    f(r["gpu_peak_mib"], ".0f"),
                ]
                for r in rows
            ],
            [
                "mode",
                "case",
                "n",
                "median s",
                "min s",
                "cpu s",
                "x vs peft-pissa",
                "x vs peft-niter16",
                "peak RSS MiB",
                "GPU peak MiB",
            ],
        )
    )
    if energy:
        print(
            f"\n== captured energy, {energy['modules_checked']} modules (every {energy['blocks_every']}th block), "
            f"float64 reference mean {energy['reference_energy_mean']:.4f} =="
        )
        print(
            report.table(
                [
                    [k, f(v["mean_rel_shortfall"], ".3e"), f(v["max_rel_shortfall"], ".3e")]
                    for k, v in energy.items()
                    if isinstance(v, dict) and "mean_rel_shortfall" in v
                ],
                ["adapter", "mean rel shortfall", "max rel shortfall"],
            )
        )
    if targets:
        print("\n== init speed targets ==")
        for t in targets:
            print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']:.3g}")


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    default = Path(__file__).resolve().parent / "results" / f"init_speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_json = report.ResultFile(args.json or default)  # a taken or unwritable path: refused before the work
    machine.ensure_loraforge_importable()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # same for both sides; keeps the log readable
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)  # SciPy's BLAS (loraforge on CPU)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = select_cases(args.cases)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    device = resolve_device(args.device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lf-bench-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    model = str(Path(args.model).resolve())
    if args.layers:
        model = str(checkpoints.truncate_checkpoint(model, work / f"model-{args.layers}layers", args.layers))
        print(f"using {model} (first {args.layers} blocks)")

    t0 = time.perf_counter()
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import loraforge.adapters.build  # noqa: F401  (imports done once for the in-process mode)

    import_s = time.perf_counter() - t0
    info = machine.machine_info()
    print(
        f"{info['cpu_model']}, {info['cpu_affinity']} cores, torch {info['versions']['torch']} "
        f"({info['torch_threads']} threads), device {device}, load {info['load_avg'][0]:.1f}; "
        f"loraforge {info.get('loraforge_commit', '?')[:10]}{' (dirty)' if info.get('loraforge_dirty') else ''}"
    )
    print(f"model {model}, r={args.r}, cases {cases}, modes {modes}, repeats {args.repeats}, warmup {args.warmup}")

    env = dict(os.environ)
    keep: dict[str, Path] = {}
    records = []
    try:
        for mode in modes:
            print(f"-- {mode}", flush=True)
            records += alternate(mode, cases, args, model, device, work, env, keep)
        energy = energy_step(args, model, device, work, keep, cases)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    rows = summarise(records, cases, modes)
    targets = check_targets(rows, energy)
    print_report(rows, energy, targets)
    commits = sorted({r["loraforge_commit"] for r in records if r.get("loraforge_commit")})
    if len(commits) > 1:
        print(f"\nWARNING: loraforge changed during the run ({', '.join(commits)}): the numbers mix versions.")

    info["load_avg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "init_speed",
        "args": vars(args),
        "model": model,
        "device": device,
        "cases": cases,
        "machine": info,
        "inproc_import_s": import_s,
        "summary": rows,
        "energy": energy,
        "targets": targets,
        "runs": records,
    }
    path = out_json.write(result)
    print(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
