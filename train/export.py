"""Export a moeforge checkpoint to a Hugging Face DeepSeek-V3 (or V2) or GptOss directory.

    python -m train.export --checkpoint RUN_DIR/checkpoints/step_N --out DIR [--dtype fp32|bf16|fp8] [--max-shard-size 5GB] [--ema]

`--dtype mxfp4` (gpt-oss): the expert weights in MXFP4 blocks / scales, as OpenAI released them,
and every other tensor in bfloat16.

`--checkpoint` may also be a run directory or its checkpoints/ directory (the newest complete
checkpoint is taken). DIR receives config.json, model-0000k-of-0000n.safetensors shards with
model.safetensors.index.json, and the run's tokenizer files; `transformers.AutoModelForCausalLM`
and `AutoTokenizer.from_pretrained(DIR)` load it. `--dtype fp8` writes DeepSeek-V3's released FP8
format (float8_e4m3fn Linear weights with 128x128-block `weight_scale_inv`, the rest in bf16;
train/hf/quant_fp8.py). `--ema` writes the EMA of the weights that the checkpoint holds when the
run had train.ema_decay > 0 (fp32 unless --dtype), in the same format. The writing itself is train/hf/write.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import torch

from train import checkpoint as ckpt
from train.hf.write import INDEX_FILE, export_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MXFP4 = "mxfp4"  # gpt-oss: experts in MXFP4, the rest in bfloat16


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="step_N directory, or a run directory (newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory (HF layout)")
    p.add_argument("--dtype", choices=sorted(DTYPES) + [MXFP4], default=None,
                   help="weight dtype; fp8: the released DeepSeek-V3 FP8 format; mxfp4: gpt-oss experts in MXFP4, "
                        "the rest bfloat16 (default: the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: RUN_DIR/tokenizer)")
    p.add_argument("--ema", action="store_true", help="export the weights' EMA (train.ema_decay > 0) instead")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dtype = torch.bfloat16 if args.dtype == MXFP4 else DTYPES.get(args.dtype) if args.dtype else None
        out = export_checkpoint(args.checkpoint, args.out, dtype, args.max_shard_size, args.tokenizer,
                                mxfp4=args.dtype == MXFP4, ema=args.ema)
    except (ckpt.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = len(json.loads((out / INDEX_FILE).read_text())["weight_map"])
    print(f"exported {n} tensors from {ckpt.resolve_checkpoint(Path(args.checkpoint))} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
