"""torch.profiler (CPU) breakdown of one HF DeepseekV3 tiny-v3 training step.

python bench/profile_hf.py [--attn sdpa] [--experts grouped_mm] [--steps 3] [--rows 30] [--trace out.json]
Prints top ops by self CPU time (averaged over --steps profiled steps) and a phase breakdown
(forward / backward / optimizer) from record_function ranges.
"""

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import TINY_V3, build_hf_model, make_batch, make_optimizer  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--attn", default=None)
    p.add_argument("--experts", default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--trace", default=None)
    a = p.parse_args()
    torch.set_num_threads(2)
    model = build_hf_model(TINY_V3, attn_implementation=a.attn, experts_implementation=a.experts)
    ids, labels = make_batch(TINY_V3)
    opt = make_optimizer(model)

    def step():
        with record_function("PHASE_forward"):
            out = model(input_ids=ids, labels=labels, use_cache=False)
        with record_function("PHASE_backward"):
            out.loss.backward()
        with record_function("PHASE_optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    # un-profiled phase timings
    ph = {"fwd": [], "bwd": [], "opt": []}
    for _ in range(5):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=labels, use_cache=False)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        ph["fwd"].append(t1 - t0)
        ph["bwd"].append(t2 - t1)
        ph["opt"].append(t3 - t2)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in ph.items()}
    print(
        f"attn={model.config._attn_implementation} experts={model.config._experts_implementation} "
        f"unprofiled median ms: fwd {med['fwd']:.1f}  bwd {med['bwd']:.1f}  opt {med['opt']:.1f}  "
        f"total {sum(med.values()):.1f}"
    )

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(a.steps):
            step()
    ka = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in ka)
    print(f"\nprofiled total self CPU per step: {total_self / a.steps / 1e3:.1f} ms (profiler overhead included)")
    print(f"{'op':60s} {'self ms/step':>12s} {'%':>6s} {'calls/step':>10s}")
    rows = sorted(ka, key=lambda e: -e.self_cpu_time_total)[: a.rows]
    for e in rows:
        print(
            f"{e.key[:60]:60s} {e.self_cpu_time_total / a.steps / 1e3:12.2f} "
            f"{100 * e.self_cpu_time_total / total_self:6.1f} {e.count / a.steps:10.0f}"
        )
    print("\nby input shapes (top 25 self CPU):")
    ks = prof.key_averages(group_by_input_shape=True)
    for e in sorted(ks, key=lambda e: -e.self_cpu_time_total)[:25]:
        print(f"  {e.key[:34]:34s} {e.self_cpu_time_total / a.steps / 1e3:8.2f} ms  x{e.count // a.steps:<4d} {str(e.input_shapes)[:110]}")
    if a.trace:
        prof.export_chrome_trace(a.trace)


if __name__ == "__main__":
    main()
