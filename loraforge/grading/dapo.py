"""verl's DAPO math scorer (`verl/utils/reward_score/math_dapo.py`, Apache-2.0; itself adapted from
lm-evaluation-harness' Minerva normalisation), the reward the paper trained with.

    dapo_result(response, ground_truth, boxed_fallback=False) -> ScoreResult(score, acc, pred)
    dapo_score(response, ground_truth) -> float            +1.0 / -1.0

The substitution and removal lists are that scorer's data, kept verbatim because any change shifts
rewards. The paper ran verl 0.7, which reads only `Answer:`; newer verl falls back to the last
`\\boxed{}` of the final 100 characters when no `Answer:` is found (`boxed_fallback=True`).
Training rewards (`rl.rewards`) and evaluation scorers (`eval.scoring`) both use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    r"\mathrm{th}",
    r"^\circ",
    r"^{\circ}",
    r"\;",
    r",\!",
    "{,}",
    '"',
    "\\dots",
]


@dataclass(frozen=True)
class ScoreResult:
    score: float  # the reward before any length penalty
    acc: bool  # correct or not (accuracy metrics, dynamic sampling)
    pred: str | None = None  # the extracted, normalised prediction, when the scorer has one


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
                return text[start + len("\\boxed{") : i]
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
