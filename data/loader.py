"""The trainer's batch stream: sources -> documents -> tokens -> blend -> pack -> shuffle -> shard -> batch.

One *global* stream of packed sequences is defined independently of the
data-parallel layout, and rank ``r`` of ``W`` takes its sequences ``r, r+W,
r+2W, ...``. Micro-batch ``k`` of every rank therefore holds global sequences
``[k*m*W, (k+1)*m*W)`` between them (m = micro_batch_size): a W-rank run sees
the same global batches as a 1-rank run with W times the micro-batch (or W
accumulation steps), which is what the data-parallel parity tests compare.

Global stream, fully determined by the config and the tokenizer:

* **Sources.** Each source is an endless sequence of epochs; in epoch ``e`` its
  files are read in an order shuffled with
  ``Random("moeforge-data:{seed}:{source}:{e}")`` and each file yields its
  records in file order (`data.sources.SourceReader`, HF ``datasets``
  streaming for text formats, megatron-core for ``.bin/.idx``).
* **Blend.** Sources are interleaved document by document so that each
  source's share of the stream's tokens tracks its normalised weight: the next
  document comes from the source furthest below its share
  (``w_i * total - tokens_i``, ties to the lower index; the weighted
  round-robin of Megatron's blended dataset, by tokens rather than samples).
  Deterministic and RNG-free; the share is exact to within one document at
  every prefix, not only in expectation.
* **Packing.** Documents are tokenized (in this process, or in DataLoader
  workers with ``data.num_workers``), followed by EOS and packed into windows
  of seq_len + 1 tokens (see `data.packing`); per-token document ids come along.
* **Shuffle.** With ``data.shuffle_buffer = B > 0``, packed sequences pass a
  shuffle buffer of B sequences: the k-th output is slot ``h(seed, k) mod B``
  (a counter-based hash, so the RNG state is just k), whose place is taken by
  the next packed sequence. Every sequence comes out exactly once.

**Exact resume, by position, not by replay.** `state_dict()` holds, for every
source, the position ``(epoch, file, record)`` after the last record that
entered the stream, the tokens drawn from it and the documents of its current
epoch; the packer's pending tokens and their document boundaries; the shuffle
buffer's sequences and draw counter; the bad-record counts; and the global
sequence count. After each of its sequences, a rank advances its stream to the
end of the current round of W global sequences, so all ranks hold the *same*
state after every batch, and a state loads under any world size (rank r' of W'
continues with global sequences G + r', G + r' + W', ...).
`load_state_dict()` restores all of that and reopens each source exactly at
its position (skipping rows of one file; nothing is re-tokenized). Reading
ahead (chunks of rows, worker prefetch) never leaks into the state: positions
are those of records *consumed*, and read-ahead is simply discarded.

**Workers.** The stateful part (reading order, blend, packing, shuffle, rank
split) stays in the training process; ``data.num_workers`` DataLoader worker
processes only parse and tokenize chunks of rows, which come back in the order
they were scheduled. A scheduler feeds each source's chunks to the workers in
proportion to the blend's demand, so read-ahead stays bounded. The stream is
identical with any number of workers, and a state saved with one number loads
with another. Pre-tokenized (.bin/.idx) sources never go through workers.

**Cost of the layout-free stream.** Every rank reads and tokenizes the whole
global stream and keeps 1/W of it, so on-the-fly tokenization costs each rank
W times its share; use workers, or pre-tokenize (``python -m data.preprocess``,
where a rank's cost is a memory-mapped read) for large W.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError
from .packing import Packer, PackedSequence
from .sources import (
    R_DOC,
    BadRecordCounter,
    ProcessedRow,
    SourceReader,
    chunks,
    expand_source,
    handle_bad,
    is_remote,
    next_position,
    process_rows,
)
from .state import decode_array, encode_array
from .tokenize_workers import TokenizedChunks

logger = logging.getLogger(__name__)

STATE_VERSION = 2
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _document_tokens(results: List[ProcessedRow]) -> int:
    return sum(r.value.size for r in results if r.kind == R_DOC)


def _files_digest(files: List[str]) -> str:
    """Names and sizes of a source's files: a changed file list changes the stream."""
    h = hashlib.sha256()
    for f in files:
        size = -1
        if not is_remote(f):
            try:
                size = os.path.getsize(f)
            except OSError:
                pass
        h.update(f"{os.path.basename(f)}\t{size}\n".encode())
    return h.hexdigest()[:16]


class _Lane:
    """One source inside the stream: its reader, consumed position and read-ahead buffer."""

    def __init__(self, source: int, slot: int, reader: SourceReader, weight: float):
        self.source = source  # index in cfg.sources
        self.slot = slot  # index among the stream's lanes
        self.reader = reader
        self.weight = weight
        self.pos = (0, 0, 0)  # (epoch, file, record) after the last consumed row
        self.epoch_docs = 0  # documents consumed in the current epoch
        self.tokens = 0  # tokens (EOS included) put into the stream
        self.buf: deque = deque()  # processed rows, read ahead
        self.buffered_tokens = 0
        self.inflight = deque()  # chars of chunks at the workers, in order
        self.inflight_chars = 0
        self._chunks: Optional[Iterator] = None

    def next_chunk(self):
        if self._chunks is None:
            self._chunks = chunks(self.reader.rows(*self.pos))
        return next(self._chunks)

    def push(self, results: List[ProcessedRow]) -> None:
        self.buf.extend(results)
        self.buffered_tokens += _document_tokens(results)

    def reset_reading(self) -> None:
        """Forget read-ahead; the next read starts at `pos`."""
        self.buf.clear()
        self.buffered_tokens = 0
        self.inflight.clear()
        self.inflight_chars = 0
        self._chunks = None


def _chunk_chars(rows) -> int:
    return sum(len(r.value) if isinstance(r.value, str) else 0 for r in rows)


class _Scheduler:
    """The workers' schedule: yields chunks of rows, choosing the source by demand."""

    def __init__(self, workers: "_Workers"):
        self.workers = workers

    def __iter__(self):
        w = self.workers
        while True:
            lanes = w.lanes
            wanted = w.wanted
            if wanted is not None and not wanted.buf and not wanted.inflight:
                lane = wanted
            else:  # the lane with the least read-ahead relative to its share of the stream
                lane = min(lanes, key=lambda l: (l.buffered_tokens + l.inflight_chars / w.chars_per_token) / l.weight)
            rows = lane.next_chunk()
            chars = _chunk_chars(rows)
            lane.inflight.append(chars)
            lane.inflight_chars += chars
            yield lane.slot, rows


class _Workers:
    """Tokenization in worker processes (`data.tokenize_workers`), results in scheduling order."""

    def __init__(self, stream: "TextBatchStream", num_workers: int):
        self.stream = stream
        self.num_workers = num_workers
        self.lanes = [l for l in stream._lanes if not l.reader.pretokenized]
        self.wanted: Optional[_Lane] = None
        self.chars_per_token = 4.0
        self._seen = [0, 0]  # chars, tokens of returned chunks
        self._it: Optional[TokenizedChunks] = None

    def _iterator(self) -> TokenizedChunks:
        if self._it is None:
            s = self.stream
            self._it = TokenizedChunks(_Scheduler(self), s.tokenizer, [l.reader.text_field for l in s._lanes],
                                       self.num_workers)
        return self._it

    def fill(self, lane: _Lane) -> None:
        self.wanted = lane
        try:
            while not lane.buf:
                slot, results = next(self._iterator())
                got = self.stream._lanes[slot]
                chars = got.inflight.popleft()
                got.inflight_chars -= chars
                got.push(results)
                tokens = _document_tokens(results)
                self._seen[0] += chars
                self._seen[1] += tokens
                if self._seen[1]:
                    self.chars_per_token = max(self._seen[0] / self._seen[1], 0.1)
        finally:
            self.wanted = None

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None:
            it.close()
        for lane in self.lanes:
            lane.reset_reading()


class TextBatchStream:
    """Endless iterator of micro-batches for one data-parallel rank.

    Each batch is a dict of int64 tensors of shape [micro_batch_size, seq_len]:
    ``input_ids``, ``labels`` (next tokens) and ``doc_ids`` (document index
    within each sequence; see `data.packing`). See the module doc for the
    stream, its state and the workers."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer=None,
        seq_len: int = 256,
        micro_batch_size: int = 1,
        dp_rank: int = 0,
        dp_world: int = 1,
        num_workers: Optional[int] = None,
        held_out: bool = False,
    ):
        """`held_out`: read the held-out side of sources with a `holdout` share (data/holdout.py),
        the evaluation stream; by default the training side."""
        cfg.validate()
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"need 0 <= dp_rank < dp_world, got dp_rank={dp_rank}, dp_world={dp_world}")
        if tokenizer is None:
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.num_workers = cfg.num_workers if num_workers is None else int(num_workers)
        self._counter = BadRecordCounter(log=dp_rank == 0)
        self.files: List[List[str]] = [
            expand_source(src, i, cfg.max_files, cfg.on_bad_record, self._counter, held_out)
            for i, src in enumerate(cfg.sources)
        ]
        self._expand_counts = self._counter.as_dict()
        kept = [i for i, f in enumerate(self.files) if f]
        if not kept:
            raise DataError(f"data.sources: nothing to read (bad paths skipped: {self._expand_counts})")
        for i, f in enumerate(self.files):
            if not f:
                logger.warning("data.sources[%d] (%r) has no readable files and is left out of the blend",
                               i, cfg.sources[i].path)
        w = np.array([float(cfg.sources[i].weight) for i in kept])
        w = w / w.sum()
        self.weights: List[float] = [0.0] * len(cfg.sources)
        for i, wi in zip(kept, w):
            self.weights[i] = float(wi)
        self._kept = kept
        self._digests = [_files_digest(f) for f in self.files]
        self._shuffle_key = _stable_hash(f"moeforge-shuffle:{cfg.seed}")
        self._workers: Optional[_Workers] = None
        self._reset()

    # -- pipeline --------------------------------------------------------------------

    def _reset(self) -> None:
        self.close()
        self._counter.load(self._expand_counts)
        self._lanes = [
            _Lane(i, slot, SourceReader(i, self.files[i], self.cfg.sources[i].text_field, self.cfg.seed),
                  self.weights[i])
            for slot, i in enumerate(self._kept)
        ]
        self._packer = Packer(self.seq_len, self.tokenizer.eos_id)
        self._shuffle: List[PackedSequence] = []
        self._draws = 0
        self._global_index = 0  # global sequences out of the shuffle (all ranks)
        self.sequences_consumed = 0  # by this rank
        self._workers = _Workers(self, self.num_workers) if self.num_workers > 0 else None

    def rewind(self) -> None:
        """Back to the stream's first sequence (a fresh stream's state)."""
        self._reset()

    def close(self) -> None:
        """Stop the worker processes (they restart on the next batch)."""
        if getattr(self, "_workers", None) is not None:
            self._workers.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _fill(self, lane: _Lane) -> None:
        if self._workers is not None and not lane.reader.pretokenized:
            self._workers.fill(lane)
        else:
            rows = lane.next_chunk()
            lane.push(process_rows(rows, lane.reader.text_field, self.tokenizer,
                                   int(self.tokenizer.vocab_size), int(self.tokenizer.eos_id)))

    def _choose(self) -> _Lane:
        lanes = self._lanes
        if len(lanes) == 1:
            return lanes[0]
        total = sum(l.tokens for l in lanes)
        return max(lanes, key=lambda l: (l.weight * total - l.tokens, -l.slot))

    def _next_document(self) -> np.ndarray:
        lane = self._choose()
        while True:
            if not lane.buf:
                self._fill(lane)
            epoch, file, rec, kind, value = lane.buf.popleft()
            if kind == R_DOC:
                lane.buffered_tokens -= value.size
            if epoch != lane.pos[0]:  # the first record of a new epoch
                self._end_epoch(lane)
            lane.pos = next_position(epoch, file, rec, kind)
            if kind == R_DOC:
                lane.epoch_docs += 1
                lane.tokens += value.size + 1  # + EOS
                return value
            reason, loc, detail = value
            handle_bad(reason, f"{lane.reader.path(epoch, file)}{loc}", detail, self.cfg.on_bad_record, self._counter)

    def _end_epoch(self, lane: _Lane) -> None:
        if lane.epoch_docs == 0:
            raise DataError(
                f"data.sources[{lane.source}]: no usable documents in {len(lane.reader.files)} file(s) of "
                f"{self.cfg.sources[lane.source].path!r} (bad records skipped so far: {self._counter.as_dict()})"
            )
        lane.epoch_docs = 0

    def _next_packed(self) -> PackedSequence:
        while not self._packer.ready():
            self._packer.add(self._next_document())
        return self._packer.pop()

    def _next_global_sequence(self) -> PackedSequence:
        size = self.cfg.shuffle_buffer
        if size == 0:
            seq = self._next_packed()
        else:
            while len(self._shuffle) < size:
                self._shuffle.append(self._next_packed())
            j = _splitmix64(self._shuffle_key ^ self._draws) % size
            self._draws += 1
            seq = self._shuffle[j]
            self._shuffle[j] = self._next_packed()
        self._global_index += 1
        return seq

    def _next_own_sequence(self) -> PackedSequence:
        """Rank r's next sequence: global G + r; then advance to the end of the round (G + W)."""
        for _ in range(self.dp_rank):
            self._next_global_sequence()
        seq = self._next_global_sequence()
        for _ in range(self.dp_world - 1 - self.dp_rank):
            self._next_global_sequence()
        self.sequences_consumed += 1
        return seq

    # -- iterator --------------------------------------------------------------------

    def __iter__(self) -> "TextBatchStream":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        seqs = [self._next_own_sequence() for _ in range(self.micro_batch_size)]
        return {
            "input_ids": torch.from_numpy(np.stack([s.input_ids for s in seqs])),
            "labels": torch.from_numpy(np.stack([s.labels for s in seqs])),
            "doc_ids": torch.from_numpy(np.stack([s.doc_ids for s in seqs])),
        }

    # -- introspection ---------------------------------------------------------------

    @property
    def tokens_per_batch(self) -> int:
        return self.micro_batch_size * self.seq_len

    @property
    def bad_records(self) -> Dict[str, int]:
        """Skipped bad records per reason (data.on_bad_record=skip), over all sources."""
        return self._counter.as_dict()

    @property
    def epochs(self) -> List[int]:
        """Completed epochs per source."""
        out = [0] * len(self.cfg.sources)
        for lane in self._lanes:
            out[lane.source] = lane.pos[0]
        return out

    @property
    def source_tokens(self) -> List[int]:
        """Tokens (EOS included) drawn from each source into the global stream so far."""
        out = [0] * len(self.cfg.sources)
        for lane in self._lanes:
            out[lane.source] = lane.tokens
        return out

    @property
    def global_sequences(self) -> int:
        """Global sequences consumed by all ranks together (this rank's view)."""
        return self._global_index

    def reader(self, source: int) -> SourceReader:
        return next(l.reader for l in self._lanes if l.source == source)

    # -- resume ----------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "seed": self.cfg.seed,
            "sources": [[s.path, float(s.weight), s.text_field] for s in self.cfg.sources],
            "max_files": self.cfg.max_files,
            "files": self._digests,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "vocab_size": int(self.tokenizer.vocab_size),
            "eos_id": int(self.tokenizer.eos_id),
        }

    def state_dict(self) -> dict:
        """The exact stream position (JSON-serialisable); the same on every rank after a batch."""
        shuffle = {"draws": self._draws}
        if self._shuffle:
            shuffle["tokens"] = encode_array(np.stack([np.append(s.input_ids, s.labels[-1]) for s in self._shuffle]))
            shuffle["doc_ids"] = encode_array(np.stack([s.doc_ids for s in self._shuffle]))
        return {
            "version": STATE_VERSION,
            **self._fingerprint(),
            "global_sequences": self._global_index,
            "sequences_consumed": self.sequences_consumed,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "micro_batch_size": self.micro_batch_size,
            "positions": [
                {"source": l.source, "epoch": l.pos[0], "file": l.pos[1], "record": l.pos[2],
                 "epoch_docs": l.epoch_docs, "tokens": l.tokens}
                for l in self._lanes
            ],
            "packer": self._packer.state_dict(),
            "shuffle": shuffle,
            "bad_records": self._counter.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was saved (under any data-parallel world size)."""
        version = state.get("version")
        if version == 1:
            self._load_v1(state)
            return
        if version != STATE_VERSION:
            raise DataError(f"data state: version {version!r}, expected {STATE_VERSION}")
        mine = self._fingerprint()
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise DataError(
                    f"data state: {key} was {state[key]!r} when saved, now {value!r}; "
                    "the data stream would differ, so it cannot be resumed exactly"
                )
        self._reset()
        by_source = {l.source: l for l in self._lanes}
        saved = {int(p["source"]): p for p in state["positions"]}
        if set(saved) != set(by_source):
            raise DataError(f"data state: sources {sorted(saved)} were read when saved, now {sorted(by_source)}")
        for i, p in saved.items():
            lane = by_source[i]
            lane.pos = (int(p["epoch"]), int(p["file"]), int(p["record"]))
            lane.epoch_docs = int(p["epoch_docs"])
            lane.tokens = int(p["tokens"])
        self._packer.load_state_dict(state["packer"])
        sh = state["shuffle"]
        self._draws = int(sh["draws"])
        if "tokens" in sh:
            tokens, docs = decode_array(sh["tokens"]), decode_array(sh["doc_ids"])
            self._shuffle = [PackedSequence(t[:-1].copy(), t[1:].copy(), d.copy()) for t, d in zip(tokens, docs)]
        self._counter.load(state.get("bad_records", {}))
        self._global_index = int(state["global_sequences"])
        if int(state["dp_world"]) == self.dp_world:
            self.sequences_consumed = int(state["sequences_consumed"])
        else:
            self.sequences_consumed = self._global_index // self.dp_world
        if self._global_index:
            logger.info("data: rank %d/%d resumed at global sequence %d", self.dp_rank, self.dp_world,
                        self._global_index)

    def _load_v1(self, state: dict) -> None:
        """States of the first demo data path (a sequence count): rebuild and replay."""
        for key in ("seq_len", "seed", "vocab_size", "eos_id", "sources", "max_files"):
            mine = self._fingerprint()[key]
            if key in state and state[key] != mine:
                raise DataError(f"data state: {key} was {state[key]!r} when saved, now {mine!r}")
        target = int(state["sequences_consumed"]) * int(state["dp_world"])
        self._reset()
        for _ in range(target):
            self._next_global_sequence()
        self.sequences_consumed = target // self.dp_world
        logger.warning("data: version-1 state: replayed %d global sequences to resume", target)
