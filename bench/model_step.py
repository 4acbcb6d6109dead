"""Training-step throughput: moeforge vs Hugging Face DeepseekV3ForCausalLM, same shapes, same run.

Each contender runs in its own subprocess (peak RSS is process-wide) on the "tiny-v3"
shapes of bench/hf_baseline.py (vocab 4096, hidden 256, 4 layers, 16 routed experts
top-4 in 4 groups (2 kept), 1 shared, MLA ranks 128/64, seq 256, micro-batch 8), fp32:
  hf                HF model, its default attention/experts kernels, fwd + bwd + AdamW
                    (torch's fused AdamW, as HF's Trainer uses by default), glibc malloc defaults
  hf-retain         the same with the host-allocator setting moeforge applies (train/allocator.py),
                    so the ratio to it is like for like
  moeforge          our Transformer, same step, MTP off (HF has none), aux-free bias on, the
                    optimizer and allocator settings the trainer uses
  moeforge-trainer  the whole Trainer step (streaming data, tokenizer, loss normalisation,
                    grad clipping, bias update, metrics), MTP off
  moeforge-trainer-mtp  the same with the demo's MTP depth 1 (costs one more block + head)
  moeforge-trainer-bf16 the trainer step with train.precision=bf16 (autocast, fp32 master weights);
                    not a like-for-like peer of fp32 HF: it shows what bf16 hardware (AVX512-BF16,
                    AMX, GPUs) gives; on AVX2-only CPUs bf16 is several times slower than fp32
  hf-gpt-oss        HF GptOssForCausalLM on configs/tiny_gpt_oss.yaml's model (vocab 4096, hidden 256,
                    4 layers alternating window 64 / full, GQA 8/2 heads of 32 with sinks, 16 biased
                    experts of 128 top-4), seq 256, micro-batch 8, fp32, eager attention (the sinks'
                    reference path), fwd + bwd + fused AdamW, moeforge's allocator setting
  moeforge-gpt-oss  our Transformer on the same model and batch, same step (CPU sink attention kernel,
                    grouped GEMM experts); its ratio is to hf-gpt-oss
Prints tokens/s, ratio to HF, peak RSS, achieved model FLOP/s next to the machine's
measured fp32 matmul FLOP/s. The machine load during each measurement is printed too:
numbers taken while other jobs run are not comparable across runs, only within one.

    python bench/model_step.py [--steps 8] [--warmup 3] [--threads 2] [--rounds 2] [--only hf,moeforge]

Contenders run one after another, `--rounds` times over (interleaved, so a slow spell of the
machine hits all of them); each contender's result is the median over rounds of its
per-round median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTENDERS = ["hf", "hf-retain", "moeforge", "moeforge-trainer", "moeforge-trainer-mtp", "moeforge-trainer-bf16",
              "hf-gpt-oss", "moeforge-gpt-oss"]
GPT_OSS = "-gpt-oss"  # contenders on the tiny gpt-oss shapes; compared with hf-gpt-oss


def _load() -> float:
    return os.getloadavg()[0]


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _time_steps(step_fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t0)
    return times


def _our_config(mtp: int):
    from bench.hf_baseline import model_shapes
    from models import ModelConfig

    return ModelConfig(**model_shapes(), num_nextn_predict_layers=mtp, max_position_embeddings=1024, rope_scaling=None,
                       routed_scaling_factor=2.5, initializer_range=0.02)


def _gpt_oss_config():
    from train.config import load_config

    return load_config(REPO / "configs" / "tiny_gpt_oss.yaml").model


def _gpt_oss_step(name: str):
    """One training step of HF's GptOssForCausalLM or of our Transformer on the tiny gpt-oss shapes."""
    import torch

    from bench.hf_baseline import TINY_V3, make_batch
    from models.head_loss import IGNORE_INDEX
    from train.allocator import retain_freed_memory

    retain_freed_memory()
    cfg = _gpt_oss_config()
    torch.manual_seed(0)
    ids, _ = make_batch(TINY_V3)
    if name.startswith("hf"):
        import transformers

        from train.hf import gpt_oss

        d = gpt_oss.config_dict(cfg, torch.float32, gpt_oss.MODEL_TYPE)
        d.pop("architectures"), d.pop("model_type")
        hf_cfg = transformers.GptOssConfig(**d)
        hf_cfg._attn_implementation = "eager"
        model = transformers.GptOssForCausalLM(hf_cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

        def loss():
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        from models import Transformer
        from models.moe import moe_layers
        from models.moe_state import MoEStepState
        from train.config import OptimConfig
        from train.optim import make_adamw, parameter_groups

        model = Transformer(cfg)
        labels = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), IGNORE_INDEX)], dim=1)
        opt = make_adamw(parameter_groups(model, 0.1), OptimConfig(lr=3e-4, betas=[0.9, 0.95]))
        moe_state = MoEStepState(moe_layers(model))

        def loss():
            out = model(ids, labels).loss(0.0)
            moe_state.end_step(0.0)
            return out

    def step():
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker(name: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from bench.hf_baseline import TINY_V3, build_hf_model, make_batch

    tokens = TINY_V3["seq_len"] * TINY_V3["micro_batch"]
    load0 = _load()
    if name.endswith(GPT_OSS):
        times = _time_steps(_gpt_oss_step(name), steps, warmup)
    elif name.startswith("hf"):
        if name == "hf-retain":
            from train.allocator import retain_freed_memory

            retain_freed_memory()
        model = build_hf_model(TINY_V3)
        ids, labels = make_batch(TINY_V3)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

        def step():
            model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = _time_steps(step, steps, warmup)
    elif name == "moeforge":
        from models import Transformer
        from models.moe import moe_layers
        from models.moe_state import MoEStepState
        from models.head_loss import IGNORE_INDEX
        from train.allocator import retain_freed_memory
        from train.config import OptimConfig
        from train.optim import make_adamw, parameter_groups

        retain_freed_memory()  # as the Trainer does on CPU (train.retain_host_memory)
        torch.manual_seed(0)
        model = Transformer(_our_config(mtp=0))
        ids, _ = make_batch(TINY_V3)
        labels = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), IGNORE_INDEX)], dim=1)
        opt = make_adamw(parameter_groups(model, 0.1), OptimConfig(lr=3e-4, betas=[0.9, 0.95]))
        moe_state = MoEStepState(moe_layers(model))

        def step():
            model(ids, labels).loss(0.0).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            moe_state.end_step(0.001)

        times = _time_steps(step, steps, warmup)
    else:
        from train.config import load_config
        from train.trainer import Trainer

        mtp = 1 if name.endswith("mtp") else 0
        precision = "bf16" if name.endswith("bf16") else "fp32"
        run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"moeforge-bench-{os.getpid()}"
        cfg = load_config(REPO / "configs" / "tiny.yaml", [
            f"run.dir={run_dir}", f"model.num_nextn_predict_layers={mtp}", f"train.threads={threads}",
            "checkpoint.at_end=false", "checkpoint.interval=0", "log.console=false", "log.progress=false",
            f"train.steps={steps + warmup}", f"train.precision={precision}",
        ])
        trainer = Trainer(cfg)
        times = _time_steps(trainer.train_step, steps, warmup)
    load1 = _load()
    med = statistics.median(times)
    return {"name": name, "tokens_per_s": tokens / med, "step_s": med, "step_s_min": min(times),
            "peak_rss_mb": _peak_rss_mb(), "load_avg": (load0 + load1) / 2, "threads": threads}


def matmul_flops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        a @ b
        reps += 1
    return 2 * 1024**3 * reps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", default=",".join(CONTENDERS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.threads)))
        return
    from models.accounting import count_model

    flops_per_token = count_model(_our_config(mtp=0), 256).flops_per_token
    gpt_oss_flops_per_token = count_model(_gpt_oss_config(), 256).flops_per_token
    peak = matmul_flops(args.threads)
    names = args.only.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--threads", str(args.threads)],
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                print(f"{name}: failed\n{out.stderr[-2000:]}")
                continue
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {}
    for name, rs in runs.items():
        if rs:
            rs = sorted(rs, key=lambda r: r["step_s"])
            results[name] = dict(rs[(len(rs) - 1) // 2], peak_rss_mb=max(r["peak_rss_mb"] for r in rs),
                                 per_round=[round(r["tokens_per_s"]) for r in runs[name]])
    hf = results.get("hf", {}).get("tokens_per_s")
    hf_retain = results.get("hf-retain", {}).get("tokens_per_s")
    hf_gpt_oss = results.get("hf" + GPT_OSS, {}).get("tokens_per_s")
    print(f"fp32 matmul peak (1024^3, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs/token (no MTP, seq 256): {flops_per_token / 1e6:.1f} M (tiny-v3), "
          f"{gpt_oss_flops_per_token / 1e6:.1f} M (tiny gpt-oss)")
    print(f"{'contender':24s} {'tokens/s':>10s} {'vs HF':>7s} {'vs HF-r':>7s} {'GFLOP/s':>8s} {'of peak':>8s} {'peak RSS':>9s} {'load':>5s}")
    for name, r in results.items():
        gpt_oss = name.endswith(GPT_OSS)  # its peer is hf-gpt-oss (allocator setting as moeforge's) in both columns
        achieved = (gpt_oss_flops_per_token if gpt_oss else flops_per_token) * r["tokens_per_s"]
        ref, ref_r = (hf_gpt_oss, hf_gpt_oss) if gpt_oss else (hf, hf_retain)
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        ratio_r = f"{r['tokens_per_s'] / ref_r:.2f}x" if ref_r else "-"
        print(f"{name:24s} {r['tokens_per_s']:10.0f} {ratio:>7s} {ratio_r:>7s} {achieved / 1e9:8.1f} {achieved / peak:8.0%} "
              f"{r['peak_rss_mb']:8.0f}M {r['load_avg']:5.1f}  rounds: {r['per_round']}")


if __name__ == "__main__":
    main()
