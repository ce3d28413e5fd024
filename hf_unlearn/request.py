"""`UnlearningRequest`: which training rows to remove (IR) or replace (QM, RC, QM+RC)."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import json
import os
import secrets
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .data import TEXT_FIELDS, TOKEN_FIELDS, TrainingSet, read_jsonl
from .errors import ConfigurationError, DataError, InvalidRequestError
from .objective import UnlearningTask

KINDS = ("IR", "QM", "RC", "QM+RC")
CONTENT_FIELDS = TEXT_FIELDS + TOKEN_FIELDS + ("attention_mask",)

# --- keyed digests of row content ---------------------------------------------------------------------------
#
# Every digest of training-row content that hf_unlearn writes (the manifest's old/new digests, the training
# record's and the manifest's training-data digests, a sampled Nyström sketch's row digests) is an
# HMAC-SHA256 under a secret key. An unkeyed hash of a short row (a 4-digit code after a known prompt) is
# inverted by hashing every guess; a keyed one cannot be tested without the key. The key stays with the
# training data and is never written next to an adapter: `hf-unlearn` keeps it in `.hf_unlearn_key` in the
# training file's directory (created on first use, mode 0600; `--digest-key FILE` names another), the Python
# API in the file `$HF_UNLEARN_DIGEST_KEY`, else `~/.config/hf_unlearn/digest_key`, unless a key is given
# (`using_digest_key`). What is written beside an adapter names the key only by its `id`, which reveals
# nothing about it.

DIGEST_KEY_NAME = ".hf_unlearn_key"
DIGEST_KEY_ENV = "HF_UNLEARN_DIGEST_KEY"
DIGEST_PREFIX = "hmac-sha256:"


@dataclass(frozen=True)
class DigestKey:
    """The secret of the keyed row digests (32 random bytes) and the file it was read from."""

    secret: bytes = field(repr=False)
    path: str | None = None

    @property
    def id(self) -> str:
        """A public name of the key (an HMAC of a constant): tells which key made a digest, not the key."""
        return hmac.new(self.secret, b"hf_unlearn digest key id", hashlib.sha256).hexdigest()[:16]

    def digest(self, data: bytes) -> str:
        return DIGEST_PREFIX + hmac.new(self.secret, data, hashlib.sha256).hexdigest()

    @classmethod
    def generate(cls) -> DigestKey:
        return cls(secrets.token_bytes(32))

    @classmethod
    def load(cls, path: str | Path, create: bool = False) -> DigestKey:
        """The key in `path` (64 hex digits); with `create`, a new random key is written there first if the file
        does not exist (readable by its owner only)."""
        path = Path(path)
        if create and not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_new_key_file(path, secrets.token_bytes(32))
            except FileExistsError:
                pass  # made by a concurrent process (another rank): read it
            except OSError as e:
                raise ConfigurationError(
                    f"Cannot create the digest key {str(path)!r} ({e.strerror}); name a writable key file with "
                    "--digest-key FILE."
                ) from None
        if not path.is_file():
            raise ConfigurationError(f"The digest key {str(path)!r} does not exist.")
        text = path.read_text(encoding="ascii", errors="replace").strip()
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) < 16:
            raise ConfigurationError(
                f"{str(path)!r} is not an hf_unlearn digest key (it holds hex digits of at least 16 random bytes)."
            )
        return cls(secret, str(path))

    def copy_to(self, path: str | Path) -> None:
        """Write this key to `path` (readable by its owner only); a different key already there is refused."""
        path = Path(path)
        if path.exists():
            if DigestKey.load(path).secret != self.secret:
                raise ConfigurationError(
                    f"{str(path)!r} holds another digest key (id {DigestKey.load(path).id}, not {self.id}); "
                    "remove it or write the file into another directory."
                )
            return
        _write_new_key_file(path, self.secret)


def _write_new_key_file(path: Path, secret: bytes) -> None:
    """Create `path` holding `secret` in hex, readable by its owner only; `FileExistsError` if it exists. The file
    appears complete or not at all (written aside, then hard-linked), so a concurrent reader never sees it
    empty."""
    tmp = path.parent / f".{path.name}.partial-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex() + "\n")
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def digest_key_path(train_file: str | Path) -> Path:
    """Where `hf-unlearn` keeps the digest key of a training file: `.hf_unlearn_key` beside it (one key per
    directory, so that an edited copy of the file written beside it shares the key)."""
    return Path(train_file).resolve().parent / DIGEST_KEY_NAME


def default_digest_key_path() -> Path:
    """The Python API's key file: `$HF_UNLEARN_DIGEST_KEY`, else `~/.config/hf_unlearn/digest_key`."""
    if os.environ.get(DIGEST_KEY_ENV):
        return Path(os.environ[DIGEST_KEY_ENV]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "hf_unlearn" / "digest_key"


_current_key: contextvars.ContextVar[DigestKey | None] = contextvars.ContextVar(
    "hf_unlearn_digest_key", default=None
)


@contextlib.contextmanager
def using_digest_key(key: DigestKey) -> Iterator[DigestKey]:
    """Within the block, digests made without an explicit key (manifests, a sampled Nyström sketch's row
    digests) use `key`."""
    token = _current_key.set(key)
    try:
        yield key
    finally:
        _current_key.reset(token)


def current_digest_key() -> DigestKey:
    """The key of `using_digest_key`, else the Python API's key file (`default_digest_key_path`, created on
    first use)."""
    key = _current_key.get()
    return key if key is not None else DigestKey.load(default_digest_key_path(), create=True)


def _content_blob(row: Mapping) -> bytes:
    """Canonical JSON of a row's content (its text or token fields, never its id or other fields)."""
    content = {
        k: list(row[k]) if k in TOKEN_FIELDS + ("attention_mask",) else row[k]
        for k in CONTENT_FIELDS
        if k in row
    }
    return json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def row_digest(row: Mapping, key: DigestKey | None = None) -> str:
    """HMAC-SHA256 under `key` (default: `current_digest_key()`) of a row's content (its text or token fields,
    never its id): equal for equal content, and without the key no guess of the content can be tested."""
    return (key or current_digest_key()).digest(_content_blob(row))


def unkeyed_digest(row: Mapping) -> str:
    """The plain SHA-256 row digest of manifests written before keyed digests; only to read those."""
    return "sha256:" + hashlib.sha256(_content_blob(row)).hexdigest()


def rows_digests(ids: Sequence, rows: Sequence[Mapping], key: DigestKey | None = None) -> dict:
    """Keyed digests of a training set: `rows_digest` (of each row id with its content) and `content_digest`
    (of the multiset of contents, whatever the ids), with `num_rows` and the key's id. Two files with equal
    `rows_digest` hold the same rows under the same ids (in any order)."""
    key = key or current_digest_key()
    digests = [row_digest(row, key) for row in rows]
    ordered = json.dumps(sorted([str(i), d] for i, d in zip(ids, digests)), separators=(",", ":"))
    return {
        "rows_digest": key.digest(ordered.encode()),
        "content_digest": key.digest(json.dumps(sorted(digests), separators=(",", ":")).encode()),
        "num_rows": len(rows),
        "digest_key_id": key.id,
    }


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
    """A request checked against the training set; `old` and `new` are the multisets O and A of docs/method.md §2."""

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

    def edited_training_set(self, train: TrainingSet) -> tuple[list, list[Mapping]]:
        """`(ids, rows)` of the training set after the edit, in file order: removed rows gone, replaced rows
        in their place with their new content under their old id (what `hf-unlearn apply-request` writes)."""
        edits = {e.index: e for e in self.edits}
        ids, rows = [], []
        for i in range(len(train)):
            edit = edits.get(i)
            if edit is None or edit.new is not None:
                ids.append(train.ids[i])
                rows.append(train[i] if edit is None else edit.new)
        return ids, rows

    def kind_counts(self) -> dict[str, int]:
        counts = Counter(e.kind for e in self.edits)
        return {k: counts[k] for k in KINDS if counts[k]}

    def summary(self, key: DigestKey | None = None) -> dict:
        """What the manifest records: kinds, counts and keyed digests (`row_digest` under `key`, default
        `current_digest_key()`), never content."""
        key = key or current_digest_key()
        return {
            "num_edits": len(self.edits),
            "kinds": self.kind_counts(),
            "digest_key_id": key.id,
            "edits": [
                {
                    "id": e.row_id,
                    "kind": e.kind,
                    "old_digest": row_digest(e.old, key),
                    "new_digest": row_digest(e.new, key) if e.new is not None else None,
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


def about_row(row_id, error, what: str | None = None) -> str:
    """`error`'s message about request row `row_id` (`what`: which version of it), naming the row once: a
    message that starts by naming a row itself (`Row 'x'`, or `Row '?'` for a row without an id) has that name
    replaced, any other is prefixed with it."""
    message, name = str(error), f"Row {row_id!r}" + (f" ({what})" if what else "")
    for named in (f"Row {row_id!r}", "Row '?'"):
        if message.startswith(named):
            return name + message[len(named) :]
    return f"{name}: {message}"


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
        raise InvalidRequestError(about_row(row_id, e)) from None
    try:
        (old_query, old_response), (new_query, new_response) = task.split(old), task.split(new)
    except DataError as e:  # e.g. a replacement without loss tokens: named by the request's id
        raise type(e)(about_row(row_id, e)) from None
    qm, rc = old_query != new_query, old_response != new_response
    if not (qm or rc):
        raise InvalidRequestError(f"Replacement for row {row_id!r} is identical to the training row.")
    return new, "QM+RC" if qm and rc else ("QM" if qm else "RC")


def edited_training_file(path: str | Path, resolved: ResolvedRequest) -> str:
    """The text of the training file `path` with the request applied, as the next request expects it: a
    replaced row's line holds its new content (and the old line's id and other non-content fields); a removed
    row's line is deleted when every row has an `"id"`, else left empty (rows named by line number keep their
    numbers); every other line is kept byte for byte."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    rows = [(n, json.loads(line)) for n, line in enumerate(lines) if line.strip()]
    explicit_ids = all("id" in row for _, row in rows)
    edits = {e.index: e for e in resolved.edits}
    out = list(lines)
    for index, (n, row) in enumerate(rows):
        edit = edits.get(index)
        if edit is None:
            continue
        newline = "\n" if lines[n].endswith("\n") else ""
        if edit.new is None:
            out[n] = None if explicit_ids else newline
        else:
            kept = {k: v for k, v in row.items() if k not in CONTENT_FIELDS}
            out[n] = json.dumps({**kept, **edit.new}, ensure_ascii=False) + (newline or "\n")
    return "".join(line for line in out if line is not None)


def _history_edits(history: list[dict]) -> tuple[set[str], dict[str, tuple[str | None, str | None]]]:
    """The rows the earlier runs (oldest first) removed, and those they replaced and did not remove later:
    id -> (digest of the new version, digest key id)."""
    removed: set[str] = set()
    replaced: dict[str, tuple[str | None, str | None]] = {}  # id -> (digest, key id)
    for run in history:
        for edit in run["request"]["edits"]:
            row_key = str(edit["id"])
            if edit["kind"] == "IR":
                removed.add(row_key)
                replaced.pop(row_key, None)
            else:
                replaced[row_key] = (edit.get("new_digest"), run["request"].get("digest_key_id"))
    return removed, replaced


def _check_removed_rows(request: UnlearningRequest, train: TrainingSet, removed: set[str]) -> None:
    """A row removed earlier is named by no new request and is absent from the training file."""
    for row_id in [*request.remove, *request.replace]:
        if str(row_id) in removed:
            raise InvalidRequestError(
                f"Row {row_id!r} was already removed by an earlier unlearning run of this adapter."
            )
    for row_key in sorted(removed):
        if train.index_of(row_key) is not None:
            raise DataError(
                f"Row {row_key!r} was removed by an earlier unlearning run of this adapter, but the training file "
                "still has it; give the training file as edited by the earlier runs (`hf-unlearn apply-request` "
                "writes it). (Rows without an 'id' field are named by line number, which shifts when a line is "
                "deleted: give every row an 'id', or leave the removed row's line empty.)"
            )


def _check_replaced_row(
    train: TrainingSet, row_key: str, digest: str, key_id: str | None, key: DigestKey
) -> None:
    """The training file holds the new version of a row replaced earlier (its digest under the earlier runs'
    key, or the unkeyed sha256 digest of older versions)."""
    index = train.index_of(row_key)
    legacy = digest.startswith("sha256:")
    if not legacy and key_id not in (None, key.id):
        raise DataError(
            f"The earlier unlearning runs of this adapter made their digests with the digest key of id "
            f"{key_id}, but this run's key ({key.path or 'given'}) has id {key.id}: give the key of the earlier "
            "runs (--digest-key FILE; it was kept as .hf_unlearn_key beside their training file)."
        )
    actual = None
    if index is not None:
        actual = unkeyed_digest(train[index]) if legacy else row_digest(train[index], key)
    if actual != digest:
        raise DataError(
            f"Row {row_key!r} was replaced by an earlier unlearning run of this adapter; the training file must "
            "hold its new version (`hf-unlearn apply-request` writes the edited file)."
        )


def check_against_history(
    request: UnlearningRequest, train: TrainingSet, history: list[dict], key: DigestKey | None = None
) -> None:
    """A request to an already-unlearned adapter must match its earlier runs (manifests, oldest first).

    The training file must be the edited one: rows removed earlier are absent, rows replaced earlier hold
    their new version (checked by keyed digest under `key`, default `current_digest_key()`). A row removed
    earlier cannot be named again.
    """
    removed, replaced = _history_edits(history)
    _check_removed_rows(request, train, removed)
    if replaced:
        key = key or current_digest_key()
    for row_key, (digest, key_id) in replaced.items():
        if digest is not None:  # None: an unkeyed digest of an older version, dropped from the history
            _check_replaced_row(train, row_key, digest, key_id, key)
