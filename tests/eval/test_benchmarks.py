"""Benchmark loading: local files, the Hub specs' field mapping, and the errors users will hit."""

import json

import pytest

from loraforge.core.errors import LoraforgeError
from loraforge.eval.benchmarks import (
    BENCHMARKS,
    aime_year,
    gold_from_gsm8k,
    hub_rows_to_benchmark,
    load_benchmark,
    resolve_template,
)


def test_paper_settings_table3():
    # Appendix C.2, Table 3: GSM8K greedy x1 (4096), MATH500 x4 (8192), AIME x32 (16384) at T 0.6 / p 0.95.
    g, m = BENCHMARKS["gsm8k"], BENCHMARKS["math500"]
    assert (g.samples, g.temperature, g.top_p, g.max_new_tokens) == (1, 0.0, 1.0, 4096)
    assert (m.samples, m.temperature, m.top_p, m.max_new_tokens, m.ks) == (4, 0.6, 0.95, 8192, (1, 4))
    for y in (22, 23, 24):
        a = BENCHMARKS[f"aime{y}"]
        assert (a.samples, a.temperature, a.top_p, a.max_new_tokens, a.year) == (32, 0.6, 0.95, 16384, 2000 + y)
    assert (g.dataset, g.config, g.split, g.question_field) == ("openai/gsm8k", "main", "test", "question")
    assert (m.dataset, m.split, m.question_field) == ("HuggingFaceH4/MATH-500", "test", "problem")
    assert BENCHMARKS["aime24"].dataset == "AI-MO/aimo-validation-aime"


def test_local_jsonl(greedy_file):
    b = load_benchmark(str(greedy_file))
    assert b.name == "tiny" and len(b.problems) == 5
    assert (b.problems[0].id, b.problems[0].question, b.problems[0].answer) == ("a", "what is two plus three", "5")
    assert b.source["sha256"] and b.source["rows"] == 5
    assert len(load_benchmark(str(greedy_file), limit=2).problems) == 2


def test_local_json_and_question_field_names(tmp_path):
    p = tmp_path / "b.json"
    p.write_text(json.dumps([{"question": "q1", "answer": 3}, {"prompt": "q2", "answer": "x"}]))
    b = load_benchmark(str(p))
    assert [(x.id, x.question, x.answer) for x in b.problems] == [("0", "q1", "3"), ("1", "q2", "x")]


def test_gsm8k_gold_is_the_number_after_hashes(tmp_path):
    assert gold_from_gsm8k("She pays 3 * 4 = 12.\n#### 1,200") == "1200"
    assert gold_from_gsm8k(r"\frac{1}{2}") == r"\frac{1}{2}"
    rows = [{"question": "q", "answer": "work\n#### 72"}]
    b = hub_rows_to_benchmark(BENCHMARKS["gsm8k"], rows)
    assert b.problems[0].answer == "72" and b.defaults["samples"] == 1
    assert b.source["dataset"] == "openai/gsm8k"


def test_aime_years_come_from_the_url():
    url = "https://artofproblemsolving.com/wiki/index.php/{}_AIME_{}_Problems/Problem_{}"
    rows = [
        {"id": i, "problem": f"p{i}", "answer": str(i), "url": url.format(y, "I", i)}
        for i, y in enumerate([2022, 2023, 2023, 2024])
    ]
    assert aime_year(rows[1]["url"]) == 2023 and aime_year("nope") is None
    b = hub_rows_to_benchmark(BENCHMARKS["aime23"], rows)
    assert [p.question for p in b.problems] == ["p1", "p2"]
    assert b.defaults["samples"] == 32
    with pytest.raises(LoraforgeError, match="no rows whose url names 2022"):
        hub_rows_to_benchmark(BENCHMARKS["aime22"], rows[1:])


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(LoraforgeError) as e:
        load_benchmark("gsm9k")
    for name in ("gsm8k", "math500", "aime22", "aime23", "aime24"):
        assert name in str(e.value)


def test_missing_answer_field_names_field_and_row(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "b.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "solution": "2"}])
    with pytest.raises(LoraforgeError, match=r"row 2 has no `answer` field \(fields: \['problem', 'solution'\]\)"):
        load_benchmark(str(p))


def test_missing_question_field(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "b.jsonl", [{"text": "a", "answer": "1"}])
    with pytest.raises(LoraforgeError, match="row 1 has no question field"):
        load_benchmark(str(p))


def test_bad_files(tmp_path):
    with pytest.raises(LoraforgeError, match="does not exist"):
        load_benchmark(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(LoraforgeError, match="line 2 is not valid JSON"):
        load_benchmark(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LoraforgeError, match="holds no rows"):
        load_benchmark(str(empty))


def test_hub_benchmark_offline_is_a_clear_error(monkeypatch):
    # Without network (or without the `datasets` package) the error says what to do instead.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LoraforgeError) as e:
        load_benchmark("math500")
    msg = str(e.value)
    assert "HuggingFaceH4/MATH-500" in msg and "--bench" in msg


def test_prompt_templates():
    assert "{problem}" in resolve_template("dapo") and 'after "Answer:"' in resolve_template("dapo")
    assert resolve_template("raw") == "{problem}"
    assert resolve_template("Q: {problem}\nA:") == "Q: {problem}\nA:"
    with pytest.raises(LoraforgeError, match="neither a known template"):
        resolve_template("Solve it")
    with pytest.raises(LoraforgeError, match="cannot be filled"):
        resolve_template("{problem} {other}")
    assert resolve_template("{{literal}} {problem}") == "{{literal}} {problem}"


@pytest.mark.parametrize(
    "template", ["{problem}{problem[0]}", "{problem} {problem:>999999999}", "{problem}{problem!r}"]
)
def test_a_prompt_template_may_use_only_the_bare_problem(template):
    """An index, conversion or format spec on {problem} passed the check against "x" and was then applied to every
    real problem: `{problem[0]}` on an empty problem was an IndexError traceback after the model had loaded, a width
    of 999999999 a gigabyte string per prompt. Only `{problem}` as it is is a template."""
    with pytest.raises(LoraforgeError, match=r"cannot be filled \(\{problem.*use only \{problem\}, as it is"):
        resolve_template(template)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, hide_package):
    hide_package("pyarrow")
    p = tmp_path / "b.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(LoraforgeError, match="needs pyarrow: `pip install pyarrow`"):
        load_benchmark(str(p))


def test_synthetic_heldout_benchmark_is_the_task_split():
    from loraforge.eval.benchmarks import load_benchmark
    from loraforge.tasks.synthetic import synthetic_rows

    spec = "synthetic:level=1-3,n=40,split=heldout"
    bench = load_benchmark(spec)
    rows = synthetic_rows(n=40, level=(1, 3), split="heldout")
    assert [(p.question, p.answer) for p in bench.problems] == [(r["prompt"], r["answer"]) for r in rows]
    assert bench.name == spec and bench.source["synthetic"] == spec and len(bench.source["sha256"]) == 64
    assert bench.defaults["temperature"] == 0.0 and bench.defaults["max_new_tokens"] == 64
    assert len(load_benchmark(spec, limit=5).problems) == 5


def test_bench_list_keeps_a_synthetic_specs_commas():
    from loraforge.eval.config import parse_benchmarks

    got = parse_benchmarks("gsm8k,synthetic:level=1-3,n=256,split=heldout,math500,data.jsonl")
    assert got == ("gsm8k", "synthetic:level=1-3,n=256,split=heldout", "math500", "data.jsonl")


def test_bad_synthetic_benchmark_is_one_line():
    from loraforge.eval.benchmarks import load_benchmark

    with pytest.raises(LoraforgeError, match="--bench synthetic:split=dev: split must be train or heldout"):
        load_benchmark("synthetic:split=dev")


GOLD_OF_ANOTHER_KIND = [
    (None, "null"),
    (True, "true"),
    ([1, 2], "a list"),
    ({"a": 1}, "an object"),
    (float("nan"), "a number \\(nan\\)"),
    ("", "an empty string"),
]


@pytest.mark.parametrize("gold, found", GOLD_OF_ANOTHER_KIND)
def test_a_gold_answer_of_another_kind_is_refused_naming_the_row(tmp_path, gold, found):
    """eval --bench: the gold was compared as its repr ("None", "True", "[1, 2]", "nan"), so every sample scored
    wrong and the report said 0.00 with exit 0. The same check reads train --data (tests/rl/test_data.py)."""
    p = tmp_path / "b.jsonl"
    p.write_text(
        json.dumps({"problem": "a", "answer": "1"}) + "\n" + json.dumps({"problem": "b", "answer": gold}) + "\n"
    )
    with pytest.raises(LoraforgeError, match=rf"b.jsonl: row 2: `answer` is {found}, expected the gold answer"):
        load_benchmark(str(p))
    p.write_text(json.dumps({"problem": "b", "answer": 42}) + "\n")  # AIME stores ints: a number is fine
    assert load_benchmark(str(p)).problems[0].answer == "42"
