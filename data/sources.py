"""Corpus sources: expand a `SourceConfig` to files, read documents from them.

Formats come from the extension:

* ``.txt``, ``.py``: one document per file (UTF-8; a leading BOM is dropped).
* ``.jsonl``, ``.jsonl.gz``: one JSON object per line, the document text in
  the source's ``text_field``. Blank lines are not records and are passed over.

Bad input never disappears silently. With ``on_bad_record="error"`` it raises
``ValueError("FILE:LINE: <reason> ...")``; with ``"skip"`` it is counted per
reason in a `BadRecordCounter`, which logs the first few with their FILE:LINE.

`.parquet` and Megatron ``.bin/.idx`` prefixes are part of the design (see
DESIGN.md §6, §8) and arrive with the streaming pipeline; until then they are
refused with a clear message rather than misread.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import sysconfig
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from .config import PYTHON_STDLIB, SourceConfig

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
_LATER_SUFFIXES = (".parquet", ".bin", ".idx")  # planned: streaming pipeline issue

# Directories of the standard library that are not "the library's own source":
# test suites (some hold deliberately broken or non-UTF-8 files) and installed packages.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)

# Reasons counted by BadRecordCounter.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_FIELD_TYPE = "wrong_field_type"
UNDECODABLE_BYTES = "undecodable_bytes"
EMPTY_DOCUMENT = "empty_document"
EMPTY_FILE = "empty_file"
CORRUPT_FILE = "corrupt_file"


class BadRecordCounter:
    """Counts skipped records per reason; logs the first `max_logged` with FILE:LINE."""

    def __init__(self, max_logged: int = 10):
        self.counts: Counter[str] = Counter()
        self.max_logged = max_logged

    def record(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        n = self.total
        if n <= self.max_logged:
            logger.warning("skipping bad record (%s) at %s%s", reason, where, f": {detail}" if detail else "")
            if n == self.max_logged:
                logger.warning("further bad records are counted but not logged (data.on_bad_record=skip)")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __repr__(self) -> str:
        return f"BadRecordCounter({self.as_dict()})"


def _has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(suffixes))


def stdlib_files() -> List[str]:
    """The standard library's non-empty .py files, excluding tests and site-packages,
    sorted by path relative to the stdlib root (the same order on every machine)."""
    root = sysconfig.get_paths()["stdlib"]
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            full = os.path.join(dirpath, name)
            try:
                if os.path.getsize(full) == 0:  # empty package __init__.py: no text, not a bad record
                    continue
            except OSError:
                continue
            found.append((Path(os.path.relpath(full, root)).as_posix(), full))
    found.sort()
    return [full for _, full in found]


def _spread(files: List[str], k: Optional[int]) -> List[str]:
    """Keep `k` files evenly spread over the sorted list (deterministic)."""
    if k is None or k >= len(files):
        return files
    n = len(files)
    return [files[(i * n) // k] for i in range(k)]


def expand_source(src: SourceConfig, index: int = 0, max_files: Optional[int] = None) -> List[str]:
    """The sorted files of one source. `index` names it in errors (data.sources[i])."""
    key = f"data.sources[{index}].path"
    path = src.path
    if path == PYTHON_STDLIB:
        files = stdlib_files()
        if not files:
            raise ValueError(f"{key}: {PYTHON_STDLIB} found no .py files under {sysconfig.get_paths()['stdlib']}")
        return _spread(files, max_files)

    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise ValueError(f"{key}: glob {path!r} matched no files")
        for f in files:
            _check_format(f, key)
    elif os.path.isdir(expanded):
        files = []
        for dirpath, dirnames, filenames in os.walk(expanded):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [
                os.path.join(dirpath, f)
                for f in filenames
                if not f.startswith(".") and _has_suffix(f, SUPPORTED_SUFFIXES)
            ]
        files.sort()
        if not files:
            raise ValueError(
                f"{key}: directory {path!r} holds no files of a supported format ({', '.join(SUPPORTED_SUFFIXES)})"
            )
    elif os.path.isfile(expanded):
        _check_format(expanded, key)
        files = [expanded]
    else:
        raise ValueError(f"{key}: {path!r} does not exist")
    return _spread(files, max_files)


def _check_format(path: str, key: str) -> None:
    if _has_suffix(path, SUPPORTED_SUFFIXES):
        return
    if _has_suffix(path, _LATER_SUFFIXES):
        raise ValueError(f"{key}: {path}: this format is not supported yet (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    raise ValueError(f"{key}: {path}: unknown format (supported: {', '.join(SUPPORTED_SUFFIXES)})")


class _Bad(Exception):
    def __init__(self, reason: str, where: str, detail: str):
        super().__init__(reason)
        self.reason, self.where, self.detail = reason, where, detail


def _handle(bad: _Bad, on_bad_record: str, counter: Optional[BadRecordCounter]) -> None:
    if on_bad_record == "skip":
        if counter is None:
            raise ValueError("on_bad_record='skip' needs a BadRecordCounter")
        counter.record(bad.reason, bad.where, bad.detail)
        return
    raise ValueError(
        f"{bad.where}: {bad.reason.replace('_', ' ')}: {bad.detail} "
        "(set data.on_bad_record=skip to count and skip bad records)"
    )


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_documents(
    path: str,
    text_field: str = "text",
    on_bad_record: str = "error",
    counter: Optional[BadRecordCounter] = None,
) -> Iterator[str]:
    """Yield the document texts of one file, applying the bad-record policy."""
    try:
        if _has_suffix(path, JSONL_SUFFIXES):
            yield from _read_jsonl(path, text_field, on_bad_record, counter)
        elif _has_suffix(path, TEXT_SUFFIXES):
            yield from _read_text(path, on_bad_record, counter)
        else:
            _check_format(path, "data.sources")
    except _Bad as bad:  # a whole-file problem (the per-record ones are handled inside)
        _handle(bad, on_bad_record, counter)


def _read_text(path: str, on_bad_record: str, counter: Optional[BadRecordCounter]) -> Iterator[str]:
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise _Bad(EMPTY_FILE, f"{path}:1", "no text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Bad(UNDECODABLE_BYTES, f"{path}:{_line_of(data, e.start)}", f"not UTF-8 ({e.reason} at byte {e.start})")
    yield text


def _read_jsonl(
    path: str, text_field: str, on_bad_record: str, counter: Optional[BadRecordCounter]
) -> Iterator[str]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    records = 0
    lineno = 0
    with opener(path, "rb") as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                records += 1
                where = f"{path}:{lineno}"
                try:
                    yield _parse_line(raw, lineno, where, text_field)
                except _Bad as bad:
                    _handle(bad, on_bad_record, counter)
        except (EOFError, OSError, zlib.error) as e:  # truncated / corrupt gzip
            raise _Bad(CORRUPT_FILE, f"{path}:{lineno + 1}", f"cannot read further ({e})")
    if records == 0:
        raise _Bad(EMPTY_FILE, f"{path}:1", "no JSON records")


def _parse_line(raw: bytes, lineno: int, where: str, text_field: str) -> str:
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(UNDECODABLE_BYTES, where, f"not UTF-8 ({e.reason} at column {e.start + 1})")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Bad(MALFORMED_JSON, where, f"{e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        raise _Bad(NOT_AN_OBJECT, where, f"expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        have = ", ".join(list(obj)[:5])
        raise _Bad(MISSING_FIELD, where, f"no field {text_field!r} (fields: {have or 'none'}; see text_field)")
    text = obj[text_field]
    if not isinstance(text, str):
        raise _Bad(WRONG_FIELD_TYPE, where, f"field {text_field!r} is {type(text).__name__}, expected a string")
    if not text:
        raise _Bad(EMPTY_DOCUMENT, where, f"field {text_field!r} is empty")
    return text
