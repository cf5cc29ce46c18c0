"""The built-in arithmetic task: problems with exact integer answers, by difficulty level, with a
fixed split of the problem space into a training part and a held-out part.

    synthetic_rows(n=4000, level=(1, 3), split="train")    # the training stream, never a held-out problem
    synthetic_rows(n=256, level=(1, 3), split="heldout")   # distinct problems from the held-out part only
    rows_from_spec("synthetic:level=1-3,n=256,split=heldout")   # the same, from the --data / --bench text

Rows are {"prompt": "What is 7 + 12?", "answer": "19", "_question": True} (a bare question that a prompt
template wraps), {"prompt": "7+12=", "answer": "19"} (style=bare), or a word problem (style=word).

The split. Small levels have few distinct problems (level 1: 441 ordered pairs, level 3: 144), so a
training stream of a few thousand rows draws most of them, and a "fresh" random draw for evaluation is
mostly problems the policy trained on. The split is made in the problem space, before any draw: a
problem belongs to the held-out part when the sha256 of its canonical key falls in the lowest
HELDOUT_PERCENT of 100 buckets. The canonical key ignores the order of the two operands of a 2-term `+`
or `*` (`7 + 12` and `12 + 7` are one problem, held out or trained on together). So `split=train` and
`split=heldout` share no problem whatever their n and seed, and the held-out part of a level is the
same for every seed and every n.
"""

from __future__ import annotations

import builtins
import hashlib
import random
from typing import Any

from loraforge.core.errors import LoraforgeError

# Difficulty levels: each sets terms, ops, min, max and style; keys given next to level= override them.
# Chosen for SmolLM2-135M-Instruct (see examples/replication): level 1 is mastered in a few steps, the
# higher ones leave room to learn over a run.
SYNTHETIC_LEVELS: dict[int, dict[str, Any]] = {
    1: {"terms": 2, "ops": "+", "min": 0, "max": 20, "style": "question"},  # 7 + 12
    2: {"terms": 2, "ops": "+-", "min": 0, "max": 50, "style": "question"},  # 31 - 48
    3: {"terms": 2, "ops": "*", "min": 1, "max": 12, "style": "question"},  # 7 * 12
    4: {"terms": 3, "ops": "+-", "min": 0, "max": 50, "style": "question"},  # 31 - 8 + 44
    5: {"terms": 3, "ops": "+-*", "min": 1, "max": 20, "style": "question"},  # 7 * 12 - 5
    6: {"terms": 4, "ops": "+-*", "min": 1, "max": 50, "style": "question"},  # 9 + 23 * 4 - 17
    7: {"terms": 3, "ops": "+-*", "min": 2, "max": 20, "style": "word"},  # a two-step story, left to right
    8: {"terms": 4, "ops": "+-*", "min": 2, "max": 50, "style": "word"},  # a three-step story, left to right
}
# The share of the problem space (in percent) that is held out of `split=train` and drawn by `split=heldout`.
HELDOUT_PERCENT = 25
SPLITS = ("train", "heldout")
_INT_KEYS = ("n", "max", "min", "terms", "seed")
_KEYS = {*_INT_KEYS, "ops", "style", "level", "split"}
# split=heldout: a level whose held-out part gave no new problem in this many draws in a row is exhausted.
# Draws are uniform over the level's problems, so missing a remaining one this long has chance
# < (1 - 1/|space|)^20000, below 1e-8 for spaces of up to 1000 problems; larger spaces are never exhausted
# at the n asked for here.
_EXHAUSTED_AFTER = 20_000


def is_synthetic(source: str) -> bool:
    return source == "synthetic" or source.startswith("synthetic:")


def parse_spec(spec: str, flag: str = "--data") -> dict[str, Any]:
    """`synthetic:level=3,n=500` -> keyword arguments of synthetic_rows; a malformed spec raises one line."""
    out: dict[str, Any] = {}
    if not is_synthetic(spec):
        raise LoraforgeError(f"{flag} {spec}: expected synthetic or synthetic:key=value,...")
    if ":" in spec:
        for part in spec.split(":", 1)[1].split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise LoraforgeError(f"{flag} {spec}: expected key=value pairs after synthetic:, got {part!r}")
            out[key.strip()] = value.strip()
    bad = sorted(set(out) - _KEYS)
    if bad:
        raise LoraforgeError(f"{flag} {spec}: unknown synthetic option(s) {bad}; known: {sorted(_KEYS)}")
    for key in _INT_KEYS:
        if key in out:
            try:
                out[key] = int(out[key])
            except ValueError:
                raise LoraforgeError(f"{flag} {spec}: {key} must be an integer, got {out[key]!r}") from None
    if "level" in out:
        out["level"] = _parse_levels(out["level"], spec, flag)
    if "split" in out and out["split"] not in SPLITS:
        raise LoraforgeError(f"{flag} {spec}: split must be train or heldout, got {out['split']!r}")
    return out


def rows_from_spec(spec: str, flag: str = "--data") -> list[dict]:
    return synthetic_rows(**parse_spec(spec, flag))


def _parse_levels(text: str, spec: str, flag: str) -> int | tuple[int, int]:
    """`3` -> 3, `1-3` -> (1, 3); anything else raises naming the known levels."""
    lo, sep, hi = text.partition("-")
    try:
        levels = (int(lo), int(hi)) if sep else int(lo)
    except ValueError:
        levels = None
    known = sorted(SYNTHETIC_LEVELS)
    flat = levels if isinstance(levels, tuple) else (levels, levels)
    if levels is None or flat[0] not in known or flat[1] not in known or flat[0] > flat[1]:
        raise LoraforgeError(f"{flag} {spec}: level must be one of {known} or a range like 1-3, got {text!r}")
    return levels


def synthetic_rows(
    n: int = 2000,
    max: int | None = None,
    min: int | None = None,
    ops: str | None = None,
    terms: int | None = None,
    seed: int = 0,
    style: str | None = None,
    level: int | tuple[int, int] | None = None,
    split: str | None = None,
) -> list[dict]:
    """Arithmetic problems with exact integer answers, deterministic in `seed`.

    `synthetic:n=2000,max=20,ops=+-,terms=2,style=question` makes rows like
    {"prompt": "What is 7 + 12?", "answer": "19"} (a question the prompt template wraps; the usual
    precedence: * before + and -); style=bare makes {"prompt": "7+12=", "answer": "19"}, used as is (for
    tiny test models); style=word makes a story whose steps apply left to right ("Mia has 12 apples. She
    gets 5 more. Then the number of apples is multiplied by 3. How many apples does Mia have now?", 51),
    where a subtraction never takes more than there is. `level=1..8` picks a row of SYNTHETIC_LEVELS; keys
    given with it override the level's; `level=1-3` mixes levels 1 to 3 in turn (row i from level 1 + i % 3).
    Without level, the defaults are level 1's.

    split=None draws from the whole problem space (repeats allowed); split="train" the same way from the
    training part only; split="heldout" gives n DISTINCT problems of the held-out part (a level mix takes
    them in turn, and a level whose held-out part is used up leaves the turn to the others), or raises if
    the held-out part has fewer than n.
    """
    if split is not None and split not in SPLITS:
        raise LoraforgeError(f"synthetic split must be train or heldout, got {split!r}")
    if n < 1:
        raise LoraforgeError(f"synthetic needs n >= 1, got n={n}")
    levels = range(level[0], level[1] + 1) if isinstance(level, tuple) else [level]
    streams = [
        _problems(_settings(lv, max, min, ops, terms, style), seed * 1_000 + lv if isinstance(level, tuple) else seed)
        for lv in levels
    ]
    if split == "heldout":
        return _distinct_heldout(streams, n)
    keep = (lambda row: not _held_out(row)) if split == "train" else (lambda row: True)
    parts = [_take(stream, -(-n // len(streams)), keep) for stream in streams]
    return [parts[i % len(parts)][i // len(parts)] for i in range(n)]


def _settings(level, max, min, ops, terms, style) -> dict[str, Any]:
    """A level's settings with the keys given beside it; invalid settings raise one line."""
    if level is not None and level not in SYNTHETIC_LEVELS:
        raise LoraforgeError(f"synthetic level must be one of {sorted(SYNTHETIC_LEVELS)}, got {level}")
    base = SYNTHETIC_LEVELS[level or 1]
    s = {
        "max": base["max"] if max is None else max,
        "min": base["min"] if min is None else min,
        "ops": base["ops"] if ops is None else ops,
        "terms": base["terms"] if terms is None else terms,
        "style": base["style"] if style is None else style,
        "level": level or 1,
    }
    if s["style"] not in ("question", "bare", "word"):
        raise LoraforgeError(f"synthetic style must be question, bare or word, got {s['style']!r}")
    if not s["ops"] or any(o not in "+-*" for o in s["ops"]):
        raise LoraforgeError(f"synthetic ops must be made of + - *, got {s['ops']!r}")
    if s["terms"] < 2 or s["max"] < s["min"] or s["min"] < 0:
        raise LoraforgeError(
            f"synthetic needs terms >= 2 and 0 <= min <= max; got terms={s['terms']}, min={s['min']}, max={s['max']}"
        )
    return s


def _problems(s: dict[str, Any], seed: int):
    """An endless seeded stream of (row, canonical key) for one level's settings."""
    rng = random.Random(seed)
    while True:
        if s["style"] == "word":
            row = _word_problem(rng, s["terms"], s["ops"], s["min"], s["max"])
            yield row, row["prompt"]
            continue
        nums = [rng.randint(s["min"], s["max"]) for _ in range(s["terms"])]
        chosen = [rng.choice(s["ops"]) for _ in range(s["terms"] - 1)]
        expr = str(nums[0])
        for op, x in zip(chosen, nums[1:]):
            expr += f" {op} {x}"
        answer = eval(expr, {"__builtins__": {}})  # digits and + - * only, built above
        if s["style"] == "bare":
            row = {"prompt": expr.replace(" ", "") + "=", "answer": str(answer)}
        else:
            row = {"prompt": f"What is {expr}?", "answer": str(answer), "_question": True}
        yield row, _canonical(nums, chosen)


def _canonical(nums: list[int], ops: list[str]) -> str:
    """The problem's key: its expression, with the two operands of a 2-term + or * in order."""
    if len(nums) == 2 and ops[0] in "+*":
        nums = sorted(nums)
    return " ".join([str(nums[0])] + [f"{op} {x}" for op, x in zip(ops, nums[1:])])


def _held_out(item: tuple[dict, str]) -> bool:
    digest = hashlib.sha256(item[1].encode()).hexdigest()
    return int(digest[:8], 16) % 100 < HELDOUT_PERCENT


def _take(stream, count: int, keep) -> list[dict]:
    """The first `count` rows of `stream` that `keep` accepts (a space with none left raises)."""
    out, misses = [], 0
    for item in stream:
        if keep(item):
            out.append(item[0])
            misses = 0
            if len(out) == count:
                return out
        else:
            misses += 1
            if misses > _EXHAUSTED_AFTER:
                raise LoraforgeError(
                    "synthetic split=train: these settings leave no problem outside the held-out part; "
                    "widen min/max or drop split="
                )
    return out


def _distinct_heldout(streams: list, n: int) -> list[dict]:
    """n distinct held-out problems, taken from the streams in turn; a used-up stream drops out."""
    out: list[dict] = []
    seen: set[str] = set()
    live = list(streams)
    while len(out) < n and live:
        for stream in list(live):
            misses = 0
            for item in stream:
                if _held_out(item) and item[1] not in seen:
                    seen.add(item[1])
                    out.append(item[0])
                    break
                misses += 1
                if misses > _EXHAUSTED_AFTER:
                    live.remove(stream)
                    break
            if len(out) == n:
                break
    if len(out) < n:
        raise LoraforgeError(
            f"synthetic split=heldout: the held-out part of these levels has {len(out)} distinct problems, "
            f"fewer than n={n}; lower n or add a level"
        )
    return out


_NAMES = {"Mia": "She", "Leo": "He", "Ava": "She", "Sam": "He", "Noah": "He", "Zoe": "She", "Omar": "He", "Lena": "She"}
_THINGS = ("apples", "marbles", "stickers", "coins", "books", "shells", "pencils", "cards")


def _word_problem(rng: random.Random, terms: int, ops: str, lo: int, hi: int) -> dict:
    """One story: a start amount, then terms - 1 steps applied in order (see synthetic_rows)."""
    name, thing = rng.choice(sorted(_NAMES)), rng.choice(_THINGS)
    pronoun = _NAMES[name]
    value = rng.randint(lo, hi)
    sentences = [f"{name} has {value} {thing}."]
    for _ in range(terms - 1):
        op = rng.choice(ops)
        if op == "-" and value < 1:
            op = "+"  # nothing left to take away
        if op == "+":
            x = rng.randint(lo, hi)
            value += x
            sentences.append(f"{pronoun} gets {x} more.")
        elif op == "-":
            low = builtins.max(1, lo)
            x = rng.randint(1, value) if value <= low else rng.randint(low, builtins.min(value, hi))
            value -= x
            sentences.append(f"{pronoun} gives away {x}.")
        else:
            x = rng.randint(2, 5)  # small factors: the story stays readable
            value *= x
            sentences.append(f"Then the number of {thing} is multiplied by {x}.")
    sentences.append(f"How many {thing} does {name} have now?")
    return {"prompt": " ".join(sentences), "answer": str(value), "_question": True}
