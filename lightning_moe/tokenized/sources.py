"""Reading fine-tuning documents from ``.txt`` and ``.jsonl`` files, lazily, with errors that name file and line.

A *piece* is what the reader yields and what is sharded over processes and data-loader workers:

- one JSONL line: a text document (a string field, ``text`` by default) or a conversation (a
  ``messages`` list of ``{"role", "content"}`` entries);
- about :data:`TEXT_CHUNK_BYTES` of whole lines of a ``.txt`` file. A ``.txt`` file is one
  document; it is read and tokenised a chunk at a time, the same way in memory and streaming, so a
  file larger than memory streams.

The pieces on one side of the split are numbered in file order (blank JSONL lines are not
counted) and piece ``i`` belongs to shard ``i % num_shards``. A reader reads every line (to count
them) but decodes and parses only its own, so each bad line is reported by exactly one shard.
Which side of the train/validation split a document falls on is a hash of the seed, its file and
its first line (:func:`is_validation_document`): no pass over the data, the same on every process.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

#: Bytes of whole lines per piece of a ``.txt`` file (one line longer than this is one piece).
TEXT_CHUNK_BYTES = 1 << 20
#: Suffixes the reader understands.
TEXT_SUFFIX, JSONL_SUFFIX = ".txt", ".jsonl"
#: Chat roles accepted by default.
DEFAULT_ROLES = ("system", "user", "assistant", "tool")
BAD_LINE_POLICIES = ("error", "skip")

log = logging.getLogger("lightning_moe.tokenized")


class BadInputError(ValueError):
    """A line (or file) that cannot become training data; the message starts with ``path:line:``.

    Args:
        location: ``path:line`` or ``path``.
        reason: a short category used in the skip counts (``"not JSON"``, ``"missing field"``, ...).
        detail: what is wrong and how to fix it.
    """

    def __init__(self, location: str, reason: str, detail: str) -> None:
        super().__init__(f"{location}: {detail}")
        self.location, self.reason = location, reason


@dataclass(frozen=True)
class Piece:
    """One unit of input: a JSONL line, or a chunk of a ``.txt`` document.

    Args:
        path: the file, as the user named it.
        line: the 1-based line where the piece starts.
        text: plain text, or ``None`` for a conversation.
        messages: the conversation, or ``None`` for plain text.
        starts_document: the piece opens its document (gets the tokenizer's leading special tokens).
        ends_document: the piece closes its document (gets the trailing ones and EOS).
    """

    path: str
    line: int
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    starts_document: bool = True
    ends_document: bool = True

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class BadLines:
    """What to do with bad input (``policy``: ``"error"`` raises, ``"skip"`` counts) and the counts.

    Args:
        policy: ``"error"`` or ``"skip"``.
    """

    policy: str = "error"
    counts: Counter = field(default_factory=Counter)
    first: str | None = None

    def report(self, error: BadInputError) -> None:
        """Raise ``error``, or count it when skipping."""
        if self.policy == "error":
            raise error
        self.counts[error.reason] += 1
        if self.first is None:
            self.first = str(error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def log_summary(self, what: str) -> None:
        """Warn on the ``lightning_moe.tokenized`` logger how many pieces of ``what`` were skipped, and why."""
        if self.total:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.counts.items()))
            log.warning("skipped %d bad lines of %s (%s); the first: %s", self.total, what, reasons, self.first)


def is_validation_document(path: str, line: int, *, val_fraction: float, seed: int) -> bool:
    """Whether the document that starts at ``path:line`` validates: a seeded hash below ``val_fraction``.

    The path is the one the user wrote (after glob expansion), not an absolute path, so every
    process and machine that runs the same recipe draws the same split.

    Args:
        path: the document's file.
        line: the document's first line.
        val_fraction: expected share of documents that validate.
        seed: seeds the draw.
    """
    # `surrogateescape`: a file name that is not UTF-8 hashes as its bytes instead of failing.
    digest = hashlib.blake2b(f"{seed}\0{path}\0{line}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def find_blank_file(path: Path) -> bool:
    """Whether ``path`` holds nothing but whitespace; reads only up to the first other byte."""
    with open(path, "rb") as handle:
        while block := handle.read(1 << 16):
            if block.strip():
                return False
    return True


def _decode(raw: bytes, location: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(
            location,
            "not UTF-8",
            f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line). Re-encode the file as UTF-8.",
        ) from None


@dataclass(frozen=True)
class JsonlFields:
    """Where a JSONL line keeps its text or its conversation, and the roles a conversation may use.

    Args:
        text_field: the string field of a text document; ``None`` accepts no text lines.
        messages_field: the list field of a conversation; ``None`` accepts no chat lines.
        roles: the roles a message may have.
    """

    text_field: str | None = "text"
    messages_field: str | None = "messages"
    roles: tuple[str, ...] = DEFAULT_ROLES

    def parse(self, raw: bytes, path: str, line: int) -> Piece:
        """The piece of one JSONL line (a conversation when it has ``messages_field``, else text)."""
        location = f"{path}:{line}"
        try:
            record = json.loads(_decode(raw.rstrip(b"\r\n"), location))  # columns within the line
        except json.JSONDecodeError as exc:
            raise BadInputError(location, "not JSON", f"not valid JSON ({exc.msg} at column {exc.colno}).") from None
        if not isinstance(record, dict):
            raise BadInputError(
                location, "not an object", f"expected a JSON object per line, got a {type(record).__name__}."
            )
        if self.messages_field is not None and self.messages_field in record:
            return Piece(path, line, messages=self._check_messages(record[self.messages_field], location))
        if self.text_field is not None and self.text_field in record:
            text = record[self.text_field]
            if not isinstance(text, str) or not text.strip():
                raise BadInputError(
                    location, "empty text", f"field {self.text_field!r} must be a non-empty string, got {text!r:.60}."
                )
            return Piece(path, line, text=text)
        wanted = " or ".join(repr(name) for name in (self.text_field, self.messages_field) if name is not None)
        raise BadInputError(
            location,
            "missing field",
            f"no {wanted} field (the line has {sorted(record)!r:.120}). Set `text_field` or `messages_field` to the "
            f"field your file uses.",
        )

    def _check_messages(self, messages: object, location: str) -> list[dict[str, Any]]:
        field_name = self.messages_field
        if not isinstance(messages, list) or not messages:
            raise BadInputError(location, "bad messages", f"{field_name!r} must be a non-empty list of messages.")
        for index, message in enumerate(messages):
            where = f"{field_name}[{index}]"
            if not isinstance(message, dict):
                raise BadInputError(
                    location,
                    "bad messages",
                    f"{where} must be an object with 'role' and 'content', got {message!r:.60}.",
                )
            role = message.get("role")
            if role not in self.roles:
                raise BadInputError(
                    location,
                    "bad role",
                    f"{where} has role {role!r}; expected one of {', '.join(self.roles)} "
                    f"(set `roles` to allow others).",
                )
            if not isinstance(message.get("content"), str):
                raise BadInputError(
                    location,
                    "bad messages",
                    f"{where} ({role}) needs a string 'content', got {message.get('content')!r:.60}.",
                )
        if not any(message["role"] == "assistant" for message in messages):
            raise BadInputError(
                location, "no assistant turn", "the conversation has no assistant message, so nothing to train on."
            )
        return messages


@dataclass(frozen=True)
class DocumentSource:
    """The pieces of a list of files on one side of the split, sharded, read lazily.

    Args:
        files: ``.txt`` and ``.jsonl`` files, as the user named them.
        fields: how JSONL lines are read.
        side: ``"train"``, ``"validation"`` or ``"all"`` (a separate validation list).
        val_fraction: the share of documents that validate when ``side`` is not ``"all"``.
        seed: seeds the split.
    """

    files: tuple[str, ...]
    fields: JsonlFields = JsonlFields()
    side: str = "all"
    val_fraction: float = 0.0
    seed: int = 0

    def _keeps(self, path: str, line: int) -> bool:
        if self.side == "all":
            return True
        validates = is_validation_document(path, line, val_fraction=self.val_fraction, seed=self.seed)
        return validates == (self.side == "validation")

    def pieces(self, bad_lines: BadLines, *, shard: int = 0, num_shards: int = 1) -> Iterator[Piece]:
        """This shard's pieces, in file order; bad lines go to ``bad_lines`` (which raises or counts)."""
        counter = _Counter()
        for path in self.files:
            reader = self._jsonl if path.endswith(JSONL_SUFFIX) else self._text
            yield from reader(path, counter, bad_lines, shard, num_shards)

    def _jsonl(self, path: str, counter: _Counter, bad_lines: BadLines, shard: int, num_shards: int) -> Iterator[Piece]:
        with open(path, "rb") as handle:
            for line, raw in _numbered_lines(handle):
                if not raw.strip():
                    continue  # blank lines (a trailing newline, a separator) are not documents
                if not self._keeps(path, line) or counter.next() % num_shards != shard:
                    continue
                try:
                    yield self.fields.parse(raw, path, line)
                except BadInputError as error:
                    bad_lines.report(error)

    def _text(self, path: str, counter: _Counter, bad_lines: BadLines, shard: int, num_shards: int) -> Iterator[Piece]:
        if not self._keeps(path, 1):
            return
        chunks = _line_chunks(path)
        pending = next(chunks, None)
        first = True
        while pending is not None:
            following = next(chunks, None)
            if counter.next() % num_shards == shard:
                text = []
                for line, raw in pending:
                    try:
                        text.append(_decode(raw, f"{path}:{line}"))
                    except BadInputError as error:
                        bad_lines.report(error)
                yield Piece(
                    path, pending[0][0], text="".join(text), starts_document=first, ends_document=following is None
                )
            pending, first = following, False


class _Counter:
    """Numbers pieces across files (shard ``i % num_shards`` owns piece ``i``)."""

    def __init__(self) -> None:
        self.value = -1

    def next(self) -> int:
        self.value += 1
        return self.value


_BYTE_ORDER_MARK = b"\xef\xbb\xbf"


def _numbered_lines(handle: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` from 1, without the UTF-8 byte order mark some editors write
    first (it would make the first JSONL line invalid JSON, and a text file's first token junk)."""
    for line, raw in enumerate(handle, start=1):
        yield line, raw.removeprefix(_BYTE_ORDER_MARK) if line == 1 else raw


def _line_chunks(path: str) -> Iterator[list[tuple[int, bytes]]]:
    """Runs of whole lines, ``(line number, raw bytes)``, of about :data:`TEXT_CHUNK_BYTES` each."""
    chunk: list[tuple[int, bytes]] = []
    size = 0
    with open(path, "rb") as handle:
        for line, raw in _numbered_lines(handle):
            chunk.append((line, raw))
            size += len(raw)
            if size >= TEXT_CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def check_input_files(owner: str, name: str, paths: Sequence[Path], bad_lines: BadLines) -> tuple[str, ...]:
    """``paths`` as strings, after checking their suffixes and dropping (``"skip"``) or rejecting blank files.

    Args:
        owner: the class named in errors.
        name: the argument named in errors.
        paths: the expanded files.
        bad_lines: the policy and counts; a blank file counts as ``"empty file"``.
    """
    kept = []
    for path in paths:
        if path.suffix not in (TEXT_SUFFIX, JSONL_SUFFIX):
            raise ValueError(
                f"{owner}: `{name}` entry {str(path)!r} is neither a {TEXT_SUFFIX} nor a {JSONL_SUFFIX} file. "
                f"Rename it or convert it to JSON Lines."
            )
        if find_blank_file(path):
            bad_lines.report(BadInputError(str(path), "empty file", "the file is empty (no line holds any text)."))
            continue
        kept.append(str(path))
    if not kept:
        raise ValueError(f"{owner}: every file of `{name}` is empty. Give at least one file with text.")
    return tuple(kept)
