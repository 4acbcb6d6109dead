"""Megatron ``.bin/.idx`` indexed datasets: check, read (through megatron-core), write.

The format (megatron-core ``megatron/core/datasets/indexed_dataset.py``, "MMIDIDX"):

    PREFIX.idx   b"MMIDIDX\\x00\\x00"  <Q version=1  <B dtype code  <Q S sequences  <Q D+1 document indices
                 int32[S] sequence lengths   int64[S] byte pointers into .bin   int64[D+1] document indices
                 (int8[S] modes, multimodal only)
    PREFIX.bin   the tokens of all sequences back to back, in the dtype of the code

Document ``d`` is sequences ``document_indices[d] .. document_indices[d+1]`` (one
sequence per document as written by `IndexedWriter` and by Megatron's
preprocess_data.py without sentence splitting).

Reading goes through megatron-core's `IndexedDataset` (numpy memory maps), which
is imported lazily: importing megatron-core costs several seconds, so only
sources that hold ``.bin/.idx`` pay it. Before it is opened, `check_pair`
verifies that the ``.idx`` describes its ``.bin`` (header, sizes, pointers,
document indices); megatron-core itself only asserts a few of these and would
otherwise hand out garbage for a truncated or mismatched ``.bin``.

Writing (`IndexedWriter`, used by ``python -m data.preprocess``) produces the
same bytes as megatron-core's ``IndexedDatasetBuilder`` (checked in the tests)
without importing megatron-core and without building torch tensors per document.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from array import array
from typing import List, NamedTuple, Optional

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # header, version, dtype code, sequence count, document count
# megatron.core.datasets.indexed_dataset.DType codes
DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_INTEGER_CODES = (1, 2, 3, 4, 5, 8)

INSTALL_HINT = "reading Megatron .bin/.idx needs megatron-core: pip install 'moeforge[megatron]' (or megatron-core)"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def optimal_dtype(vocab_size: int) -> type:
    """The token dtype Megatron picks for a vocabulary (uint16 below 65500, else int32)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class IndexInfo(NamedTuple):
    dtype: np.dtype
    sequences: int
    documents: int
    tokens: int


class IndexMismatch(ValueError):
    """The .idx does not describe its .bin (or is not an index at all)."""


def check_pair(prefix: str) -> IndexInfo:
    """Validate PREFIX.idx against PREFIX.bin; raise `IndexMismatch` saying what is wrong."""
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    for p in (ipath, bpath):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} does not exist")
    isize, bsize = os.path.getsize(ipath), os.path.getsize(bpath)
    if isize < _HEADER_BYTES:
        raise IndexMismatch(f"{ipath}: {isize} bytes, too short for a Megatron index header")
    with open(ipath, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if head[:9] != INDEX_HEADER:
        raise IndexMismatch(f"{ipath}: not a Megatron index (header {head[:9]!r}, expected {INDEX_HEADER!r})")
    (version,) = struct.unpack("<Q", head[9:17])
    code = head[17]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    if version != 1:
        raise IndexMismatch(f"{ipath}: index version {version}, expected 1")
    if code not in _INTEGER_CODES:
        raise IndexMismatch(f"{ipath}: dtype code {code} is not an integer token type")
    dtype = np.dtype(DTYPES[code])
    expected = _HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if isize not in (expected, expected + n_seq):  # + int8 modes for multimodal indexes
        raise IndexMismatch(
            f"{ipath}: {isize} bytes, but its header ({n_seq} sequences, {n_doc} document indices) needs {expected}"
        )
    mm = np.memmap(ipath, mode="r", dtype=np.uint8)
    try:
        lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=_HEADER_BYTES)
        pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=_HEADER_BYTES + 4 * n_seq)
        docs = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=_HEADER_BYTES + 12 * n_seq)
        if n_seq and int(lengths.min()) < 0:
            raise IndexMismatch(f"{ipath}: negative sequence length")
        nbytes = lengths.astype(np.int64) * dtype.itemsize
        total = int(nbytes.sum())
        if total != bsize:
            raise IndexMismatch(
                f"{ipath} describes {total} bytes ({total // dtype.itemsize} {dtype.name} tokens) "
                f"but {bpath} holds {bsize}: the .idx does not match its .bin"
            )
        if n_seq:
            starts = np.concatenate([[0], np.cumsum(nbytes[:-1])])
            if not np.array_equal(starts, pointers):
                bad = int(np.flatnonzero(starts != pointers)[0])
                raise IndexMismatch(
                    f"{ipath}: sequence {bad} points to byte {int(pointers[bad])}, expected {int(starts[bad])}"
                )
        if n_doc < 1 or int(docs[0]) != 0 or int(docs[-1]) != n_seq or (n_doc > 1 and bool((np.diff(docs) < 0).any())):
            raise IndexMismatch(
                f"{ipath}: document indices must rise from 0 to the sequence count {n_seq}"
            )
        return IndexInfo(dtype, int(n_seq), int(n_doc) - 1, total // dtype.itemsize)
    finally:
        del mm


_INDEXED_DATASET = None


def indexed_dataset_class():
    """megatron-core's IndexedDataset, imported on first use (several seconds)."""
    global _INDEXED_DATASET
    if _INDEXED_DATASET is None:
        quiet = logging.getLogger("megatron")
        if quiet.level == logging.NOTSET:  # its import logs at INFO; leave a level someone set alone
            quiet.setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed" etc.
                warnings.simplefilter("ignore")
                from megatron.core.datasets.indexed_dataset import IndexedDataset
        except ImportError as e:
            raise ImportError(f"{INSTALL_HINT} ({e})") from None
        _INDEXED_DATASET = IndexedDataset
    return _INDEXED_DATASET


class MegatronDocuments:
    """The documents of one checked ``.bin/.idx`` pair, read through megatron-core."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.info = check_pair(prefix)
        self._ds = indexed_dataset_class()(prefix, mmap=True)
        # Copies, never views: megatron-core closes its memory maps when the dataset is
        # deleted, whether or not arrays still point into them.
        self._doc_index = np.array(self._ds.document_indices, dtype=np.int64)
        self._one_per_doc = len(self._doc_index) == len(self._ds) + 1

    def __len__(self) -> int:
        return self.info.documents

    def documents(self, start: int, stop: int) -> List[np.ndarray]:
        """Documents [start, stop) as int32/int64 arrays (copies, safe after the file is closed)."""
        stop = min(stop, len(self))
        if start >= stop:
            return []
        out_dtype = np.int64 if self.info.dtype.itemsize > 4 or self.info.dtype == np.uint32 else np.int32
        if self._one_per_doc:
            return [np.array(x, dtype=out_dtype) for x in self._ds[start:stop]]
        s0, s1 = int(self._doc_index[start]), int(self._doc_index[stop])
        seqs = self._ds[s0:s1] if s1 > s0 else []
        out = []
        for d in range(start, stop):
            a, b = int(self._doc_index[d]) - s0, int(self._doc_index[d + 1]) - s0
            parts = seqs[a:b]
            out.append(np.concatenate(parts).astype(out_dtype) if parts else np.zeros(0, out_dtype))
        return out


class IndexedWriter:
    """Write a Megatron ``.bin/.idx`` pair, one sequence per document.

    Files are written under temporary names and renamed by `finalize`, so a
    reader never sees a half-written pair."""

    def __init__(self, prefix: str, dtype=np.int32):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES or _CODES[self.dtype] not in _INTEGER_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._info = np.iinfo(self.dtype)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._tmp_bin = bin_path(prefix) + ".tmp"
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = array("i")
        self.tokens = 0

    @property
    def documents(self) -> int:
        return len(self._lengths)

    def add_document(self, tokens) -> None:
        a = np.asarray(tokens)
        if a.size and (int(a.min()) < self._info.min or int(a.max()) > self._info.max):
            raise ValueError(f"{self.prefix}: token ids outside {self.dtype.name}")
        a = a.astype(self.dtype, copy=False).reshape(-1)
        self._bin.write(a.tobytes(order="C"))
        self._lengths.append(a.size)
        self.tokens += a.size

    def finalize(self) -> IndexInfo:
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
        n = lengths.size
        pointers = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.arange(n + 1, dtype=np.int64)
        tmp_idx = idx_path(self.prefix) + ".tmp"
        with open(tmp_idx, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _CODES[self.dtype]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", n + 1))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_index.tobytes(order="C"))
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(tmp_idx, idx_path(self.prefix))
        return IndexInfo(self.dtype, n, n, self.tokens)

    def abort(self) -> None:
        self._bin.close()
        for p in (self._tmp_bin, idx_path(self.prefix) + ".tmp"):
            try:
                os.remove(p)
            except OSError:
                pass


def megatron_prefix(path: str) -> Optional[str]:
    """The prefix of a .bin/.idx path, else None."""
    low = path.lower()
    if low.endswith(".bin") or low.endswith(".idx"):
        return path[:-4]
    return None
