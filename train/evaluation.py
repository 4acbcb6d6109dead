"""Loss evaluation: mean cross-entropy of the main head and of each MTP depth over fixed batches.

`loss_sums` / `evaluate_loss` evaluate a model in one process (the shared function, also behind
`python -m train.evaluate`); `HeldOutData`
gives the trainer's periodic evaluation its batches: the first `eval.tokens` tokens of the
`eval.sources` stream (their held-out files, data/holdout.py), the same ones every time, split
over the data-parallel ranks as the training stream is. The trainer sums the CE sums and the
target counts over the ranks, so the number is the single process's under every layout.

Global sequences are counted as the stream numbers them (rank r of W takes r, r + W, ...); the
ranks run whole rounds of `train.grad_accum_steps` micro-batches (the pipeline schedule's shape)
and the sequences past the budget are masked (labels IGNORE_INDEX), so no layout sees more or
fewer tokens than another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from data import TextBatchStream
from models.transformer import IGNORE_INDEX, target_counts


@dataclass
class EvalResult:
    """Mean CE of the main head (`loss`) and of MTP depths 1..D, over `tokens` target tokens."""

    loss: float
    mtp_losses: list[float]
    tokens: int

    @classmethod
    def from_sums(cls, sums: torch.Tensor, counts: torch.Tensor) -> "EvalResult":
        """From the global CE sums and target counts [1 + D] (main head, then each depth)."""
        means = (sums.double() / counts.double().clamp(min=1)).tolist()
        return cls(means[0], means[1:], int(counts[0]))

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def metrics(self) -> dict[str, Any]:
        """metrics.jsonl keys: val_loss, val_mtp_loss (mean over depths, as mtp_loss), per depth, tokens."""
        out: dict[str, Any] = {"val_loss": self.loss, "val_tokens": self.tokens}
        if self.mtp_losses:
            out["val_mtp_loss"] = sum(self.mtp_losses) / len(self.mtp_losses)
            out["val_mtp_loss_by_depth"] = list(self.mtp_losses)
        return out


def batch_counts(batches: list[dict[str, torch.Tensor]], depth: int) -> torch.Tensor:
    """Target tokens [1 + D] (fp64) of the batches, as the losses count them."""
    counts = torch.zeros(1 + depth, dtype=torch.float64)
    for b in batches:
        counts += target_counts(b["labels"], depth, b.get("doc_ids"))
    return counts


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], depth: int, device: torch.device,
              context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """CE sums [1 + D] (fp64, CPU) of the main head and each MTP depth over `batches`, forward only;
    `context` wraps each forward (autocast, loss_parallel)."""
    sums = torch.zeros(1 + depth, dtype=torch.float64)
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with context():
            out = model(b["input_ids"], b["labels"], b.get("doc_ids"))
        sums[0] += float(out.lm_loss_sum)
        if out.mtp_loss_sums is not None:
            sums[1:] += out.mtp_loss_sums.double().cpu()
    return sums


def evaluate_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], depth: int,
                  device: torch.device = torch.device("cpu"),
                  context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> EvalResult:
    """The model's mean losses over `batches` in one process (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    try:
        return EvalResult.from_sums(loss_sums(model, batches, depth, device, context), batch_counts(batches, depth))
    finally:
        model.train(was_training)


def mask_past(batch: dict[str, torch.Tensor], first_own: int, dp_rank: int, dp_size: int,
              limit: int) -> dict[str, torch.Tensor]:
    """The batch with the labels of its sequences numbered `limit` or later in the global stream set to
    IGNORE_INDEX; its sequence i is the rank's own sequence first_own + i, global (first_own + i) * W + r."""
    rows = torch.arange(batch["labels"].shape[0])
    past = (first_own + rows) * dp_size + dp_rank >= limit
    if not past.any():
        return batch
    return {**batch, "labels": batch["labels"].masked_fill(past[:, None], IGNORE_INDEX)}


class HeldOutData:
    """The evaluation's batches on one data-parallel rank: rounds of `micro_per_round` micro-batches,
    covering the first ceil(eval.tokens / seq_len) global sequences of the eval stream."""

    def __init__(self, cfg, tokenizer, dp_rank: int, dp_size: int) -> None:
        t = cfg.train
        data_cfg = dataclasses.replace(cfg.data, sources=list(cfg.eval.sources), shuffle_buffer=0, num_workers=0,
                                       max_files=None)
        try:
            self.stream = TextBatchStream(data_cfg, tokenizer, t.seq_len, t.micro_batch_size, dp_rank, dp_size,
                                          held_out=True)
        except ValueError as e:  # a DataError stays one: the errors name eval.sources, the section at fault
            raise type(e)(str(e).replace("data.sources", "eval.sources")) from None
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batch, self.micro_per_round = t.micro_batch_size, t.grad_accum_steps
        self.sequences = math.ceil(cfg.eval.tokens / t.seq_len)
        per_round = self.micro_batch * self.micro_per_round * dp_size
        self.rounds = math.ceil(self.sequences / per_round)

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Each round's micro-batches, from the start of the stream (the training stream is not touched)."""
        self.stream.rewind()
        own = 0
        for _ in range(self.rounds):
            round_batches = []
            for _ in range(self.micro_per_round):
                round_batches.append(mask_past(next(self.stream), own, self.dp_rank, self.dp_size, self.sequences))
                own += self.micro_batch
            yield round_batches
