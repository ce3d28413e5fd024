"""Training rows: JSON-lines files, row ids, and tokenisation into `input_ids`/`labels`.

A row is either text, `{"prompt": ..., "response": ...}`, tokenised here with the loss on the response
tokens only, or pre-tokenised, `{"input_ids": [...], "labels": [...]}` (optionally `"attention_mask"`),
with `-100` marking positions that carry no loss. A row's id is its `"id"` field, else its 0-based line
number; ids of an in-memory dataset are its row indices.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

IGNORE_INDEX = -100
TEXT_FIELDS = ("prompt", "response")
TOKEN_FIELDS = ("input_ids", "labels")


def read_jsonl(path: str | Path, what: str = "training file", assign_ids: bool = True) -> list[dict]:
    """Read a JSON-lines file into dicts; blank lines are skipped. With `assign_ids`, a row without an
    `"id"` gets its 0-based line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The {what} {str(path)!r} does not exist.")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_number + 1} is not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: line {line_number + 1} must be a JSON object, got {type(row).__name__}."
                )
            if assign_ids:
                row.setdefault("id", line_number)
            rows.append(row)
    return rows


def row_form(row: Mapping) -> str:
    """'text' or 'tokens'; raises `DataError` for a row that is neither."""
    if all(k in row for k in TOKEN_FIELDS):
        return "tokens"
    if all(k in row for k in TEXT_FIELDS):
        return "text"
    raise DataError(
        f"Row {row.get('id', '?')!r} has neither 'prompt'+'response' nor 'input_ids'+'labels' "
        f"(fields: {sorted(row)})."
    )


@dataclass
class TextEncoding:
    """How text rows become token ids."""

    max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate tokenised rows to this many tokens (default: no truncation)."},
    )
    chat_template: bool = field(
        default=False,
        metadata={"help": "Wrap each prompt in the tokenizer's chat template as a user turn."},
    )


class ExampleEncoder:
    """Turns any row into `{"input_ids", "labels", "attention_mask"}` lists of ints."""

    def __init__(self, tokenizer=None, encoding: TextEncoding | None = None):
        self.tokenizer = tokenizer
        self.encoding = encoding or TextEncoding()

    def __call__(self, row: Mapping) -> dict:
        if row_form(row) == "tokens":
            example = {"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}
            mask = row.get("attention_mask")
            example["attention_mask"] = list(mask) if mask is not None else [1] * len(example["input_ids"])
            if not (len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])):
                raise DataError(
                    f"Row {row.get('id', '?')!r}: input_ids, labels and attention_mask differ in length."
                )
        else:
            example = self._encode_text(row)
        if self.encoding.max_length is not None:
            example = {k: v[: self.encoding.max_length] for k, v in example.items()}
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):
            raise DataError(
                f"Row {row.get('id', '?')!r} has no loss tokens (every label after the first is -100"
                + (", possibly after truncation to max_length" if self.encoding.max_length else "")
                + "); it cannot contribute to the training loss."
            )
        return example

    # As a text encoder for tokenised training rows (trainer.CollatorTask): prompt and response are encoded
    # independently, so either part of a tokenised row can be replaced while the other keeps its tokens.
    separable = True

    def _tokenizer(self, row_id="?"):
        if self.tokenizer is None:
            raise DataError(
                f"Row {row_id!r} is text (prompt/response) but no tokenizer was given; "
                "pass --tokenizer (or tokenizer=...), or give pre-tokenised input_ids/labels."
            )
        return self.tokenizer

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens: with the tokenizer's special tokens (BOS), or as the chat template's user turn
        with the generation prompt (`chat_template=True`)."""
        tok = self._tokenizer()
        if self.encoding.chat_template:
            if not getattr(tok, "chat_template", None):
                raise DataError("chat_template=True but the tokenizer has no chat template.")
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(tok(prompt, add_special_tokens=False)["input_ids"])
        return list(tok(prompt, add_special_tokens=True)["input_ids"])

    def response_ids(self, response: str) -> list[int]:
        """The response's tokens, without special tokens, then EOS."""
        tok = self._tokenizer()
        ids = list(tok(response, add_special_tokens=False)["input_ids"])
        return ids + [tok.eos_token_id] if tok.eos_token_id is not None else ids

    def __repr__(self) -> str:
        return f"ExampleEncoder(chat_template={self.encoding.chat_template})"

    def encode_text(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(prompt tokens, response tokens) of a text row, before truncation."""
        return self.prompt_ids(prompt), self.response_ids(response)

    def _encode_text(self, row: Mapping) -> dict:
        self._tokenizer(row.get("id", "?"))
        prompt_ids, response_ids = self.encode_text(row["prompt"], row["response"])
        input_ids = prompt_ids + response_ids
        return {
            "input_ids": input_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
            "attention_mask": [1] * len(input_ids),
        }


def row_ids(rows: Sequence[Mapping]) -> list:
    """The id of each row, by the one rule that request ids are resolved with (Python, Trainer and CLI alike):
    a row's `"id"` field when it has one (not None), else its position — its index in `rows`, or, for a
    training file, its 0-based line number (`read_jsonl` fills that in)."""
    column_names = getattr(rows, "column_names", None)
    if column_names is not None:  # a datasets.Dataset: read the column, not every row
        if "id" not in column_names:
            return list(range(len(rows)))
        return [i if value is None else value for i, value in enumerate(rows["id"])]
    ids = []
    for i in range(len(rows)):
        value = rows[i].get("id") if isinstance(rows[i], Mapping) else None
        ids.append(i if value is None else value)
    return ids


class TrainingSet:
    """The training rows of an adapter, addressable by row id.

    `rows` is any sequence of mappings (a list, a `datasets.Dataset`); `ids` defaults to `row_ids(rows)`: each
    row's `"id"` field, else its index.
    """

    def __init__(self, rows: Sequence[Mapping], ids: Sequence | None = None):
        self.rows = rows
        self.ids = row_ids(rows) if ids is None else list(ids)
        if len(self.ids) != len(rows):
            raise DataError(f"{len(self.ids)} ids for {len(rows)} rows.")
        self._index: dict[str, int] = {}
        for i, row_id in enumerate(self.ids):
            key = str(row_id)
            if key in self._index:
                raise DataError(f"Duplicate training row id {row_id!r} (rows {self._index[key]} and {i}).")
            self._index[key] = i

    @classmethod
    def from_jsonl(cls, path: str | Path) -> TrainingSet:
        rows = read_jsonl(path)
        if not rows:
            raise DataError(f"The training file {str(path)!r} has no rows.")
        return cls(rows, [row["id"] for row in rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Mapping:
        return self.rows[index]

    def index_of(self, row_id) -> int | None:
        return self._index.get(str(row_id))
