"""Packing: documents -> one token stream -> fixed-length training windows.

Each document is followed by EOS and concatenated into a single stream. Window
``w`` covers stream tokens ``[w*seq_len, w*seq_len + seq_len + 1)``:

    input_ids = window[:-1]    labels = window[1:]

so consecutive windows share exactly one token (the last label of window w is
the first input of window w+1) and every stream token is an input exactly once.
Documents are never dropped or truncated: one that crosses a window boundary
continues in the next window.

``doc_ids[t]`` is the index, within the window, of the document that input
token ``t`` belongs to: 0 for the first (possibly partial) document, +1 after
each EOS (the EOS belongs to the document it ends). A label crosses into the
next document exactly where ``input_ids[t] == eos_id``; boundary-aware losses
and attention masks can be built from ``doc_ids`` and that rule.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from .state import decode_array, encode_array

# Label of positions without a target: the data side's one definition (data imports no model code);
# it equals models.head_loss.IGNORE_INDEX, which the loss skips (tests/test_data_packing.py checks).
IGNORE_INDEX = -100


class PackedSequence(NamedTuple):
    input_ids: np.ndarray  # [seq_len] int64
    labels: np.ndarray  # [seq_len] int64
    doc_ids: np.ndarray  # [seq_len] int64


class Packer:
    """Incremental packer: `add(doc)` documents, `pop()` full windows.

    Holds at most one document plus one window of tokens, so memory stays
    bounded by the longest document."""

    def __init__(self, seq_len: int, eos_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.eos_id = int(eos_id)
        self._tokens = np.empty(0, dtype=np.int64)
        self._docs = np.empty(0, dtype=np.int64)  # global document counter per token
        self._pos = 0  # start of the next window in the buffers
        self._next_doc = 0
        self.windows_emitted = 0

    def add(self, doc: Sequence[int]) -> None:
        doc = np.asarray(doc, dtype=np.int64).reshape(-1)
        n = doc.size + 1
        self._tokens = np.concatenate([self._tokens[self._pos :], doc, np.array([self.eos_id], dtype=np.int64)])
        self._docs = np.concatenate([self._docs[self._pos :], np.full(n, self._next_doc, dtype=np.int64)])
        self._pos = 0
        self._next_doc += 1

    def ready(self) -> bool:
        return self._tokens.size - self._pos >= self.seq_len + 1

    def pop(self) -> PackedSequence:
        if not self.ready():
            raise IndexError("not enough tokens for a full window")
        L, p = self.seq_len, self._pos
        window = self._tokens[p : p + L + 1].copy()
        docs = self._docs[p : p + L]
        self._pos += L
        self.windows_emitted += 1
        return PackedSequence(window[:-1], window[1:], docs - docs[0])

    def state_dict(self) -> dict:
        """The pending tokens and their document boundaries (JSON-serialisable)."""
        docs = self._docs[self._pos :]
        if docs.size:
            cuts = np.flatnonzero(np.diff(docs)) + 1
            runs = np.diff(np.concatenate([[0], cuts, [docs.size]]))
        else:
            runs = np.zeros(0, dtype=np.int64)
        return {
            "seq_len": self.seq_len,
            "tokens": encode_array(self._tokens[self._pos :]),
            "doc_runs": encode_array(runs),
            "windows_emitted": self.windows_emitted,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["seq_len"]) != self.seq_len:
            raise ValueError(f"packer state: seq_len {state['seq_len']}, expected {self.seq_len}")
        tokens = decode_array(state["tokens"])
        runs = decode_array(state["doc_runs"])
        if int(runs.sum()) != tokens.size:
            raise ValueError("packer state: document runs do not cover the pending tokens")
        self._tokens = tokens
        self._docs = np.repeat(np.arange(runs.size, dtype=np.int64), runs)
        self._pos = 0
        self._next_doc = int(runs.size)
        self.windows_emitted = int(state["windows_emitted"])

    @property
    def pending_tokens(self) -> int:
        """Stream tokens not yet used as inputs (still waiting for a full window)."""
        return self._tokens.size - self._pos

    def flush(self, pad_id: int) -> Optional[PackedSequence]:
        """The last, partial window padded to seq_len (labels IGNORE_INDEX, doc_ids -1
        on padding), or None when no input tokens are left."""
        L, p = self.seq_len, self._pos
        left = self._tokens.size - p
        if left <= 1:  # 0: nothing; 1: only the last label of the previous window
            return None
        n_in = left - 1
        inputs = np.full(L, pad_id, dtype=np.int64)
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        docs = np.full(L, -1, dtype=np.int64)
        inputs[:n_in] = self._tokens[p : p + n_in]
        labels[:n_in] = self._tokens[p + 1 : p + 1 + n_in]
        d = self._docs[p : p + n_in]
        docs[:n_in] = d - d[0]
        self._pos = self._tokens.size - 1
        self.windows_emitted += 1
        return PackedSequence(inputs, labels, docs)


def pack_documents(
    token_docs: Iterable[Sequence[int]],
    seq_len: int,
    eos_id: int,
    drop_last: bool = True,
    pad_id: Optional[int] = None,
) -> Iterator[PackedSequence]:
    """Pack tokenized documents into `PackedSequence` windows (see module doc).

    For an infinite document iterator (the training loader) nothing is ever
    left over. For a finite one, the tokens after the last full window are
    dropped when `drop_last` (fewer than seq_len of them), else emitted as one
    padded window (inputs `pad_id`, labels IGNORE_INDEX, doc_ids -1)."""
    if not drop_last and pad_id is None:
        raise ValueError("pack_documents(drop_last=False) needs pad_id")
    packer = Packer(seq_len, eos_id)
    for doc in token_docs:
        packer.add(doc)
        while packer.ready():
            yield packer.pop()
    if not drop_last:
        last = packer.flush(pad_id)  # type: ignore[arg-type]
        if last is not None:
            yield last
