"""The trainer's batch stream: sources -> documents -> tokens -> blend -> pack -> shard -> batch.

One *global* packed stream is defined independently of the data-parallel
layout, and rank ``r`` of ``W`` takes its sequences ``r, r+W, r+2W, ...``.
Micro-batch ``k`` of every rank therefore holds global sequences
``[k*m*W, (k+1)*m*W)`` between them (m = micro_batch_size): a W-rank run sees
the same global batches as a 1-rank run with W times the micro-batch (or W
accumulation steps), which is what the data-parallel parity tests compare.

Global stream, fully determined by the config and the tokenizer:

* Each source is an endless sequence of epochs; in epoch ``e`` its files are
  read in an order shuffled with ``Random("moeforge-data:{seed}:{source}:{e}")``
  and each file yields its documents in file order.
* Several sources are interleaved document by document so that each source's
  share of the stream's tokens tracks its normalised weight: the next document
  comes from the source furthest below its share (``w_i * total - tokens_i``,
  ties to the lower index; the weighted round-robin of Megatron's blended
  dataset, by tokens rather than samples). This needs no RNG and holds the
  proportions exactly at every prefix, not only in expectation.
* Documents are tokenized on the fly in this process, followed by EOS and
  packed (see `data.packing`).

Resume: `state_dict()` records how many sequences this rank has consumed;
`load_state_dict()` rebuilds the stream and replays (re-reads, re-tokenizes
and skips) up to that point, so the following batches are exactly those of an
uninterrupted run. Replay costs time linear in the position; the streaming
pipeline issue replaces it with true positions (file offsets, packing buffer).
A state saved under W ranks loads under W' ranks when the global position
(consumed * W) divides by W'.
"""

from __future__ import annotations

import logging
import random
from typing import Dict, Iterator, List

import numpy as np
import torch

from .config import DataConfig, SourceConfig
from .packing import Packer
from .sources import BadRecordCounter, expand_source, read_documents

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class _SourceStream:
    """Endless document texts of one source, epoch after epoch."""

    def __init__(self, index: int, src: SourceConfig, files: List[str], cfg: DataConfig, counter: BadRecordCounter):
        self.index, self.src, self.files, self.cfg, self.counter = index, src, files, cfg, counter
        self.epoch = 0
        self._it = self._documents()

    def file_order(self, epoch: int) -> List[str]:
        order = list(self.files)
        random.Random(f"moeforge-data:{self.cfg.seed}:{self.index}:{epoch}").shuffle(order)
        return order

    def _documents(self) -> Iterator[str]:
        while True:
            n_docs = 0
            for f in self.file_order(self.epoch):
                for text in read_documents(f, self.src.text_field, self.cfg.on_bad_record, self.counter):
                    n_docs += 1
                    yield text
            if n_docs == 0:
                raise ValueError(
                    f"data.sources[{self.index}]: no usable documents in {len(self.files)} file(s) of "
                    f"{self.src.path!r} (bad records skipped so far: {self.counter.as_dict()})"
                )
            self.epoch += 1

    def next_document(self) -> str:
        return next(self._it)


class TextBatchStream:
    """Endless iterator of micro-batches for one data-parallel rank.

    Each batch is a dict of int64 tensors of shape [micro_batch_size, seq_len]:
    ``input_ids``, ``labels`` (next tokens) and ``doc_ids`` (document index
    within each sequence; see `data.packing`)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer=None,
        seq_len: int = 256,
        micro_batch_size: int = 1,
        dp_rank: int = 0,
        dp_world: int = 1,
    ):
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
        self.files: List[List[str]] = [
            expand_source(src, i, cfg.max_files) for i, src in enumerate(cfg.sources)
        ]
        w = np.array([float(s.weight) for s in cfg.sources])
        self.weights: List[float] = list(w / w.sum())
        self._reset()

    # -- pipeline --------------------------------------------------------------------

    def _reset(self) -> None:
        self._counter = BadRecordCounter()
        self._sources = [
            _SourceStream(i, src, files, self.cfg, self._counter)
            for i, (src, files) in enumerate(zip(self.cfg.sources, self.files))
        ]
        self._source_tokens = [0] * len(self._sources)
        self._packer = Packer(self.seq_len, self.tokenizer.eos_id)
        self._global_index = 0  # next global sequence to come out of the packer
        self.sequences_consumed = 0  # by this rank

    def _next_token_document(self) -> List[int]:
        if len(self._sources) == 1:
            i = 0
        else:
            total = sum(self._source_tokens)
            deficits = [w * total - t for w, t in zip(self.weights, self._source_tokens)]
            i = max(range(len(deficits)), key=lambda j: (deficits[j], -j))
        ids = self.tokenizer.encode(self._sources[i].next_document())
        self._source_tokens[i] += len(ids) + 1  # + EOS
        return ids

    def _next_global_sequence(self):
        while not self._packer.ready():
            self._packer.add(self._next_token_document())
        self._global_index += 1
        return self._packer.pop()

    def _next_own_sequence(self):
        """This rank's next sequence: global index == rank (mod world)."""
        while self._global_index % self.dp_world != self.dp_rank:
            self._next_global_sequence()
        seq = self._next_global_sequence()
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
        return [s.epoch for s in self._sources]

    @property
    def source_tokens(self) -> List[int]:
        """Tokens (EOS included) drawn from each source into the global stream so far."""
        return list(self._source_tokens)

    # -- resume ----------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "seed": self.cfg.seed,
            "sources": [[s.path, float(s.weight), s.text_field] for s in self.cfg.sources],
            "max_files": self.cfg.max_files,
            "n_files": [len(f) for f in self.files],
            "vocab_size": int(self.tokenizer.vocab_size),
            "eos_id": int(self.tokenizer.eos_id),
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "sequences_consumed": self.sequences_consumed,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "micro_batch_size": self.micro_batch_size,
            "global_sequences": self.sequences_consumed * self.dp_world,
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the stream and replay it up to `state`'s position (see module doc)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state: version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self._fingerprint()
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"data state: {key} was {state[key]!r} when saved, now {value!r}; "
                    "the data stream would differ, so it cannot be resumed exactly"
                )
        if state["dp_world"] == self.dp_world:
            target = int(state["sequences_consumed"])
        else:
            glob = int(state["sequences_consumed"]) * int(state["dp_world"])
            if glob % self.dp_world:
                raise ValueError(
                    f"data state: {glob} global sequences consumed under dp_world={state['dp_world']} "
                    f"do not divide among dp_world={self.dp_world} ranks"
                )
            target = glob // self.dp_world
        self._reset()
        for _ in range(target):
            self._next_own_sequence()
        if target:
            logger.info("data: resumed rank %d/%d after %d sequences (replayed)", self.dp_rank, self.dp_world, target)
