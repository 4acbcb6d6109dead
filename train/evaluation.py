"""Held-out loss of a model over batches: the one loss-evaluation function.

`evaluate_loss` is what `python -m train.evaluate` runs on a checkpoint and what training-time
evaluation can call on the live model. It returns sums and counts as well as the means, so a
data-parallel caller can all-reduce the sums before dividing.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Optional

import torch
from torch import nn


@dataclass
class EvalLoss:
    """CE sums and target counts of the main head and of each MTP depth, and the means they give."""

    lm_loss_sum: float
    tokens: int
    mtp_loss_sums: list[float]
    mtp_tokens: list[int]
    batches: int

    @property
    def loss(self) -> float:
        """Mean next-token cross-entropy (nats per target token)."""
        return self.lm_loss_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def mtp_losses(self) -> list[float]:
        """Mean CE of each MTP depth (position i predicting token i + k + 1)."""
        return [s / max(n, 1) for s, n in zip(self.mtp_loss_sums, self.mtp_tokens)]


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    context: Callable[[], ContextManager] = nullcontext,
    device: Optional[torch.device] = None,
) -> EvalLoss:
    """Sum the model's CE over `batches` (dicts of input_ids, labels, optional doc_ids) in eval mode.

    `context` wraps each forward pass (e.g. the trainer's precision autocast). The model's
    train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    lm_sum, tokens, n_batches = 0.0, 0, 0
    mtp_sums: Optional[torch.Tensor] = None
    mtp_counts: Optional[torch.Tensor] = None
    try:
        for batch in batches:
            b = {k: v.to(device) for k, v in batch.items()}
            with context():
                out = model(b["input_ids"], b["labels"], b.get("doc_ids"))
            lm_sum += float(out.lm_loss_sum)
            tokens += int(out.lm_tokens)
            if out.mtp_loss_sums is not None:
                s, c = out.mtp_loss_sums.double().cpu(), out.mtp_tokens.cpu()
                mtp_sums, mtp_counts = (s, c) if mtp_sums is None else (mtp_sums + s, mtp_counts + c)
            n_batches += 1
    finally:
        model.train(was_training)
    return EvalLoss(
        lm_loss_sum=lm_sum,
        tokens=tokens,
        mtp_loss_sums=[] if mtp_sums is None else mtp_sums.tolist(),
        mtp_tokens=[] if mtp_counts is None else [int(c) for c in mtp_counts],
        batches=n_batches,
    )
