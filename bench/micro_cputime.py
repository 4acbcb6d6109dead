"""Contention-robust relative comparisons: 1 thread, timed with time.thread_time() (CPU time of
this thread only), so other jobs on the shared 2-core box barely affect the numbers (they still
share L3 / memory bandwidth). Use for *relative* ranking; absolute 2-thread wall times come from
the other micro_*.py scripts when the box is idle.

Covers: AdamW variants, LM-head+CE full vs chunked, MoE routed path end-to-end variants,
gather/combine variants, grouped_mm vs loop experts.

python bench/micro_cputime.py [--reps 7]
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import TINY_V3, build_hf_model, malloc_tuned, tune_malloc  # noqa: E402
from micro_experts import (  # noqa: E402
    E, H, K, T, ExpertMLPFn, PermGather, experts_gmm_fused, experts_gmm_hf, experts_loop_fused, make_routing,
    route_sort, route_sort_hf,
)
from micro_optim import ChunkedLMHeadCE  # noqa: E402

REPS = 7


def ct(fn, reps=None, warmup=2):
    reps = reps or REPS
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return statistics.median(ts) * 1e3


def main():
    global REPS
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--system-malloc", action="store_true")
    a = p.parse_args()
    tune_malloc(not a.system_malloc)
    REPS = a.reps
    torch.set_num_threads(1)
    print(f"1-thread CPU-time medians (ms); malloc_tuned={malloc_tuned()}")

    # ---------------- optimizer
    model = build_hf_model(TINY_V3)
    params = list(model.parameters())
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    for name, kw in [("default (CPU for-loop)", {}), ("foreach=True", {"foreach": True}), ("fused=True", {"fused": True})]:
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **kw)
        print(f"AdamW {name:24s} {ct(opt.step):8.2f}")
    del model, params, opt

    # ---------------- LM head + CE
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

    print(f"LMhead+CE fwd+bwd full logits   {ct(hf_ce):8.2f}")
    for c in (512, 256, 128):
        print(f"LMhead+CE fwd+bwd chunk {c:4d}    {ct(chunked(c)):8.2f}")

    # ---------------- MoE routed path
    idx, wts = make_routing("uniform")
    perm, inv_perm, counts_t, offs = route_sort(idx)
    tok = torch.div(perm, K, rounding_mode="floor")
    Wgu = (torch.randn(E, H, 256) * 0.02).requires_grad_()
    Wd = (torch.randn(E, 128, H) * 0.02).requires_grad_()
    Wgu_hf = Wgu.detach().transpose(1, 2).contiguous().requires_grad_()
    Wd_hf = Wd.detach().transpose(1, 2).contiguous().requires_grad_()
    params = [Wgu, Wd, Wgu_hf, Wd_hf]
    x0 = torch.randn(T, H)
    gout = torch.randn(T, H)
    N8 = T * K
    gx = torch.randn(N8, H)
    ys0 = torch.randn(N8, H)

    def clear():
        for q in params:
            q.grad = None

    def full(kind):
        def run():
            x = x0.clone().requires_grad_()
            w = wts.clone().requires_grad_()
            if kind == "hf_like":
                pm, of = route_sort_hf(idx)
                xs = x[torch.div(pm, K, rounding_mode="floor")]
                ys = experts_gmm_hf(xs, of, Wgu_hf, Wd_hf) * w.view(-1)[pm].unsqueeze(-1)
                ip = torch.empty_like(pm)
                ip[pm] = torch.arange(pm.numel())
                out = ys[ip].view(T, K, H).sum(1)
            elif kind == "gmm+index_select+index_add":
                pm, ip, ct_, of = route_sort(idx)
                tk = torch.div(pm, K, rounding_mode="floor")
                xs = x.index_select(0, tk)
                ys = experts_gmm_fused(xs, of, Wgu, Wd) * w.view(-1).index_select(0, pm).unsqueeze(-1)
                out = x.new_zeros(T, H).index_add(0, tk, ys)
            else:
                pm, ip, ct_, of = route_sort(idx)
                xs = PermGather.apply(x, pm, ip, K) if "perm" in kind else x.index_select(0, torch.div(pm, K, rounding_mode="floor"))
                if kind.startswith("fn_gmm"):
                    ys = ExpertMLPFn.apply(xs, of, Wgu, Wd)
                else:
                    ys = experts_loop_fused(xs, ct_.tolist(), Wgu, Wd)
                yu = ys.index_select(0, ip).view(T, K, H)
                out = torch.bmm(w.unsqueeze(1), yu).squeeze(1)
            out.backward(gout)
            clear()

        return run

    for kind in ["hf_like", "gmm+index_select+index_add", "fn_gmm+perm", "fn_gmm+index_select", "loop_fused+perm"]:
        print(f"MoE routed fwd+bwd {kind:28s} {ct(full(kind)):8.2f}")

    def gather_fb(kind):
        def run():
            x = x0.clone().requires_grad_()
            if kind == "x[idx]":
                xs = x[tok]
            elif kind == "index_select":
                xs = x.index_select(0, tok)
            else:
                xs = PermGather.apply(x, perm, inv_perm, K)
            xs.backward(gx)

        return run

    for kind in ["x[idx]", "index_select", "PermGather"]:
        print(f"gather fwd+bwd {kind:32s} {ct(gather_fb(kind)):8.2f}")

    def combine_fb(kind):
        def run():
            ys = ys0.clone().requires_grad_()
            w = wts.clone().requires_grad_()
            if kind == "HF ys[inv].view.sum":
                out = (ys * w.view(-1)[perm].unsqueeze(-1))[inv_perm].view(T, K, H).sum(1)
            elif kind == "index_add":
                out = ys.new_zeros(T, H).index_add(0, tok, ys * w.view(-1).index_select(0, perm).unsqueeze(-1))
            else:
                out = torch.bmm(w.unsqueeze(1), ys.index_select(0, inv_perm).view(T, K, H)).squeeze(1)
            out.backward(gout)

        return run

    for kind in ["HF ys[inv].view.sum", "index_add", "index_select+bmm"]:
        print(f"combine fwd+bwd {kind:31s} {ct(combine_fb(kind)):8.2f}")


if __name__ == "__main__":
    main()
