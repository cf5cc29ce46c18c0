"""The final-number reward: 1.0 when the response's final answer is the right number written as a number,
0.0 otherwise. Made for tasks whose answers are numbers (the built-in `synthetic:` arithmetic task).

    number_result(response, ground_truth) -> ScoreResult(score, acc, pred)

Why not Math-Verify: it evaluates expressions, so on arithmetic questions a response that repeats the
question (`Answer: 12*7+3`, or `The answer is 12 * 7 + 3.`) verifies equal to 87 and is rewarded for
echoing, not computing. Here the final answer must be a single number:

  1. where the answer is: the text after the last `Answer:` (to the end of its line); else the content of
     the last `\\boxed{...}`; else the last non-empty line of the response;
  2. working may come before a final `=`: only the part after the last `=` counts (`12*7+3 = 87` -> `87`);
  3. TeX and markdown decoration is dropped (`$`, `**`, `\\(`, `\\)`, `\\boxed{}`, a trailing period);
  4. what is left must hold exactly one number and no arithmetic operator (`+ * / x × ÷ ^`, or `-` other
     than the number's own sign); words around it are allowed (`The answer is 87.`);
  5. that number must equal the ground truth numerically (`87.0` = `87`; thousands commas allowed).
"""

from __future__ import annotations

import re

from loraforge.core.errors import LoraforgeError
from loraforge.grading.dapo import ScoreResult, last_boxed

_ANSWER = re.compile(r"(?i)answer\s*:\s*([^\n]*)")
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w])|(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
# an operator: + * / × ÷ ^ anywhere, a minus between two operands (not a sign), or " x " as in "3 x 4"
_OPERATOR = re.compile(r"[+*/×÷^]|(?<=[\d)\]])\s*-\s*(?=[\d(\[])|\d\s*[x×]\s*\d")
_DECORATION = ("$", "**", "\\(", "\\)", "\\[", "\\]", "\\,")


def parse_number(text: str) -> float | None:
    """`-1,234.5` -> -1234.5; None when text is not one plain number."""
    text = text.strip()
    if not re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", text):
        return None
    return float(text.replace(",", ""))


def answer_text(response: str) -> str:
    """Steps 1-3 of the module docstring: the response's final-answer text, undecorated."""
    found = _ANSWER.findall(response)
    if found:
        text = found[-1]
    else:
        boxed = last_boxed(response)
        if boxed is not None:
            text = boxed
        else:
            lines = [ln for ln in response.splitlines() if ln.strip()]
            text = lines[-1] if lines else ""
    text = text.split("=")[-1]
    inner = last_boxed(text)
    if inner is not None:
        text = inner
    for mark in _DECORATION:
        text = text.replace(mark, " ")
    return text.strip().rstrip(".").strip()


def final_number(response: str) -> float | None:
    """The response's final answer as a number, or None when it is not exactly one number (see module doc)."""
    text = answer_text(response)
    numbers = _NUMBER.findall(text)
    if len(numbers) != 1 or _OPERATOR.search(text):
        return None
    return float(numbers[0].replace(",", ""))


def number_result(response: str, ground_truth: str) -> ScoreResult:
    """1.0 / 0.0: the response's final answer is the number ground_truth (module docstring)."""
    gold = parse_number(str(ground_truth))
    if gold is None:
        raise LoraforgeError(
            f"the number reward needs ground truths that are plain numbers, got {ground_truth!r}; "
            "use --reward dapo or math-verify for other answers"
        )
    pred = final_number(response)
    ok = pred is not None and pred == gold
    return ScoreResult(1.0 if ok else 0.0, ok, None if pred is None else f"{pred:g}")
