"""How many CPU threads the `loraforge` command uses when the user has not said.

torch (OpenMP, MKL) and scipy's OpenBLAS each start one thread per core, and `init` adds a read-ahead thread. On
a machine whose cores are busy with other work, those threads wait for one another at every parallel region
(spinning: the CPU time grows with the wait) and a command becomes many times slower. Measured on 2 cores with
competing processes (load average 10-11): `init` of SmolLM2-135M, milora r 32, took 697 s (186 s of CPU) with the
default threads and 82 s (15 s of CPU) with one thread; benchmarks/RESULTS.md has the rows.

The rule, for the CLI only (a Python caller keeps its own settings): when none of THREAD_VARS is set, use as many
threads as there are idle cores, the cores this process may run on less the load average of the last minute
(rounded), at least 1, shared out between the processes of a launch on this machine (LOCAL_WORLD_SIZE, set by
torchrun and accelerate). On an idle machine that is every core, as before. A variable set by the user wins:
`OMP_NUM_THREADS=4 loraforge init ...`.
"""

from __future__ import annotations

import os

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def idle_cores(cpus: int, load: float, processes: int = 1) -> int:
    """max(1, (cpus - round(load)) // processes) (pure)."""
    return max(1, (cpus - round(load)) // max(1, processes))


def default_threads() -> int | None:
    """The thread count for this process, or None when the user set one of THREAD_VARS."""
    if any(os.environ.get(v) for v in THREAD_VARS):
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average (some containers): assume the cores are free
        load = 0.0
    try:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        processes = 1
    return idle_cores(cpus, load, processes)


def limit_threads() -> int | None:
    """Apply default_threads(): set THREAD_VARS (read by OpenMP, MKL and OpenBLAS when they start) and, if torch is
    already imported, torch's own count. Returns the count set, or None when the user's setting stands."""
    import sys

    n = default_threads()
    if n is None:
        return None
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n
