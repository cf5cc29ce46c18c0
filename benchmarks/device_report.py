"""The device check's figures as a section of benchmarks/RESULTS.md: `python benchmarks/device_report.py DIR`
reads DIR's gpu_init.json, gpu_determinism.json, train_smoke.json and train_vllm.json (whichever exist) and prints
Markdown naming the device, the versions and the commit. device_check.sh writes it to DIR/device_check.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def init_section(g: dict) -> list[str]:
    m = g.get("machine", {})
    cuda, versions = m.get("cuda") or {}, m.get("versions") or {}
    gpus = " + ".join(cuda.get("devices", [])) or f"none (device {g['device']})"
    ck = g.get("checkpoint", {})
    lines = [
        f"### GPU: {gpus}: {g['preset']} shapes, pretrained-like spectrum (bf16, "
        f"{fmt(ck.get('bytes', 0) / 2**30)} GiB), r = {g['r']}",
        "",
        f"device_check.sh, loraforge {m.get('loraforge_commit') or '(commit: see the log)'}, torch "
        f"{versions.get('torch')} (CUDA {cuda.get('torch_cuda')}), transformers {versions.get('transformers')}, "
        f"peft {versions.get('peft')}; {m.get('cpu_count')} CPUs, load {m.get('load_avg')}. "
        "Cold: the shards' page cache dropped (posix_fadvise) just before; the share still resident is shown "
        "(a VM's host may cache the disk too). Each method's two runs share one process (imports and CUDA "
        "warm-up excluded, reported beside).",
        "",
        "| method | cold s (resident at start) | warm s | GPU peak GiB, warm (per device) | peak RSS GiB | "
        "imports + CUDA warm-up s | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, res in g.get("results", {}).items():
        if method == "like_with_like":
            continue
        if "missing" in res:
            lines.append(f"| {method} | {res['missing'][:80]} | | | | | |")
            continue
        cold, warm = res.get("cold", {}), res.get("warm", {})
        per = ", ".join(fmt(x, ".2f") for x in warm.get("gpu_peak_alloc_gib_per_device", []))
        goal = res.get("goal", "")
        if goal:
            goal += ": met" if res.get("goal_met") else ": NOT met"
        lines.append(
            f"| {method} | {fmt(cold.get('wall_s'))} ({fmt(cold.get('page_cache_resident_at_start'), '.0%')}) | "
            f"{fmt(warm.get('wall_s'))} | {fmt(warm.get('gpu_peak_alloc_gib'), '.2f')} ({per}) | "
            f"{fmt(res.get('peak_rss_gib'), '.2f')} | {fmt(res.get('imports_s'))} + {fmt(res.get('cuda_warmup_s'))} | "
            f"{goal} |"
        )
    lw = g.get("results", {}).get("like_with_like")
    if lw:
        ph = lw["peft_phases_s"]
        lines += [
            "",
            f"Like with like, first {lw['blocks']} blocks, {lw['both_write']} written on both sides, end to end in "
            f"fresh processes: PEFT pissa {fmt(lw['peft_pissa_s'])} s (load {fmt(ph['load_s'])}, init "
            f"{fmt(ph['init_s'])}, save {fmt(ph['save_s'])}), loraforge pissa {fmt(lw['loraforge_pissa_s'])} s: "
            f"{fmt(lw['x_faster'])}x. PEFT's init extrapolated to all blocks: "
            f"{fmt(lw['peft_init_s_extrapolated_to_all_blocks'])} s.",
        ]
    return lines


def determinism_section(d: dict) -> list[str]:
    lines = ["", f"Determinism ({Path(d['model']).name}, r = 32, device {d['device']}), against batch-mib 512:"]
    for method, rows in d["methods"].items():
        parts = []
        for label, row in rows.items():
            if "identical" not in row:
                continue
            diff = ", ".join(f"{f} max |diff| {v:.1e}" for f, v in row.get("max_abs_diff", {}).items())
            parts.append(f"batch-mib {label}: {'byte-identical' if row['identical'] else 'differs (' + diff + ')'}")
        lines.append(f"- {method}: " + "; ".join(parts))
    v = d.get("verify_on_cpu")
    if v:
        bad = [k for k, s in v["checks"].items() if s.startswith("FAILED")]
        lines.append(
            f"- `verify --device cpu` of the pissa adapter: {'ok' if v['ok'] else 'FAILED: ' + ', '.join(bad)}"
        )
    return lines


def train_line(name: str, t: dict | None) -> str:
    if t is None:
        return f"- {name}: not run"
    if "skipped" in t:
        return f"- {name}: skipped ({t['skipped']})"
    if "train" not in t:
        init = t.get("init", {})
        why = "timed out" if init.get("timed_out") else f"rc {init.get('rc')}: {init.get('tail', '')[-300:]!r}"
        return f"- {name}: FAILED at `loraforge init` ({why})"
    tr = t["train"]
    last = (t.get("metrics") or [{}])[-1]
    keys = [k for k in ("reward", "grad_norm", "ppo_kl", "sampler_logp_diff") if k in last]
    got = ", ".join(f"{k} {last[k]:.3g}" for k in keys if isinstance(last[k], (int, float)))
    status = "ok" if t.get("ok") else f"FAILED (rc {tr.get('rc')}): {tr.get('tail', '')[-300:]!r}"
    return f"- {name}: {status}, {t.get('steps_logged', 0)} steps in {fmt(tr.get('wall_s'))} s; last step {got}"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="the device check's output directory ($OUT of device_check.sh)")
    out = Path(p.parse_args(argv).dir)
    if not out.is_dir():
        p.error(f"{out} is not a directory; expected the directory device_check.sh wrote its JSON files to")
    lines = []
    g = load(out / "gpu_init.json")
    lines += init_section(g) if g else ["### GPU: gpu_init.json missing"]
    d = load(out / "gpu_determinism.json")
    lines += determinism_section(d) if d else ["", "Determinism: not run"]
    lines += ["", "Train:"]
    lines.append(train_line("2 steps on the device in bf16 (tiny model)", load(out / "train_smoke.json")))
    lines.append(train_line("--rollout vllm, 2 steps", load(out / "train_vllm.json")))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
