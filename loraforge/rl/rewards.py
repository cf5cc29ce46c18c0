"""Verifiable rewards for training: scorers by name, user reward functions, and DAPO's overlong
length penalty.

    get_scorer(name) -> Scorer        "dapo", "dapo-boxed", "math-verify", "number" or "module:function"
    math_verify_result(response, ground_truth) -> ScoreResult   1.0 / 0.0 (Math-Verify, gold boxed as verl does)
    overlong_penalty(length, max_len, buffer, factor) -> float   <= 0, added to the score

A Scorer maps (response, ground_truth) to a ScoreResult; `acc` is what accuracy metrics and dynamic
sampling use (it is logged before any length penalty, as DAPO does). The DAPO scorer itself lives in
`loraforge.grading.dapo`, shared with `loraforge eval`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Callable

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
