"""A finished run's model and tokenizer, for sampling and evaluation (no training state)."""

from __future__ import annotations

from pathlib import Path

from data.tokenizer import TextTokenizer
from models.transformer import Transformer
from parallel.checkpointing import CheckpointState
from parallel.context import ParallelContext
from train import checkpoint as ckpt


def load_for_inference(checkpoint: Path) -> tuple[Transformer, TextTokenizer]:
    """Model (eval mode, weights from `checkpoint`) and tokenizer of a finished run."""
    cfg = ckpt.saved_config(checkpoint)
    model = Transformer(cfg.model)
    ckpt.load_checkpoint(checkpoint, CheckpointState(model, None, ParallelContext.single()), rank=0)
    model.eval()
    tokenizer = TextTokenizer.from_dir(checkpoint.parent.parent / "tokenizer")
    return model, tokenizer
