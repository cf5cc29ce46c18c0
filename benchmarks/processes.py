"""Measuring a command in a fresh process: `run_measured(cmd)` gives wall time, CPU time and peak
RSS (ru_maxrss from wait4, i.e. the kernel's VmHWM of that process: anonymous + file-mapped pages it
touched), plus sampled peaks of RssAnon / RssFile from /proc/PID/status. Standard library only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# run by path: see its docstring for why a launcher sits between the benchmark and the command
LAUNCHER = Path(__file__).resolve().parent / "launcher.py"


def _proc_status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def run_measured(cmd: list[str], env: dict | None = None, timeout: float | None = None, sample_s: float = 0.05) -> dict:
    """Run CMD in a fresh process and measure it like /usr/bin/time -v does.

    Returns wall_s (fork to reap), cpu_s (user+sys of the process), rc, peak_rss_mib (ru_maxrss
    from wait4: the kernel's high-water mark of the process's RSS, the same number as its VmHWM,
    counting the file pages it mapped), sampled peaks of RssAnon / RssFile (polled every SAMPLE_S
    from /proc; they can miss a short spike), stdout, stderr, timed_out. CMD runs under a small
    launcher (launcher.py) so that the benchmark's own RSS does not leak into the number.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lf-bench-run-") as tmp:
        result_path, pid_path = Path(tmp) / "result.json", Path(tmp) / "pid"
        with open(Path(tmp) / "stdout", "w+") as out, open(Path(tmp) / "stderr", "w+") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, str(LAUNCHER), str(result_path), str(pid_path), *cmd],
                stdout=out,
                stderr=err,
                env=env,
                text=True,
            )
            peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
            timed_out = []
            child = None
            while proc.poll() is None:
                if child is None and pid_path.exists():
                    text = pid_path.read_text()
                    child = int(text) if text else None
                if child is not None:
                    st = _proc_status_kib(child)
                    for k in peaks:
                        peaks[k] = max(peaks[k], st.get(k, 0))
                if timeout is not None and time.perf_counter() - start > timeout and not timed_out:
                    timed_out.append(True)
                    if child is not None:
                        os.kill(child, 9)
                    proc.kill()
                time.sleep(sample_s)
            res = json.loads(result_path.read_text()) if result_path.exists() else {}
            out.seek(0)
            err.seek(0)
            return {
                "wall_s": res.get("wall_s", time.perf_counter() - start),
                "cpu_s": res.get("cpu_s"),
                "rc": res.get("rc", proc.returncode),
                "timed_out": bool(timed_out),
                "peak_rss_mib": res["maxrss_kib"] / 1024 if "maxrss_kib" in res else None,  # KiB on Linux
                "sampled_peak_hwm_mib": peaks["VmHWM"] / 1024,
                "sampled_peak_anon_mib": peaks["RssAnon"] / 1024,
                "sampled_peak_file_mib": peaks["RssFile"] / 1024,
                "stdout": out.read(),
                "stderr": err.read(),
            }


def tail(text: str, n: int = 2000) -> str:
    return text[-n:]
