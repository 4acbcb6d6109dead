"""AdamW step cost on CPU for the tiny-v3 parameter set (HF model's params, 8.3M fp32), 2 threads.

Compares torch.optim.AdamW default (CPU -> single-tensor for-loop), foreach=True, fused=True,
and zero_grad(set_to_none=True) vs zeroing. Also loss variants: HF-style full-logits CE vs
chunked-vocab-projection CE (fwd+bwd), since the LM head + CE is ~1/5 of the step.

python bench/micro_optim.py [--reps 15]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import TINY_V3, build_hf_model, malloc_tuned, tune_malloc  # noqa: E402
from hf_baseline import clean_bench as _clean_bench  # noqa: E402


def clean_bench(fn, **kw):
    r = _clean_bench(fn, **kw)
    if not r["clean"]:
        r["median"] = float("nan")  # never got an uncontended window
    return r


class ChunkedLMHeadCE(torch.autograd.Function):
    """mean CE of (h @ W.T) without materialising [N,V] logits: process `chunk` rows at a time,
    computing grad_h / grad_W in the forward (the usual 'fused linear cross-entropy' trick)."""

    @staticmethod
    def forward(ctx, h, W, target, chunk):
        n = h.shape[0]
        gh = torch.empty_like(h)
        gW = torch.zeros_like(W)
        loss = h.new_zeros(())
        for i in range(0, n, chunk):
            hc, tc = h[i : i + chunk], target[i : i + chunk]
            logits = hc @ W.t()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            p = torch.softmax(logits, dim=-1)  # d loss_sum / d logits = softmax - onehot
            p[torch.arange(p.shape[0]), tc] -= 1.0
            torch.mm(p, W, out=gh[i : i + chunk])
            gW.addmm_(p.t(), hc)
        ctx.save_for_backward(gh, gW)
        ctx.n = n
        return loss / n

    @staticmethod
    def backward(ctx, g):
        gh, gW = ctx.saved_tensors
        s = g / ctx.n
        return gh * s, gW * s, None, None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--system-malloc", action="store_true")
    a = p.parse_args()
    tune_malloc(not a.system_malloc)
    torch.set_num_threads(2)
    print(f"malloc_tuned={malloc_tuned()}")
    model = build_hf_model(TINY_V3)
    params = list(model.parameters())
    print(f"{len(params)} param tensors, {sum(q.numel() for q in params)/1e6:.2f}M params")
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    for name, kw in [("default (CPU: for-loop)", {}), ("foreach=True", {"foreach": True}), ("fused=True", {"fused": True})]:
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **kw)
        r = clean_bench(opt.step, reps=a.reps, warmup=3, batch_min_s=0.1)
        print(f"AdamW {name:26s} {r['median']*1e3:7.2f} ms")
    grads = [q.grad for q in params]
    r = clean_bench(lambda: [g.zero_() for g in grads], reps=a.reps, warmup=2, batch_min_s=0.1)
    print(f"zero_() all grads                {r['median']*1e3:7.2f} ms   (set_to_none: ~0)")

    # LM head + CE, fwd+bwd
    N, Hd, V = 2048, TINY_V3["hidden_size"], TINY_V3["vocab_size"]
    h0 = torch.randn(N, Hd)
    W = (torch.randn(V, Hd) * 0.02).requires_grad_()
    tgt = torch.randint(0, V, (N,))

    def hf_ce():
        h = h0.clone().requires_grad_()
        F.cross_entropy((h @ W.t()).float(), tgt).backward()
        W.grad = None

    def chunked(c):
        def run():
            h = h0.clone().requires_grad_()
            ChunkedLMHeadCE.apply(h, W, tgt, c).backward()
            W.grad = None

        return run

    # correctness
    h1 = h0.clone().requires_grad_()
    l1 = F.cross_entropy(h1 @ W.t(), tgt)
    l1.backward()
    g1 = (h1.grad.clone(), W.grad.clone())
    W.grad = None
    h2 = h0.clone().requires_grad_()
    l2 = ChunkedLMHeadCE.apply(h2, W, tgt, 256)
    l2.backward()
    err = max((l1 - l2).abs().item(), (g1[0] - h2.grad).abs().max().item(), (g1[1] - W.grad).abs().max().item())
    W.grad = None
    print(f"LM head+CE fwd+bwd [{N},{Hd}]x[{Hd},{V}]  (chunked max err vs ref {err:.1e}; GEMM floor ~62 ms @210GF/s)")
    print(f"  full logits (HF-style)      {clean_bench(hf_ce, reps=a.reps, batch_min_s=0.1)['median']*1e3:7.2f} ms")
    for c in (512, 256, 128):
        print(f"  chunked {c:4d} rows           {clean_bench(chunked(c), reps=a.reps, batch_min_s=0.1)['median']*1e3:7.2f} ms")


if __name__ == "__main__":
    main()
