"""`python -m train.plan --config FILE [--gpus N] [--json] [key=value ...]`

Parameters (total, activated per token) and training FLOPs per token of the configured
model, computed on the meta device: nothing is allocated, so the 671B preset plans in
about a second on a laptop.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any, Optional

from models.accounting import count_model
from train.config import Config, ConfigError, load_config


def plan(cfg: Config, gpus: Optional[int] = None) -> dict[str, Any]:
    counts = count_model(cfg.model, cfg.train.seq_len)
    out: dict[str, Any] = asdict(counts)
    tokens_per_step = cfg.global_batch_sequences * cfg.train.seq_len
    out.update(
        seq_len=cfg.train.seq_len,
        tokens_per_step=tokens_per_step,
        flops_per_step=counts.flops_per_token * tokens_per_step,
    )
    if gpus:
        out["gpus"] = gpus
    return out


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    result = plan(cfg, args.gpus)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {args.config}")
    print(f"  parameters        {_human(result['params_total'])} total "
          f"({_human(result['params_total_no_mtp'])} without MTP)")
    print(f"  activated/token   {_human(result['params_active'])} "
          f"({_human(result['params_active_no_mtp'])} without MTP)")
    print(f"  FLOPs/token       {_human(result['flops_per_token'])} (training, seq {result['seq_len']})")
    print(f"  FLOPs/step        {_human(result['flops_per_step'])} ({_human(result['tokens_per_step'])} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
