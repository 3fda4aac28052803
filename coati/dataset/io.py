"""Reading dataset files into plain records, with errors that say exactly where the data is wrong.

Every loader in :mod:`coati.dataset` starts here, so a bad line stops the run before any model is built, with
a message such as ``data/sft.jsonl: line 17: field 'output': expected a string, got list``.

Supported inputs (the content decides, not only the extension):

* JSON array (``.json``; also a ``.jsonl`` file that holds one array, read with a warning): ``record {i}``
  locations, ``i`` counted from 0 like ``data[i]``.
* JSON lines (``.jsonl`` / ``.json`` / ``.gz`` of either): ``line {n}`` locations, counted from 1 like an editor.
* ``.txt``: one document per non-blank line, read as ``{"text": line}``.
* KoChatGPT plain-text chats (``<<start conversation>>`` blocks of ``<사람>:`` / ``<챗봇>:`` turns), read as
  ``{"messages": [{"role", "content"}, ...]}`` one record per block.
* ``.parquet`` / ``.arrow`` files, a Hugging Face ``datasets`` ``save_to_disk`` directory (the ``split``
  of a ``DatasetDict``, default ``"train"``) or a directory of data files: ``row {i}`` locations.
"""
from __future__ import annotations

import gzip
import json
import logging
import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from ..errors import UserError

logger = logging.getLogger("coati")

PathLike = Union[str, Path]
DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".parquet", ".arrow", ".json.gz", ".jsonl.gz")


class DatasetFormatError(UserError, ValueError):
    """Bad dataset input. The message is ``"{path}: {location}: field '{field}': {why}"``.

    ``location`` is ``line n`` (JSON lines / text, from 1), ``record i`` (JSON array, from 0) or ``row i``
    (parquet / arrow / ``datasets``); parts that do not apply are left out.
    """

    def __init__(self, path: Any, location: str | None = None, field: str | None = None, why: str = ""):
        self.path = None if path is None else str(path)
        self.location = location
        self.field = field
        self.why = why
        parts = [self.path or "<records>"]
        if location:
            parts.append(location)
        if field:
            parts.append(f"field '{field}'")
        parts.append(why)
        super().__init__(": ".join(parts))

    def __reduce__(self):
        return (type(self), (self.path, self.location, self.field, self.why))


class EmptyFieldError(DatasetFormatError):
    """A response / prompt / text that is empty: datasets skip these with ``empty="skip"`` (the default)."""


@dataclass(frozen=True)
class Record:
    """One raw example and where it came from, so later checks can still point at the source line."""

    data: dict
    location: str
    path: str = "<records>"
    meta: dict = dc_field(default_factory=dict, compare=False)

    def error(self, field: str | None, why: str, cls: type = DatasetFormatError) -> DatasetFormatError:
        return cls(self.path, self.location, field, why)


def _open_text(path: Path) -> str:
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return f.read()


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    return Path(name[:-3]).suffix if name.endswith(".gz") else path.suffix.lower()


def read_records(path: PathLike, *, split: str = "train") -> list[Record]:
    """Read every record of one file or directory; raises :class:`DatasetFormatError` on bad input."""
    p = Path(path)
    if not p.exists():
        raise DatasetFormatError(p, None, None, "no such file or directory")
    if p.is_dir():
        records = _read_dir(p, split)
    else:
        suffix = _base_suffix(p)
        if suffix == ".parquet":
            records = _read_parquet(p)
        elif suffix == ".arrow":
            records = _read_arrow(p)
        else:
            records = _read_text_file(p, suffix)
    if not records:
        raise DatasetFormatError(p, None, None, "empty file: no records found")
    return records


def _read_text_file(p: Path, suffix: str) -> list[Record]:
    try:
        text = _open_text(p)
    except UnicodeDecodeError as e:
        raise DatasetFormatError(p, None, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    text = text.lstrip("\ufeff")
    stripped = text.lstrip()
    if not stripped:
        raise DatasetFormatError(p, None, None, "empty file: no records found")
    if stripped.startswith(KOCHAT_START):
        return _read_kochat(p, text)
    if stripped.startswith("["):
        return _read_json_array(p, text, suffix)
    if suffix == ".txt":
        return [Record({"text": line}, f"line {n}", str(p)) for n, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    return _read_json_lines(p, text)


def _read_json_array(p: Path, text: str, suffix: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(p, f"line {e.lineno}", None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DatasetFormatError(p, None, None, f"expected a JSON array of objects, got {type(data).__name__}")
    if suffix == ".jsonl":
        logger.warning("%s holds one JSON array, not JSON lines; reading it as an array", p)
    out = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DatasetFormatError(p, f"record {i}", None, f"expected a JSON object, got {type(obj).__name__}")
        out.append(Record(obj, f"record {i}", str(p)))
    return out


def _read_json_lines(p: Path, text: str) -> list[Record]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if not out:  # maybe one pretty-printed object rather than JSON lines
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    return [Record(whole, "record 0", str(p))]
            raise DatasetFormatError(p, f"line {n}", None,
                                     f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetFormatError(p, f"line {n}", None, f"expected a JSON object, got {type(obj).__name__}")
        out.append(Record(obj, f"line {n}", str(p)))
    return out


# KoChatGPT SFT conversations: plain text blocks.
KOCHAT_START = "<<start conversation>>"
KOCHAT_ROLES = {"<사람>": "user", "<챗봇>": "assistant"}
_KOCHAT_TURN = re.compile(r"^(<사람>|<챗봇>)\s*:\s?(.*)$")


def _read_kochat(p: Path, text: str) -> list[Record]:
    """One record per ``<<start conversation>>`` block; a line without a speaker tag continues the turn."""
    out: list[Record] = []
    messages: list[dict] | None = None
    start = 0
    turn_lines: list[int] = []

    def flush() -> None:
        if messages is None:
            return
        for m in messages:
            m["content"] = m["content"].strip()
        if not messages:
            raise DatasetFormatError(p, f"line {start}", None, "conversation block has no turns")
        out.append(Record({"messages": messages}, f"line {start}", str(p), {"turn_lines": turn_lines}))

    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() == KOCHAT_START:
            flush()
            messages, start, turn_lines = [], n, []
            continue
        m = _KOCHAT_TURN.match(line)
        if m:
            if messages is None:
                raise DatasetFormatError(p, f"line {n}", None, f"turn before the first '{KOCHAT_START}'")
            messages.append({"role": KOCHAT_ROLES[m.group(1)], "content": m.group(2)})
            turn_lines.append(n)
        elif line.strip():
            if not messages:
                raise DatasetFormatError(p, f"line {n}", None,
                                         "expected a '<사람>:' or '<챗봇>:' turn or '<<start conversation>>'")
            messages[-1]["content"] += "\n" + line
    flush()
    return out


def _rows_to_records(rows: Iterable[dict], path: str) -> list[Record]:
    return [Record(dict(row), f"row {i}", path) for i, row in enumerate(rows)]


def _read_parquet(p: Path) -> list[Record]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    return _rows_to_records(pq.read_table(p).to_pylist(), str(p))


def _read_arrow(p: Path) -> list[Record]:
    from datasets import Dataset

    return _rows_to_records(Dataset.from_file(str(p)).to_list(), str(p))


def _read_dir(p: Path, split: str) -> list[Record]:
    if any((p / name).exists() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DatasetFormatError(p, None, None, f"no split '{split}' (splits: {sorted(ds)})")
            ds = ds[split]
        return _rows_to_records(ds.to_list(), str(p))
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(DATA_SUFFIXES)
                   and not f.name.startswith("."))
    chosen = [f for f in files if split in f.relative_to(p).as_posix()] or files
    if not chosen:
        raise DatasetFormatError(p, None, None, f"no data files ({', '.join(DATA_SUFFIXES)}) in directory")
    out: list[Record] = []
    for f in chosen:
        out.extend(read_records(f))
    return out


Source = Union[PathLike, Sequence[Any], Any]


def load_records(source: Source, *, split: str = "train") -> list[Record]:
    """Records from a path, a list of paths, a list of dicts / Records, or a ``datasets.Dataset``."""
    if isinstance(source, (str, Path)):
        return read_records(source, split=split)
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        records = _rows_to_records(source.to_list(), "<datasets.Dataset>")
    else:
        items = list(source)
        if items and all(isinstance(x, (str, Path)) for x in items):
            return [r for x in items for r in read_records(x, split=split)]
        records = []
        for i, x in enumerate(items):
            if isinstance(x, Record):
                records.append(x)
            elif isinstance(x, dict):
                records.append(Record(x, f"record {i}"))
            else:
                raise DatasetFormatError(None, f"record {i}", None, f"expected a dict, got {type(x).__name__}")
    if not records:
        raise DatasetFormatError(None, None, None, "no records given")
    return records
