"""The final-number reward: echoed expressions score 0, a final number scores 1, and the rules of
grading/number.py one by one."""

import pytest

from loraforge.core.errors import LoraforgeError
from loraforge.grading.number import final_number, number_result
from loraforge.rl.rewards import get_scorer, math_verify_result

# 12*7+3 = 84 + 3 = 87: every echo below evaluates to the ground truth 87 but states no number.
ECHOES = [
    "Answer: 12*7+3",
    "The answer is 12 * 7 + 3.",
    "Answer: $12 \\times 7 + 3$",
    "\\boxed{12*7+3}",
    "Answer: 12 * 7 + 3 = 12*7+3",
    "I think it is 87.\nAnswer: 12*7+3",  # the stated final answer is the echo, whatever came before
]


@pytest.mark.parametrize("response", ECHOES)
def test_an_echoed_expression_scores_0(response):
    result = number_result(response, "87")
    assert (result.score, result.acc) == (0.0, False)


def test_math_verify_rewards_the_echo_the_number_reward_does_not():
    # why this scorer exists: Math-Verify evaluates 12*7+3 to 87 and pays for repeating the question
    pytest.importorskip("math_verify")
    assert math_verify_result("Answer: 12*7+3", "87").score == 1.0
    assert get_scorer("number")("Answer: 12*7+3", "87").score == 0.0


@pytest.mark.parametrize(
    "response",
    [
        "Answer: 87",
        "answer: 87.",
        "**Answer: 87**",
        "Answer: $87$",
        "\\boxed{87}",
        "The answer is 87.",  # no Answer: line and no box: the last line, one number in words
        "12 * 7 = 84\n84 + 3 = 87",  # working before the last =, on the last line
        "Answer: 87.0",  # 87.0 == 87 numerically
    ],
)
def test_the_right_final_number_scores_1(response):
    result = number_result(response, "87")
    assert (result.score, result.acc, result.pred) == (1.0, True, "87")


@pytest.mark.parametrize(
    "response,gt,expected",
    [
        ("Answer: 86", "87", None),  # wrong number: pred 86, score 0 (checked below)
        ("Answer: 87 or 88", "87", None),  # two numbers
        ("Answer: 90 - 3", "87", None),  # a minus between operands is an operator
        ("Answer: 3 x 29", "87", None),  # 3 x 29 = 87, "x" as times
        ("The answer is -5", "-5", -5.0),  # a sign is not an operator
        ("Answer: 1,000", "1000", 1000.0),  # thousands comma
        ("", "87", None),
    ],
)
def test_final_number_rules(response, gt, expected):
    if expected is None and response == "Answer: 86":
        assert final_number(response) == 86.0 and number_result(response, gt).score == 0.0
        return
    assert final_number(response) == expected
    assert number_result(response, gt).score == (1.0 if expected is not None else 0.0)


def test_a_non_numeric_ground_truth_is_refused():
    with pytest.raises(LoraforgeError, match="plain numbers"):
        number_result("Answer: 1/2", "\\frac{1}{2}")
