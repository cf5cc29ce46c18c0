"""Row formats, the synthetic task and its difficulty levels, prompt formatting, the resumable stream, bad rows."""

import json
import re

import pytest

from loraforge.core.errors import LoraforgeError
from loraforge.rl.data import (
    DAPO_TEMPLATE,
    SYNTHETIC_LEVELS,
    PromptStream,
    format_prompt,
    load_examples,
    synthetic_rows,
    to_example,
)


def test_row_formats():
    dapo = {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": "Q?"}],
        "reward_model": {"ground_truth": "34", "style": "rule"},
    }
    e = to_example(dapo, 0)
    assert e.prompt == [{"role": "user", "content": "Q?"}] and e.ground_truth == "34" and not e.is_question
    g = to_example({"question": "How many?", "answer": "6 * 2 = 12\n#### 1,200"}, 1)
    assert g.ground_truth == "1200" and g.is_question  # after ####, commas dropped
    p = to_example({"prompt": "2+2=", "answer": 4}, 2)
    assert p.prompt == "2+2=" and p.ground_truth == "4"


@pytest.mark.parametrize(
    "row,field",
    [
        ({"prompt": "x"}, "answer"),
        ({"answer": "3"}, "prompt"),
        ({"question": "x"}, "answer"),
        (
            {"prompt": [{"role": "user", "content": "x"}], "reward_model": {"style": "rule"}},
            "reward_model.ground_truth",
        ),
    ],
)
def test_missing_field_names_field_and_row(row, field):
    with pytest.raises(LoraforgeError) as e:
        to_example(row, 7, "train.jsonl")
    # index 7 is the 8th row: messages count rows from 1
    assert "train.jsonl: row 8" in str(e.value) and f"no field {field}" in str(e.value)


def test_files_jsonl_parquet_and_errors(tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"question": "q", "answer": "#### 5"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [e.ground_truth for e in load_examples(str(tmp_path / "d.jsonl"))] == ["2", "5"]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    dapo = [{"prompt": [{"role": "user", "content": "Q"}], "reward_model": {"ground_truth": "7", "style": "r"}}]
    pq.write_table(pa.Table.from_pylist(dapo), tmp_path / "d.parquet")
    assert load_examples(str(tmp_path / "d.parquet"))[0].ground_truth == "7"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(LoraforgeError, match="row 2 has no field answer"):
        load_examples(str(tmp_path / "bad.jsonl"))
    with pytest.raises(LoraforgeError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"))


def test_synthetic_task():
    rows = synthetic_rows(n=5, max=9, ops="+*", seed=3)
    assert rows == synthetic_rows(n=5, max=9, ops="+*", seed=3)  # deterministic
    for r in rows:
        expr = r["prompt"][len("What is ") : -1]
        assert eval(expr) == int(r["answer"])
    bare = load_examples("synthetic:n=3,max=2,style=bare")
    assert all(e.prompt.endswith("=") and not e.is_question for e in bare)
    with pytest.raises(LoraforgeError, match="unknown synthetic option"):
        load_examples("synthetic:digits=3")


def test_format_prompt_templates(tokenizer):
    q = load_examples("synthetic:n=1,max=3")[0]
    text = format_prompt(q, tokenizer, "dapo", chat=True)  # the test tokenizer has no chat template
    assert text == DAPO_TEMPLATE.replace("{question}", q.prompt)
    assert format_prompt(q, tokenizer, "Q: {question}\nA:") == f"Q: {q.prompt}\nA:"
    assert format_prompt(q, tokenizer, "none") == q.prompt

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<user>" + messages[-1]["content"] + "<assistant>"

    assert format_prompt(q, Chat(), "none") == f"<user>{q.prompt}<assistant>"


def test_prompt_stream_resumes_exactly():
    examples = load_examples("synthetic:n=7,max=50")
    a = PromptStream(examples, seed=1)
    first = [a.next_batch(3) for _ in range(4)]  # 12 draws: crosses an epoch boundary (7 rows)
    b = PromptStream(examples, seed=1)
    b.next_batch(3)
    b.next_batch(3)
    state = b.state()
    c = PromptStream(examples, seed=1)
    c.load_state(state)
    assert [c.next_batch(3) for _ in range(2)] == first[2:]
    assert sorted(map(id, first[0] + first[1][:1]))  # sanity: batches are Example objects
    assert {e.prompt for e in first[0] + first[1] + [first[2][0]]} == {e.prompt for e in examples}


def _value(row):
    """The answer of a synthetic row recomputed from its prompt, independently of the generator."""
    import re

    text = row["prompt"]
    if text.startswith("What is "):
        return eval(text[len("What is ") : -1])  # "What is 7 * 12 - 5?": Python's precedence, as documented
    value = int(re.match(r"\w+ has (\d+)", text).group(1))
    for verb, x in re.findall(r"(gets|gives away|multiplied by) (\d+)", text):  # left to right
        value = value + int(x) if verb == "gets" else value - int(x) if verb == "gives away" else value * int(x)
    return value


@pytest.mark.parametrize("level", sorted(SYNTHETIC_LEVELS))
def test_synthetic_levels_are_deterministic_correct_and_as_documented(level):
    spec = SYNTHETIC_LEVELS[level]
    rows = synthetic_rows(n=200, level=level, seed=5)
    assert rows == synthetic_rows(n=200, level=level, seed=5)  # deterministic in the seed
    assert rows != synthetic_rows(n=200, level=level, seed=6)
    for r in rows:
        assert _value(r) == int(r["answer"]), r
        numbers = [int(x) for x in re.findall(r"\d+", r["prompt"])]
        if spec["style"] == "question":
            assert len(numbers) == spec["terms"]  # terms as documented
            assert all(spec["min"] <= x <= spec["max"] for x in numbers)
            ops = re.findall(r" ([-+*]) ", r["prompt"])
            assert set(ops) <= set(spec["ops"])
        else:  # a story: a start amount and terms - 1 steps; a count never goes below 0
            steps = re.findall(r"gets|gives away|multiplied by", r["prompt"])
            assert len(steps) == spec["terms"] - 1 and int(r["answer"]) >= 0
    if spec["style"] == "question":  # every allowed operation occurs
        assert {o for r in rows for o in re.findall(r" ([-+*]) ", r["prompt"])} == set(spec["ops"])


def test_synthetic_level_mix_and_overrides():
    mixed = synthetic_rows(n=9, level=(1, 3), seed=0)
    # row i comes from level 1 + i % 3: levels 1 (+), 2 (+-, two terms), 3 (*)
    assert [r["prompt"] for r in mixed[::3]] == [r["prompt"] for r in synthetic_rows(n=3, level=1, seed=1)]
    assert all("*" in r["prompt"] for r in mixed[2::3])
    assert load_examples("synthetic:level=1-3,n=9") == load_examples("synthetic:level=1-3,n=9,seed=0")
    big = synthetic_rows(n=50, level=1, max=500, min=400)  # keys next to level override it
    assert all(int(x) >= 400 for r in big for x in re.findall(r"\d+", r["prompt"]))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("synthetic:level=9", "level must be one of"),
        ("synthetic:level=3-1", "level must be one of"),
        ("synthetic:level=hard", "level must be one of"),
        ("synthetic:n=many", "n must be an integer, got 'many'"),
        ("synthetic:max", "expected key=value pairs"),
        ("synthetic:style=essay", "style must be question, bare or word"),
        ("synthetic:min=5,max=1", "0 <= min <= max"),
        ("synthetic:ops=/", "ops must be made of"),
    ],
)
def test_malformed_synthetic_spec_is_one_line(spec, message):
    with pytest.raises(LoraforgeError, match=re.escape(message)) as err:
        load_examples(spec)
    assert "\n" not in str(err.value)


def _problem_key(prompt: str) -> tuple:
    """An independent reading of a synthetic question: (op, operands), operands of + and * in order."""
    m = re.fullmatch(r"What is (\d+) ([+*-]) (\d+)\?", prompt)
    a, op, b = int(m[1]), m[2], int(m[3])
    return (op, *sorted((a, b))) if op in "+*" else (op, a, b)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_synthetic_heldout_split_is_disjoint_from_training(seed):
    train = load_examples(f"synthetic:level=1-3,n=4000,seed={seed},split=train")
    held = synthetic_rows(n=256, level=(1, 3), split="heldout", seed=seed)
    train_keys = {_problem_key(e.prompt) for e in train}
    held_keys = [_problem_key(r["prompt"]) for r in held]
    assert len(set(held_keys)) == 256  # distinct problems (7 + 12 and 12 + 7 are one)
    assert not train_keys & set(held_keys)  # no held-out problem is ever trained on, in either order
    # the training stream still covers most of the remaining space of the small levels
    assert len({k for k in train_keys if k[0] == "*"}) > 50
    for r in held:  # every answer right
        a, op, b = re.fullmatch(r"What is (\d+) ([+*-]) (\d+)\?", r["prompt"]).groups()
        assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_synthetic_heldout_part_is_the_same_for_every_seed_and_n():
    def keys(**kw):
        return {_problem_key(r["prompt"]) for r in synthetic_rows(level=3, split="heldout", **kw)}

    everything = keys(n=15, seed=0)  # level 3's held-out part: 15 of its 78 unordered pairs
    assert keys(n=15, seed=5) == everything
    assert keys(n=5, seed=2) <= everything
    with pytest.raises(LoraforgeError, match="has 15 distinct problems, fewer than n=16"):
        synthetic_rows(n=16, level=3, split="heldout")
    # the split leaves the stream without split= as it always was
    assert synthetic_rows(n=50, level=(1, 3)) == synthetic_rows(n=50, level=(1, 3), split=None)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("synthetic:split=test", "split must be train or heldout"),
        ("synthetic:level=3,min=4,max=4,split=train", "no problem outside"),
    ],
)
def test_bad_split_is_one_line(spec, message):
    with pytest.raises(LoraforgeError, match=message):
        load_examples(spec)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "answer": None}, r"row 1: `answer` is null, expected the gold answer"),
        ({"prompt": "q", "answer": [3]}, r"row 1: `answer` is a list"),
        ({"question": "q", "answer": True}, r"row 1: `answer` is true"),
        ({"question": ["q"], "answer": "3"}, r"row 1: field question is a list, expected the question text"),
        ({"prompt": "q", "reward_model": {"ground_truth": None}}, r"`reward_model.ground_truth` is null"),
        ({"prompt": "q", "reward_model": {"ground_truth": float("nan")}}, r"`reward_model.ground_truth` is a number"),
    ],
)
def test_a_gold_answer_of_another_kind_is_refused_naming_the_row(tmp_path, row, message):
    """train --data (rows counted from 0 here): the ground truth was str() of whatever the row held ("None", "[3]",
    "True"), so every reward was 0 and the run trained on nothing, exit 0. Refused in one line, as eval --bench does
    (core/rowfiles.gold_answer)."""
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(LoraforgeError, match=message):
        load_examples(str(tmp_path / "d.jsonl"))
    ok = {"prompt": "q", "answer": None, "ground_truth": 7}  # an empty answer beside a filled ground_truth
    (tmp_path / "d.jsonl").write_text(json.dumps(ok) + "\n")
    assert load_examples(str(tmp_path / "d.jsonl"))[0].ground_truth == "7"
