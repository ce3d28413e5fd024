"""`UnlearningRequest`: which training rows to remove (IR) or replace (QM, RC, QM+RC)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .data import TEXT_FIELDS, TOKEN_FIELDS, TrainingSet, read_jsonl
from .errors import DataError, InvalidRequestError
from .objective import UnlearningTask

KINDS = ("IR", "QM", "RC", "QM+RC")
CONTENT_FIELDS = TEXT_FIELDS + TOKEN_FIELDS + ("attention_mask",)


def example_digest(row: Mapping) -> str:
    """SHA-256 of a row's content (canonical JSON of its text or token fields, never its id)."""
    content = {
        k: list(row[k]) if k in TOKEN_FIELDS + ("attention_mask",) else row[k]
        for k in CONTENT_FIELDS
        if k in row
    }
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class Edit:
    """One resolved request row: the training row `index` (id `row_id`) and what it becomes."""

    row_id: object
    index: int
    kind: str
    old: Mapping
    new: Mapping | None  # None for IR


@dataclass
class ResolvedRequest:
    """A request checked against the training set; `old` and `new` are the multisets O and A of DESIGN §2."""

    edits: list[Edit]

    @property
    def old(self) -> list[Mapping]:
        return [e.old for e in self.edits]

    @property
    def new(self) -> list[Mapping]:
        return [e.new for e in self.edits if e.new is not None]

    @property
    def indices(self) -> list[int]:
        return [e.index for e in self.edits]

    def edited_rows(self, rows: Sequence[Mapping]) -> list[Mapping]:
        """The training set after the edit, as R' sums it: the kept `rows`, then the new versions."""
        removed = set(self.indices)
        return [row for i, row in enumerate(rows) if i not in removed] + self.new

    def kind_counts(self) -> dict[str, int]:
        counts = Counter(e.kind for e in self.edits)
        return {k: counts[k] for k in KINDS if counts[k]}

    def summary(self) -> dict:
        """What the manifest records: kinds, counts and digests, never content."""
        return {
            "num_edits": len(self.edits),
            "kinds": self.kind_counts(),
            "edits": [
                {
                    "id": e.row_id,
                    "kind": e.kind,
                    "old_digest": example_digest(e.old),
                    "new_digest": example_digest(e.new) if e.new is not None else None,
                }
                for e in self.edits
            ],
        }


@dataclass
class UnlearningRequest:
    """Training rows to take back out of an adapter.

    Ids name training rows by one rule, the same in Python, in the Trainer paths and on the command line
    (`data.row_ids`): a row's `"id"` field when it has one, else its position (index in the dataset, line
    number in a training file). `remove` lists row ids to forget (IR). `replace` maps a row id to its new content: text
    (`prompt` and/or `response`; a missing part keeps the old one) or pre-tokenised
    (`input_ids` + `labels`). The kind of each replacement (QM, RC, QM+RC) is derived from which part changed.
    """

    remove: list = field(default_factory=list)
    replace: dict = field(default_factory=dict)

    @classmethod
    def from_jsonl(cls, path: str | Path) -> UnlearningRequest:
        """Read `{"op": "remove", "id": ...}` / `{"op": "replace", "id": ..., <new fields>}` lines."""
        try:
            rows = read_jsonl(path, what="request file", assign_ids=False)
        except DataError as e:
            raise InvalidRequestError(str(e)) from None
        return cls.from_lines(rows, source=str(path))

    @classmethod
    def from_lines(cls, lines: list[Mapping], source: str = "request") -> UnlearningRequest:
        """The request of already-parsed request lines (as in a request file); `source` names them in errors."""
        remove, replace = [], {}
        for line_number, row in enumerate(lines, start=1):
            op, row_id = row.get("op"), row.get("id")
            if "id" not in row:
                raise InvalidRequestError(f"{source}: request line {line_number} has no 'id'.")
            if op == "remove":
                if extra := sorted(set(row) - {"op", "id"}):
                    raise InvalidRequestError(
                        f"{source}: request line {line_number} removes row {row_id!r} but also gives {extra}; a "
                        "remove line has only 'op' and 'id' (to change the row, use op 'replace')."
                    )
                remove.append(row_id)
            elif op == "replace":
                if row_id in replace:
                    raise InvalidRequestError(f"{source}: id {row_id!r} is replaced twice.")
                replace[row_id] = {k: v for k, v in row.items() if k not in ("op", "id")}
            else:
                raise InvalidRequestError(
                    f"{source}: request line {line_number} has op {op!r}; use 'remove' or 'replace'."
                )
        return cls(remove=remove, replace=replace)

    def resolve(self, train: TrainingSet, task: UnlearningTask) -> ResolvedRequest:
        """Check the request against `train` and derive each row's kind with `task.split`."""
        if not self.remove and not self.replace:
            raise InvalidRequestError("The request is empty: name at least one row to remove or replace.")
        edits, seen = [], set()
        for row_id, new_fields in [(i, None) for i in self.remove] + list(self.replace.items()):
            index = train.index_of(row_id)
            if index is None:
                raise InvalidRequestError(
                    f"Unknown training row id {row_id!r}: no training row has that id (rows are named by their "
                    f"'id' field, else by their index; {_id_hint(train)})."
                )
            if index in seen:
                raise InvalidRequestError(f"Training row {row_id!r} is named more than once in the request.")
            seen.add(index)
            old = train[index]
            if new_fields is None:
                edits.append(Edit(row_id, index, "IR", old, None))
            else:
                new, kind = _replacement(row_id, old, new_fields, task)
                edits.append(Edit(row_id, index, kind, old, new))
        if sum(e.kind == "IR" for e in edits) == len(train):
            raise InvalidRequestError(
                "The request removes every training row; there would be nothing left to fit."
            )
        return ResolvedRequest(edits)


def _id_hint(train: TrainingSet) -> str:
    named = list(train.ids[:3])
    return f"these rows' ids start {', '.join(map(repr, named))}" if named else "there are no rows"


def _replacement(row_id, old: Mapping, new_fields: Mapping, task: UnlearningTask) -> tuple[dict, str]:
    """The new version of `old` and its kind."""
    if not isinstance(new_fields, Mapping) or not new_fields:
        raise InvalidRequestError(f"Replacement for row {row_id!r} has no new content.")
    try:
        new = task.merge(old, new_fields)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"Row {row_id!r}: {e}") from None
    (old_query, old_response), (new_query, new_response) = task.split(old), task.split(new)
    qm, rc = old_query != new_query, old_response != new_response
    if not (qm or rc):
        raise InvalidRequestError(f"Replacement for row {row_id!r} is identical to the training row.")
    return new, "QM+RC" if qm and rc else ("QM" if qm else "RC")


def check_against_history(request: UnlearningRequest, train: TrainingSet, history: list[dict]) -> None:
    """A request to an already-unlearned adapter must match its earlier runs (manifests, oldest first).

    The training file must be the edited one: rows removed earlier are absent, rows replaced earlier hold
    their new version (checked by digest). A row removed earlier cannot be named again.
    """
    removed: set[str] = set()
    replaced: dict[str, str] = {}
    for run in history:
        for edit in run["request"]["edits"]:
            key = str(edit["id"])
            if edit["kind"] == "IR":
                removed.add(key)
                replaced.pop(key, None)
            else:
                replaced[key] = edit["new_digest"]
    for row_id in [*request.remove, *request.replace]:
        if str(row_id) in removed:
            raise InvalidRequestError(
                f"Row {row_id!r} was already removed by an earlier unlearning run of this adapter."
            )
    for key in sorted(removed):
        if train.index_of(key) is not None:
            raise DataError(
                f"Row {key!r} was removed by an earlier unlearning run of this adapter, but the training file still "
                "has it; give the training file as edited by the earlier runs. (Rows without an 'id' field are "
                "named by line number, which shifts when a line is deleted: give every row an 'id', or leave the "
                "removed row's line empty.)"
            )
    for key, digest in replaced.items():
        index = train.index_of(key)
        if index is None or example_digest(train[index]) != digest:
            raise DataError(
                f"Row {key!r} was replaced by an earlier unlearning run of this adapter; the training file must hold "
                "its new version."
            )
