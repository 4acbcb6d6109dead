"""Corpus sources: expand a `SourceConfig` to files, stream records from them.

Formats come from the extension:

* ``.jsonl``, ``.jsonl.gz``: one JSON object per line, the document text in
  the source's ``text_field``. Blank lines are not records and are passed over.
* ``.parquet``: one document per row, in the ``text_field`` column.
* ``.txt``, ``.py``: one document per file (UTF-8; a leading BOM is dropped).
* ``.bin`` + ``.idx``: a Megatron indexed dataset of pre-tokenized documents
  (`data.megatron`); the source path may name the prefix, the .bin or the .idx.

Text formats are streamed with HF ``datasets`` (``load_dataset(..., streaming=True)``
with the ``text`` builder for .jsonl/.txt, one line or one file per row, and the
``parquet`` builder for .parquet), so local files, globs and remote URLs
(``https://``, ``hf://``, ``s3://`` ... via fsspec) all go through the same
reader. Each source builds one streaming dataset per format and reads it one
file (shard) at a time, which gives every record an exact position
``(epoch, file, record)``: the file's index in the epoch's shuffled order and
the row within the file (for .jsonl the line number minus one). A reader
started at a position continues exactly there (``IterableDataset.skip`` over
the file's rows; no tokenization is repeated).

JSON is parsed here rather than by ``datasets``' json builder so that a bad
line is reported (or skipped) by itself, with its line number, instead of
failing a whole block. Undecodable bytes are marked by a codec error handler
that substitutes U+FDD0 (a Unicode noncharacter, reserved for internal use) and
are then reported per line.

Bad input never disappears silently. With ``on_bad_record="error"`` it raises
``ValueError("FILE:LINE: <reason> ...")``; with ``"skip"`` it is counted per
reason in a `BadRecordCounter`, which logs the first few with their FILE:LINE.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import os
import random
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .config import PYTHON_STDLIB, SourceConfig
from .errors import DataError
from .holdout import split_files
from .megatron import IndexMismatch, MegatronDocuments, megatron_prefix

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
MEGATRON_SUFFIXES = (".bin", ".idx")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + MEGATRON_SUFFIXES

FMT_JSONL, FMT_TEXT, FMT_PARQUET, FMT_MEGATRON = "jsonl", "text", "parquet", "megatron"

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
MISSING_PATH = "missing_path"  # a source path / glob / directory with nothing to read
MISSING_FILE = "missing_file"  # a file that vanished, or a .bin without its .idx (or the reverse)
UNSUPPORTED_FORMAT = "unsupported_format"
INDEX_MISMATCH = "index_mismatch"  # an .idx that does not describe its .bin
TOKEN_OUT_OF_RANGE = "token_out_of_range"  # a pre-tokenized id >= the tokenizer's vocabulary

# Undecodable bytes become this noncharacter, then the line is reported.
_UNDECODABLE_MARK = "\ufdd0"
ENCODING_ERRORS = "moeforge-mark-undecodable"


def _mark_undecodable(err: UnicodeDecodeError):
    return _UNDECODABLE_MARK, err.end


try:
    codecs.lookup_error(ENCODING_ERRORS)
except LookupError:
    codecs.register_error(ENCODING_ERRORS, _mark_undecodable)

# Rows per chunk handed to the tokenizer (inline or to a worker), and a cap on their characters.
CHUNK_ROWS = 64
CHUNK_CHARS = 256 << 10
# Characters per read of the datasets text builder (its default is 10 MB). A file that
# breaks off (a truncated .gz) loses the lines of the read in progress.
TEXT_READ_BYTES = 256 << 10


class BadRecordCounter:
    """Counts skipped records per reason; logs the first `max_logged` with FILE:LINE."""

    def __init__(self, max_logged: int = 10, log: bool = True):
        self.counts: Counter[str] = Counter()
        self.max_logged = max_logged
        self.log = log

    def record(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        n = self.total
        if self.log and n <= self.max_logged:
            logger.warning("skipping bad record (%s) at %s%s", reason, where, f": {detail}" if detail else "")
            if n == self.max_logged:
                logger.warning("further bad records are counted but not logged (data.on_bad_record=skip)")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def load(self, counts: Dict[str, int]) -> None:
        self.counts = Counter({str(k): int(v) for k, v in counts.items()})

    def __repr__(self) -> str:
        return f"BadRecordCounter({self.as_dict()})"


def _has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(suffixes))


def file_format(path: str) -> Optional[str]:
    """The reader format of a file entry (by extension), or None."""
    if _has_suffix(path, JSONL_SUFFIXES):
        return FMT_JSONL
    if _has_suffix(path, TEXT_SUFFIXES):
        return FMT_TEXT
    if _has_suffix(path, PARQUET_SUFFIXES):
        return FMT_PARQUET
    if _has_suffix(path, MEGATRON_SUFFIXES):
        return FMT_MEGATRON
    return None


def is_remote(path: str) -> bool:
    return "://" in path


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


# ---------------------------------------------------------------------------------------
# Bad input


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
    raise DataError(
        f"{bad.where}: {bad.reason.replace('_', ' ')}: {bad.detail} "
        "(set data.on_bad_record=skip to count and skip bad records)"
    )


def handle_bad(reason: str, where: str, detail: str, on_bad_record: str, counter: Optional[BadRecordCounter]) -> None:
    """Apply the bad-record policy: raise a ValueError naming `where`, or count and log."""
    _handle(_Bad(reason, where, detail), on_bad_record, counter)


# ---------------------------------------------------------------------------------------
# Expansion: source path -> sorted file entries (Megatron pairs as PREFIX.bin)


def expand_source(
    src: SourceConfig,
    index: int = 0,
    max_files: Optional[int] = None,
    on_bad_record: str = "error",
    counter: Optional[BadRecordCounter] = None,
    held_out: bool = False,
) -> List[str]:
    """The sorted file entries of one source. `index` names it in errors (data.sources[i]).
    With `src.holdout` > 0 they are the training side of the source's files, or with `held_out`
    the held-out side (data/holdout.py).

    Megatron ``.bin/.idx`` pairs appear once, as ``PREFIX.bin``. Problems (a path
    that does not exist, a glob matching nothing, an unsupported file in a glob,
    a .bin without its .idx) raise ``ValueError("data.sources[i].path: ...")``,
    or with ``on_bad_record="skip"`` are counted and left out (an empty list
    when nothing is left)."""
    key = f"data.sources[{index}].path"
    problems: List[Tuple[str, str, str]] = []  # (reason, where, detail)
    files = _expand(src.path, key, problems)
    for reason, where, detail in problems:
        if on_bad_record == "skip" and counter is not None:
            counter.record(reason, where, detail)
        else:
            raise DataError(f"{key}: {where}{': ' if where else ''}{detail}")
    kept = split_files(files, src.path, src.holdout, held_out)
    if files and not kept and src.holdout > 0:
        side = "holds out none" if held_out else "holds out all"
        raise DataError(f"data.sources[{index}].holdout: {src.holdout} {side} of the source's {len(files)} files; "
                        f"{'raise' if held_out else 'lower'} it")
    return _spread(kept, max_files)


def _expand(path: str, key: str, problems: list) -> List[str]:
    if path == PYTHON_STDLIB:
        files = stdlib_files()
        if not files:
            problems.append((MISSING_PATH, "", f"{PYTHON_STDLIB} found no .py files under {sysconfig.get_paths()['stdlib']}"))
        return files
    if is_remote(path):
        return _expand_remote(path, problems)

    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not matches:
            problems.append((MISSING_PATH, "", f"glob {path!r} matched no files"))
        return _entries(matches, problems, strict=True)
    if os.path.isdir(expanded):
        found = []
        for dirpath, dirnames, filenames in os.walk(expanded):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [
                os.path.join(dirpath, f)
                for f in filenames
                if not f.startswith(".") and _has_suffix(f, SUPPORTED_SUFFIXES)
            ]
        files = _entries(sorted(found), problems, strict=False)
        if not files and not problems:
            problems.append((
                MISSING_PATH, "",
                f"directory {path!r} holds no files of a supported format ({', '.join(SUPPORTED_SUFFIXES)})",
            ))
        return files
    if os.path.isfile(expanded):
        return _entries([expanded], problems, strict=True)
    # a Megatron prefix: PREFIX.bin / PREFIX.idx
    if os.path.isfile(expanded + ".bin") or os.path.isfile(expanded + ".idx"):
        return _entries([expanded + ".bin" if os.path.isfile(expanded + ".bin") else expanded + ".idx"], problems, True)
    problems.append((MISSING_PATH, "", f"{path!r} does not exist"))
    return []


def _entries(paths: List[str], problems: list, strict: bool) -> List[str]:
    """Files -> entries: known formats kept, Megatron pairs merged to PREFIX.bin."""
    out, seen = [], set()
    for p in paths:
        fmt = file_format(p)
        if fmt is None:
            if strict:
                problems.append((UNSUPPORTED_FORMAT, p, f"unknown format (supported: {', '.join(SUPPORTED_SUFFIXES)})"))
            continue
        if fmt == FMT_MEGATRON:
            prefix = megatron_prefix(p)
            if prefix in seen:
                continue
            seen.add(prefix)
            missing = [q for q in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(q)]
            if missing:
                problems.append((MISSING_FILE, missing[0], "does not exist (a Megatron dataset needs both .bin and .idx)"))
                continue
            out.append(prefix + ".bin")
        else:
            out.append(p)
    return sorted(out)


def _expand_remote(path: str, problems: list) -> List[str]:
    import fsspec

    if file_format(path) == FMT_MEGATRON:
        problems.append((UNSUPPORTED_FORMAT, path, "Megatron .bin/.idx must be local files (they are memory-mapped)"))
        return []
    if not glob.has_magic(path):
        if file_format(path) is None:
            problems.append((UNSUPPORTED_FORMAT, path, f"unknown format (supported: {', '.join(SUPPORTED_SUFFIXES)})"))
            return []
        return [path]
    try:
        fs, pattern = fsspec.core.url_to_fs(path)
        matches = sorted(fs.unstrip_protocol(p) for p in fs.glob(pattern))
    except Exception as e:  # no network, no credentials, unknown protocol ...
        problems.append((MISSING_PATH, "", f"cannot list {path!r}: {type(e).__name__}: {e}"))
        return []
    if not matches:
        problems.append((MISSING_PATH, "", f"glob {path!r} matched no files"))
    out = []
    for m in matches:
        if file_format(m) in (None, FMT_MEGATRON):
            problems.append((UNSUPPORTED_FORMAT, m, "unknown or non-streamable format"))
        else:
            out.append(m)
    return out


# ---------------------------------------------------------------------------------------
# Rows and their processing (parse, check, tokenize)

# Row kinds (reader output) and result kinds (process_rows output).
K_LINE, K_DOC, K_VALUE, K_TOKENS, K_FILEBAD = range(5)
R_DOC, R_BAD, R_FILEBAD = range(3)


class Row(NamedTuple):
    epoch: int
    file: int  # index in the epoch's file order
    rec: int  # record (row) index within the file
    kind: int
    value: object


class ProcessedRow(NamedTuple):
    """A row after `process_rows`: where it was read and what came of it."""

    epoch: int
    file: int  # index in the epoch's file order
    rec: int  # record (row) index within the file
    kind: int  # R_DOC, R_BAD or R_FILEBAD
    value: object  # R_DOC: token array (or text); else (reason, loc, detail)


def next_position(epoch: int, file: int, rec: int, result_kind: int) -> Tuple[int, int, int]:
    """The reader position after a processed row."""
    if result_kind == R_FILEBAD:
        return epoch, file + 1, 0
    return epoch, file, rec + 1


def _line_in(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _check_text(kind: int, value, rec: int, text_field: str):
    """A raw row -> (text, None) or (None, (reason, loc, detail))."""
    if kind == K_LINE:
        loc = f":{rec + 1}"
        line = value[1:] if rec == 0 and value.startswith("\ufeff") else value
        if _UNDECODABLE_MARK in line:
            col = line.index(_UNDECODABLE_MARK) + 1
            return None, (UNDECODABLE_BYTES, loc, f"not UTF-8 (at character {col})")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return None, (MALFORMED_JSON, loc, f"{e.msg} at column {e.colno}")
        if not isinstance(obj, dict):
            return None, (NOT_AN_OBJECT, loc, f"expected a JSON object, got {type(obj).__name__}")
        if text_field not in obj:
            have = ", ".join(list(obj)[:5])
            return None, (MISSING_FIELD, loc, f"no field {text_field!r} (fields: {have or 'none'}; see text_field)")
        text = obj[text_field]
        if not isinstance(text, str):
            return None, (WRONG_FIELD_TYPE, loc, f"field {text_field!r} is {type(text).__name__}, expected a string")
        if not text:
            return None, (EMPTY_DOCUMENT, loc, f"field {text_field!r} is empty")
        return text, None
    if kind == K_DOC:
        if _UNDECODABLE_MARK in value:
            return None, (UNDECODABLE_BYTES, f":{_line_in(value, value.index(_UNDECODABLE_MARK))}", "not UTF-8")
        text = value[1:] if value.startswith("\ufeff") else value
        if not text.strip():
            return None, (EMPTY_FILE, ":1", "no text")
        return text, None
    if kind == K_VALUE:
        loc = f": row {rec}"
        if value is None:
            return None, (MISSING_FIELD, loc, f"field {text_field!r} is null")
        if not isinstance(value, str):
            return None, (WRONG_FIELD_TYPE, loc, f"field {text_field!r} is {type(value).__name__}, expected a string")
        if not value:
            return None, (EMPTY_DOCUMENT, loc, f"field {text_field!r} is empty")
        return value, None
    raise AssertionError(kind)


def _process_row(r: Row, text_field: str, tokenizer, vocab_size: Optional[int],
                 eos_id: Optional[int]) -> Tuple[int, object]:
    """One row -> (result kind, value), as `process_rows` describes."""
    if r.kind == K_FILEBAD:
        return R_FILEBAD, r.value
    if r.kind == K_TOKENS:
        a = r.value
        if eos_id is not None and a.size and int(a[-1]) == eos_id:  # written with EOS (Megatron --append-eod)
            a = a[:-1]
        if a.size == 0:
            return R_BAD, (EMPTY_DOCUMENT, f": document {r.rec}", "no tokens")
        if vocab_size is not None and (int(a.max()) >= vocab_size or int(a.min()) < 0):
            bad = int(a.max()) if int(a.max()) >= vocab_size else int(a.min())
            return R_BAD, (
                TOKEN_OUT_OF_RANGE, f": document {r.rec}",
                f"token id {bad} outside the tokenizer's vocabulary of {vocab_size} (tokenized with another tokenizer?)",
            )
        return R_DOC, a
    text, bad = _check_text(r.kind, r.value, r.rec, text_field)
    if bad is not None:
        return R_BAD, bad
    if tokenizer is None:
        return R_DOC, text
    return R_DOC, np.asarray(tokenizer.encode(text), dtype=np.int32)


def process_rows(rows: Sequence[Row], text_field: str, tokenizer=None, vocab_size: Optional[int] = None,
                 eos_id: Optional[int] = None) -> List[ProcessedRow]:
    """Rows -> `ProcessedRow`s ``(epoch, file, rec, kind, value)``.

    R_DOC values are token arrays (int32; no EOS, the packer adds it), or the
    texts when `tokenizer` is None. R_BAD / R_FILEBAD values are
    ``(reason, loc, detail)`` with `loc` the part of FILE:LINE after the file.
    Pure function of its inputs: runs in the training process or in a worker."""
    return [ProcessedRow(r.epoch, r.file, r.rec, *_process_row(r, text_field, tokenizer, vocab_size, eos_id)) for r in rows]


# ---------------------------------------------------------------------------------------
# Streaming reader of one source


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    if "HF_UPDATE_DOWNLOAD_COUNTS" not in os.environ:
        # load_dataset("text"/"parquet") otherwise sends a usage-count HEAD request to the Hub
        # for every call: a 3-5 s stall per source on machines without internet.
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    return datasets


class _StreamingFiles:
    """One HF `datasets` streaming dataset over all files of one format; one file = one shard."""

    def __init__(self, files: List[str], fmt: str, text_field: str):
        self.files = files
        self.fmt = fmt
        self.text_field = text_field
        self.shard_of = {f: i for i, f in enumerate(files)}
        self._base = None

    def base(self):
        if self._base is None:
            ds = _datasets()
            if self.fmt == FMT_PARQUET:
                self._base = ds.load_dataset(
                    "parquet", data_files=self.files, split="train", streaming=True, columns=[self.text_field]
                )
            else:
                self._base = ds.load_dataset(
                    "text", data_files=self.files, split="train", streaming=True,
                    sample_by="line" if self.fmt == FMT_JSONL else "document",
                    encoding_errors=ENCODING_ERRORS, chunksize=TEXT_READ_BYTES,
                )
            if self._base.num_shards != len(self.files):
                raise RuntimeError(f"datasets made {self._base.num_shards} shards of {len(self.files)} files")
        return self._base

    def batches(self, path: str, start: int) -> Iterator[list]:
        """The rows of one file from row `start`, in lists."""
        base = self.base()
        ds = base.shard(num_shards=len(self.files), index=self.shard_of[path]) if len(self.files) > 1 else base
        if start:
            ds = ds.skip(start)
        col = self.text_field if self.fmt == FMT_PARQUET else "text"
        for batch in ds.iter(batch_size=CHUNK_ROWS):
            yield batch[col]


def _parquet_problem(path: str, text_field: str) -> Optional[Tuple[str, str, str]]:
    """Check a local parquet file's schema before streaming it."""
    if is_remote(path):
        return None
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
        names = list(meta.schema.to_arrow_schema().names)
    except FileNotFoundError:
        return None  # reported by the reader
    except Exception as e:
        return (CORRUPT_FILE, "", f"not a readable parquet file ({type(e).__name__}: {e})")
    if text_field not in names:
        have = ", ".join(names[:5])
        return (MISSING_FIELD, "", f"no column {text_field!r} (columns: {have or 'none'}; see text_field)")
    if meta.num_rows == 0:
        return (EMPTY_FILE, "", "no rows")
    return None


class SourceReader:
    """Endless rows of one source, epoch after epoch, from any position.

    Epoch ``e`` reads the files in the order ``file_order(e)`` (a seeded shuffle,
    different per epoch; natural order with ``shuffle=False``). `rows(position)`
    yields `Row`s from that position on; `process_rows` turns them into documents
    or bad-record results, and `next_position` gives the position after each."""

    def __init__(self, index: int, files: List[str], text_field: str = "text", seed: int = 0, shuffle: bool = True):
        self.index = index
        self.files = list(files)
        self.text_field = text_field
        self.seed = seed
        self.shuffle = shuffle
        self.formats = [file_format(f) for f in self.files]
        by_fmt: Dict[str, List[str]] = {}
        for f, fmt in zip(self.files, self.formats):
            if fmt is None:
                raise DataError(f"data.sources[{index}]: {f}: unknown format")
            by_fmt.setdefault(fmt, []).append(f)
        self._streams = {fmt: _StreamingFiles(fs, fmt, text_field) for fmt, fs in by_fmt.items() if fmt != FMT_MEGATRON}
        self._megatron: Dict[str, object] = {}
        self._checked: Dict[str, Optional[Tuple[str, str, str]]] = {}
        self._orders: Dict[int, Tuple[str, ...]] = {}

    @property
    def pretokenized(self) -> bool:
        """Only Megatron files: nothing to tokenize."""
        return all(f == FMT_MEGATRON for f in self.formats)

    def file_order(self, epoch: int) -> Tuple[str, ...]:
        order = self._orders.get(epoch)
        if order is None:
            files = list(self.files)
            if self.shuffle:
                random.Random(f"moeforge-data:{self.seed}:{self.index}:{epoch}").shuffle(files)
            order = tuple(files)
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = order
        return order

    def path(self, epoch: int, file: int) -> str:
        return self.file_order(epoch)[file]

    def rows(self, epoch: int = 0, file: int = 0, rec: int = 0, epochs: Optional[int] = None) -> Iterator[Row]:
        while epochs is None or epoch < epochs:
            order = self.file_order(epoch)
            for j in range(file, len(order)):
                yield from self._file_rows(epoch, j, order[j], rec if j == file else 0)
            epoch, file, rec = epoch + 1, 0, 0

    def _file_rows(self, epoch: int, j: int, path: str, start: int) -> Iterator[Row]:
        fmt = file_format(path)
        if fmt == FMT_MEGATRON:
            yield from self._megatron_rows(epoch, j, path, start)
            return
        if fmt == FMT_PARQUET and start == 0:
            if path not in self._checked:
                self._checked[path] = _parquet_problem(path, self.text_field)
            if self._checked[path] is not None:
                yield Row(epoch, j, 0, K_FILEBAD, self._checked[path])
                return
        kind = {FMT_JSONL: K_LINE, FMT_TEXT: K_DOC, FMT_PARQUET: K_VALUE}[fmt]
        rec = start
        records = 0
        try:
            for batch in self._streams[fmt].batches(path, start):
                for value in batch:
                    if kind == K_LINE and not value.strip():
                        rec += 1  # blank line: not a record
                        continue
                    records += 1
                    yield Row(epoch, j, rec, kind, value)
                    rec += 1
        except Exception as e:  # unreadable file: missing, corrupt/truncated gzip, broken parquet ...
            if isinstance(e, FileNotFoundError):
                reason, detail = MISSING_FILE, "does not exist (any more)"
            elif fmt == FMT_PARQUET and "No match for FieldRef" in str(e):
                reason, detail = MISSING_FIELD, f"no column {self.text_field!r} (see text_field)"
            else:
                reason, detail = CORRUPT_FILE, f"cannot read further ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            loc = f":{rec + 1}" if fmt != FMT_PARQUET else f": row {rec}"
            yield Row(epoch, j, rec, K_FILEBAD, (reason, loc, detail))
            return
        if start == 0 and records == 0 and kind != K_DOC:
            yield Row(epoch, j, rec, K_FILEBAD, (EMPTY_FILE, ":1", "no records"))

    def _megatron_rows(self, epoch: int, j: int, path: str, start: int) -> Iterator[Row]:
        prefix = path[:-4]
        docs = self._megatron.get(prefix)
        if docs is None:
            try:
                docs = MegatronDocuments(prefix)
            except FileNotFoundError as e:
                yield Row(epoch, j, start, K_FILEBAD, (MISSING_FILE, "", str(e)))
                return
            except IndexMismatch as e:
                yield Row(epoch, j, start, K_FILEBAD, (INDEX_MISMATCH, "", str(e)))
                return
            self._megatron.clear()  # keep one memory map per source open
            self._megatron[prefix] = docs
        if len(docs) == 0 and start == 0:
            yield Row(epoch, j, 0, K_FILEBAD, (EMPTY_FILE, "", "no documents"))
            return
        for a in range(start, len(docs), CHUNK_ROWS):
            for k, arr in enumerate(docs.documents(a, a + CHUNK_ROWS)):
                yield Row(epoch, j, a + k, K_TOKENS, arr)


def chunks(rows: Iterator[Row], max_rows: int = CHUNK_ROWS, max_chars: int = CHUNK_CHARS) -> Iterator[List[Row]]:
    """Group rows into chunks of at most `max_rows` rows / about `max_chars` characters."""
    chunk: List[Row] = []
    chars = 0
    for r in rows:
        chunk.append(r)
        if r.kind in (K_LINE, K_DOC, K_VALUE) and isinstance(r.value, str):
            chars += len(r.value)
        elif r.kind == K_TOKENS:
            chars += 4 * r.value.size
        if len(chunk) >= max_rows or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------
# Whole-file helpers (tokenizer training, tests)


def iter_documents(
    files: Sequence[str],
    text_field: str = "text",
    on_bad_record: str = "error",
    counter: Optional[BadRecordCounter] = None,
) -> Iterator[str]:
    """The document texts of `files`, in the given order, once, applying the bad-record policy."""
    reader = SourceReader(0, list(files), text_field, shuffle=False)
    order = reader.file_order(0)
    if reader.pretokenized:
        raise ValueError("iter_documents: Megatron .bin/.idx files hold tokens, not text")
    for chunk in chunks(reader.rows(epochs=1)):
        for epoch, file, rec, kind, value in process_rows(chunk, text_field):
            if kind == R_DOC:
                yield value
            else:
                reason, loc, detail = value
                _handle(_Bad(reason, f"{order[file]}{loc}", detail), on_bad_record, counter)


def read_documents(
    path: str,
    text_field: str = "text",
    on_bad_record: str = "error",
    counter: Optional[BadRecordCounter] = None,
) -> Iterator[str]:
    """Yield the document texts of one file, applying the bad-record policy."""
    fmt = file_format(path)
    if fmt is None or fmt == FMT_MEGATRON:
        raise DataError(f"data.sources: {path}: not a text format (supported: {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)})")
    yield from iter_documents([path], text_field, on_bad_record, counter)
