"""RUN_DIR/verl, the job `loraforge train --backend verl` hands to verl: its data and reward files, and how the
directory is put in place (rl/verl_launch.py decides what goes into it).

The five files (JOB_FILES) are written together into a staging directory beside RUN_DIR/verl and claimed in one
rename (adapters/writers.staged_dir), so a failure or a kill leaves the previous job or none, never a mix. An
existing RUN_DIR/verl holding the very same job is left as it is (its checkpoints too: running the script again
continues it); one holding another job is replaced only with --overwrite, and never while it holds anything besides
those files (verl's checkpoints belong to the job that made them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from loraforge.adapters import writers
from loraforge.core.errors import LoraforgeError

SCRIPT = "run_verl.sh"
# what prepare writes into RUN_DIR/verl; anything else there (verl's checkpoints/) is not loraforge's to replace
JOB_FILES = ("train.parquet", "val.parquet", "reward.py", SCRIPT, "overrides.json")


# ------------------------------------------------------------------------------------------------
# data and reward files
def _verl_prompt(example, template: str) -> list[dict]:
    from loraforge.rl.data import DAPO_TEMPLATE

    prompt = example.prompt
    if isinstance(prompt, list):
        return prompt
    if example.is_question and template != "none":
        text = DAPO_TEMPLATE if template == "dapo" else template
        if "{question}" not in text:
            raise LoraforgeError(
                f"--prompt-template must be dapo, none, or a text containing {{question}}, got {template!r}"
            )
        prompt = text.replace("{question}", prompt)
    return [{"role": "user", "content": prompt}]


def write_parquet(examples, path: Path, template: str) -> None:
    """Rows in verl's format: data_source, prompt (chat messages; verl applies the chat template),
    reward_model.ground_truth, extra_info.index."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise LoraforgeError("--backend verl writes parquet data and needs pyarrow: pip install -e '.[train]'") from e
    rows = [
        {
            "data_source": "loraforge",
            "prompt": _verl_prompt(e, template),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": e.ground_truth},
            "extra_info": {"index": i},
        }
        for i, e in enumerate(examples)
    ]
    pq.write_table(pa.Table.from_pylist(rows), str(path))


REWARD_TEMPLATE = '''"""Written by `loraforge train --backend verl`: verl's reward.custom_reward_function calling
loraforge's scorer ({reward!r}), so the verl run scores exactly as `loraforge train` does. verl's DAPO reward
manager adds the overlong penalty; "acc" feeds dynamic sampling (algorithm.filter_groups.metric=acc)."""

from loraforge.rl.rewards import get_scorer

_SCORER = get_scorer({reward!r})


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    result = _SCORER(solution_str, ground_truth)
    return {{"score": float(result.score), "acc": bool(result.acc), "pred": str(result.pred)}}
'''


# ------------------------------------------------------------------------------------------------
# putting the directory in place
def put_job(out: Path, write: Callable[[Path], None], overwrite: bool) -> bool:
    """Write the job with WRITE(directory) into a staging directory beside OUT and claim it as OUT; return whether
    OUT changed. OUT holding the same job is kept as it is; another job is replaced only with OVERWRITE, and never
    when OUT holds anything besides JOB_FILES. A refusal or a failure leaves OUT as it was, and removes the run
    directory again if this call created it."""
    created = [p for p in [out.parent, *out.parent.parents] if not os.path.lexists(p)]  # deepest first
    changed = True

    def replace(staged: Path, existing: Path) -> bool:
        nonlocal changed
        changed = _replaceable(staged, existing, overwrite)
        return changed

    try:
        with writers.staged_dir(out, overwrite, replace) as tmp:
            write(tmp)
            os.chmod(tmp / SCRIPT, 0o755)
    except BaseException:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return changed


def _replaceable(new: Path, out: Path, overwrite: bool) -> bool:
    """Whether the existing OUT may be replaced by the job staged in NEW: False when OUT already holds that very
    job (nothing to write); raises when OUT holds anything --overwrite does not cover."""
    if out.is_symlink():
        raise LoraforgeError(
            f"{out} is a symlink (to {os.readlink(out)}); loraforge writes RUN_DIR/verl itself and would "
            "replace the link, or write through it into a directory -o does not name. Nothing was changed: "
            "remove the link, or choose another -o."
        )
    differ, others = _job_differences(new, out)
    if not differ:
        return False
    prepared = any(os.path.lexists(out / name) for name in JOB_FILES)
    if others and not prepared:
        raise LoraforgeError(
            f"{out} holds {', '.join(others)} and no verl job written by loraforge. Nothing was "
            "changed: choose another -o, or move those away yourself."
        )
    if others:
        raise LoraforgeError(
            f"{out} holds a verl job prepared with other settings ({', '.join(differ)} differ) and "
            f"also {', '.join(others)}, which --overwrite never deletes (verl's checkpoints belong "
            f"to that job). Nothing was changed: continue that job with bash {out / SCRIPT}, or "
            "choose another -o for this one."
        )
    if prepared and not overwrite:
        raise LoraforgeError(
            f"{out} holds a verl job prepared with other settings ({', '.join(differ)} differ). "
            "Nothing was changed: pass --overwrite to replace it with this one, or choose another -o."
        )
    return True


def _job_differences(new: Path, old: Path) -> tuple[list[str], list[str]]:
    """(the job files of OLD that are missing or differ from NEW's, the other entries of OLD). An empty
    checkpoints/ (a verl run that saved nothing) is not counted as another entry."""

    def same(name: str) -> bool:
        path = old / name
        return path.is_file() and not path.is_symlink() and path.read_bytes() == (new / name).read_bytes()

    differ = [name for name in JOB_FILES if not same(name)]
    others = sorted(
        p.name + ("/" if p.is_dir() and not p.is_symlink() else "")
        for p in old.iterdir()
        if p.name not in JOB_FILES
        and not (p.name == "checkpoints" and p.is_dir() and not p.is_symlink() and not any(p.iterdir()))
    )
    return differ, others
