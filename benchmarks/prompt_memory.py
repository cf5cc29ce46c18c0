"""Memory and CPU time of turning one very long data row into --max-prompt-length tokens: tokenised whole and
cut afterwards (loraforge up to 0.2), against cut by characters first (`sampling.generation.prompt_ids`).

    python benchmarks/prompt_memory.py --tokenizer models/SmolLM2-135M-Instruct [--mb 5] [--max-prompt-length 512]

Each way runs in its own child process; it reports the child's peak RSS (ru_maxrss) after loading the tokenizer
and after the prompt, and the CPU seconds of the prompt alone. The row is words of random digits separated by
spaces and operators, the shape of a pasted document. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, random, resource, sys, time
from transformers import AutoTokenizer
from loraforge.sampling.generation import prompt_ids
tok = AutoTokenizer.from_pretrained(sys.argv[1])
mb, keep, way = float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(0)
words, size = [], 0
while size < mb * 1e6:
    w = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 8))) + rng.choice(" + - * = ")
    words.append(w)
    size += len(w)
text = "".join(words)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.process_time()
if way == "whole":
    ids = tok(text, add_special_tokens=False)["input_ids"][-keep:]
else:
    ids = prompt_ids(tok, text, keep)
cpu = time.process_time() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"way": way, "chars": len(text), "tokens_kept": len(ids), "rss_loaded_mib": round(loaded),
                  "rss_peak_mib": round(peak), "cpu_s": round(cpu, 2), "ids_sha": hash(tuple(ids))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--mb", type=float, default=5.0)
    ap.add_argument("--max-prompt-length", type=int, default=512)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import ensure_loraforge_importable, machine_info

    ensure_loraforge_importable()
    rows = []
    for way in ("whole", "cut"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, a.tokenizer, str(a.mb), str(a.max_prompt_length), way],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    same = rows[0]["ids_sha"] == rows[1]["ids_sha"]
    print(json.dumps({"machine": machine_info(), "runs": rows, "same_tokens": same}, indent=2))


if __name__ == "__main__":
    main()
