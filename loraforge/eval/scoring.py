"""Deciding whether a response is correct: answer extraction plus one of two scorers.

- `math-verify` (default): the last `\\boxed{...}` or `Answer: ...` in the response is extracted and
  compared with the gold answer by Math-Verify, which knows that 0.5 = \\frac{1}{2}, 1,000 = 1000 and
  x = 3 answers 3. Gold goes first: `verify(gold, pred)` is asymmetric.
- `dapo`: verl's DAPO math reward (the scorer the paper used, appendix C.2), taken from
  loraforge.rl.rewards so training and evaluation agree; it reads only `Answer:` lines and compares
  normalised strings, so 0.5 vs \\frac{1}{2} is wrong there. Its newer-verl variant that falls back to
  `\\boxed{}` is `dapo-boxed`.
- `number`: the training reward `--reward number` (loraforge.grading.number): the final answer must be one
  number equal to the gold one; an expression (`Answer: 12*7+3`) scores 0 where Math-Verify would evaluate it.
  Made for the synthetic arithmetic task, whose held-out split it scores as the runs were rewarded.

A number in a report is only comparable with numbers from the same scorer: the report names it.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field

from loraforge.core.errors import LoraforgeError
from loraforge.grading.dapo import INVALID, dapo_result
from loraforge.grading.number import number_result

SCORERS = ("math-verify", "dapo", "dapo-boxed", "number")

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_LINE = re.compile(r"(?i)answer\s*:\s*([^\n]+)")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[start] == '{', and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\":  # an escaped brace (\{ or \}) does not open or close a group
            continue
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None  # unbalanced: the response was cut off inside the box


def _boxed_matches(text: str) -> list[tuple[int, str]]:
    """(position, content) of every complete \\boxed{...} / \\fbox{...} (or `\\boxed 5`) in text."""
    found = []
    for m in _BOXED.finditer(text):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is not None:
                found.append((m.start(), got[0].strip()))
        elif m.end() < len(text) and text[m.end()] == " ":
            # `\boxed 5`: the argument runs to the next space or `$`.
            arg = re.match(r"[^\s$]+", text[j:])
            if arg:
                found.append((m.start(), arg.group(0)))
    return found


def extract_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...} in text (nested braces kept), or None."""
    found = _boxed_matches(text)
    return found[-1][1] if found else None


def _clean_answer_line(value: str) -> str:
    """Strip what surrounds an answer on an `Answer:` line: markdown bold, a final period, `$...$`."""
    value = value.strip().strip("*").strip().rstrip(".").strip()
    if len(value) > 1 and value.startswith("$") and value.endswith("$"):
        value = value.strip("$").strip()
    elif value.startswith("\\(") and value.endswith("\\)"):
        value = value[2:-2].strip()
    return value.rstrip(".").strip()


def extract_answer(text: str) -> tuple[str | None, str | None]:
    """(answer, where) from a response: whichever of the last \\boxed{} and the last `Answer:` line
    comes later wins, so `Answer: \\boxed{5}` gives "5" and a corrected final line beats an earlier
    box. `where` is "boxed", "answer-line" or None when the response states no answer."""
    boxed = _boxed_matches(text)
    lines = list(_ANSWER_LINE.finditer(text))
    box_pos = boxed[-1][0] if boxed else -1
    line_pos = lines[-1].start() if lines else -1
    if box_pos < 0 and line_pos < 0:
        return None, None
    if box_pos > line_pos:
        return boxed[-1][1], "boxed"
    value = _clean_answer_line(lines[-1].group(1))
    return (value or None), ("answer-line" if value else None)


@dataclass
class Score:
    correct: bool
    extracted: str | None
    detail: dict = field(default_factory=dict)


class MathVerifyScorer:
    """Math-Verify equivalence of the extracted answer with the gold answer (gold first)."""

    name = "math-verify"

    def __init__(self):
        try:
            import math_verify
        except ImportError:
            raise LoraforgeError(
                "the math-verify scorer needs the math-verify package, which is not installed: "
                "run `pip install -e '.[eval]'` (or `pip install math-verify`), "
                "or pass --scorer dapo"
            ) from None
        self._mv = math_verify
        # With timeouts off (outside the main thread) Math-Verify warns on every call.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        self._gold_cache: dict[str, object] = {}

    def _timeouts(self) -> dict:
        # Math-Verify's timeouts use signal.alarm, which only works in the main thread; elsewhere
        # (a trainer's worker thread) they must be off or every call raises.
        on = threading.current_thread() is threading.main_thread()
        return {"parsing_timeout": 5 if on else None}

    def _parse(self, expr: str):
        # Boxing makes Math-Verify take the whole string as one answer (verl's wrapper does the same).
        return self._mv.parse("\\boxed{" + expr + "}", **self._timeouts())

    def score(self, response: str, gold: str) -> Score:
        extracted, where = extract_answer(response)
        if extracted is None:
            return Score(False, None, {"where": None})
        if gold not in self._gold_cache:
            self._gold_cache[gold] = self._parse(gold)
        gold_parsed = self._gold_cache[gold]
        pred_parsed = self._parse(extracted)
        on = threading.current_thread() is threading.main_thread()
        try:
            ok = bool(self._mv.verify(gold_parsed, pred_parsed, timeout_seconds=5 if on else None))
        except Exception as e:  # a pathological expression must cost one sample, not the run
            return Score(False, extracted, {"where": where, "error": f"{type(e).__name__}: {e}"})
        return Score(ok, extracted, {"where": where})


class DapoScorer:
    """verl's DAPO math scorer, the one training rewards with (loraforge.grading.dapo)."""

    def __init__(self, boxed_fallback: bool = False):
        self.name = "dapo-boxed" if boxed_fallback else "dapo"
        self.boxed_fallback = boxed_fallback

    def score(self, response: str, gold: str) -> Score:
        r = dapo_result(response, gold, boxed_fallback=self.boxed_fallback)
        # "[INVALID]" is verl's marker for "no Answer: line": report it as no answer.
        pred = None if r.pred == INVALID else r.pred
        return Score(bool(r.acc), pred, {"score": r.score})


class NumberScorer:
    """The final-number reward `train --reward number` pays (loraforge.grading.number), as a scorer."""

    name = "number"

    def score(self, response: str, gold: str) -> Score:
        r = number_result(response, gold)  # a gold answer that is not a plain number raises one line
        return Score(bool(r.acc), r.pred, {})


def make_scorer(name: str):
    """The scorer called `name` (one of SCORERS)."""
    if name == "number":
        return NumberScorer()
    if name == "math-verify":
        return MathVerifyScorer()
    if name in ("dapo", "dapo-boxed"):
        return DapoScorer(boxed_fallback=name == "dapo-boxed")
    raise LoraforgeError(f"--scorer {name!r} is not known; choose one of: {', '.join(SCORERS)}")
