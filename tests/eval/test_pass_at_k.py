"""pass@k against hand-computed values: 1 - C(n-c, k) / C(n, k)."""

import math
from fractions import Fraction

import pytest

from loraforge.core.errors import LoraforgeError
from loraforge.eval import mean_at_k, pass_at_k
from loraforge.eval.metrics import bootstrap_std, seed_spread


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 1, 0.25),  # 1 - C(3,1)/C(4,1) = 1 - 3/4
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 1 - 1/12
        (32, 1, 16, 0.5),  # 1 - C(31,16)/C(32,16) = 1 - 16/32
        (32, 1, 1, 1 / 32),  # pass@1 is c/n
        (32, 0, 32, 0.0),  # nothing correct
        (32, 1, 32, 1.0),  # all 32 drawn: the correct one is among them (C(31,32) = 0)
        (4, 3, 2, 1.0),  # n - c = 1 < k = 2: every pair holds a correct sample
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample():
    # The unbiased estimator draws k of the n samples WITHOUT replacement: count, over every k-subset
    # of n samples of which the first c are correct, those that hold at least one correct sample.
    # (Drawing with replacement, 1 - (1 - c/n)^k, would give 1 - (3/4)^2 = 0.4375 for n=4, c=1, k=2
    # where the subsets give 3/6 = 0.5.)
    from itertools import combinations

    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations(range(n), k))
                hit = sum(any(i < c for i in s) for s in subsets)
                assert pass_at_k(n, c, k) == pytest.approx(hit / len(subsets), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_matches_exact_fraction_without_overflow():
    # C(2000, 1000) has 600 digits: a float ratio of binomials overflows, the product form does not.
    for n, c, k in [(200, 3, 50), (2000, 7, 1000), (1024, 100, 512)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_grows_with_k_and_c():
    assert pass_at_k(32, 4, 1) < pass_at_k(32, 4, 4) < pass_at_k(32, 4, 16) < pass_at_k(32, 4, 28) < 1.0
    assert pass_at_k(32, 4, 29) == 1.0  # n - c = 28 < 29: any 29 samples include a correct one
    assert pass_at_k(32, 1, 8) < pass_at_k(32, 2, 8) < pass_at_k(32, 3, 8)


@pytest.mark.parametrize(
    "n, c, k, words",
    [
        (4, 1, 5, "k = 5 is larger than n = 4"),
        (4, 5, 1, "c (correct samples) must be in [0, n = 4]"),
        (4, -1, 1, "c (correct samples)"),
        (4, 1, 0, "k must be >= 1"),
        (0, 0, 1, "n (samples per problem) must be >= 1"),
        (4.0, 1, 1, "n must be an int"),
    ],
)
def test_pass_at_k_errors(n, c, k, words):
    with pytest.raises(LoraforgeError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        pass_at_k(n, c, k)


def test_mean_at_k_is_c_over_n_and_equals_pass_at_1():
    assert mean_at_k(4, 3) == 0.75
    for c in range(5):
        assert mean_at_k(4, c) == pytest.approx(pass_at_k(4, c, 1))


def test_bootstrap_and_seed_spread():
    assert bootstrap_std([1.0] * 10)["std"] == 0.0  # no variation, no spread
    sp = bootstrap_std([0.0, 1.0] * 50, resamples=500, seed=0)
    # std of the mean of 100 fair coins is 0.5 / sqrt(100) = 0.05
    assert sp["std"] == pytest.approx(0.05, abs=0.01)
    assert sp["ci95"][0] < 0.5 < sp["ci95"][1]
    assert bootstrap_std([0.0, 1.0] * 50, 200, seed=3) == bootstrap_std([0.0, 1.0] * 50, 200, seed=3)
    # per-seed: sample std of 0.5, 0.7 = sqrt(((-0.1)^2 + 0.1^2) / 1) = 0.1414...
    s = seed_spread([0.5, 0.7], [0, 1])
    assert s["std"] == pytest.approx(math.sqrt(0.02)) and s["per_seed"] == [0.5, 0.7]
