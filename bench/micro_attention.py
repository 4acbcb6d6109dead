"""Causal attention on CPU fp32, fwd and fwd+bwd, tiny-v3 shapes: B=8, heads=8, S=256, qk dim 48, v dim 32.

Variants
  sdpa_v32        F.scaled_dot_product_attention(is_causal=True), v head dim 32 (as HF passes it)
  sdpa_v48pad     v zero-padded to 48 (F.pad), output sliced back to 32 -> same-dim fast path
  sdpa_pad64      q/k/v all padded to 64
  sdpa_mask       explicit boolean causal mask instead of is_causal (what a mask-carrying caller gets)
  sdpa_bshd       q/k/v given as [B,S,H,D].transpose(1,2) views (no .contiguous()), v padded to 48
  eager           matmul -> masked_fill -> softmax -> matmul (HF eager_attention_forward style)
  blocked causal  autograd.Function: q-blocks x only the keys they can see (skips ~3/8 or 1/4 of the
                  S x S work), bmm + softmax, hand-written backward (saves P blocks)
Also reports which aten SDPA kernel ran (flash CPU vs math) via torch.profiler.

python bench/micro_attention.py [--reps 15] [--threads 2]
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import clean_bench, malloc_tuned, tune_malloc  # noqa: E402

B, NH, S, DQK, DV = 8, 8, 256, 48, 32
SCALE = 1.0 / math.sqrt(DQK)


def sdpa_v32(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)


def sdpa_v48pad(q, k, v):
    vp = F.pad(v, (0, DQK - DV))
    return F.scaled_dot_product_attention(q, k, vp, is_causal=True, scale=SCALE)[..., :DV]


def sdpa_pad64(q, k, v):
    qp, kp, vp = F.pad(q, (0, 64 - DQK)), F.pad(k, (0, 64 - DQK)), F.pad(v, (0, 64 - DV))
    return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=SCALE)[..., :DV]


_MASK = torch.ones(S, S, dtype=torch.bool).tril()


def sdpa_mask(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_MASK, scale=SCALE)


def sdpa_mask_v48pad(q, k, v):
    vp = F.pad(v, (0, DQK - DV))
    return F.scaled_dot_product_attention(q, k, vp, attn_mask=_MASK, scale=SCALE)[..., :DV]


def eager(q, k, v):
    w = torch.matmul(q, k.transpose(-1, -2)) * SCALE
    w = w.masked_fill(~_MASK, float("-inf"))
    return torch.matmul(torch.softmax(w, dim=-1), v)


class BlockedCausalAttn(torch.autograd.Function):
    """Causal attention via q-blocks of size BS: block i only multiplies keys [0, (i+1)*BS) and only the
    diagonal block is masked (work fraction (n+1)/2n of full).  Saves P blocks; manual backward."""

    BS = 64

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, s, d = q.shape
        dv = v.shape[-1]
        q3, k3, v3 = (t.reshape(b * h, s, t.shape[-1]) for t in (q, k, v))
        bs = BlockedCausalAttn.BS
        tri = torch.ones(bs, bs, dtype=torch.bool).triu(1)
        o = q3.new_empty(b * h, s, dv)
        ps = []
        for i in range(0, s, bs):
            e = i + bs
            sc = torch.bmm(q3[:, i:e], k3[:, :e].transpose(1, 2)).mul_(SCALE)
            sc[:, :, i:e].masked_fill_(tri, float("-inf"))
            p = torch.softmax(sc, dim=-1)
            torch.bmm(p, v3[:, :e], out=o[:, i:e])
            ps.append(p)
        ctx.save_for_backward(q3, k3, v3, o, *ps)
        ctx.shape = (b, h, s, d, dv)
        return o.view(b, h, s, dv)

    @staticmethod
    def backward(ctx, do):
        q3, k3, v3, o, *ps = ctx.saved_tensors
        b, h, s, d, dv = ctx.shape
        bs = BlockedCausalAttn.BS
        do = do.reshape(b * h, s, dv)
        dq = torch.empty_like(q3)
        dk = torch.zeros_like(k3)
        dvv = torch.zeros_like(v3)
        delta = (do * o).sum(-1, keepdim=True)
        for j, i in enumerate(range(0, s, bs)):
            e = i + bs
            p = ps[j]
            dvv[:, :e].baddbmm_(p.transpose(1, 2), do[:, i:e])
            dp = torch.bmm(do[:, i:e], v3[:, :e].transpose(1, 2))
            ds = dp.sub_(delta[:, i:e]).mul_(p).mul_(SCALE)
            torch.bmm(ds, k3[:, :e], out=dq[:, i:e])
            dk[:, :e].baddbmm_(ds.transpose(1, 2), q3[:, i:e])
        return dq.view(b, h, s, d), dk.view(b, h, s, d), dvv.view(b, h, s, dv)


def blocked64(q, k, v):
    BlockedCausalAttn.BS = 64
    return BlockedCausalAttn.apply(q, k, v)


def blocked128(q, k, v):
    BlockedCausalAttn.BS = 128
    return BlockedCausalAttn.apply(q, k, v)


VARIANTS = {
    "sdpa_v32 (HF sdpa path)": (sdpa_v32, "bhsd"),
    "sdpa_v48pad": (sdpa_v48pad, "bhsd"),
    "sdpa_pad64": (sdpa_pad64, "bhsd"),
    "sdpa_mask (bool mask, v32)": (sdpa_mask, "bhsd"),
    "sdpa_mask_v48pad": (sdpa_mask_v48pad, "bhsd"),
    "sdpa_bshd views, v48pad": (sdpa_v48pad, "bshd"),
    "eager": (eager, "bhsd"),
    "blocked causal fn bs=64": (blocked64, "bhsd"),
    "blocked causal fn bs=128": (blocked128, "bhsd"),
}


def make_inputs(layout, grad):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, NH, S, d, generator=g) for d in (DQK, DQK, DV))
    if layout == "bshd":  # projections produce [B,S,H,D]; attention sees transposed views
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    if grad:
        for t in (q, k, v):
            t.requires_grad_()
    if layout == "bshd":
        return (q, k, v), tuple(t.transpose(1, 2) for t in (q, k, v))
    return (q, k, v), (q, k, v)


def kernel_names(f, layout):
    leaves, (q, k, v) = make_inputs(layout, True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        f(q, k, v).backward(torch.randn(B, NH, S, DV))
    names = {e.key for e in prof.key_averages()}
    picks = [n for n in names if "attention" in n and ("flash" in n or "math" in n or "efficient" in n)]
    if any(n in names for n in ("aten::bmm", "aten::matmul")) and not picks:
        picks = ["matmul/bmm (eager)"]
    return ", ".join(sorted(picks))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings (page-fault noise)")
    a = p.parse_args()
    tune_malloc(not a.system_malloc)
    print(f"malloc_tuned={malloc_tuned()}")
    torch.set_num_threads(a.threads)
    flops_fwd = 4 * B * NH * S * S * (DQK + DV) / 2 / 2  # causal half; 2*(qk)+2*(pv) MACs
    # reference output / grads for correctness
    leaves, (q, k, v) = make_inputs("bhsd", True)
    go = torch.randn(B, NH, S, DV)
    ref = eager(q, k, v)
    ref.backward(go)
    ref_g = [t.grad.clone() for t in leaves]

    # Warm the allocator first: with glibc malloc, the first calls that allocate 16 MiB [B,H,S,S]
    # temporaries get fresh mmap()ed pages (page faults) until a free raises the dynamic mmap
    # threshold; timing order would otherwise bias whichever variant runs first (~2x on math fwd).
    for f, layout in VARIANTS.values():
        leaves_w, (qw, kw, vw) = make_inputs(layout, True)
        f(qw, kw, vw).backward(go)
    print(f"B={B} H={NH} S={S} dqk={DQK} dv={DV} threads={torch.get_num_threads()}  (causal useful GFLOP fwd={flops_fwd/1e9:.2f})")
    print(f"{'variant':30s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'maxerr':>8s}  kernel")
    total_discarded = 0
    for name, (f, layout) in VARIANTS.items():
        leaves, (q, k, v) = make_inputs(layout, True)
        out = f(q, k, v)
        out.backward(go if layout == "bhsd" else go)
        err = max([(out - ref).abs().max().item()] + [(t.grad - (r if layout == "bhsd" else r.transpose(1, 2))).abs().max().item() for t, r in zip(leaves, ref_g)])

        def fwd():
            with torch.no_grad():
                f(q.detach(), k.detach(), v.detach())

        def fb():
            for t in leaves:
                t.grad = None
            f(q, k, v).backward(go)

        rf = clean_bench(fwd, reps=a.reps, warmup=2, batch_min_s=0.1)
        rb = clean_bench(fb, reps=a.reps, warmup=2, batch_min_s=0.1)
        total_discarded += rf["n_discarded"] + rb["n_discarded"]
        tf = rf["median"] if rf["clean"] else float("nan")  # nan: never got an uncontended window
        tb = rb["median"] if rb["clean"] else float("nan")
        print(f"{name:30s} {tf*1e3:8.2f} {tb*1e3:11.2f} {err:8.1e}  {kernel_names(f, layout)}")
    print(f"({total_discarded} contended samples discarded)")


if __name__ == "__main__":
    main()
