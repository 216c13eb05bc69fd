"""Streaming reader of raw-text sources: JSON lines, one sample per line, `.gz` accepted (by suffix).

Two formats, told apart per line by their fields:

    {"title": "...", "content": "...", "target_ind": [3, 17], ...}   the Extreme Classification
        Repository's raw-text sets (trn.json / tst.json, optionally .gz); `content` is optional and
        other fields (uid, target_rel, ...) are ignored. The text is the title alone, or
        `title + ". " + content` when content is non-empty (content alone when the title is blank).
    {"text": "...", "labels": [3, 17]}  or  {"text": "...", "labels": ["rust", "web"]}
        labels all integer ids or all string names.

A line is the XMC format when it has `target_ind`, or `title` without `text`; else the second format
(so `{"title", "content", "text", "labels"}` rows, as make_debian_xmc writes, are read by `text` and
`labels`). A file uses one label kind, ids or names, fixed by its first labelled line; a test file
uses its training file's kind. Texts are kept exactly as given (no stripping, no normalisation), so
they reach the tokenizer byte for byte.

One line in memory at a time. Every problem is a DataError at `file:line`: invalid JSON, not an
object, a missing field or one of the wrong type, an empty or whitespace-only text, a negative label
id, mixed label kinds, a label name that is empty or has a line break (label_names.txt holds one name
per line). Blank lines at the end of a file are ignored; a blank line followed by more data is an
error (as in the BoW reader: a hole in the middle of a file is more likely damage than intent).
Range checks of ids and lookups of names need the label space: `TextSource.ids`.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Literal

import numpy as np

from pipeline.data.errors import DataError

LabelKind = Literal["ids", "names"]
_KIND_WORDS = {"ids": "integer label ids", "names": "string label names"}
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


@dataclass
class TextRow:
    """One sample as read: 1-based line number, its text, its labels (ids or names, as in the file)."""

    line: int
    text: str
    labels: list[int] | list[str]


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), "a number")


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _open_binary(path: str) -> IO[bytes]:
    """Binary, so lines split on b"\\n" only (a text-mode file would also split on a lone "\\r")."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


class TextSource:
    """Iterable of TextRow over a JSON-lines file; `label_kind` is known after the first labelled row.

    label_kind: the kind the file must use (a test file: its training file's), named in errors as
    coming from `kind_from`; None: fixed by the file's first labelled line. require_labels=False lets
    rows leave out their label field (texts to predict): they read as no labels.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        label_kind: LabelKind | None = None,
        kind_from: str | None = None,
        *,
        require_labels: bool = True,
    ) -> None:
        self.path = str(path)
        self.require_labels = require_labels
        self.label_kind: LabelKind | None = label_kind
        self._kind_where = f"the training file {kind_from}" if kind_from else "this data set"

    def _fail(self, message: str, line: int | None) -> DataError:
        return DataError(message, file=self.path, line=line)

    def __iter__(self) -> Iterator[TextRow]:
        try:
            file = _open_binary(self.path)
        except OSError as exn:
            raise self._fail(f"cannot read: {exn}", None) from None
        lineno, blank = 0, None
        with file:
            try:
                for lineno, raw in enumerate(file, start=1):
                    try:
                        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    except UnicodeDecodeError as exn:
                        raise self._fail(f"not UTF-8 text: {exn}", lineno) from None
                    if not text.strip():
                        blank = blank or lineno
                        continue
                    if blank is not None:
                        raise self._fail("blank line inside the data (one JSON object per line)", blank)
                    yield self._parse(text, lineno)
            except (OSError, EOFError) as exn:  # a damaged or truncated .gz
                raise self._fail(f"cannot read: {exn}", lineno + 1) from None

    def ids(
        self, row: TextRow, num_labels: int | None, vocabulary: dict[str, int] | None = None
    ) -> np.ndarray:
        """The row's label ids (int64) in [0, num_labels) (None: no upper bound): ids checked, names
        looked up in `vocabulary` (the training file's); DataError at the row's line otherwise."""
        if row.labels and isinstance(row.labels[0], str):
            if vocabulary is None:
                raise self._fail("string label names where integer label ids were expected", row.line)
            missing = next((name for name in row.labels if name not in vocabulary), None)
            if missing is not None:
                raise self._fail(
                    f"unknown label {missing!r}: not among the {len(vocabulary)} labels of the training file",
                    row.line,
                )
            return np.array([vocabulary[name] for name in row.labels], dtype=np.int64)
        ids = np.array(row.labels, dtype=np.int64)
        if num_labels is not None and ids.size and ids.max() >= num_labels:
            raise self._fail(f"label id {ids[ids >= num_labels][0]} not in [0, {num_labels})", row.line)
        return ids

    # -- one line ----------------------------------------------------------------------------------
    def _parse(self, text: str, lineno: int) -> TextRow:
        def fail(message: str) -> DataError:
            return self._fail(message, lineno)

        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exn:
            raise fail(f"invalid JSON: {exn.msg} (column {exn.colno})") from None
        if not isinstance(obj, dict):
            raise fail(f"expected a JSON object per line, got {_json_type(obj)}")

        def field(name: str, kind: type, required: bool = True) -> object:
            if name not in obj or (not required and obj[name] is None):
                if required:
                    raise fail(f"missing field {name!r}")
                return None
            value = obj[name]
            if not isinstance(value, kind):
                want = "a string" if kind is str else "a list"
                raise fail(f"field {name!r} must be {want}, got {_json_type(value)} {_short(value)}")
            return value

        if "target_ind" in obj or ("title" in obj and "text" not in obj):
            title, content = field("title", str), field("content", str, required=False)
            labels = field("target_ind", list, self.require_labels) or []
            if not content:
                body = title
            else:
                body = content if not title.strip() else f"{title}. {content}"
            if not body.strip():
                raise fail("empty text: 'title' and 'content' are blank")
            label_field = "target_ind"
        else:
            if "text" not in obj and "labels" not in obj:
                raise fail(
                    "missing field 'text' (a {\"text\", \"labels\"} row) or 'title' (an Extreme "
                    "Classification Repository row with 'title', 'content', 'target_ind')"
                )
            body = field("text", str)
            if not body.strip():
                raise fail("empty text: field 'text' is blank")
            labels = field("labels", list, self.require_labels) or []
            label_field = "labels"
        _check_unicode(body, "text", fail)
        kind = self._label_kind(labels, label_field, fail)
        if kind is not None:
            if self.label_kind is None:
                self.label_kind, self._kind_where = kind, f"line {lineno}"
            elif kind != self.label_kind:
                raise fail(
                    f"{_KIND_WORDS[kind]}, but {self._kind_where} has {_KIND_WORDS[self.label_kind]}: "
                    "a data set uses one kind"
                )
        return TextRow(lineno, body, labels)

    @staticmethod
    def _label_kind(labels: list, name: str, fail) -> LabelKind | None:
        """ "ids", "names" or None (no labels) after checking every element."""
        what = "an integer label id" if name == "target_ind" else "an integer label id or a string name"
        is_id = [isinstance(x, int) and not isinstance(x, bool) for x in labels]
        for x, x_is_id in zip(labels, is_id, strict=True):
            if not x_is_id and (name == "target_ind" or not isinstance(x, str)):
                raise fail(f"{name}: {_short(x)} is not {what}")
        if not labels:
            return None
        if all(is_id):
            negative = next((x for x in labels if x < 0), None)
            if negative is not None:
                raise fail(f"negative label id {negative}")
            return "ids"
        if any(is_id):
            raise fail(f"{name} mixes integer label ids and string label names")
        for label in labels:
            if not label.strip():
                raise fail(f"{name}: empty label name {_short(label)}")
            if "\n" in label or "\r" in label:
                raise fail(f"{name}: label name {_short(label)} has a line break")
            _check_unicode(label, "label name", fail)
        return "names"


def read_text_rows(
    path: str | os.PathLike, names: list[str] | None = None, num_labels: int | None = None
) -> tuple[list[str], list[list[int]] | None]:
    """All texts of a JSON-lines file (either format above; label fields optional) and their label
    ids, for predicting: (texts, labels), labels None when no row has any. String labels are looked up
    in `names` (the training set's vocabulary, label_names.txt); ids must be below `num_labels`
    (default: len(names) when given). DataError at `file:line` otherwise."""
    source = TextSource(path, require_labels=False)
    rows = list(source)
    if not rows:
        raise DataError("empty input: no texts", file=source.path)
    limit = num_labels if num_labels is not None else (len(names) if names is not None else None)
    if source.label_kind is None:
        return [r.text for r in rows], None
    if source.label_kind == "names" and names is None:
        first = next(r for r in rows if r.labels)
        raise DataError(
            "string label names, but the training set has no label names file",
            file=source.path,
            line=first.line,
        )
    vocabulary = {name: i for i, name in enumerate(names)} if source.label_kind == "names" else None
    labels = [source.ids(r, limit, vocabulary).tolist() for r in rows]
    return [r.text for r in rows], labels


def _check_unicode(value: str, what: str, fail) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exn:  # JSON "\ud800": a lone surrogate has no UTF-8 form
        raise fail(f"{what} is not valid Unicode: {exn.reason} at position {exn.start}") from None


def read_names_file(path: str | os.PathLike) -> list[str]:
    """A label-names file as users have it (e.g. the XMC repository's label text): UTF-8, one name per
    line, line i = label id i, `\\n` or `\\r\\n` line ends; the last line's end is optional."""
    path = str(path)
    try:
        with _open_binary(path) as file:
            data = file.read()
    except (OSError, EOFError) as exn:
        raise DataError(f"cannot read: {exn}", file=path) from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    names = []
    for lineno, raw in enumerate(lines, start=1):
        raw = raw.removesuffix(b"\r")
        try:
            name = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exn:
            raise DataError(f"not UTF-8 text: {exn}", file=path, line=lineno) from None
        if "\r" in name:
            raise DataError("label name has a carriage return inside it", file=path, line=lineno)
        names.append(name)
    return names
