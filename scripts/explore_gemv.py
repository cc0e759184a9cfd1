"""Exploration (not part of the suite): batch-1 decode GEMV chains inside CUDA graphs.

A chain of L layers x (in_proj GEMV -> out_proj GEMV), each reading the previous output, with distinct
weights per layer (so they stream from HBM), captured in one CUDA graph. Compares cuBLAS, a Triton
FMA GEMV, and the same with programmatic dependent launch (weights prefetched before gdc_wait).
"""
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_xr, stride_wn, stride_or,
                ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    for r in tl.static_range(ROWS):
        x = tl.load(x_ptr + r * stride_xr + k, mask=k < K, other=0.0).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(out_ptr + r * stride_or + n, y.to(out_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def gemv_chunked_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_xr, stride_wn, stride_or,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr):
    """K = CHUNKS * BLOCK_K exactly (CHUNKS <= 4): no lanes lost to padding K to a power of two."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    wp = w_ptr + n[:, None] * stride_wn + k[None, :]
    m = n[:, None] < N
    w0 = tl.load(wp, mask=m, other=0.0)
    if CHUNKS >= 2:
        w1 = tl.load(wp + BLOCK_K, mask=m, other=0.0)
    if CHUNKS >= 3:
        w2 = tl.load(wp + 2 * BLOCK_K, mask=m, other=0.0)
    if CHUNKS >= 4:
        w3 = tl.load(wp + 3 * BLOCK_K, mask=m, other=0.0)
    gdc_launch_dependents()
    gdc_wait()
    for r in tl.static_range(ROWS):
        xp = x_ptr + r * stride_xr + k
        acc = tl.sum(w0.to(tl.float32) * tl.load(xp).to(tl.float32)[None, :], axis=1)
        if CHUNKS >= 2:
            acc += tl.sum(w1.to(tl.float32) * tl.load(xp + BLOCK_K).to(tl.float32)[None, :], axis=1)
        if CHUNKS >= 3:
            acc += tl.sum(w2.to(tl.float32) * tl.load(xp + 2 * BLOCK_K).to(tl.float32)[None, :], axis=1)
        if CHUNKS >= 4:
            acc += tl.sum(w3.to(tl.float32) * tl.load(xp + 3 * BLOCK_K).to(tl.float32)[None, :], axis=1)
        tl.store(out_ptr + r * stride_or + n, acc.to(out_ptr.dtype.element_ty), mask=n < N)


def gemv(x, w, out, block_n, warps, kind):
    n, k = w.shape
    if kind == "chunked":  # BLOCK_K: the largest power of two dividing k with k / BLOCK_K <= 4
        block_k = k & -k
        while k // block_k > 4:
            block_k *= 2
        gemv_chunked_kernel[(triton.cdiv(n, block_n),)](x, w, out, n, k, x.stride(0), w.stride(0), out.stride(0),
                                                       ROWS=x.shape[0], BLOCK_N=block_n, BLOCK_K=block_k,
                                                       CHUNKS=k // block_k, num_warps=warps, launch_pdl=True)
        return
    pdl = kind == "pdl"
    gemv_kernel[(triton.cdiv(n, block_n),)](x, w, out, n, k, x.stride(0), w.stride(0), out.stride(0),
                                           ROWS=x.shape[0], BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(k),
                                           PDL=pdl, num_warps=warps, launch_pdl=pdl)


def run(d, d_inner, n_in, layers, rows=2, dtype=torch.bfloat16):
    torch.manual_seed(0)
    w_in = [torch.randn(n_in, d, device="cuda", dtype=dtype) / d ** 0.5 for _ in range(layers)]
    w_out = [torch.randn(d, d_inner, device="cuda", dtype=dtype) / d_inner ** 0.5 for _ in range(layers)]
    x = torch.randn(rows, d, device="cuda", dtype=dtype)
    bytes_ = sum(w.numel() * w.element_size() for w in w_in + w_out)
    ref = x.float()
    for wi, wo in zip(w_in, w_out):
        ref = (ref @ wi.float().t())[:, :d_inner] @ wo.float().t()
    results = []
    configs = [("cublas", 0, 0)] + [(k, bn, nw) for k in KINDS for bn in BLOCKS_N for nw in (4, 8)]
    for kind, bn, nw in configs:
        mids = [torch.empty(rows, n_in, device="cuda", dtype=dtype) for _ in range(layers)]

        def body():
            h = x
            for wi, wo, mid in zip(w_in, w_out, mids):
                if kind == "cublas":
                    h = F.linear(F.linear(h, wi)[:, :d_inner], wo)
                else:
                    gemv(h, wi, mid, bn, nw, kind)
                    h2 = torch.empty(rows, d, device="cuda", dtype=dtype)
                    gemv(mid[:, :d_inner].contiguous() if kind == "chunked" else mid[:, :d_inner], wo, h2, bn, nw, kind)
                    h = h2
            return h
        try:
            body()
            torch.cuda.synchronize()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                body()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = body()
            g.replay()
            torch.cuda.synchronize()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = triton.testing.do_bench(g.replay, warmup=50, rep=300)
            us = ms * 1e3
            results.append((kind, bn, nw, us, us / layers, bytes_ / (ms * 1e-3) / 1e12, err))
            print(f"d={d} {str(dtype)[6:]} {kind:7s} BLOCK_N={bn:2d} warps={nw}: {us:8.1f} us total, {us / layers:6.2f} us/layer, "
                  f"{bytes_ / (ms * 1e-3) / 1e12:5.2f} TB/s, rel err {err:.1e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"d={d} {kind} {bn} {nw}: FAILED {type(e).__name__}: {e}", flush=True)
    return results


KINDS, BLOCKS_N = ("pdl", "chunked"), (1, 2, 4, 8, 16)

if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    which = sys.argv[1:] or ["B", "XL"]
    for dtype in (torch.bfloat16, torch.float32):
        if "B" in which:
            run(768, 1536, 3352, 24, dtype=dtype)       # AiM-B
        if "L" in which:
            run(1024, 2048, 4384, 48, dtype=dtype)      # AiM-L
        if "XL" in which:
            run(1536, 3072, 6448, 48, dtype=dtype)      # AiM-XL
