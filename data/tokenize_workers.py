"""Tokenizer workers: parse, check and tokenize chunks of rows in worker processes.

The one worker mechanism of the data path, used by the training stream (`data.loader`, the
``data.num_workers`` setting) and by the preprocessing CLI (`data.preprocess`, ``--workers``).
The caller hands over a *schedule*, an iterable of ``(slot, rows)``: `slot` selects the text
field, `rows` is a chunk of `data.sources.Row`. The schedule is drawn lazily in the calling
process, a chunk whenever a worker has room (at most `PREFETCH_PER_WORKER` chunks per worker in
flight), so a caller may decide what to schedule next from what it has received so far. Results
come back in schedule order, so the output never depends on the number of workers.

Workers are torch DataLoader worker processes: the tokenizer reaches them once, at start.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .sources import ProcessedRow, Row, process_rows

# Start method of the worker processes: None = the platform's default (fork on Linux).
# Everything they receive pickles, so "spawn" / "forkserver" work too.
WORKER_START_METHOD: Optional[str] = None
# Chunks scheduled ahead per worker (bounded read-ahead).
PREFETCH_PER_WORKER = 2

Chunk = Tuple[int, Sequence[Row]]
ChunkResult = Tuple[int, List[ProcessedRow]]


class _ChunkWork(torch.utils.data.Dataset):
    """What a worker does with a scheduled chunk: parse, check and tokenize its rows."""

    def __init__(self, tokenizer, text_fields: Sequence[str]):
        self.tokenizer = tokenizer
        self.text_fields = list(text_fields)
        self.vocab_size = int(tokenizer.vocab_size)
        self.eos_id = int(tokenizer.eos_id)

    def __getitem__(self, item: Chunk) -> ChunkResult:
        slot, rows = item
        return slot, process_rows(rows, self.text_fields[slot], self.tokenizer, self.vocab_size, self.eos_id)


class _Schedule(torch.utils.data.Sampler):
    """The DataLoader's sampler: the caller's schedule, whose items are the chunks themselves."""

    def __init__(self, schedule: Iterable[Chunk]):
        self.schedule = schedule

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.schedule)


def _identity(x):
    return x


class TokenizedChunks:
    """Iterator of ``(slot, processed rows)``, one per chunk of `schedule`, in schedule order.

    `num_workers` processes do the work (0: this process, on demand). `close()` stops them."""

    def __init__(self, schedule: Iterable[Chunk], tokenizer, text_fields: Sequence[str], num_workers: int):
        if num_workers < 0:
            raise ValueError(f"tokenizer workers: num_workers must be >= 0, got {num_workers}")
        work = _ChunkWork(tokenizer, text_fields)
        if num_workers == 0:
            self._it: Iterator[ChunkResult] = map(work.__getitem__, schedule)
            return
        loader = torch.utils.data.DataLoader(
            work, batch_size=None, sampler=_Schedule(schedule), num_workers=num_workers, collate_fn=_identity,
            prefetch_factor=PREFETCH_PER_WORKER, persistent_workers=False, multiprocessing_context=WORKER_START_METHOD,
        )
        self._it = iter(loader)

    def __iter__(self) -> "TokenizedChunks":
        return self

    def __next__(self) -> ChunkResult:
        return next(self._it)

    def close(self) -> None:
        """Stop the worker processes; chunks still in flight are dropped."""
        it, self._it = self._it, iter(())
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
