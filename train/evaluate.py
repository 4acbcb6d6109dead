"""Held-out loss and perplexity of a checkpoint on a data source.

    python -m train.evaluate --checkpoint RUN_DIR/checkpoints/step_N --data SOURCE [--tokens N] [--ema]

SOURCE is anything `data.sources[].path` accepts (a file, glob or directory of .jsonl, .jsonl.gz,
.parquet, .txt, or a Megatron .bin/.idx prefix), read by the training pipeline (packing, the run's
tokenizer) at the run's sequence length. Prints one JSON object: loss, perplexity, tokens (and the
MTP depths' losses). `--ema` evaluates the weights' EMA (train.ema_decay > 0) instead of the weights.
The loss itself is train/evaluation.py's `evaluate_loss`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Optional

from data.config import DataConfig, SourceConfig
from data.loader import TextBatchStream
from train import checkpoint as ckpt
from train.evaluation import EvalResult, evaluate_loss
from train.inference import load_for_inference


def evaluate_checkpoint(checkpoint: Path, source: str, tokens: int, text_field: str = "text",
                        seq_len: Optional[int] = None, batch_size: int = 1,
                        ema: bool = False) -> tuple[EvalResult, int]:
    """(evaluate_loss of `checkpoint` over the first ceil(tokens / seq_len) sequences of `source`, batches)."""
    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    checkpoint = ckpt.resolve_checkpoint(checkpoint)
    run_cfg = ckpt.saved_config(checkpoint)
    model, tokenizer = load_for_inference(checkpoint, ema=ema)
    seq_len = seq_len or run_cfg.train.seq_len
    data_cfg = DataConfig(sources=[SourceConfig(path=source, text_field=text_field)], num_workers=0)
    stream = TextBatchStream(data_cfg, tokenizer, seq_len, batch_size)
    try:
        n_batches = math.ceil(tokens / (seq_len * batch_size))
        batches = list(itertools.islice(stream, n_batches))
        return evaluate_loss(model, batches, run_cfg.model.num_nextn_predict_layers), len(batches)
    finally:
        stream.close()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="step_N directory, or a run directory (newest checkpoint)")
    p.add_argument("--data", required=True, help="a data source path (file, glob, directory or Megatron prefix)")
    p.add_argument("--tokens", type=int, default=262144, help="tokens to evaluate (rounded up to whole batches)")
    p.add_argument("--text-field", default="text", help="JSON/parquet field holding the text")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the run's train.seq_len)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--ema", action="store_true", help="evaluate the weights' EMA (train.ema_decay > 0)")
    args = p.parse_args(argv)
    try:
        result, n_batches = evaluate_checkpoint(Path(args.checkpoint), args.data, args.tokens, args.text_field,
                                     args.seq_len, args.batch_size, args.ema)
    except (ckpt.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
              "batches": n_batches}
    if result.mtp_losses:
        report["mtp_losses"] = result.mtp_losses
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
