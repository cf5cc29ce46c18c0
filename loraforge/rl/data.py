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

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loraforge.core.errors import LoraforgeError
from loraforge.core.readers import describe
from loraforge.core.rowfiles import gold_answer, read_row_file
from loraforge.tasks.synthetic import SYNTHETIC_LEVELS, is_synthetic, rows_from_spec, synthetic_rows

__all__ = ["SYNTHETIC_LEVELS", "synthetic_rows"]  # the task lives in loraforge.tasks; names kept for imports

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
    row: int = field(default=-1, compare=False)  # its row in the source (rows past MAX_ROW_CHARS are skipped)


# ------------------------------------------------------------------------------------------------
# reading
def read_rows(source: str, split: str = "train", flag: str = "--data") -> list[dict]:
    """Rows of a local jsonl/json/parquet file, a Hub dataset, or the synthetic task, as dicts. FLAG is the
    option that named SOURCE (--data, --eval-data), for messages."""
    if is_synthetic(source):
        return rows_from_spec(source)
    path = Path(source)
    if path.is_file():
        return read_row_file(path)
    if path.exists() or source.startswith((".", "/")) or Path(source).suffix in (".jsonl", ".json", ".parquet"):
        found = "a directory" if path.is_dir() else "not a regular file (a pipe?)" if path.exists() else "no such file"
        raise LoraforgeError(f"{flag} {source}: {found}; expected a .jsonl, .json or .parquet file")
    return _read_hub(source, split, flag)


def _read_hub(name: str, split: str, flag: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise LoraforgeError(
            f"{flag} {name}: not a local file; reading a Hub dataset needs the datasets package "
            "(pip install datasets), or download it and pass the .parquet/.jsonl file"
        ) from e
    config = None
    if ":" in name:  # e.g. openai/gsm8k:main
        name, config = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing split, ...: say what was asked
        raise LoraforgeError(f"{flag} {name}: could not load split {split!r} from the Hub ({e})") from e
    return [dict(r) for r in ds]


# ------------------------------------------------------------------------------------------------
# recognising rows
def to_example(row: Any, index: int, source: str = "data") -> Example:
    """One row -> Example; a row without the needed fields raises naming the field and the row. INDEX counts from 0;
    messages count rows from 1, as eval's and the line numbers of a JSONL file do."""
    where = f"{source}: row {index + 1}"
    if not isinstance(row, dict):
        raise LoraforgeError(f"{where} is a {type(row).__name__}, expected an object with prompt and answer fields")
    if "reward_model" in row:  # DAPO-Math-17k / verl format
        rm = row["reward_model"]
        if not isinstance(rm, dict) or "ground_truth" not in rm:
            raise LoraforgeError(f"{where} has no field reward_model.ground_truth (verl/DAPO format); add it")
        if "prompt" not in row:
            raise LoraforgeError(f"{where} has no field prompt (verl/DAPO format: a list of chat messages)")
        gold = gold_answer(rm["ground_truth"], where, "reward_model.ground_truth")
        return Example(_prompt(row["prompt"], where), gold)
    if "question" in row and "prompt" not in row:  # GSM8K
        if "answer" not in row:
            raise LoraforgeError(f"{where} has no field answer (GSM8K format: question + answer ending in #### N)")
        answer = gold_answer(row["answer"], where, "answer")
        if not isinstance(row["question"], str):
            raise LoraforgeError(f"{where}: field question is {describe(row['question'])}, expected the question text")
        if "####" in answer:
            answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
        return Example(str(row["question"]), answer, is_question=True)
    if "prompt" not in row:
        raise LoraforgeError(
            f"{where} has no field prompt; found fields {sorted(row)}; expected prompt + answer, "
            "question + answer (GSM8K) or prompt + reward_model.ground_truth (DAPO-Math)"
        )
    present = [k for k in ("answer", "ground_truth") if k in row]
    filled = [k for k in present if row[k] is not None and row[k] != ""]
    for key in (filled or present)[:1]:  # an empty answer beside a filled ground_truth: the filled one
        gold = gold_answer(row[key], where, key)
        return Example(_prompt(row["prompt"], where), gold, is_question=bool(row.get("_question")))
    raise LoraforgeError(f"{where} has no field answer (the ground truth); found fields {sorted(row)}")


def _prompt(value: Any, where: str) -> str | list:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": m.get("role", "user"), "content": m["content"]} for m in value]
    raise LoraforgeError(f"{where}: field prompt must be a string or a list of {{role, content}} messages")


# A row whose prompt and answer together are longer than this is skipped (with a count in the log): a
# DAPO-Math prompt is a few thousand characters, and no --max-prompt-length keeps more than a fraction of
# this. Prompts are also cut by characters before they are tokenised (sampling.generation.prompt_ids), so
# memory follows the settings, not the data; this bounds what the scorer is handed as a ground truth.
MAX_ROW_CHARS = 1_000_000


def row_chars(example: Example) -> int:
    """The characters of an example's prompt (every message's content) and ground truth."""
    prompt = example.prompt
    text = len(prompt) if isinstance(prompt, str) else sum(len(str(m["content"])) for m in prompt)
    return text + len(example.ground_truth)


def load_examples(
    source: str, split: str = "train", echo: Callable[[str], None] | None = None, flag: str = "--data"
) -> list[Example]:
    """The rows of SOURCE as Examples; rows longer than MAX_ROW_CHARS are skipped, with one line to ECHO
    naming how many and the first (all of them skipped is an error). FLAG names SOURCE's option in messages."""
    rows = read_rows(source, split, flag)
    if not rows:
        raise LoraforgeError(f"{flag} {source}: no rows found")
    examples, skipped = [], []
    for i, r in enumerate(rows):
        e = to_example(r, i, source)
        size = row_chars(e)
        if size > MAX_ROW_CHARS:
            skipped.append((i, size))
        else:
            examples.append(dataclasses.replace(e, row=i))
    if skipped and not examples:
        raise LoraforgeError(
            f"{flag} {source}: every row is longer than {MAX_ROW_CHARS:,} characters (row {skipped[0][0] + 1}: "
            f"{skipped[0][1]:,}); expected prompts with answers, not whole documents"
        )
    if skipped and echo is not None:
        echo(
            f"warning: {flag} {source}: skipped {len(skipped)} row(s) longer than {MAX_ROW_CHARS:,} characters "
            f"(row {skipped[0][0] + 1}: {skipped[0][1]:,})"
        )
    return examples


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
