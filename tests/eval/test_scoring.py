"""Answer extraction and the two scorers on the edge cases that move benchmark numbers."""

import threading

import pytest

from loraforge.core.errors import LoraforgeError
from loraforge.eval.scoring import extract_answer, extract_boxed, make_scorer


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),  # nested braces kept whole
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),  # two levels deep
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"first \boxed{3} then \boxed{4}", "4"),  # the last box wins
        (r"\fbox{9}", "9"),
        (r"\boxed 7 is it", "7"),  # the brace-less form
        (r"\boxed{12", None),  # cut off inside the box: no answer, not "12"
        ("no box here", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, answer, where",
    [
        ("Answer: 42", "42", "answer-line"),
        ("answer : 42.", "42", "answer-line"),  # case, spaces, final period
        ("**Answer:** $1,000$.", "1,000", "answer-line"),  # markdown bold and $...$ unwrapped
        (r"Answer: \boxed{5}", "5", "boxed"),  # the box inside the line is the answer
        (r"I guess \boxed{4}. Wait, no.\nAnswer: 5".replace("\\n", "\n"), "5", "answer-line"),  # later wins
        (r"Answer: 3" + "\n" + r"so finally \boxed{6}", "6", "boxed"),
        ("I think it is 5", None, None),
    ],
)
def test_extract_answer(text, answer, where):
    assert extract_answer(text) == (answer, where)


@pytest.fixture(scope="module")
def mv():
    return make_scorer("math-verify")


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        (r"Answer: \boxed{\frac{1}{2}}", "0.5", True),  # fraction vs decimal: equal values
        ("Answer: 0.5", r"\frac{1}{2}", True),
        ("Answer: 0.5", r"\frac12", True),  # shorthand \frac12
        ("Answer: 0.3", r"\frac{1}{3}", False),  # not equal after 6-digit rounding
        ("Answer: 1,000", "1000", True),  # thousands separator
        (r"\boxed{1,234,567}", "1234567", True),
        ("Answer: 2,3", "23", False),  # "2,3" is the set {2, 3}, not twenty-three
        (r"\boxed{x = 3}", "3", True),  # an equation answers its right-hand side
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),  # nested braces both sides
        (r"\boxed{\{1,2\}}", "1,2", True),
        ("Answer: 12 cm", "12", True),  # units dropped
        ("Answer: 6", "5", False),
        ("The answer is 5", "5", False),  # no \boxed{} and no Answer: line: not extracted
    ],
)
def test_math_verify_scorer(mv, response, gold, correct):
    assert mv.score(response, gold).correct is correct


def test_math_verify_scorer_records_extraction(mv):
    s = mv.score(r"Answer: \boxed{\frac{1}{2}}", "0.5")
    assert s.extracted == r"\frac{1}{2}" and s.detail["where"] == "boxed"
    assert mv.score("nothing", "5").extracted is None


def test_math_verify_scorer_works_off_the_main_thread(mv):
    # Math-Verify's signal-based timeouts raise outside the main thread unless turned off.
    out = {}
    t = threading.Thread(target=lambda: out.update(s=mv.score("Answer: 1,000", "1000")))
    t.start()
    t.join()
    assert out["s"].correct


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        ("Answer: 5", "5", True),
        (r"Answer: \boxed{5}", "5", True),
        ("Answer: 1,000", "1000", True),  # commas dropped inside digit strings
        ("Answer: x = 3", "3", True),  # the last = side
        ("Answer: 0.5", r"\frac{1}{2}", False),  # DAPO compares strings: no fraction/decimal equivalence
        (r"The answer is \boxed{5}", "5", False),  # verl 0.7 reads only Answer:
        ("**Answer:** 5", "5", False),  # pred "**5": the paper's scorer is that strict
    ],
)
def test_dapo_scorer_is_the_training_reward(response, gold, correct):
    from loraforge.grading.dapo import dapo_score

    s = make_scorer("dapo").score(response, gold)
    assert s.correct is correct
    assert (dapo_score(response, gold) > 0) is correct  # the same decision as train's reward


def test_dapo_boxed_falls_back_to_the_box():
    assert make_scorer("dapo-boxed").score(r"The answer is \boxed{5}", "5").correct
    assert make_scorer("dapo-boxed").name == "dapo-boxed"


def test_unknown_scorer():
    with pytest.raises(LoraforgeError, match="math-verify, dapo, dapo-boxed, number"):
        make_scorer("exact")


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        ("Answer: 87", "87", True),
        ("12 * 7 + 3 = 87", "87", True),  # working before the final = is allowed
        ("Answer: 12*7+3", "87", False),  # an echoed expression: Math-Verify would evaluate it to 87
        ("Answer: 86", "87", False),
        ("The answer is 87.0.", "87", True),  # numerically equal
        ("hmm", "87", False),  # no number at all
    ],
)
def test_number_scorer_is_the_number_reward(response, gold, correct):
    from loraforge.grading.number import number_result

    s = make_scorer("number").score(response, gold)
    assert s.correct is correct
    assert bool(number_result(response, gold).acc) is correct  # the same decision as train's --reward number


def test_number_scorer_refuses_a_gold_that_is_not_a_number():
    with pytest.raises(LoraforgeError, match="plain numbers"):
        make_scorer("number").score("Answer: 1/2", r"\frac{1}{2}")
