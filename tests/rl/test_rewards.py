"""The DAPO scorer against every test vector of the RLVR reference (docs/design.md), plus the other scorers and the
overlong penalty with hand-computed numbers."""

import pytest

from loraforge.core.errors import LoraforgeError
from loraforge.grading.dapo import dapo_result, dapo_score, normalize_final_answer
from loraforge.rl.rewards import get_scorer, math_verify_score, overlong_penalty

# (response, ground truth, score): the RLVR reference's table, verbatim
RLVR_VECTORS = [
    ("Answer: 5", "5", 1.0),
    ("Answer: \\boxed{5}", "5", 1.0),
    ("**Answer:** \\boxed{5}", "5", -1.0),
    ("The answer is \\boxed{5}", "5", -1.0),
    ("Answer: 0.5", "\\frac{1}{2}", -1.0),
    ("Answer: 1,000", "1000", 1.0),
    ("Answer: x = 3", "3", 1.0),
]


@pytest.mark.parametrize("response,gt,score", RLVR_VECTORS)
def test_dapo_score_rlvr_vectors(response, gt, score):
    assert dapo_score(response, gt) == score


def test_dapo_preds_named_in_rlvr():
    # "**Answer:** \boxed{5}": the capture is "** \boxed{5}", spaces go, \boxed{} unwraps -> "**5"
    assert dapo_result("**Answer:** \\boxed{5}", "5").pred == "**5"
    assert dapo_result("The answer is \\boxed{5}", "5").pred == "[INVALID]"
    r = dapo_result("Answer: 5", "5")
    assert r.acc is True and r.score == 1.0


def test_dapo_reads_last_answer_in_last_300_chars():
    # the last "Answer:" wins
    assert dapo_score("Answer: 4\nthinking again... Answer: 5", "5") == 1.0
    # an answer more than 300 characters before the end is not seen: 9 + 300 characters of filler
    assert dapo_score("Answer: 5" + "x" * 300, "5") == -1.0
    assert dapo_score("x" * 1000 + "Answer: 5", "5") == 1.0


def test_dapo_normalisation_details():
    assert normalize_final_answer("\\frac12") == "\\frac{1}{2}"
    assert normalize_final_answer("\\sqrt2") == "\\sqrt{2}"
    assert normalize_final_answer("$12$") == "12"
    assert normalize_final_answer("10 dollars") == "10"
    assert normalize_final_answer("\\text{(A)}") == "(A)"
    assert dapo_score("Answer: $\\frac12$", "\\frac{1}{2}") == 1.0


def test_boxed_fallback_is_the_newer_verl_behaviour():
    # verl <= 0.7 (default): no "Answer:" -> [INVALID] -> -1; newer verl reads the last \boxed{}
    assert dapo_result("The answer is \\boxed{5}", "5").score == -1.0
    r = dapo_result("The answer is \\boxed{5}", "5", boxed_fallback=True)
    assert (r.score, r.acc, r.pred) == (1.0, True, "5")
    # an "Answer:" present takes precedence even when wrong
    assert dapo_result("Answer: 4 \\boxed{5}", "5", boxed_fallback=True).score == -1.0
    assert get_scorer("dapo-boxed")("so \\boxed{5}", "5").score == 1.0


def test_math_verify_scorer():
    assert math_verify_score("The answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert math_verify_score("The answer is 7", "5") == 0.0
    r = get_scorer("math-verify")("so the result is \\boxed{12}", "12")
    assert r.score == 1.0 and r.acc


def test_overlong_penalty_hand_computed():
    # L_max 20, buffer 8 -> expected 12; alpha 1
    assert overlong_penalty(10, 20, 8, 1.0) == 0.0  # under expected: no penalty
    assert overlong_penalty(12, 20, 8, 1.0) == 0.0  # -(12-12)/8 = 0
    assert overlong_penalty(16, 20, 8, 1.0) == -0.5  # -(16-12)/8 * 1 = -0.5
    assert overlong_penalty(20, 20, 8, 1.0) == -1.0  # -(20-12)/8 = -1
    assert overlong_penalty(14, 20, 8, 0.5) == -0.125  # -(14-12)/8 * 0.5 = -0.125
    assert overlong_penalty(20, 20, 0, 1.0) == 0.0  # buffer 0: off
    # the paper: L_max 16384, buffer 4096 -> expected 12288; 14336 tokens -> -(2048/4096) = -0.5
    assert overlong_penalty(14336, 16384, 4096, 1.0) == -0.5


def test_user_scorer(tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text(
        "def f(response, gt):\n    return 2.0 if response.strip() == gt else 0.0\n"
        "def d(response, gt):\n    return {'score': -1.0, 'acc': True}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    r = get_scorer("myreward:f")(" 7", "7")
    assert (r.score, r.acc) == (2.0, True)
    assert get_scorer("myreward:d")("x", "y").acc is True
    with pytest.raises(LoraforgeError, match="myreward:nope"):
        get_scorer("myreward:nope")
    with pytest.raises(LoraforgeError, match="unknown reward"):
        get_scorer("bogus")
