"""Which init outputs are byte-identical on this device, and how far the rest are: the same command twice, and the
same command under other batch plans (--batch-mib), for rlpo (top-r), rlmo (bottom-r) and pissa (top-r with a
residual base); then `verify --device cpu` of the pissa adapter (the CPU recomputes what the device made, within
verify's tolerances).

Plans (MiB): 512 (the default), 512 again (the same command twice), 1 (one matrix per batch nearly everywhere) and
8192 (whole groups of same-shaped matrices in one batch). Files compared: adapter_model.safetensors and the residual
base's shards; where they differ, the largest difference of any tensor is reported.

    python benchmarks/gpu_determinism.py --model DIR [--device cuda] [--force-gpu-backend] --json F
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
import report  # noqa: E402

PLANS = [("512", 512), ("512 again", 512), ("1", 1), ("8192", 8192)]


def digests(out: Path) -> dict[str, str]:
    files = [out / "adapter_model.safetensors", *sorted((out / "base").glob("*.safetensors"))]
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def max_difference(a: Path, b: Path) -> float:
    """The largest |a - b| over every tensor of two safetensors files with the same keys."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta) if ta else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", default="rlpo,rlmo,pissa")
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--force-gpu-backend", action="store_true", help="the GPU path's code on any device")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out_json = report.ResultFile(args.json) if args.json else None  # a taken or unwritable path: refused now
    machine.ensure_loraforge_importable()
    import torch

    from loraforge import InitConfig, init_adapter

    if args.force_gpu_backend:
        from loraforge.inits import linalg

        linalg._backend = lambda X: linalg._TorchBackend
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    work = Path(tempfile.mkdtemp(prefix="lf-determinism-"))
    result = {"benchmark": "gpu_determinism", "device": device, "model": args.model, "methods": {}}
    result["gpu"] = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    for method in args.methods.split(","):
        rows, ref = {}, None
        for label, mib in PLANS:
            out = work / f"{method}-{label.replace(' ', '-')}"
            t0 = time.perf_counter()
            init_adapter(args.model, out, InitConfig(method=method, r=args.r, device=device, batch_mib=mib))
            row = {"batch_mib": mib, "wall_s": time.perf_counter() - t0, "digests": digests(out)}
            if ref is None:
                ref = out
            else:
                same = {f: row["digests"][f] == d for f, d in digests(ref).items()}
                row["identical"] = all(same.values())
                row["max_abs_diff"] = {f: max_difference(ref / f, out / f) for f, ok in same.items() if not ok}
            rows[label] = row
            print(f"[{method} batch-mib {label}] {row.get('identical', 'reference')} {row.get('max_abs_diff', '')}")
        result["methods"][method] = rows
        save(result, out_json)  # after each method: a run cut short keeps what it found
        if method == "pissa" and not args.no_verify:
            result["verify_on_cpu"] = verify(ref)
        for label, _ in PLANS[1:]:
            shutil.rmtree(work / f"{method}-{label.replace(' ', '-')}", ignore_errors=True)
        shutil.rmtree(ref, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    print(result["summary"], result.get("verify_on_cpu"))
    save(result, out_json)
    return 0


def save(result: dict, out: report.ResultFile | None) -> None:
    result["summary"] = {
        m: {label: row.get("identical", True) for label, row in rows.items()} for m, rows in result["methods"].items()
    }
    if out:
        out.write(result)


def verify(out: Path) -> dict:
    """`loraforge verify OUT --device cpu`: the CPU recomputes every module; which checks pass."""
    from loraforge.ship.verify import verify_adapter

    t0 = time.perf_counter()
    rep = verify_adapter(out, device="cpu")
    return {
        "ok": all(c.ok for c in rep.checks),
        "checks": {c.name: f"{c.status} {c.detail}".strip() for c in rep.checks},
        "wall_s": time.perf_counter() - t0,
    }


if __name__ == "__main__":
    sys.exit(main())
