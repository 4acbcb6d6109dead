"""Activation memory: the planner's prediction against the bytes autograd saves, per config, mode and precision.

For the tiny config and a wider one, every train.recompute mode (none, each selective module, DeepSeek-V3's
three, full) and fp32 / bf16 / fp8, in a fresh forked process each: the planner's predicted activation bytes
per token (train/activations.py, the whole model: blocks, MTP, head, token ids), the bytes autograd keeps for
backward per token (train/memory_probe.py: each storage once, parameters and weight copies apart), their
ratio, the process's peak RSS (VmHWM, reset after the model is built, over one probed step and the timed
steps) and the step time (forward + backward of one micro-batch, median of a few) relative to `none`.

python bench/memory.py [--json] [--configs tiny,wider] [--precisions fp32,bf16,fp8] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.hf_baseline import reset_peak_rss, rss_stats  # noqa: E402
from parallel.recompute import DEEPSEEK_V3_MODULES, MODULES  # noqa: E402

CONFIGS = {
    "tiny": ["model.num_hidden_layers=2", "train.micro_batch_size=2", "train.seq_len=128"],
    "wider": ["model.num_hidden_layers=2", "train.micro_batch_size=2", "train.seq_len=128", "model.hidden_size=512",
              "model.intermediate_size=1536", "model.moe_intermediate_size=384", "model.q_lora_rank=null",
              "model.kv_lora_rank=128", "model.n_shared_experts=2", "model.num_attention_heads=4",
              "model.qk_nope_head_dim=64", "model.qk_rope_head_dim=32", "model.v_head_dim=96"],
}
MODES = {"none": ["train.recompute=none"],
         **{m: ["train.recompute=selective", f"train.recompute_modules=[{m}]"] for m in MODULES},
         "deepseek_v3": ["train.recompute=selective", f"train.recompute_modules=[{','.join(DEEPSEEK_V3_MODULES)}]"],
         "full": ["train.recompute=full"]}


def measure(config: str, mode: str, precision: str, steps: int, threads: int) -> dict:
    """One case, in this (forked) process."""
    import torch

    from train.activations import ActivationModel
    from train.config import load_config
    from train.memory_probe import SavedTensorProbe, build_model, random_batch
    from train.plan import recompute_of

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", CONFIGS[config] + MODES[mode] + [f"train.precision={precision}"])
    model, policy, recompute = build_model(cfg)
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    gen = torch.Generator().manual_seed(1)

    def step(probe=None):
        ids = random_batch(cfg, gen)
        ctx = probe if probe is not None else recompute.context()
        with ctx, policy.autocast(torch.device("cpu")):
            loss = model(ids[:, :-1], ids[:, 1:]).loss(0.3)
        counted = probe.result() if probe is not None else None
        loss.backward()
        model.zero_grad(set_to_none=True)
        return counted

    reset_peak_rss()
    counted = step(SavedTensorProbe(model, recompute))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    predicted = ActivationModel(cfg.model, precision, recompute_of(cfg), cfg.train.micro_batch_size).by_kind(tokens)
    measured = counted.total_activations
    return {"config": config, "mode": mode, "precision": precision,
            "predicted_bytes_per_token": sum(predicted.values()) / tokens,
            "measured_bytes_per_token": measured / tokens, "ratio": sum(predicted.values()) / measured,
            "peak_rss_mb": rss_stats()["hwm_mb"], "step_s": statistics.median(times)}


def _child(queue, *args) -> None:
    queue.put(measure(*args))


def run_case(*args) -> dict:
    ctx = mp.get_context("fork")  # torch is imported once; each case gets its own memory high-water mark
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    row = queue.get()
    proc.join()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print a JSON list of objects")
    ap.add_argument("--configs", default="tiny,wider")
    ap.add_argument("--precisions", default="fp32,bf16,fp8")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case (median)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for config in args.configs.split(","):
        for precision in args.precisions.split(","):
            base = None
            for mode in args.modes.split(","):
                row = run_case(config, mode, precision, args.steps, args.threads)
                base = row["step_s"] if mode == "none" else base
                row["step_time_ratio"] = row["step_s"] / base if base else float("nan")
                rows.append(row)
                if not args.json:
                    print(f"{config:<6} {precision:<5} {mode:<15} predicted {row['predicted_bytes_per_token']:>9.0f} "
                          f"measured {row['measured_bytes_per_token']:>9.0f} B/token  ratio {row['ratio']:.3f}  "
                          f"peak RSS {row['peak_rss_mb']:>6.0f} MiB  step x{row['step_time_ratio']:.2f}", flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
