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


def gemv(x, w, out, block_n, warps, pdl):
    n, k = w.shape
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
    configs = [("cublas", 0, 0)] + [(k, bn, nw) for k in ("triton", "pdl") for bn in (4, 8, 16, 32) for nw in (4, 8)]
    for kind, bn, nw in configs:
        mids = [torch.empty(rows, n_in, device="cuda", dtype=dtype) for _ in range(layers)]

        def body():
            h = x
            for wi, wo, mid in zip(w_in, w_out, mids):
                if kind == "cublas":
                    h = F.linear(F.linear(h, wi)[:, :d_inner], wo)
                else:
                    gemv(h, wi, mid, bn, nw, kind == "pdl")
                    h2 = torch.empty(rows, d, device="cuda", dtype=dtype)
                    gemv(mid[:, :d_inner], wo, h2, bn, nw, kind == "pdl")
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
            print(f"d={d} {kind:7s} BLOCK_N={bn:2d} warps={nw}: {us:8.1f} us total, {us / layers:6.2f} us/layer, "
                  f"{bytes_ / (ms * 1e-3) / 1e12:5.2f} TB/s, rel err {err:.1e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"d={d} {kind} {bn} {nw}: FAILED {type(e).__name__}: {e}", flush=True)
    return results


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    run(768, 1536, 3352, 24)       # AiM-B
    run(1536, 3072, 6448, 48)      # AiM-XL
