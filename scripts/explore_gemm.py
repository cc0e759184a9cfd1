"""Exploration (not part of the suite): the decode projections at 32-512 rows (batch 16-256 with CFG),
cuBLAS vs a split-K Triton tl.dot GEMM (fp32 through 3xTF32, float32-accurate; with `bf16`, bf16),
device time per call in a CUDA graph over weights that do not fit in L2 together.

  python scripts/explore_gemm.py [bf16]
"""
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, K_PER_SPLIT,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = tl.program_id(2) * K_PER_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
        kk = k0 + k
        x = tl.load(x_ptr + m[:, None] * stride_xm + kk[None, :], mask=(m[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + n[None, :].to(tl.int64) * stride_wn + kk[:, None], mask=(n[None, :] < N) & (kk[:, None] < K),
                    other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if SPLIT:
        tl.atomic_add(out_ptr + m[:, None] * stride_om + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < N),
                      sem="relaxed")
    else:
        tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (n[None, :] < N))


def gemm(x, w, out, bm, bn, bk, stages, warps, split=1):
    M, K = x.shape
    N = w.shape[0]
    prec = "tf32x3" if x.dtype == torch.float32 else "ieee"
    if split > 1:
        out.zero_()
    k_per = triton.cdiv(triton.cdiv(K, split), bk) * bk
    gemm_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm), split)](
        x, w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0), k_per, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        PRECISION=prec, SPLIT=split > 1, num_stages=stages, num_warps=warps)


def bench(fn, n):
    graph = torch.cuda.CUDAGraph()
    fn(0)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for i in range(n):
            fn(i)
    return triton.testing.do_bench(graph.replay, warmup=10, rep=60) * 1e3 / n


SHAPES = {"B": (768, 1536, 3352), "L": (1024, 2048, 4384), "XL": (1536, 3072, 6448)}
CONFIGS = [(bm, bn, sp, wp) for bm in (32, 64, 128) for bn in (32, 64) for sp in (1, 2, 4, 8) for wp in (4, 8)]


def main():
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for dtype in ((torch.bfloat16,) if "bf16" in sys.argv else (torch.float32,)):
        for model, (d, d_inner, n_in) in SHAPES.items():
            if "bf16" in sys.argv and model == "L":
                continue
            for name, (N, K) in (("in_proj", (n_in, d)), ("out_proj", (d, d_inner))):
                ws = [torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5 for _ in range(8)]
                for M in (32, 128, 512):
                    x = torch.randn(M, K, device="cuda", dtype=dtype)
                    out = torch.empty(M, N, device="cuda", dtype=dtype)
                    out32 = torch.empty(M, N, device="cuda")  # Triton's output (split-K accumulates in float32)
                    ref = (x.double() @ ws[0].double().t())
                    t_cublas = bench(lambda i: torch.matmul(x, ws[i % 8].t(), out=out), 16)
                    best = None
                    for bm, bn, sp, wp in CONFIGS:
                        cfg = (bm, bn, 64 if dtype == torch.bfloat16 else 32, 3, wp, sp)
                        if bm > max(32, M) or (M >= 512 and bm < 64):
                            continue
                        try:
                            t = bench(lambda i: gemm(x, ws[i % 8], out32, *cfg), 16)
                        except Exception:  # noqa: BLE001  (out of shared memory etc.)
                            continue
                        if best is None or t < best[0]:
                            best = (t, cfg)
                    gemm(x, ws[0], out32, *best[1])
                    err = ((out32.double() - ref).norm() / ref.norm()).item()
                    cub_err = ((torch.matmul(x, ws[0].t()).double() - ref).norm() / ref.norm()).item()
                    wbytes = N * K * x.element_size()
                    print(f"{model:3s} {name:8s} {str(dtype)[6:]:9s} M={M:4d}: cuBLAS {t_cublas:6.1f} us "
                          f"({wbytes / t_cublas / 1e6:.2f} TB/s, err {cub_err:.1e}), Triton {best[0]:6.1f} us "
                          f"{best[1]} ({wbytes / best[0] / 1e6:.2f} TB/s, err {err:.1e}): "
                          f"{t_cublas / best[0]:.2f}x", flush=True)
                del ws
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
