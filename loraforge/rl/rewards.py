"""Verifiable rewards for training: scorers by name, user reward functions, and DAPO's overlong
length penalty.

    get_scorer(name) -> Scorer        "dapo", "dapo-boxed", "math-verify", "number" or "module:function"
    RewardGuard(scorer, name)(response, ground_truth, where) -> ScoreResult   the trainer's only call path:
                                      an exception or a non-number becomes one line naming the function and row
    math_verify_result(response, ground_truth) -> ScoreResult   1.0 / 0.0 (Math-Verify, gold boxed as verl does)
    overlong_penalty(length, max_len, buffer, factor) -> float   <= 0, added to the score

A Scorer maps (response, ground_truth) to a ScoreResult; `acc` is what accuracy metrics and dynamic
sampling use (it is logged before any length penalty, as DAPO does). The DAPO scorer itself lives in
`loraforge.grading.dapo`, shared with `loraforge eval`.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import threading
from typing import Any, Callable

from loraforge.core.errors import LoraforgeError
from loraforge.grading.dapo import ScoreResult, dapo_result
from loraforge.grading.number import number_result

Scorer = Callable[[str, str], ScoreResult]


def math_verify_result(response: str, ground_truth: str) -> ScoreResult:
    """Math-Verify equivalence, 1/0; the gold answer is wrapped in \\boxed{} as verl's wrapper does.

    Math-Verify's timeouts use signals, which only work in the main thread; elsewhere they are off.
    """
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise LoraforgeError("the math-verify scorer needs the math-verify package: pip install -e '.[train]'") from e
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
        return as_score_result(fn(response, ground_truth))

    scorer.__qualname__ = spec  # what RewardGuard names in its messages
    return scorer


class BadReward(ValueError):
    """A reward function returned something that is not a score; the message says what it returned."""


def as_score_result(out: Any) -> ScoreResult:
    """A reward function's return value as a ScoreResult: a ScoreResult, a dict with "score" (and
    optionally "acc", "pred"; verl style), a bool, or a real number; accuracy = score > 0 unless given.
    Anything else, and a score that is NaN or infinite, raises BadReward."""
    if isinstance(out, ScoreResult):
        score, result = out.score, out
    elif isinstance(out, dict):
        if "score" not in out:
            raise BadReward(f"returned a dict without a 'score' key (keys {sorted(map(str, out))[:6]})")
        score = out["score"]
        if not _is_number(score):
            raise BadReward(f"returned a dict whose 'score' is {_show(score)}")
        result = ScoreResult(float(score), bool(out.get("acc", score > 0)), out.get("pred"))
    elif isinstance(out, bool):
        score, result = float(out), ScoreResult(float(out), out)
    elif _is_number(out):
        score, result = out, ScoreResult(float(out), float(out) > 0)
    else:
        raise BadReward(f"returned {_show(out)}")
    if not _is_number(score) or not math.isfinite(float(score)):
        raise BadReward(f"returned the score {_show(score)}")
    return result


def _is_number(x: Any) -> bool:
    # numbers.Real covers int, float, numpy floats; a 0-d tensor passes through float() too
    if isinstance(x, (str, bytes)) or x is None:
        return False
    if isinstance(x, numbers.Real):
        return True
    return hasattr(x, "item") and getattr(x, "numel", lambda: 0)() == 1


def _show(x: Any) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:60] + '...' if len(text) > 60 else text}"


class RewardGuard:
    """Calls the reward for one response; an exception or a non-score becomes a LoraforgeError of one line
    naming the function, the row (`where`, e.g. "prompt 3 (data row 17), response 2") and what it
    returned, so a user's reward bug reads as that and not as a traceback from inside the trainer."""

    def __init__(self, scorer: Scorer, name: str | None = None):
        self.scorer = scorer
        self.name = name or getattr(scorer, "__qualname__", None) or repr(scorer)

    def __call__(self, response: str, ground_truth: str, where: str) -> ScoreResult:
        try:
            return as_score_result(self.scorer(response, ground_truth))
        except BadReward as e:
            what = str(e)
        except LoraforgeError:
            raise  # already a message for the user (e.g. math-verify not installed)
        except Exception as e:
            what = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        raise LoraforgeError(
            f"reward function {self.name} {what} for {where} (ground truth {ground_truth!r}, response "
            f"{response[:80]!r}); it must return a finite number, a bool, or a dict with a numeric 'score'"
        ) from None


def get_scorer(name: str) -> Scorer:
    """A scorer by name: "dapo" (paper, verl 0.7), "dapo-boxed" (newer verl), "math-verify", "number" (the
    final answer must be one number: grading/number.py), or "module:function" returning a float, a bool, or a
    dict with "score" (and optionally "acc")."""
    if name == "dapo":
        return dapo_result
    if name == "dapo-boxed":
        return lambda r, g: dapo_result(r, g, boxed_fallback=True)
    if name == "math-verify":
        return math_verify_result
    if name == "number":
        return number_result
    if ":" in name:
        return _user_scorer(name)
    raise LoraforgeError(f"unknown reward {name!r}; expected dapo, dapo-boxed, math-verify, number or module:function")
