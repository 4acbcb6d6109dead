"""Routed-expert kernel microbenchmarks (CPU fp32, fwd+bwd), tiny-v3 MoE shapes.

T=2048 tokens x K=4 -> N=8192 token-expert rows over E=16 experts, H=256, I=128, SwiGLU.

Part A  expert compute only, on rows already sorted by expert (x_sorted [N,H] -> y [N,H]):
  gmm      torch._grouped_mm(x, W[E,K,N], offs=int32 cumsum)         separate gate / up / down
  gmm_hf   same, HF weight layout [E,N,K] passed as .transpose(1,2)   (what HF grouped_mm path does)
  loop     python loop of torch.mm over contiguous slices + torch.cat
  bmm_pad  scatter into [E, max_count, H] padded buffer, torch.bmm, gather back
  fn_gmm   one torch.autograd.Function for the whole expert MLP with a hand-written backward
           (grouped_mm fwd/bwd, 2D x 2D grouped_mm for weight grads, recomputes silu in bwd)
  *_fused  gate+up fused into one weight [E,H,2I] (one GEMM, chunk)
Part B  dispatch / combine around it (fwd+bwd, x [T,H] and routing weights need grad):
  gather   x[perm // K] (aten::index; bwd = index_put_ accumulate)     <- HF
           x.index_select(0, perm // K)  (bwd = index_add_)
           PermGather autograd.Function (bwd = row permutation + view(T,K,H).sum(1), no atomics)
  combine  y[inv_perm].view(T,K,H) * w -> sum(1)          <- HF
           zeros.index_add_(0, tok_sorted, y * w_sorted)
           bmm: w[T,1,K] @ y_unsorted[T,K,H]
Part C  full MoE routed path end-to-end (route sort + gather + experts + combine).

python bench/micro_experts.py [--reps 20] [--threads 2] [--dist uniform|skewed|both]
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import CpuMonitor, clean_bench, malloc_tuned, tune_malloc, wait_for_idle  # noqa: E402

T, K, E, H, I = 2048, 4, 16, 256, 128
N = T * K


N_DISCARDED = 0


def bench(fn, reps=20, warmup=3):
    """median seconds over `reps` clean (uncontended) calls."""
    global N_DISCARDED
    r = clean_bench(fn, reps=reps, warmup=warmup, batch_min_s=0.1)
    N_DISCARDED += r["n_discarded"]
    return r["median"] if r["clean"] else float("nan")  # nan: never got an uncontended window


def make_routing(dist: str, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dist == "uniform":
        logits = torch.randn(T, E, generator=g)
    else:  # skewed: strong per-expert bias -> counts from ~0 to ~2000
        bias = torch.linspace(3.0, -3.0, E)
        logits = torch.randn(T, E, generator=g) + bias
    idx = logits.topk(K, dim=-1).indices  # distinct experts per token
    w = torch.rand(T, K, generator=g)
    return idx, w


# --------------------------------------------------------------------------- expert kernels
def swiglu(h):
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def experts_gmm(x, offs, Wg, Wu, Wd):  # Wg/Wu [E,H,I], Wd [E,I,H]
    a = F.silu(torch._grouped_mm(x, Wg, offs)) * torch._grouped_mm(x, Wu, offs)
    return torch._grouped_mm(a, Wd, offs)


def experts_gmm_fused(x, offs, Wgu, Wd):  # Wgu [E,H,2I]
    return torch._grouped_mm(swiglu(torch._grouped_mm(x, Wgu, offs)), Wd, offs)


def experts_gmm_hf(x, offs, Wgu_hf, Wd_hf):  # HF layout: gate_up_proj [E,2I,H], down_proj [E,H,I]
    h = torch._grouped_mm(x, Wgu_hf.transpose(1, 2), offs)
    return torch._grouped_mm(swiglu(h), Wd_hf.transpose(1, 2), offs)


def experts_loop(x, counts, Wg, Wu, Wd):
    outs, s = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        xe = x[s : s + c]
        outs.append((F.silu(xe @ Wg[e]) * (xe @ Wu[e])) @ Wd[e])
        s += c
    return torch.cat(outs)


def experts_loop_fused(x, counts, Wgu, Wd):
    outs, s = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        outs.append(swiglu(x[s : s + c] @ Wgu[e]) @ Wd[e])
        s += c
    return torch.cat(outs)


def _pad_index(counts):
    """row index into the flattened [E*maxc] padded buffer for each sorted row."""
    maxc = max(counts)
    starts = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)[:-1].tolist()))
    cnt = torch.tensor(counts)
    expert_of_row = torch.repeat_interleave(torch.arange(E), cnt)
    pos = torch.arange(sum(counts)) - starts[expert_of_row]
    return expert_of_row * maxc + pos, maxc


def experts_bmm_pad(x, pad_idx, maxc, Wg, Wu, Wd):
    xp = x.new_zeros(E * maxc, H).index_copy(0, pad_idx, x).view(E, maxc, H)
    a = F.silu(torch.bmm(xp, Wg)) * torch.bmm(xp, Wu)
    return torch.bmm(a, Wd).view(E * maxc, H).index_select(0, pad_idx)


def experts_bmm_pad_fused(x, pad_idx, maxc, Wgu, Wd):
    xp = x.new_zeros(E * maxc, H).index_copy(0, pad_idx, x).view(E, maxc, H)
    return torch.bmm(swiglu(torch.bmm(xp, Wgu)), Wd).view(E * maxc, H).index_select(0, pad_idx)


class ExpertMLPFn(torch.autograd.Function):
    """y = grouped( silu(x Wg) * (x Wu) ) Wd with fused Wgu [E,H,2I]; manual backward.

    Saves x and the [N,2I] pre-activation only (a is recomputed in backward)."""

    @staticmethod
    def forward(ctx, x, offs, Wgu, Wd):
        h = torch._grouped_mm(x, Wgu, offs)
        g, u = h.chunk(2, dim=-1)
        a = F.silu(g) * u
        y = torch._grouped_mm(a, Wd, offs)
        ctx.save_for_backward(x, offs, Wgu, Wd, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offs, Wgu, Wd, h = ctx.saved_tensors
        dy = dy.contiguous()  # grouped_mm rejects zero-stride (expanded) grads
        g, u = h.chunk(2, dim=-1)
        sg = torch.sigmoid(g)
        silu_g = g * sg
        a = silu_g * u
        dWd = torch._grouped_mm(a.t(), dy, offs)  # [E,I,H]
        da = torch._grouped_mm(dy, Wd.transpose(1, 2), offs)  # [N,I]
        du = da * silu_g
        dg = da * u * (sg * (1 + g * (1 - sg)))
        dh = torch.cat([dg, du], dim=-1)
        dWgu = torch._grouped_mm(x.t(), dh, offs)  # [E,H,2I]
        dx = torch._grouped_mm(dh, Wgu.transpose(1, 2), offs)
        return dx, None, dWgu, dWd


# --------------------------------------------------------------------------- dispatch / combine
class PermGather(torch.autograd.Function):
    """xs = x[perm // K] where perm is a permutation of T*K rows (every token appears exactly K times).
    Backward: undo the permutation (gather, no accumulation), then sum the K copies per token."""

    @staticmethod
    def forward(ctx, x, perm, inv_perm, k):
        ctx.save_for_backward(inv_perm)
        ctx.k = k
        return x.index_select(0, torch.div(perm, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, dxs):
        (inv_perm,) = ctx.saved_tensors
        d = dxs.index_select(0, inv_perm)  # rows back in (token, k) order
        return d.view(-1, ctx.k, d.shape[-1]).sum(1), None, None, None


def route_sort(idx):
    flat = idx.reshape(-1)
    sorted_e, perm = torch.sort(flat, stable=True)
    counts_t = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts_t, 0, dtype=torch.int32)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel())
    return perm, inv_perm, counts_t, offs


def route_sort_hf(idx):
    flat = idx.reshape(-1)
    sorted_e, perm = torch.sort(flat)
    counts_t = torch.histc(sorted_e.float(), bins=E, min=0, max=E - 1)
    offs = torch.cumsum(counts_t, 0, dtype=torch.int32)
    return perm, offs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dist", default="both")
    p.add_argument("--no-wait-idle", action="store_true")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings (page-fault noise)")
    a = p.parse_args()
    tune_malloc(not a.system_malloc)
    print(f"malloc_tuned={malloc_tuned()}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if not a.no_wait_idle:
        wait_for_idle()
    mon = CpuMonitor().__enter__()
    R = a.reps

    Wg = (torch.randn(E, H, I) * 0.02).requires_grad_()
    Wu = (torch.randn(E, H, I) * 0.02).requires_grad_()
    Wd = (torch.randn(E, I, H) * 0.02).requires_grad_()
    Wgu = torch.cat([Wg.detach(), Wu.detach()], dim=-1).requires_grad_()  # [E,H,2I]
    Wgu_hf = Wgu.detach().transpose(1, 2).contiguous().requires_grad_()  # [E,2I,H]
    Wd_hf = Wd.detach().transpose(1, 2).contiguous().requires_grad_()  # [E,H,I]
    params = [Wg, Wu, Wd, Wgu, Wgu_hf, Wd_hf]
    flops = 2 * N * H * I * 3 * 3  # 3 GEMMs, fwd + 2x bwd

    dists = ["uniform", "skewed"] if a.dist == "both" else [a.dist]
    for dist in dists:
        idx, wts = make_routing(dist)
        perm, inv_perm, counts_t, offs = route_sort(idx)
        counts = counts_t.tolist()
        pad_idx, maxc = _pad_index(counts)
        print(f"\n=== routing '{dist}': counts min {min(counts)} max {max(counts)} (pad buffer {E*maxc} rows vs {N})")
        xs0 = torch.randn(N, H)
        gy = torch.randn(N, H)

        def fb(f):
            def run():
                xs = xs0.clone().requires_grad_()
                y = f(xs)
                y.backward(gy)
                for q in params:
                    q.grad = None

            return run

        def fwd(f):
            def run():
                with torch.no_grad():
                    f(xs0)

            return run

        variants = {
            "gmm (separate gate/up)": lambda x: experts_gmm(x, offs, Wg, Wu, Wd),
            "gmm_fused [E,H,2I]": lambda x: experts_gmm_fused(x, offs, Wgu, Wd),
            "gmm_hf layout [E,2I,H].T": lambda x: experts_gmm_hf(x, offs, Wgu_hf, Wd_hf),
            "loop mm (separate)": lambda x: experts_loop(x, counts, Wg, Wu, Wd),
            "loop mm fused": lambda x: experts_loop_fused(x, counts, Wgu, Wd),
            "bmm_pad (separate)": lambda x: experts_bmm_pad(x, pad_idx, maxc, Wg, Wu, Wd),
            "bmm_pad fused": lambda x: experts_bmm_pad_fused(x, pad_idx, maxc, Wgu, Wd),
            "fn_gmm autograd.Function fused": lambda x: ExpertMLPFn.apply(x, offs, Wgu, Wd),
        }
        # correctness vs loop
        with torch.no_grad():
            ref = experts_loop(xs0, counts, Wg, Wu, Wd)
            for name, f in variants.items():
                err = (f(xs0) - ref).abs().max().item()
                assert err < 1e-4, (name, err)
        # gradient check of the custom Function vs autograd gmm_fused
        xa = xs0.clone().requires_grad_()
        experts_gmm_fused(xa, offs, Wgu, Wd).backward(gy)
        g_ref = (xa.grad.clone(), Wgu.grad.clone(), Wd.grad.clone())
        for q in params:
            q.grad = None
        xb = xs0.clone().requires_grad_()
        ExpertMLPFn.apply(xb, offs, Wgu, Wd).backward(gy)
        gerr = max((r - t).abs().max().item() for r, t in zip(g_ref, (xb.grad, Wgu.grad, Wd.grad)))
        assert gerr < 1e-4, gerr
        for q in params:
            q.grad = None

        print(f"{'Part A: experts only':36s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'GF/s(f+b)':>10s}")
        for name, f in variants.items():
            tf = bench(fwd(f), R)
            tfb = bench(fb(f), R)
            print(f"  {name:34s} {tf*1e3:8.2f} {tfb*1e3:11.2f} {flops/tfb/1e9:10.1f}")

        # ------------------------------------------------------------- Part B
        x0 = torch.randn(T, H)
        w0 = wts.clone()
        print("Part B: dispatch / combine (ms)")
        print(f"  route sort+bincount+offs+inv_perm (ours)   {bench(lambda: route_sort(idx), R)*1e3:8.3f}")
        print(f"  route sort+histc+offs (HF)                 {bench(lambda: route_sort_hf(idx), R)*1e3:8.3f}")
        print(f"  argsort(stable) only                       {bench(lambda: torch.sort(idx.view(-1), stable=True), R)*1e3:8.3f}")
        print(f"  bincount only                              {bench(lambda: torch.bincount(idx.view(-1), minlength=E), R)*1e3:8.3f}")
        print(f"  offs.tolist() (host sync; free on CPU)     {bench(lambda: offs.tolist(), R)*1e3:8.3f}")
        tok = torch.div(perm, K, rounding_mode="floor")
        gx = torch.randn(N, H)

        def gather_fb(kind):
            def run():
                x = x0.clone().requires_grad_()
                if kind == "index":
                    xs = x[tok]
                elif kind == "index_select":
                    xs = x.index_select(0, tok)
                else:
                    xs = PermGather.apply(x, perm, inv_perm, K)
                xs.backward(gx)

            return run

        for kind in ["index", "index_select", "PermGather"]:
            x = x0.clone()
            tf = bench(lambda: x.index_select(0, tok) if kind != "index" else x[tok], R)
            print(f"  gather {kind:14s} fwd {tf*1e3:7.3f}   fwd+bwd {bench(gather_fb(kind), R)*1e3:7.3f}")

        ys0 = torch.randn(N, H)
        gout = torch.randn(T, H)
        w_sorted_idx = perm  # routing weight for sorted row r is w.view(-1)[perm[r]]

        def combine_fb(kind):
            def run():
                ys = ys0.clone().requires_grad_()
                w = w0.clone().requires_grad_()
                if kind == "hf_index_view_sum":
                    ysw = ys * w.view(-1)[w_sorted_idx].unsqueeze(-1)
                    out = ysw[inv_perm].view(T, K, H).sum(1)
                elif kind == "index_add":
                    ysw = ys * w.view(-1)[w_sorted_idx].unsqueeze(-1)
                    out = ys.new_zeros(T, H).index_add(0, tok, ysw)
                elif kind == "index_select_bmm":
                    yu = ys.index_select(0, inv_perm).view(T, K, H)
                    out = torch.bmm(w.unsqueeze(1), yu).squeeze(1)
                elif kind == "index_select_mulsum":
                    yu = ys.index_select(0, inv_perm).view(T, K, H)
                    out = (yu * w.unsqueeze(-1)).sum(1)
                out.backward(gout)

            return run

        for kind in ["hf_index_view_sum", "index_add", "index_select_bmm", "index_select_mulsum"]:
            print(f"  combine {kind:20s} fwd+bwd {bench(combine_fb(kind), R)*1e3:7.3f}")

        # ------------------------------------------------------------- Part C
        def full(kind):
            def run():
                x = x0.clone().requires_grad_()
                w = w0.clone().requires_grad_()
                if kind == "hf_like":  # HF grouped_mm_experts_forward
                    pm, of = route_sort_hf(idx)
                    xs = x[torch.div(pm, K, rounding_mode="floor")]
                    ws = w.view(-1)[pm]
                    ys = experts_gmm_hf(xs, of, Wgu_hf, Wd_hf) * ws.unsqueeze(-1)
                    ip = torch.empty_like(pm)
                    ip[pm] = torch.arange(pm.numel())
                    out = ys[ip].view(T, K, H).sum(1)
                else:
                    pm, ip, ct, of = route_sort(idx)
                    xs = PermGather.apply(x, pm, ip, K)
                    if kind == "gmm+index_select+index_add":
                        tk = torch.div(pm, K, rounding_mode="floor")
                        xs = x.index_select(0, tk)
                        ys = experts_gmm_fused(xs, of, Wgu, Wd) * w.view(-1).index_select(0, pm).unsqueeze(-1)
                        out = x.new_zeros(T, H).index_add(0, tk, ys)
                        out.backward(gout)
                        for q in params:
                            q.grad = None
                        return
                    if kind == "fn_gmm+perm":
                        ys = ExpertMLPFn.apply(xs, of, Wgu, Wd)
                    else:
                        ys = experts_loop_fused(xs, ct.tolist(), Wgu, Wd)
                    yu = ys.index_select(0, ip).view(T, K, H)
                    out = torch.bmm(w.unsqueeze(1), yu).squeeze(1)
                out.backward(gout)
                for q in params:
                    q.grad = None

            return run

        print("Part C: routed path end-to-end fwd+bwd (sort+gather+experts+combine)")
        for kind in ["hf_like", "gmm+index_select+index_add", "fn_gmm+perm", "loop_fused+perm"]:
            print(f"  {kind:20s} {bench(full(kind), R)*1e3:8.2f} ms")
    mon.__exit__(None, None, None)
    print(f"\nforeign CPU during run: {100*mon.foreign_frac:.0f}%; {N_DISCARDED} contended samples discarded")


if __name__ == "__main__":
    main()
