"""HF transformers DeepseekV3ForCausalLM training-step baseline (CPU).

Reusable pieces for a combined bench script:

* ``TINY_V3``                       -- the "tiny-v3" shape dict (model + batch shapes).
* ``model_shapes(shapes)``          -- its model-config keys only.
* ``build_hf_model(shapes, ...)``   -- DeepseekV3ForCausalLM with those shapes (fp32, train mode).
* ``make_batch(shapes, seed)``      -- (input_ids, labels) [B, S] int64; labels == input_ids (HF shifts inside).
* ``make_hf_step_fn(model, ids, labels, optimizer)`` -- closure doing fwd + bwd + AdamW step.
* ``measure_step_fn(step_fn, tokens_per_step, steps, warmup)`` -- generic timer for ANY step callable.
* ``measure_train_step(model, input_ids, labels, steps, warmup, ...)`` -- convenience wrapper.
* ``rss_stats()`` / ``reset_peak_rss()`` -- VmRSS/VmHWM from /proc/self/status.

Peak RSS is process-wide (torch import, other models, allocator caches all count), so a fair
comparison runs each model in its own fresh subprocess (``python bench/hf_baseline.py --json``
prints one JSON line that a parent process can parse).

Usage:  python bench/hf_baseline.py [--steps 10] [--warmup 3] [--attn sdpa|eager]
                                   [--experts grouped_mm|eager|batched_mm] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

TINY_V3: dict = dict(
    vocab_size=4096,
    hidden_size=256,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    intermediate_size=512,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    moe_intermediate_size=128,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    num_attention_heads=8,
    # batch shapes (not config keys)
    seq_len=256,
    micro_batch=8,
)

_BATCH_KEYS = ("seq_len", "micro_batch")


def model_shapes(shapes: dict = TINY_V3) -> dict:
    """The model-config keys of a shape dict (batch shapes dropped)."""
    return {k: v for k, v in shapes.items() if k not in _BATCH_KEYS}


# --------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def rss_stats() -> dict:
    """Current RSS and high-water mark (MiB) of this process."""
    return {"rss_mb": _proc_status_kb("VmRSS") / 1024.0, "hwm_mb": _proc_status_kb("VmHWM") / 1024.0}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write '5' to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- CPU contention
# This box has 2 cores shared with other users' jobs; a concurrent training run halves our
# throughput.  We record how much CPU *other* processes burned during the timed region and can
# wait for the machine to go idle before measuring.
_CLK = os.sysconf("SC_CLK_TCK")


def _cpu_busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / _CLK


class CpuMonitor:
    """Fraction of machine CPU used by processes other than this one during a region."""

    def __enter__(self):
        self.t0, self.b0, self.o0 = time.perf_counter(), _cpu_busy_s(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        foreign = (_cpu_busy_s() - self.b0) - (sum(os.times()[:2]) - self.o0)
        self.foreign_frac = max(0.0, foreign) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
        return False


def wait_for_idle(max_busy_frac: float = 0.15, window_s: float = 1.0, timeout_s: float = 600.0) -> float:
    """Block until machine-wide CPU use (by others) over ``window_s`` is below ``max_busy_frac``.

    Returns seconds waited (timeout_s -> gives up and returns, caller should flag the result).
    """
    t_start = time.perf_counter()
    while True:
        b0 = _cpu_busy_s()
        time.sleep(window_s)
        frac = (_cpu_busy_s() - b0) / (window_s * (os.cpu_count() or 1))
        waited = time.perf_counter() - t_start
        if frac < max_busy_frac or waited > timeout_s:
            return waited


def clean_bench(
    fn: Callable[[], object],
    reps: int = 20,
    warmup: int = 3,
    max_foreign: float = 0.05,
    batch_min_s: float = 0.25,
    timeout_s: float = 900.0,
) -> dict:
    """Time ``fn`` ``reps`` times, discarding batches during which other processes used > max_foreign
    of the machine's CPU (measured from /proc/stat).  Batches last >= batch_min_s (0 -> one call per
    batch).  Returns dict(median, min, times, n_discarded, clean) -- clean=False if timeout_s hit.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    discarded = 0
    t_start = time.perf_counter()
    dirty = True
    while len(samples) < reps:
        if time.perf_counter() - t_start > timeout_s:
            break
        if dirty:
            wait_for_idle(window_s=0.5, timeout_s=max(1.0, timeout_s - (time.perf_counter() - t_start)))
        batch = []
        with CpuMonitor() as mon:
            tb = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                batch.append(t1 - t0)
                if t1 - tb >= batch_min_s or len(batch) >= 500:
                    break
        dirty = mon.foreign_frac > max_foreign
        if dirty:
            discarded += len(batch)
        else:
            samples.extend(batch)
    clean = len(samples) >= reps
    if not samples:  # give up: report contaminated numbers rather than nothing
        samples = batch
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "times": samples,
        "n_discarded": discarded,
        "clean": clean,
    }


# glibc malloc returns big blocks (> dynamic mmap threshold, max 32 MiB) to the OS on free, so
# every step re-faults the pages of large temporaries (logits, attention scores, ...). The trainer
# keeps freed memory in the heap (train/allocator.py); benchmarks apply the same setting in-process.
_MALLOC_TUNED = False


def tune_malloc(enable: bool = True) -> None:
    """Apply the trainer's host-allocator setting (`train.allocator.retain_freed_memory`) to this process.
    Micro-benchmarks use it so kernel timings don't depend on allocator page-fault luck."""
    global _MALLOC_TUNED
    if not enable:
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:  # micro-benchmarks import this file from bench/ directly
        sys.path.insert(0, repo)
    from train.allocator import retain_freed_memory

    _MALLOC_TUNED = retain_freed_memory()


def malloc_tuned() -> bool:
    return _MALLOC_TUNED


# --------------------------------------------------------------------------- model
def build_hf_model(
    shapes: dict = TINY_V3,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """DeepseekV3ForCausalLM from a shape dict (extra keys are forwarded to DeepseekV3Config).

    attn_implementation / experts_implementation = None -> HF defaults (sdpa / grouped_mm in transformers 5.x).
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg_kwargs = model_shapes(shapes)
    cfg_kwargs.setdefault("num_key_value_heads", cfg_kwargs.get("num_attention_heads"))
    cfg_kwargs.setdefault("max_position_embeddings", max(4096, shapes.get("seq_len", 0)))
    cfg_kwargs.setdefault("tie_word_embeddings", False)
    cfg_kwargs.setdefault("use_cache", False)
    cfg = DeepseekV3Config(**cfg_kwargs)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).to(dtype)
    model.train()
    return model


def make_batch(shapes: dict = TINY_V3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shapes["vocab_size"], (shapes["micro_batch"], shapes["seq_len"]), generator=g)
    return ids, ids.clone()  # HF's ForCausalLMLoss shifts labels internally


def make_optimizer(model, lr: float = 3e-4, **kw):
    """torch.optim.AdamW with library defaults (on CPU: foreach=None -> per-tensor for-loop impl)."""
    kw.setdefault("weight_decay", 0.1)
    kw.setdefault("betas", (0.9, 0.95))
    return torch.optim.AdamW(model.parameters(), lr=lr, **kw)


def make_hf_step_fn(model, input_ids, labels, optimizer=None) -> Callable[[], float]:
    opt = optimizer if optimizer is not None else make_optimizer(model)

    def step_fn():
        out = model(input_ids=input_ids, labels=labels, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step_fn


# --------------------------------------------------------------------------- timing
def measure_step_fn(
    step_fn: Callable[[], object],
    tokens_per_step: int,
    steps: int = 10,
    warmup: int = 3,
    max_foreign: float = 0.05,
    timeout_s: float = 900.0,
) -> dict:
    """Time ``step_fn()`` (fwd+bwd+optimizer step) ``steps`` times after ``warmup`` untimed calls.

    Steps during which other processes used > max_foreign of the CPU are discarded and re-run
    (shared 2-core box).  Returns tokens_per_s (from the median clean step), step_s (median), step_s_min/max, all step times,
    foreign_cpu_frac (CPU used by other processes over the whole timing window, dirty steps included),
    n_steps_discarded, clean (False if timeout_s passed before `steps` clean steps were collected),
    peak_rss_mb (process VmHWM at the end: includes everything the process ever touched),
    steady_peak_rss_mb (VmHWM after a reset taken just before the timed steps, i.e. peak during
    training steps incl. params/grads/optimizer state/activations), rss_before_mb.
    """
    for _ in range(warmup):
        step_fn()
    gc.collect()
    before = rss_stats()
    reset_ok = reset_peak_rss()
    with CpuMonitor() as mon:
        r = clean_bench(step_fn, reps=steps, warmup=0, max_foreign=max_foreign, batch_min_s=0.0, timeout_s=timeout_s)
    times = r["times"]
    after = rss_stats()
    med = statistics.median(times)
    return {
        "tokens_per_s": tokens_per_step / med,
        "step_s": med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_times": times,
        "tokens_per_step": tokens_per_step,
        # process-lifetime peak (VmHWM before the reset covers import/build/warmup)
        "peak_rss_mb": max(after["hwm_mb"], before["hwm_mb"]),
        "steady_peak_rss_mb": after["hwm_mb"] if reset_ok else None,
        "rss_before_mb": before["rss_mb"],
        # CPU share burned by OTHER processes over the whole timing window (dirty steps included)
        "foreign_cpu_frac": mon.foreign_frac,
        "n_steps_discarded": r["n_discarded"],  # steps dropped because another process used the CPU
        "clean": r["clean"],
    }


def measure_train_step(
    model,
    input_ids,
    labels,
    steps: int = 10,
    warmup: int = 3,
    *,
    optimizer=None,
    step_fn: Callable[[], object] | None = None,
) -> dict:
    """HF-style convenience wrapper: ``model(input_ids=..., labels=...).loss`` + AdamW.

    Pass ``step_fn`` to time an arbitrary step instead (``model`` is then unused).
    peak_rss_mb is the process-lifetime VmHWM; steady_peak_rss_mb the peak over the timed steps.
    """
    if step_fn is None:
        step_fn = make_hf_step_fn(model, input_ids, labels, optimizer)
    return measure_step_fn(step_fn, input_ids.numel(), steps=steps, warmup=warmup)


# --------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default=None, help="None = HF default (sdpa); or eager / sdpa")
    p.add_argument("--experts", default=None, help="None = HF default (grouped_mm); or eager / batched_mm")
    p.add_argument("--json", action="store_true", help="print one JSON line (for subprocess use)")
    p.add_argument("--no-wait-idle", action="store_true", help="don't wait for other jobs to stop using the CPU")
    p.add_argument("--malloc-tuned", action="store_true", help="apply the trainer's malloc setting, train/allocator.py (default: glibc defaults)")
    a = p.parse_args(argv)
    tune_malloc(a.malloc_tuned)

    torch.set_num_threads(a.threads)
    hwm_after_import = rss_stats()["hwm_mb"]
    model = build_hf_model(TINY_V3, attn_implementation=a.attn, experts_implementation=a.experts)
    ids, labels = make_batch(TINY_V3)
    nparams = sum(p.numel() for p in model.parameters())
    waited = 0.0 if a.no_wait_idle else wait_for_idle()
    res = measure_train_step(model, ids, labels, steps=a.steps, warmup=a.warmup)
    res.update(
        model="hf_deepseek_v3",
        attn_implementation=model.config._attn_implementation,
        experts_implementation=model.config._experts_implementation,
        n_params=nparams,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        hwm_after_import_mb=hwm_after_import,
        waited_for_idle_s=waited,
        malloc_tuned=malloc_tuned(),
    )
    if a.json:
        res.pop("step_times")
        print(json.dumps(res))
    else:
        print(
            f"HF DeepseekV3 tiny-v3 attn={res['attn_implementation']} experts={res['experts_implementation']} "
            f"params={nparams/1e6:.2f}M threads={res['threads']} malloc_tuned={res['malloc_tuned']}"
        )
        print(
            f"  tokens/s={res['tokens_per_s']:.0f}  step={res['step_s']*1e3:.1f} ms "
            f"(min {res['step_s_min']*1e3:.1f}, max {res['step_s_max']*1e3:.1f})  "
            f"[{res['n_steps_discarded']} contended steps discarded, clean={res['clean']}]"
        )
        print(
            f"  peak RSS (process)={res['peak_rss_mb']:.0f} MiB  during steps={res['steady_peak_rss_mb']:.0f} MiB  "
            f"RSS before steps={res['rss_before_mb']:.0f} MiB  HWM after import={hwm_after_import:.0f} MiB"
        )
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
