"""A finished run's model and tokenizer, for sampling and evaluation (no training state)."""

from __future__ import annotations

from pathlib import Path

from data.tokenizer import TextTokenizer
from models.transformer import Transformer
from parallel.checkpointing import CheckpointState
from parallel.context import ParallelContext
from parallel.ema import WeightEMA
from train import checkpoint as ckpt


def load_for_inference(checkpoint: Path, ema: bool = False) -> tuple[Transformer, TextTokenizer]:
    """Model (eval mode, weights from `checkpoint`, or with `ema` their EMA) and tokenizer of a finished run."""
    cfg = ckpt.saved_config(checkpoint)
    model = Transformer(cfg.model)
    average = None
    if ema:
        if not ckpt.has_ema(ckpt.SafeFileSystemReader(str(checkpoint)).read_metadata()):
            raise ckpt.no_ema(checkpoint)
        average = WeightEMA(model, decay=0.0)  # only a place to load the saved EMA into
    ckpt.load_checkpoint(checkpoint, CheckpointState(model, None, ParallelContext.single(), average), rank=0)
    if average is not None:
        average.copy_to_weights()
        average.close()
    model.eval()
    tokenizer = TextTokenizer.from_dir(checkpoint.parent.parent / "tokenizer")
    return model, tokenizer
