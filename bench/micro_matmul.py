"""fp32 matmul GFLOP/s on this CPU (2 threads by default) for peak and tiny-v3 shapes.

python bench/micro_matmul.py [--threads 2]
Checks all transpose layouts used by fwd/bwd (A@B, A@B.T, A.T@B) and torch.mm vs F.linear,
plus MKL vs oneDNN (mkldnn) where applicable.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import clean_bench, malloc_tuned, tune_malloc  # noqa: E402


def bench(fn, reps=10, warmup=2):
    """median seconds over `reps` calls taken while no other process used the CPU (nan if the box
    never went idle long enough: clean_bench timed out)."""
    r = clean_bench(fn, reps=reps, warmup=warmup, batch_min_s=0.1)
    return r["median"] if r["clean"] else float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings (page-fault noise)")
    a = p.parse_args()
    tune_malloc(not a.system_malloc)
    print(f"malloc_tuned={malloc_tuned()}")
    torch.set_num_threads(a.threads)
    print(f"threads={torch.get_num_threads()} cpu_capability={torch.backends.cpu.get_cpu_capability()} "
          f"mkldnn={torch.backends.mkldnn.is_available()}")
    # (M, K, N, label)
    shapes = [
        (2048, 2048, 2048, "peak square 2048"),
        (4096, 4096, 4096, "peak square 4096"),
        (2048, 256, 4096, "LM head fwd  x[2048,256] @ W.T[256,4096]"),
        (2048, 4096, 256, "LM head dX   dY[2048,4096] @ W[4096,256]"),
        (4096, 2048, 256, "LM head dW   dY.T[4096,2048] @ x[2048,256]"),
        (2048, 256, 512, "dense MLP up [2048,256]x[256,512]"),
        (2048, 512, 256, "dense MLP down [2048,512]x[512,256]"),
        (2048, 256, 256, "attn proj [2048,256]x[256,256]"),
        (2048, 256, 128, "shared/expert up [2048,256]x[256,128]"),
        (512, 256, 128, "expert up (512 rows) [512,256]x[256,128]"),
        (512, 256, 256, "expert gate_up fused (512 rows) [512,256]x[256,256]"),
        (512, 128, 256, "expert down (512 rows) [512,128]x[128,256]"),
        (8192, 256, 256, "all-experts-as-one [8192,256]x[256,256]"),
    ]
    print(f"{'shape':58s} {'NN ms':>8s} {'GF/s':>7s} {'lin GF/s':>8s} {'NT GF/s':>8s} {'TN GF/s':>8s}")
    for M, K, N, label in shapes:
        A = torch.randn(M, K)
        B = torch.randn(K, N)
        W = torch.randn(N, K)  # linear weight layout
        At = torch.randn(K, M)
        fl = 2 * M * K * N
        t_nn = bench(lambda: torch.mm(A, B))
        t_lin = bench(lambda: F.linear(A, W))  # A @ W.T
        t_nt = bench(lambda: torch.mm(A, W.t()))
        t_tn = bench(lambda: torch.mm(At.t(), B))
        g = lambda t: fl / t / 1e9
        print(f"{label:58s} {t_nn*1e3:8.3f} {g(t_nn):7.1f} {g(t_lin):8.1f} {g(t_nt):8.1f} {g(t_tn):8.1f}")

    # bmm as used by attention math path
    print("\nbmm (attention math path, B*H=64):")
    for (b, m, k, n, label) in [
        (64, 256, 48, 256, "QK^T [64,256,48]x[64,48,256]"),
        (64, 256, 256, 32, "PV   [64,256,256]x[64,256,32]"),
        (64, 256, 256, 48, "PV padded v=48"),
    ]:
        A = torch.randn(b, m, k)
        B = torch.randn(b, k, n)
        t = bench(lambda: torch.bmm(A, B))
        print(f"  {label:40s} {t*1e3:7.3f} ms {2*b*m*k*n/t/1e9:7.1f} GF/s")

    # LM head forward in row chunks (output chunk stays in L2/L3 instead of a 32 MiB write)
    A = torch.randn(2048, 256)
    W = torch.randn(4096, 256)
    fl = 2 * 2048 * 256 * 4096
    for rows in (2048, 512, 256, 128):
        out = torch.empty(rows, 4096)
        def chunked():
            for i in range(0, 2048, rows):
                torch.mm(A[i : i + rows], W.t(), out=out)
        t = bench(chunked)
        print(f"LM head fwd in {rows:4d}-row chunks (reused out buffer): {t*1e3:7.3f} ms {fl/t/1e9:6.1f} GF/s")

    # bf16 (CPU reports avx512_bf16; only informative -- the benchmark is fp32)
    for M, K, N in [(2048, 2048, 2048), (2048, 256, 4096)]:
        Ab, Bb = torch.randn(M, K).bfloat16(), torch.randn(K, N).bfloat16()
        t = bench(lambda: torch.mm(Ab, Bb))
        print(f"bf16 mm [{M},{K}]x[{K},{N}]: {t*1e3:7.3f} ms {2*M*K*N/t/1e9:6.1f} GF/s")

    # oneDNN path check (torch.mm on CPU fp32 uses MKL sgemm by default)
    try:
        A = torch.randn(2048, 256)
        W = torch.randn(4096, 256)
        Am = A.to_mkldnn()
        Wm = W.to_mkldnn()
        t = bench(lambda: torch._C._nn.mkldnn_linear(Am, Wm, None))
        print(f"\nmkldnn_linear LM head fwd (opaque mkldnn tensors): {t*1e3:.3f} ms {2*2048*256*4096/t/1e9:.1f} GF/s")
    except Exception as e:  # pragma: no cover
        print("mkldnn_linear unavailable:", type(e).__name__, e)


if __name__ == "__main__":
    main()
