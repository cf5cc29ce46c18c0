"""Training prompts with verifiable answers: reading rows, recognising their format, the synthetic
arithmetic task, prompt formatting, and a resumable shuffled stream of prompt batches.

Row formats recognised (per row, so mixed files work):
  DAPO-Math-17k  {"prompt": [{"role": "user", "content": ...}], "reward_model": {"ground_truth": ...}}
  GSM8K          {"question": ..., "answer": "... #### 42"}     ground truth: after the last ####, commas dropped
  plain          {"prompt": "..." or chat messages, "answer": ...}   ("ground_truth" is accepted for "answer")
Sources: a local .jsonl / .json / .parquet file, a Hub dataset id (needs the `datasets` package),
or `synthetic[:key=value,...]`, the built-in arithmetic task (see `synthetic_rows`).
"""

from __future__ import annotations

import builtins
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.core.errors import LoraforgeError
from loraforge.core.rowfiles import read_row_file

# The instruction DAPO-Math-17k's prompts carry; the DAPO scorer reads the "Answer:" line it asks for.
DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{question}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


@dataclass(frozen=True)
class Example:
    prompt: str | list  # text, or chat messages [{"role", "content"}]
    ground_truth: str
    is_question: bool = False  # a bare question (GSM8K, synthetic) that the prompt template wraps


# ------------------------------------------------------------------------------------------------
# reading
def read_rows(source: str, split: str = "train") -> list[dict]:
    """Rows of a local jsonl/json/parquet file, a Hub dataset, or the synthetic task, as dicts."""
    if source == "synthetic" or source.startswith("synthetic:"):
        return synthetic_rows(**_parse_synthetic(source))
    path = Path(source)
    if path.is_file():
        return read_row_file(path)
    if path.exists() or source.startswith((".", "/")) or Path(source).suffix in (".jsonl", ".json", ".parquet"):
        raise LoraforgeError(f"--data {source}: no such file; expected a .jsonl, .json or .parquet file")
    return _read_hub(source, split)


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise LoraforgeError(
            f"--data {name}: not a local file; reading a Hub dataset needs the datasets package "
            "(pip install datasets), or download it and pass the .parquet/.jsonl file"
        ) from e
    config = None
    if ":" in name:  # e.g. openai/gsm8k:main
        name, config = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing split, ...: say what was asked
        raise LoraforgeError(f"--data {name}: could not load split {split!r} from the Hub ({e})") from e
    return [dict(r) for r in ds]


# ------------------------------------------------------------------------------------------------
# recognising rows
def to_example(row: Any, index: int, source: str = "data") -> Example:
    """One row -> Example; a row without the needed fields raises naming the field and the row."""
    where = f"{source}: row {index}"
    if not isinstance(row, dict):
        raise LoraforgeError(f"{where} is a {type(row).__name__}, expected an object with prompt and answer fields")
    if "reward_model" in row:  # DAPO-Math-17k / verl format
        rm = row["reward_model"]
        if not isinstance(rm, dict) or rm.get("ground_truth") in (None, ""):
            raise LoraforgeError(f"{where} has no field reward_model.ground_truth (verl/DAPO format); add it")
        if "prompt" not in row:
            raise LoraforgeError(f"{where} has no field prompt (verl/DAPO format: a list of chat messages)")
        return Example(_prompt(row["prompt"], where), str(rm["ground_truth"]))
    if "question" in row and "prompt" not in row:  # GSM8K
        if "answer" not in row:
            raise LoraforgeError(f"{where} has no field answer (GSM8K format: question + answer ending in #### N)")
        answer = str(row["answer"])
        if "####" in answer:
            answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
        return Example(str(row["question"]), answer, is_question=True)
    if "prompt" not in row:
        raise LoraforgeError(
            f"{where} has no field prompt; found fields {sorted(row)}; expected prompt + answer, "
            "question + answer (GSM8K) or prompt + reward_model.ground_truth (DAPO-Math)"
        )
    for key in ("answer", "ground_truth"):
        if key in row and row[key] not in (None, ""):
            return Example(_prompt(row["prompt"], where), str(row[key]), is_question=bool(row.get("_question")))
    raise LoraforgeError(f"{where} has no field answer (the ground truth); found fields {sorted(row)}")


def _prompt(value: Any, where: str) -> str | list:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": m.get("role", "user"), "content": m["content"]} for m in value]
    raise LoraforgeError(f"{where}: field prompt must be a string or a list of {{role, content}} messages")


def load_examples(source: str, split: str = "train") -> list[Example]:
    rows = read_rows(source, split)
    if not rows:
        raise LoraforgeError(f"--data {source}: no rows found")
    return [to_example(r, i, source) for i, r in enumerate(rows)]


# ------------------------------------------------------------------------------------------------
# the synthetic task
# Difficulty levels: each sets terms, ops, min, max and style; keys given next to level= override them.
# Chosen for SmolLM2-135M-Instruct (see examples/replication): level 1 is mastered in a few steps, the
# higher ones leave room to learn over a run.
SYNTHETIC_LEVELS: dict[int, dict[str, Any]] = {
    1: {"terms": 2, "ops": "+", "min": 0, "max": 20, "style": "question"},  # 7 + 12
    2: {"terms": 2, "ops": "+-", "min": 0, "max": 50, "style": "question"},  # 31 - 48
    3: {"terms": 2, "ops": "*", "min": 1, "max": 12, "style": "question"},  # 7 * 12
    4: {"terms": 3, "ops": "+-", "min": 0, "max": 50, "style": "question"},  # 31 - 8 + 44
    5: {"terms": 3, "ops": "+-*", "min": 1, "max": 20, "style": "question"},  # 7 * 12 - 5
    6: {"terms": 4, "ops": "+-*", "min": 1, "max": 50, "style": "question"},  # 9 + 23 * 4 - 17
    7: {"terms": 3, "ops": "+-*", "min": 2, "max": 20, "style": "word"},  # a two-step story, left to right
    8: {"terms": 4, "ops": "+-*", "min": 2, "max": 50, "style": "word"},  # a three-step story, left to right
}
_SYNTHETIC_INT_KEYS = ("n", "max", "min", "terms", "seed")
_SYNTHETIC_KEYS = {*_SYNTHETIC_INT_KEYS, "ops", "style", "level"}


def _parse_synthetic(spec: str) -> dict[str, Any]:
    """`synthetic:level=3,n=500` -> keyword arguments of synthetic_rows; a malformed spec raises one line."""
    out: dict[str, Any] = {}
    if spec != "synthetic" and not spec.startswith("synthetic:"):
        raise LoraforgeError(f"--data {spec}: expected synthetic or synthetic:key=value,...")
    if ":" in spec:
        for part in spec.split(":", 1)[1].split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise LoraforgeError(f"--data {spec}: expected key=value pairs after synthetic:, got {part!r}")
            out[key.strip()] = value.strip()
    bad = sorted(set(out) - _SYNTHETIC_KEYS)
    if bad:
        raise LoraforgeError(f"--data {spec}: unknown synthetic option(s) {bad}; known: {sorted(_SYNTHETIC_KEYS)}")
    for key in _SYNTHETIC_INT_KEYS:
        if key in out:
            try:
                out[key] = int(out[key])
            except ValueError:
                raise LoraforgeError(f"--data {spec}: {key} must be an integer, got {out[key]!r}") from None
    if "level" in out:
        out["level"] = _parse_levels(out["level"], spec)
    return out


def _parse_levels(text: str, spec: str) -> int | tuple[int, int]:
    """`3` -> 3, `1-3` -> (1, 3); anything else raises naming the known levels."""
    lo, sep, hi = text.partition("-")
    try:
        levels = (int(lo), int(hi)) if sep else int(lo)
    except ValueError:
        levels = None
    known = sorted(SYNTHETIC_LEVELS)
    flat = levels if isinstance(levels, tuple) else (levels, levels)
    if levels is None or flat[0] not in known or flat[1] not in known or flat[0] > flat[1]:
        raise LoraforgeError(f"--data {spec}: level must be one of {known} or a range like 1-3, got {text!r}")
    return levels


def synthetic_rows(
    n: int = 2000,
    max: int | None = None,
    min: int | None = None,
    ops: str | None = None,
    terms: int | None = None,
    seed: int = 0,
    style: str | None = None,
    level: int | tuple[int, int] | None = None,
) -> list[dict]:
    """Arithmetic problems with exact integer answers, deterministic in `seed`.

    `synthetic:n=2000,max=20,ops=+-,terms=2,style=question` makes rows like
    {"prompt": "What is 7 + 12?", "answer": "19"} (a question the prompt template wraps; the usual
    precedence: * before + and -); style=bare makes {"prompt": "7+12=", "answer": "19"}, used as is (for
    tiny test models); style=word makes a story whose steps apply left to right ("Mia has 12 apples. She
    gets 5 more. Then the number of apples is multiplied by 3. How many apples does Mia have now?", 51),
    where a subtraction never takes more than there is. `level=1..8` picks a row of SYNTHETIC_LEVELS; keys
    given with it override the level's; `level=1-3` mixes levels 1 to 3 in turn (row i from level 1 + i % 3).
    Without level, the defaults are level 1's.
    """
    if isinstance(level, tuple):  # a mix: row i from level lo + i % k, each level its own seeded stream
        lo, hi = level
        k = hi - lo + 1
        parts = [
            synthetic_rows(-(-n // k), max, min, ops, terms, seed * 1_000 + lv, style, lv) for lv in range(lo, hi + 1)
        ]
        return [parts[i % k][i // k] for i in range(n)]
    if level is not None and level not in SYNTHETIC_LEVELS:
        raise LoraforgeError(f"synthetic level must be one of {sorted(SYNTHETIC_LEVELS)}, got {level}")
    base = SYNTHETIC_LEVELS[level or 1]
    max = base["max"] if max is None else max
    min = base["min"] if min is None else min
    ops = base["ops"] if ops is None else ops
    terms = base["terms"] if terms is None else terms
    style = base["style"] if style is None else style
    if style not in ("question", "bare", "word"):
        raise LoraforgeError(f"synthetic style must be question, bare or word, got {style!r}")
    if not ops or any(o not in "+-*" for o in ops):
        raise LoraforgeError(f"synthetic ops must be made of + - *, got {ops!r}")
    if terms < 2 or n < 1 or max < min or min < 0:
        raise LoraforgeError(
            f"synthetic needs terms >= 2, n >= 1 and 0 <= min <= max; got terms={terms}, n={n}, min={min}, max={max}"
        )
    rng = random.Random(seed)
    if style == "word":
        return [_word_problem(rng, terms, ops, min, max) for _ in range(n)]
    rows = []
    for _ in range(n):
        nums = [rng.randint(min, max) for _ in range(terms)]
        chosen = [rng.choice(ops) for _ in range(terms - 1)]
        expr = str(nums[0])
        for op, x in zip(chosen, nums[1:]):
            expr += f" {op} {x}"
        answer = eval(expr, {"__builtins__": {}})  # digits and + - * only, built above
        if style == "bare":
            rows.append({"prompt": expr.replace(" ", "") + "=", "answer": str(answer)})
        else:
            rows.append({"prompt": f"What is {expr}?", "answer": str(answer), "_question": True})
    return rows


_NAMES = {"Mia": "She", "Leo": "He", "Ava": "She", "Sam": "He", "Noah": "He", "Zoe": "She", "Omar": "He", "Lena": "She"}
_THINGS = ("apples", "marbles", "stickers", "coins", "books", "shells", "pencils", "cards")


def _word_problem(rng: random.Random, terms: int, ops: str, lo: int, hi: int) -> dict:
    """One story: a start amount, then terms - 1 steps applied in order (see synthetic_rows)."""
    name, thing = rng.choice(sorted(_NAMES)), rng.choice(_THINGS)
    pronoun = _NAMES[name]
    value = rng.randint(lo, hi)
    sentences = [f"{name} has {value} {thing}."]
    for _ in range(terms - 1):
        op = rng.choice(ops)
        if op == "-" and value < 1:
            op = "+"  # nothing left to take away
        if op == "+":
            x = rng.randint(lo, hi)
            value += x
            sentences.append(f"{pronoun} gets {x} more.")
        elif op == "-":
            low = builtins.max(1, lo)
            x = rng.randint(1, value) if value <= low else rng.randint(low, builtins.min(value, hi))
            value -= x
            sentences.append(f"{pronoun} gives away {x}.")
        else:
            x = rng.randint(2, 5)  # small factors: the story stays readable
            value *= x
            sentences.append(f"Then the number of {thing} is multiplied by {x}.")
    sentences.append(f"How many {thing} does {name} have now?")
    return {"prompt": " ".join(sentences), "answer": str(value), "_question": True}


# ------------------------------------------------------------------------------------------------
# formatting
def format_prompt(example: Example, tokenizer, template: str = "dapo", chat: bool = True) -> str:
    """The text fed to the model: the template around bare questions, then the chat template if any."""
    prompt = example.prompt
    if example.is_question and isinstance(prompt, str) and template != "none":
        text = DAPO_TEMPLATE if template == "dapo" else template
        if "{question}" not in text:
            raise LoraforgeError(
                f"--prompt-template must be dapo, none, or a text containing {{question}}, got {template!r}"
            )
        prompt = text.replace("{question}", prompt)
    has_chat = chat and getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, list):
        if has_chat:
            return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(str(m["content"]) for m in prompt)
    if has_chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


# ------------------------------------------------------------------------------------------------
# the stream of batches
class PromptStream:
    """Shuffled prompt batches, epoch after epoch, whose position can be saved and restored exactly.

    The order of epoch e is a permutation drawn from Random(seed * 1_000_003 + e), so it needs no
    saved RNG: the state is just (epoch, cursor).
    """

    def __init__(self, examples: list[Example], seed: int = 0):
        self.examples = examples
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[Example]:
        out = []
        while len(out) < size:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._perm(self.epoch)
            out.append(self.examples[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._perm(self.epoch)
