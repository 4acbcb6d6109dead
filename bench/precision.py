"""FP32 vs BF16 vs FP8 training on CPU: step time, peak memory, activation memory, loss error.

Part A  FP8 GEMM paths (Linear forward + backward, three GEMMs): fp32 F.linear, bf16 F.linear,
        FP8 "emulate" (quantise -> dequantise -> fp32 GEMM) and FP8 "scaled_mm" (torch._scaled_mm
        float8 GEMM, row-wise scales per 128-slice of K); says which FP8 path is faster here.
Part B  the Trainer on the tiny config and a wider one, each precision in its own subprocess:
        median step time, peak RSS of two extra steps (VmHWM reset before them), bytes saved
        for backward by one forward (exact, storage-deduplicated), and the relative loss error of
        FP8 (and FP32) vs BF16 over the same steps and data (mean of the last 5 steps), and the
        share of the machine's CPU other processes used meanwhile (timings are only as good as that).
        Prints which FP8 path ran.

python bench/precision.py [--threads 2] [--steps 12] [--configs tiny,wide] [--skip-gemm] [--wait 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from hf_baseline import CpuMonitor, reset_peak_rss, rss_stats, wait_for_idle  # noqa: E402

CONFIGS = {
    # configs/tiny.yaml as shipped (hidden 256, 16 experts top-4, MTP 1), shorter batch for CPU time
    "tiny": ["train.seq_len=256", "train.micro_batch_size=4"],
    # wider: hidden 768, experts 384 wide, MLA ranks scaled up
    "wide": [
        "model.hidden_size=768", "model.intermediate_size=2048", "model.moe_intermediate_size=384",
        "model.q_lora_rank=384", "model.kv_lora_rank=256", "model.num_attention_heads=12",
        "model.qk_nope_head_dim=64", "model.qk_rope_head_dim=32", "model.v_head_dim=64",
        "train.seq_len=256", "train.micro_batch_size=2",
    ],
}


# ---------------------------------------------------------------- part A
def bench_gemms(reps: int) -> None:
    import torch.nn.functional as F

    from models.fp8 import Fp8Recipe, fp8_linear

    print("\n== A. Linear fwd+bwd (3 GEMMs), ms per call (median) ==")
    print(f"{'tokens x in -> out':>22} {'fp32':>8} {'bf16':>8} {'fp8 emulate':>12} {'fp8 scaled_mm':>14}")
    for m, k, n in [(1024, 256, 512), (2048, 768, 768), (4096, 1024, 2048)]:
        x = torch.randn(m, k, requires_grad=True)
        w = (torch.randn(n, k) * 0.02).requires_grad_()
        g = torch.randn(m, n)

        def run(fn):
            def once():
                x.grad = w.grad = None
                fn().backward(g)
            once()
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                once()
                ts.append(time.perf_counter() - t)
            return statistics.median(ts) * 1e3

        def bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.linear(x, w)

        r = {
            "fp32": run(lambda: F.linear(x, w)),
            "bf16": run(bf16),
            "emulate": run(lambda: fp8_linear(x, w, recipe=Fp8Recipe(backend="emulate"))),
            "scaled_mm": run(lambda: fp8_linear(x, w, recipe=Fp8Recipe(backend="scaled_mm"))),
        }
        faster = "emulate" if r["emulate"] <= r["scaled_mm"] else "scaled_mm"
        print(f"{f'{m} x {k} -> {n}':>22} {r['fp32']:8.2f} {r['bf16']:8.2f} {r['emulate']:12.2f} "
              f"{r['scaled_mm']:14.2f}   faster FP8 path: {faster}")


# ---------------------------------------------------------------- part B (worker)
def saved_activation_bytes(trainer) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward, parameters excluded (FP8 caches
    e4m3; train/memory_probe.py counts them, through the trainer's recomputation hook)."""
    from train.memory_probe import SavedTensorProbe

    batch = next(trainer.data)
    with SavedTensorProbe(trainer.model, trainer.recompute) as probe:
        with trainer.precision_context():
            out = trainer.model(batch["input_ids"], batch["labels"], batch.get("doc_ids"))
        counted = probe.result()
    del out
    return counted.total_activations + counted.weight_copies


def worker(config: str, precision: str, steps: int, threads: int, cache: str, run_dir: str) -> dict:
    from train.config import load_config
    from train.trainer import Trainer

    overrides = CONFIGS[config] + [
        f"train.precision={precision}", f"train.steps={steps + 2}", f"train.threads={threads}",
        f"run.dir={run_dir}", f"data.cache_dir={cache}", "data.max_files=200", "checkpoint.interval=0",
        "checkpoint.at_end=false", "log.console=false", "log.progress=false", "train.sample_prompt=''",
        "optim.warmup_steps=3", "optim.lr=1e-3",
    ]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    trainer = Trainer(cfg)
    losses, times = [], []
    warm = 2
    with CpuMonitor() as mon:
        for i in range(steps):
            m = trainer.train_step()
            losses.append(m["loss"])
            if i >= warm:
                times.append(m["step_time_s"])
    # Memory, after the timed steps: from now on glibc mmaps every allocation >= 64 KiB and unmaps it
    # on free, so peak RSS follows live memory instead of the heap's high-water mark (it still holds
    # oneDNN's primitive cache, large for bf16 kernels). Two more steps, same for every precision.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except OSError:
        pass
    base = rss_stats()["rss_mb"]
    peak_reset = reset_peak_rss()
    for _ in range(2):
        trainer.train_step()
    peak = rss_stats()["hwm_mb"]
    act = saved_activation_bytes(trainer)  # after the timed steps, so training is untouched
    return {
        "config": config, "precision": precision, "step_s": statistics.median(times), "losses": losses,
        "peak_rss_mb": peak, "step_peak_over_rss_mb": peak - base if peak_reset else float("nan"),
        "saved_act_mb": act / 2**20, "fp8_path": trainer.precision.describe(trainer.device),
        "tokens_per_step": cfg.train.seq_len * cfg.train.micro_batch_size, "foreign_cpu": mon.foreign_frac,
        "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--configs", default="tiny,wide")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for other CPU load to drop per run")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "PRECISION"))
    ap.add_argument("--cache", default=os.environ.get("MOEFORGE_CACHE", str(Path.home() / ".cache" / "moeforge")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        with tempfile.TemporaryDirectory() as run_dir:
            print("RESULT " + json.dumps(worker(*args.worker, args.steps, args.threads, args.cache, run_dir)))
        return

    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if not args.skip_gemm:
        bench_gemms(args.reps)
    print(f"\n== B. Trainer, {args.steps} steps (median step time of the last {args.steps - 2}) ==")
    results = {}
    for config in args.configs.split(","):
        for precision in ("fp32", "bf16", "fp8"):
            cmd = [sys.executable, __file__, "--worker", config, precision, "--steps", str(args.steps),
                   "--threads", str(args.threads), "--cache", args.cache]
            wait_for_idle(max_busy_frac=0.3, timeout_s=args.wait)  # best effort on a shared machine
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(out.stdout[-2000:], out.stderr[-4000:])
                raise SystemExit(f"worker {config}/{precision} failed")
            results[(config, precision)] = json.loads(line[0][7:])
    hdr = f"{'config':>6} {'prec':>5} {'params':>7} {'step s':>7} {'tok/s':>7} {'peak RSS MB':>11} " \
          f"{'step peak +MB':>13} {'saved act MB':>12} {'loss@end':>9} {'rel err vs bf16':>15} {'other CPU':>9}"
    print(hdr)
    for config in args.configs.split(","):
        ref = results[(config, "bf16")]["losses"][-5:]  # same steps and batches in every run
        ref_end = sum(ref) / len(ref)
        for precision in ("fp32", "bf16", "fp8"):
            r = results[(config, precision)]
            end = sum(r["losses"][-5:]) / len(r["losses"][-5:])
            err = (end - ref_end) / ref_end
            print(f"{config:>6} {precision:>5} {r['params_m']:6.1f}M {r['step_s']:7.3f} "
                  f"{r['tokens_per_step'] / r['step_s']:7.0f} {r['peak_rss_mb']:11.0f} "
                  f"{r['step_peak_over_rss_mb']:13.0f} {r['saved_act_mb']:12.1f} {end:9.4f} "
                  f"{err:+15.4%} {r['foreign_cpu']:9.0%}")
    fp8_paths = {r["fp8_path"] for (c, p), r in results.items() if p == "fp8"}
    print("\nFP8 path that ran: " + "; ".join(sorted(fp8_paths)))
    print("peak RSS: whole process over two steps after the timed ones; step peak: above the RSS before them; saved act: "
          "tensors autograd keeps for backward in one forward (FP8 Linears keep e4m3 inputs + scales)")
    print("(emulate = E4M3 quantise -> dequantise with 1x128 / 128x128 scales, then fp32 GEMM; the loss error over "
          "this few steps is a smoke check, tests/test_fp8_training.py runs the 200-step comparison)")


if __name__ == "__main__":
    main()
