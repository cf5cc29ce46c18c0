"""Verifiable rewards: the DAPO math scorer (as verl computes it), Math-Verify, user functions, and
DAPO's overlong length penalty.

Public functions (stable names; `loraforge eval` reuses them):

    dapo_score(response, ground_truth) -> float            +1.0 / -1.0, verl <= 0.7 semantics ("Answer:" only)
    dapo_result(response, ground_truth, boxed_fallback=False) -> ScoreResult(score, acc, pred)
    math_verify_score(response, ground_truth) -> float     1.0 / 0.0 (Math-Verify, gold boxed as verl does)
    overlong_penalty(length, max_len, buffer, factor) -> float   <= 0, added to the score
    get_scorer(name) -> Scorer                             "dapo", "dapo-boxed", "math-verify" or "module:function"

A Scorer maps (response, ground_truth) to a ScoreResult; `acc` is what accuracy metrics and dynamic
sampling use (it is logged before any length penalty, as DAPO does).

The DAPO scorer follows verl's `verl/utils/reward_score/math_dapo.py` (Apache-2.0; itself adapted from
lm-evaluation-harness' Minerva normalisation): the substitution and removal lists below are that
scorer's data, kept verbatim because any change shifts rewards. The paper ran verl 0.7, which reads
only `Answer:`; newer verl falls back to the last `\\boxed{}` of the final 100 characters when no
`Answer:` is found: that is `dapo_result(..., boxed_fallback=True)` and the scorer "dapo-boxed".
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import Callable

from loraforge.errors import LoraforgeError

INVALID = "[INVALID]"
ANSWER_PATTERN = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# verl math_dapo: applied in order with str.replace (so "an " also hits the end of "Japan 3").
SUBSTITUTIONS = [
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    (r"\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
]

# verl math_dapo: unit words and TeX spacing removed anywhere in the string.
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
    r",\!", "{,}", '"', "\\dots",
]


@dataclass(frozen=True)
class ScoreResult:
    score: float  # the reward before any length penalty
    acc: bool  # correct or not (accuracy metrics, dynamic sampling)
    pred: str | None = None  # the extracted, normalised prediction, when the scorer has one


Scorer = Callable[[str, str], ScoreResult]


def normalize_final_answer(answer: str) -> str:
    """verl's DAPO normalisation: last `=` side, substitutions, unit removal, TeX unwrapping, digits."""
    answer = answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)  # keep the first $...$ span
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)  # greedy: up to the last }
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)  # \frac12 -> \frac{1}{2}
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)  # \sqrt2 -> \sqrt{2}
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # 1,000 -> 1000, only for pure digit strings
        answer = answer.replace(",", "")
    return answer.strip()


def last_boxed(text: str) -> str | None:
    """The content of the last balanced `\\boxed{...}` in text, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{"): i]
    return None


def dapo_result(response: str, ground_truth: str, boxed_fallback: bool = False) -> ScoreResult:
    """verl's DAPO math score with its acc and pred; see the module docstring for the two versions."""
    tail = response[-300:]  # verl looks only at the last 300 characters
    matches = ANSWER_PATTERN.findall(tail)
    pred = normalize_final_answer(matches[-1] if matches else INVALID)
    gt = normalize_final_answer(str(ground_truth))
    correct = pred == gt
    if boxed_fallback and pred == INVALID:
        boxed = last_boxed(tail[-100:])
        if boxed is not None:
            pred = normalize_final_answer(boxed)
            correct = pred == gt
    return ScoreResult(1.0 if correct else -1.0, correct, pred)


def dapo_score(response: str, ground_truth: str) -> float:
    """+1.0 if the last `Answer: ...` in the final 300 characters matches ground_truth after
    normalisation, else -1.0 (verl 0.7's `math_dapo.compute_score`, the paper's reward)."""
    return dapo_result(response, ground_truth).score


def math_verify_result(response: str, ground_truth: str) -> ScoreResult:
    """Math-Verify equivalence, 1/0; the gold answer is wrapped in \\boxed{} as verl's wrapper does.

    Math-Verify's timeouts use signals, which only work in the main thread; elsewhere they are off.
    """
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise LoraforgeError(
            "the math-verify scorer needs the math-verify package: pip install 'loraforge[train]'"
        ) from e
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silence its "timeout disabled" warning
    try:
        gold = parse("\\boxed{" + str(ground_truth) + "}", parsing_timeout=timeout)
        pred = parse(response, parsing_timeout=timeout)
        ok = bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # a parse/verify failure or timeout scores 0, as in verl
        ok, pred = False, []
    return ScoreResult(1.0 if ok else 0.0, ok, str(pred[-1]) if pred else None)


def math_verify_score(response: str, ground_truth: str) -> float:
    """1.0 if Math-Verify finds the response's answer equivalent to ground_truth, else 0.0."""
    return math_verify_result(response, ground_truth).score


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then linear down to -factor
    at max_len: min(-(length - (max_len - buffer)) / buffer * factor, 0). buffer 0 disables it."""
    if buffer <= 0:
        return 0.0
    expected = max_len - buffer
    return min(-(length - expected) / buffer * factor, 0.0)


def _user_scorer(spec: str) -> Scorer:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise LoraforgeError(
            f"reward function {spec!r} not found ({e}); give it as module:function with the module importable "
            "(on PYTHONPATH or installed)"
        ) from e
    if not callable(fn):
        raise LoraforgeError(f"reward {spec!r} is not callable; expected a function (response, ground_truth)")

    def scorer(response: str, ground_truth: str) -> ScoreResult:
        out = fn(response, ground_truth)
        if isinstance(out, ScoreResult):
            return out
        if isinstance(out, dict):  # verl style: {"score": float, "acc": bool, ...}
            score = float(out["score"])
            return ScoreResult(score, bool(out.get("acc", score > 0)), out.get("pred"))
        if isinstance(out, bool):
            return ScoreResult(float(out), out)
        score = float(out)
        return ScoreResult(score, score > 0)  # a plain number: correct means positive

    return scorer


def get_scorer(name: str) -> Scorer:
    """A scorer by name: "dapo" (paper, verl 0.7), "dapo-boxed" (newer verl), "math-verify", or
    "module:function" returning a float, a bool, or a dict with "score" (and optionally "acc")."""
    if name == "dapo":
        return dapo_result
    if name == "dapo-boxed":
        return lambda r, g: dapo_result(r, g, boxed_fallback=True)
    if name == "math-verify":
        return math_verify_result
    if ":" in name:
        return _user_scorer(name)
    raise LoraforgeError(
        f"unknown reward {name!r}; expected dapo, dapo-boxed, math-verify or module:function"
    )
