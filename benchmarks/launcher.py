"""A small launcher between a benchmark and the command it measures:
`python launcher.py RESULT_JSON PID_FILE CMD...`.

The kernel charges a child's ru_maxrss with the RSS of the process it was forked/vforked from
(exec_mmap records the old mm's high-water mark), so a command spawned straight from a big benchmark
process would report the benchmark's own RSS. This launcher is small; its forked child starts from
it, execs the command, and the launcher writes the child's rusage from wait4 and the wall time from
fork to reap to RESULT_JSON (and the child's pid to PID_FILE, for sampling /proc). Standard library
only, so it starts in milliseconds.
"""

import json
import os
import sys
import time

result_path, pid_path, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"cannot run {cmd[0]}: {e}", file=sys.stderr, flush=True)
    os._exit(127)
with open(pid_path, "w") as f:
    f.write(str(pid))
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(result_path, "w") as f:
    json.dump(
        {
            "wall_s": wall,
            "rc": os.waitstatus_to_exitcode(status),
            "maxrss_kib": ru.ru_maxrss,
            "cpu_s": ru.ru_utime + ru.ru_stime,
        },
        f,
    )
