"""evaluate() end to end: the report's numbers equal a hand count.

The bigram model (conftest) answers each prompt by its last word, so which samples are right is
known before running; sampling goes through loraforge.sampling.generation, the code `train` uses.
"""

import json

import pytest

from loraforge.core.errors import LoraforgeError
from loraforge.eval import EvalConfig, evaluate, load_benchmark, run_eval
from loraforge.eval.benchmarks import Benchmark, Problem
from loraforge.eval.runner import build_prompts


def cfg(**kw):
    kw.setdefault("model", "bigram")
    kw.setdefault("benchmarks", ("x",))
    kw.setdefault("prompt_template", "raw")
    return EvalConfig(**kw).validate()


def metric(result, name):
    return next(m for m in result["metrics"] if m["metric"] == name)


def test_greedy_tiny_model_math_verify(bigram_model, tokenizer, greedy_file):
    res = evaluate(bigram_model, tokenizer, str(greedy_file), cfg(), keep_samples=True)
    # a: "Answer: 5" = 5 right; b: "Answer: 7" = 7 right; c: "Answer: 7" != 5 wrong; d: "hmm" no answer;
    # e: \boxed{\frac{1}{2}} = 0.5 right for Math-Verify.  3 of 5 -> 0.6.
    assert [s["response"] for s in res["samples"]] == [
        "Answer: 5",
        "Answer: 7",
        "Answer: 7",
        "hmm",
        "\\boxed{\\frac{1}{2}}",
    ]
    assert [s["correct"] for s in res["samples"]] == [True, True, False, False, True]
    assert metric(res, "pass@1")["score"] == pytest.approx(3 / 5)
    assert metric(res, "mean@1")["score"] == pytest.approx(3 / 5)
    assert res["counts"]["correct"] == 3 and res["counts"]["samples"] == 5 and res["counts"]["no_answer"] == 1
    assert res["scorer"] == "math-verify" and res["problems"] == 5
    assert res["settings"]["temperature"] == 0.0 and res["settings"]["samples"] == 1
    assert res["settings"]["top_k"] == -1 and res["prompt_template"] == "{problem}"
    assert res["samples"][2]["extracted"] == "7" and res["samples"][2]["gold"] == "5"
    sp = metric(res, "pass@1")["spread"]
    assert sp["kind"] == "bootstrap" and 0 < sp["std"] < 0.5


def test_greedy_tiny_model_dapo(bigram_model, tokenizer, greedy_file):
    # The DAPO scorer reads only "Answer:" lines: e (a bare box) is wrong there. 2 of 5 -> 0.4.
    res = evaluate(bigram_model, tokenizer, str(greedy_file), cfg(scorer="dapo"))
    assert metric(res, "pass@1")["score"] == pytest.approx(2 / 5)
    assert res["scorer"] == "dapo" and "samples" not in res
    assert res["counts"]["no_answer"] == 2  # "hmm" and the bare box have no Answer: line


# pass@k for n = 4, by hand: 1 - C(4-c, k) / C(4, k)
PASS_N4 = {
    1: {0: 0, 1: 1 / 4, 2: 2 / 4, 3: 3 / 4, 4: 1},
    2: {0: 0, 1: 1 - 3 / 6, 2: 1 - 1 / 6, 3: 1, 4: 1},  # C(3,2)=3, C(2,2)=1, C(4,2)=6
    4: {0: 0, 1: 1, 2: 1, 3: 1, 4: 1},
}


def test_sampled_tiny_model_matches_hand_count(bigram_model, tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"problem": "two plus three", "answer": "5"},  # always "Answer: 5": 4 of 4
            {"problem": "one plus four", "answer": "5"},  # always "Answer: 7": 0 of 4
            {"problem": "maybe", "answer": "5"},  # a fair coin between 5 and 7
        ],
    )
    res = evaluate(
        bigram_model,
        tokenizer,
        str(path),
        cfg(samples=4, k=(1, 2, 4), temperature=1.0, top_p=1.0, max_new_tokens=4),
        keep_samples=True,
    )
    by_problem = {}
    for s in res["samples"]:
        assert s["response"] in ("Answer: 5", "Answer: 7")
        by_problem.setdefault(s["problem_index"], []).append(s["response"] == "Answer: 5")
    counts = [sum(v) for _, v in sorted(by_problem.items())]
    assert counts[:2] == [4, 0] and len(by_problem[2]) == 4
    assert res["counts"]["correct_per_problem"] == [counts]
    for k in (1, 2, 4):
        hand = sum(PASS_N4[k][c] for c in counts) / 3
        assert metric(res, f"pass@{k}")["score"] == pytest.approx(hand), k
    assert metric(res, "mean@4")["score"] == pytest.approx(sum(counts) / 12)
    # the same seed gives the same samples
    again = evaluate(bigram_model, tokenizer, str(path), cfg(samples=4, k=(1, 2, 4), temperature=1.0, max_new_tokens=4))
    assert again["counts"]["correct_per_problem"] == [counts]


def fixed(responses):
    """A sampler that ignores the model: responses[i] are the n texts of prompt i."""
    return lambda prompts, settings, seed: [list(r) for r in responses[seed]]


def test_fixed_responses_pass_at_k_and_seed_spread(tokenizer):
    bench = Benchmark(
        "fixed",
        [Problem(str(i), "q", "5") for i in range(3)],
        {"memory": True},
        {"samples": 4, "ks": (1, 4), "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8},
    )
    R, W = "Answer: 5", "Answer: 6"
    seed0 = [[R, R, R, R], [R, W, W, W], [W, W, W, W]]  # c = 4, 1, 0
    seed1 = [[R, R, W, W], [W, W, W, W], [W, W, W, W]]  # c = 2, 0, 0
    res = evaluate(
        None,
        tokenizer,
        bench,
        cfg(k=(1, 2, 4), seeds=(0, 1)),
        sample_fn=fixed({0: seed0, 1: seed1}),
        model_info={"name_or_path": "none"},
    )
    # seed 0: pass@1 = (1 + 1/4 + 0)/3 = 5/12; pass@2 = (1 + 1/2 + 0)/3 = 1/2; pass@4 = (1 + 1 + 0)/3 = 2/3
    # seed 1: pass@1 = (2/4)/3 = 1/6;          pass@2 = (5/6)/3 = 5/18;       pass@4 = 1/3
    p1, p2, p4 = (metric(res, f"pass@{k}") for k in (1, 2, 4))
    assert p1["score"] == pytest.approx((5 / 12 + 1 / 6) / 2)
    assert p2["score"] == pytest.approx((1 / 2 + 5 / 18) / 2)
    assert p4["score"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert p4["spread"]["kind"] == "seeds" and p4["spread"]["per_seed"] == pytest.approx([2 / 3, 1 / 3])
    # sample std of {2/3, 1/3} = sqrt(2 * (1/6)^2 / 1) = 0.2357
    assert p4["spread"]["std"] == pytest.approx((2 * (1 / 6) ** 2) ** 0.5)
    assert metric(res, "mean@4")["score"] == p1["score"]  # mean@n is pass@1
    assert res["counts"]["correct_per_problem"] == [[4, 1, 0], [2, 0, 0]]


def test_evaluate_restores_training_mode(bigram_model, tokenizer, greedy_file):
    bigram_model.train()
    try:
        evaluate(bigram_model, tokenizer, str(greedy_file), cfg(limit=2))
        assert bigram_model.training
    finally:
        bigram_model.eval()


def test_bad_settings_are_caught_before_sampling(bigram_model, tokenizer, greedy_file):
    with pytest.raises(LoraforgeError, match="--k 4 is larger than the 1 samples per problem of tiny"):
        evaluate(bigram_model, tokenizer, str(greedy_file), cfg(k=(1, 4)))
    with pytest.raises(LoraforgeError, match="temperature 0 \\(greedy\\)"):
        evaluate(bigram_model, tokenizer, str(greedy_file), cfg(samples=4))
    with pytest.raises(LoraforgeError, match="problem a is 5 tokens, over --max-prompt-tokens 3"):
        evaluate(bigram_model, tokenizer, str(greedy_file), cfg(max_prompt_tokens=3))


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(k=(1, 8), samples=4), "--k 8 is larger than --samples 4"),
        (dict(samples=0), "--samples must be an integer >= 1"),
        (dict(top_p=0.0), "--top-p must be in \\(0, 1\\]"),
        (dict(temperature=-1.0), "--temperature must be 0 \\(greedy\\) or in \\[1e-05, 10\\]"),
        # logits / 1e-300 overflowed, the softmax went NaN and every draw was the vocabulary's last token, exit 0
        (dict(temperature=1e-300), "--temperature must be 0 \\(greedy\\) or in \\[1e-05, 10\\].*overflows"),
        (dict(seeds=(2**64,)), "--seed 18446744073709551616 is not a 64-bit integer"),  # torch: ValueError
        (dict(batch_size=0), "--batch-size"),
        (dict(limit=0), "--limit"),
        (dict(seeds=(1, 1)), "--seed values must differ"),
        (dict(scorer="exact"), "--scorer 'exact' is not known"),
        (dict(model=""), "--model is required"),
    ],
)
def test_config_errors_name_the_flag(kw, words):
    with pytest.raises(LoraforgeError, match=words):
        cfg(**kw)


def test_chat_template_wraps_prompts(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}what {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} is{% endif %}"
    )
    bench = Benchmark("b", [Problem("0", "two plus three", "5")], {})
    texts, ids, used = build_prompts(tok, bench, "{problem}", None)
    assert used and texts == ["what two plus three is"]
    texts, ids, used = build_prompts(tok, bench, "{problem}", False)
    assert not used and texts == ["two plus three"]
    with pytest.raises(LoraforgeError, match="no chat template"):
        build_prompts(tokenizer, bench, "{problem}", True)


def test_run_eval_writes_report_and_samples(bigram_model, tokenizer, greedy_file, tmp_path):
    out = tmp_path / "r" / "report.json"
    config = EvalConfig(
        model="bigram", benchmarks=(str(greedy_file), str(greedy_file)), prompt_template="raw", output=str(out)
    )
    report = run_eval(config, model=bigram_model, tokenizer=tokenizer, echo=lambda m: None)
    on_disk = json.loads(out.read_text())
    assert list(on_disk["benchmarks"]) == ["tiny", "tiny-2"]  # the same file twice stays two entries
    assert on_disk["benchmarks"]["tiny"]["metrics"][0]["score"] == pytest.approx(0.6)
    lines = (tmp_path / "r" / "report.samples.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[0])["benchmark"] == "tiny"
    assert report["samples_file"].endswith("report.samples.jsonl")


def test_load_benchmark_roundtrip_keeps_ids(greedy_file):
    assert [p.id for p in load_benchmark(str(greedy_file)).problems] == list("abcde")


def test_batch_size_smaller_than_samples(bigram_model, tokenizer, tmp_path, write_jsonl):
    # 4 samples decoded 3 rows at a time: same counts as a deterministic prompt must give.
    path = write_jsonl(
        tmp_path / "b.jsonl",
        [{"problem": "two plus three", "answer": "5"}, {"problem": "one plus four", "answer": "5"}],
    )
    res = evaluate(bigram_model, tokenizer, str(path), cfg(samples=4, temperature=1.0, max_new_tokens=3, batch_size=3))
    assert res["counts"]["correct_per_problem"] == [[4, 0]]
    assert metric(res, "pass@4")["score"] == pytest.approx(0.5)  # (1 + 0) / 2


def test_a_prompt_too_long_for_the_limit_is_refused_before_it_is_tokenised(tokenizer):
    """A 2,000,000-character problem: eval tokenised it whole (1.3 GB peak and ~40 s on a loaded 2-core CPU with
    the tiny models' word tokenizer) only to refuse it as over --max-prompt-tokens. A text longer than the limit
    times the tokenizer's longest token (in characters) cannot fit, so it is refused from its length alone; a
    prompt that can fit is still tokenised and checked as before."""
    from loraforge.sampling.generation import max_token_chars

    seen = []

    class Recording:  # the real tokenizer, noting the length of every text it is asked to tokenise
        chat_template = None

        def __call__(self, text, **kw):
            seen.append(len(text))
            return tokenizer(text, **kw)

        def get_vocab(self):
            return tokenizer.get_vocab()

    tok = Recording()
    limit = 16
    huge = Benchmark("b", [Problem("0", "two " * 500_000, "5")], {})
    with pytest.raises(LoraforgeError, match=r"b: the prompt of problem 0 is 2,000,000 characters, more than "):
        build_prompts(tok, huge, "{problem}", False, limit)
    assert seen == []  # refused from its length: never tokenised
    fits = "two " * (limit * max_token_chars(tok) // 4)  # as long as the bound allows: tokenised, then counted
    texts, ids, _ = build_prompts(tok, Benchmark("b", [Problem("0", fits, "5")], {}), "{problem}", False, limit)
    assert seen == [len(fits)] and len(ids[0]) > limit  # the token count is the check that refuses this one
