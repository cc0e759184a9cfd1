"""Exploration: a batch-1 Mamba2 layer whose z rows of in_proj run beside the SSM step.

The SSM step needs x, B, C and dt of in_proj's output, not z: z is first read by the gated RMSNorm. Now:
  [prologue +] in_proj (all rows) -> SSM step -> gated norm [+ out_proj]
Here:
  A. [prologue +] in_proj's x, B, C, dt rows only (writing the normalised rows h too);
  B. one launch: the SSM step's programs (y = state.C + D x, ungated) and GEMV programs for the z rows
     (weights loaded before the PDL wait), so z's weights stream while the SSM step runs on few SMs;
  C. gated norm of y * silu(z) [+ out_proj].
Compared in a CUDA graph of L layers against the package's ops; the new chain's output is checked against
theirs over three steps.

  python scripts/explore_z_split.py            (GPU)
  TRITON_INTERPRET=1 python scripts/explore_z_split.py check   (CPU, small fp32 model)
"""
import sys

import torch
import triton
import triton.language as tl

import aim_kernels as ak
from aim_kernels import _triton, decode, gemv
from aim_kernels.decode import _conv_silu, _shift_conv_state

EPS = 1e-5


@triton.jit
def prologue_xbcdt_kernel(x_ptr, res_ptr, gate_ptr, norm_w_ptr, shift_ptr, scale_ptr, w_ptr, out_ptr, h_ptr,
                          res_out_ptr, N, K, eps, ROWS: tl.constexpr, ROWS_PAD: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """out[:, n] = prologue(x) @ w[n].T; program 0 writes h (the prologue's output) and the residual."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=(n[:, None] < N) & kmask[None, :], other=0.0)
    norm_w = tl.load(norm_w_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    _triton.pdl_wait(PDL)
    i = tl.arange(0, ROWS_PAD)
    m = (i[:, None] < ROWS) & kmask[None, :]
    off = i[:, None] * K + k[None, :]
    res = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) * tl.load(gate_ptr + off, mask=m, other=0.0).to(tl.float32)
    res += tl.load(res_ptr + off, mask=m, other=0.0)
    scale = tl.load(scale_ptr + off, mask=m, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + off, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(res * res, axis=1) / K + eps)
    h = (res * rstd[:, None] * norm_w[None, :] * (1.0 + scale) + shift).to(h_ptr.dtype.element_ty)
    if pid == 0:
        tl.store(res_out_ptr + off, res, mask=m)
        tl.store(h_ptr + off, h, mask=m)
    h = h.to(tl.float32)
    for r in tl.static_range(ROWS):
        h_r = _triton.select_row(h, i, r)
        y = tl.sum(w.to(tl.float32) * h_r[None, :], axis=1)
        tl.store(out_ptr + r * N + n, y.to(out_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def ssm_z_kernel(xbcdt_ptr, h_ptr, wz_ptr, z_ptr, conv_state_ptr, ssm_state_ptr, conv_w_ptr, conv_b_ptr, A_log_ptr,
                 D_ptr, dt_bias_ptr, v_ptr, K, N_SSM, stride_xr, stride_cr, stride_cc, stride_cs, stride_sr, stride_sh,
                 stride_sp, stride_wc, stride_wk, S, H, GN, HEADS_PER_GROUP, PB,
                 ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, P: tl.constexpr, N: tl.constexpr, W: tl.constexpr,
                 P_PER_PROGRAM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, Z_FIRST: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    n_z = tl.num_programs(0) - N_SSM
    d_inner = H * P
    if Z_FIRST:
        is_z = pid < n_z
        zpid = pid
        spid = pid - n_z
    else:
        is_z = pid >= N_SSM
        zpid = pid - N_SSM
        spid = pid
    if is_z:
        nn = zpid * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        w = tl.load(wz_ptr + nn[:, None].to(tl.int64) * K + k[None, :], mask=(nn[:, None] < d_inner) & (k[None, :] < K),
                    other=0.0)
        _triton.pdl_wait(PDL)
        i = tl.arange(0, ROWS_PAD)
        hs = tl.load(h_ptr + i[:, None] * K + k[None, :], mask=(i[:, None] < ROWS) & (k[None, :] < K),
                     other=0.0).to(tl.float32)
        for r in tl.static_range(ROWS):
            h_r = _triton.select_row(hs, i, r)
            zr = tl.sum(w.to(tl.float32) * h_r[None, :], axis=1)
            tl.store(z_ptr + r * d_inner + nn, zr.to(z_ptr.dtype.element_ty), mask=nn < d_inner)
    else:
        r = (spid // (H * PB)).to(tl.int64)
        h = (spid // PB) % H
        pb = spid % PB
        g = h // HEADS_PER_GROUP
        n = tl.arange(0, N)
        xbc_row = xbcdt_ptr + r * stride_xr
        cs_row = conv_state_ptr + r * stride_cr
        p0 = h * P + pb * P_PER_PROGRAM
        s_head = ssm_state_ptr + r * stride_sr + h * stride_sh + (pb * P_PER_PROGRAM) * stride_sp
        neg_A = tl.exp(tl.load(A_log_ptr + h).to(tl.float32))
        skip = tl.load(D_ptr + h).to(tl.float32)
        dt_bias = tl.load(dt_bias_ptr + h).to(tl.float64)
        _triton.pdl_wait(PDL)
        state_first = tl.load(s_head + tl.arange(0, BLOCK_P)[:, None] * stride_sp + n[None, :])
        B = _conv_silu(xbc_row, cs_row, conv_w_ptr, conv_b_ptr, d_inner + g * N + n, S, stride_cc, stride_cs,
                       stride_wc, stride_wk, W, HAS_BIAS)
        C = _conv_silu(xbc_row, cs_row, conv_w_ptr, conv_b_ptr, d_inner + GN + g * N + n, S, stride_cc, stride_cs,
                       stride_wc, stride_wk, W, HAS_BIAS)
        dt = tl.load(xbc_row + d_inner + 2 * GN + h).to(tl.float64) + dt_bias
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt))).to(tl.float32)
        dA = tl.exp(-dt * neg_A)
        for it in tl.static_range(P_PER_PROGRAM // BLOCK_P):
            p = it * BLOCK_P + tl.arange(0, BLOCK_P)
            s_ptrs = s_head + p[:, None] * stride_sp + n[None, :]
            if it == 0:
                state = state_first
            else:
                state = tl.load(s_ptrs)
            x = _conv_silu(xbc_row, cs_row, conv_w_ptr, conv_b_ptr, p0 + p, S, stride_cc, stride_cs, stride_wc,
                           stride_wk, W, HAS_BIAS)
            if it == P_PER_PROGRAM // BLOCK_P - 1:
                _shift_conv_state(xbc_row, cs_row, p0 + tl.arange(0, P_PER_PROGRAM), S, stride_cc, stride_cs, BLOCK_S)
            state = state.to(tl.float32) * dA + (dt * x)[:, None] * B[None, :]
            tl.store(s_ptrs, state.to(ssm_state_ptr.dtype.element_ty))
            y = tl.sum(state * C[None, :], axis=1) + skip * x
            tl.store(v_ptr + r * d_inner + p0 + p, y)


@triton.jit
def norm_z_shift_kernel(xbcdt_ptr, z_ptr, conv_state_ptr, v_ptr, norm_w_ptr, out_ptr, stride_xr, stride_cr, stride_cc,
                        stride_cs, S, eps, D_INNER, N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                        PDL: tl.constexpr):
    """One program per row (one group): out = g * rstd(g) * norm_w for g = y * silu(z); shifts the B/C windows."""
    _triton.pdl_wait(PDL)
    r = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = d < D_INNER
    v = tl.load(v_ptr + r * D_INNER + d, mask=mask, other=0.0)
    z = tl.load(z_ptr + r * D_INNER + d, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(norm_w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    _shift_conv_state(xbcdt_ptr + r * stride_xr, conv_state_ptr + r * stride_cr, D_INNER + tl.arange(0, 2 * N), S,
                      stride_cc, stride_cs, BLOCK_S)
    g = v * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=0) / D_INNER + eps)
    tl.store(out_ptr + r * D_INNER + d, (g * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def norm_z_shift_out_kernel(xbcdt_ptr, z_ptr, conv_state_ptr, v_ptr, norm_w_ptr, out_w_ptr, out_ptr, stride_xr,
                            stride_cr, stride_cc, stride_cs, S, eps, N_OUT, D_INNER, ROWS: tl.constexpr,
                            ROWS_PAD: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    w = tl.load(out_w_ptr + n[:, None].to(tl.int64) * D_INNER + k[None, :],
                mask=(n[:, None] < N_OUT) & (k[None, :] < D_INNER), other=0.0)
    norm_w = tl.load(norm_w_ptr + k, mask=k < D_INNER, other=0.0).to(tl.float32)
    _triton.pdl_wait(PDL)
    i = tl.arange(0, ROWS_PAD)
    m = (i[:, None] < ROWS) & (k[None, :] < D_INNER)
    v = tl.load(v_ptr + i[:, None] * D_INNER + k[None, :], mask=m, other=0.0)
    z = tl.load(z_ptr + i[:, None] * D_INNER + k[None, :], mask=m, other=0.0).to(tl.float32)
    for r in range(pid, ROWS, tl.num_programs(0)):
        _shift_conv_state(xbcdt_ptr + r * stride_xr, conv_state_ptr + r * stride_cr, D_INNER + tl.arange(0, 2 * N), S,
                          stride_cc, stride_cs, BLOCK_S)
    g = v * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=1) / D_INNER + eps)
    x = (g * rstd[:, None] * norm_w[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
    for r in tl.static_range(ROWS):
        x_r = _triton.select_row(x, i, r)
        y = tl.sum(w.to(tl.float32) * x_r[None, :], axis=1)
        tl.store(out_ptr + r * N_OUT + n, y.to(out_ptr.dtype.element_ty), mask=n < N_OUT)


class Layer:
    def __init__(self, d, h, dtype, device, p=64, n=128, w=4):
        di = h * p
        t = lambda *s: torch.randn(*s, device=device)  # noqa: E731
        self.d, self.h, self.p, self.n, self.di = d, h, p, n, di
        self.norm_w = (1 + 0.1 * t(d)).to(dtype)
        self.in_w = (t(2 * di + 2 * n + h, d) / d ** 0.5).to(dtype)
        self.conv_w = (t(di + 2 * n, w) / w ** 0.5).to(dtype)
        self.conv_b = (0.1 * t(di + 2 * n)).to(dtype)
        self.A_log = torch.log(torch.empty(h, device=device).uniform_(1, 16))
        self.D = t(h).to(dtype)
        self.dt_bias = torch.log(torch.expm1(torch.empty(h, device=device).uniform_(1e-3, 0.1))).to(dtype)
        self.gnorm_w = (1 + 0.1 * t(di)).to(dtype)
        self.out_w = (t(d, di) / di ** 0.5).to(dtype)

    def new_cache(self, rows, dtype, device):
        return (0.3 * torch.randn(rows, self.di + 2 * self.n, 3, device=device)).to(dtype), \
            0.3 * torch.randn(rows, self.h, self.p, self.n, device=device)


def step_now(layer, cache, hidden, residual, gate, shift, scale):
    proj, residual = ak.add_rmsnorm_modulate_linear(hidden, residual, layer.norm_w, shift, scale, EPS, gate,
                                                    layer.in_w)
    out = ak.mamba2_decode_step(proj, cache[0], cache[1], layer.conv_w, layer.conv_b, layer.A_log, layer.D,
                                layer.dt_bias, layer.gnorm_w, EPS, layer.p, 1, layer.out_w)
    return out, residual


def step_new(layer, cache, hidden, residual, gate, shift, scale, fused_a=True, fused_c=True, z_first=False):
    rows, d = hidden.shape
    di, h, p, n = layer.di, layer.h, layer.p, layer.n
    dev, dtype = hidden.device, hidden.dtype
    launch = _triton.launch_options(dev)
    w_xbcdt, w_z = layer.in_w[di:], layer.in_w[:di]
    nx = w_xbcdt.shape[0]
    bn, bk = gemv.tile_shape(d)
    if fused_a:
        xbcdt = torch.empty(rows, nx, device=dev, dtype=dtype)
        hrows = torch.empty(rows, d, device=dev, dtype=dtype)
        res_out = torch.empty(rows, d, device=dev, dtype=torch.float32)
        prologue_xbcdt_kernel[(triton.cdiv(nx, bn),)](
            hidden, residual, gate, layer.norm_w, shift, scale, w_xbcdt, xbcdt, hrows, res_out, nx, d, EPS,
            ROWS=rows, ROWS_PAD=triton.next_power_of_2(rows), BLOCK_N=bn, BLOCK_K=bk, num_warps=4, **launch)
    else:
        hrows, res_out = ak.add_rmsnorm_modulate(hidden, residual, layer.norm_w, shift, scale, EPS, gate)
        xbcdt = gemv.linear(hrows, w_xbcdt)
    conv_state, ssm_state = cache
    z = torch.empty(rows, di, device=dev, dtype=dtype)
    v = torch.empty(rows, di, device=dev, dtype=torch.float32)
    ppp = decode._p_per_program(rows, h, p)
    block_p = min(ppp, max(1, decode.TILE_ELEMENTS // n))
    pb = p // ppp
    n_ssm = rows * h * pb
    n_z = triton.cdiv(di, bn)
    block_s = triton.next_power_of_2(conv_state.shape[2])
    ssm_z_kernel[(n_ssm + n_z,)](
        xbcdt, hrows, w_z, z, conv_state, ssm_state, layer.conv_w, layer.conv_b, layer.A_log, layer.D, layer.dt_bias,
        v, d, n_ssm, xbcdt.stride(0), *conv_state.stride(), *ssm_state.stride()[:3], *layer.conv_w.stride(),
        conv_state.shape[2], h, n, h, pb, ROWS=rows, ROWS_PAD=triton.next_power_of_2(rows), P=p, N=n,
        W=layer.conv_w.shape[1], P_PER_PROGRAM=ppp, BLOCK_P=block_p, BLOCK_S=block_s, HAS_BIAS=True,
        BLOCK_N=bn, BLOCK_K=bk, Z_FIRST=z_first, num_warps=4, **launch)
    if fused_c:
        out = torch.empty(rows, d, device=dev, dtype=dtype)
        bn2, bk2 = gemv.tile_shape(di)
        norm_z_shift_out_kernel[(triton.cdiv(d, bn2),)](
            xbcdt, z, conv_state, v, layer.gnorm_w, layer.out_w, out, xbcdt.stride(0), *conv_state.stride(),
            conv_state.shape[2], EPS, d, di, ROWS=rows, ROWS_PAD=triton.next_power_of_2(rows), N=n,
            BLOCK_N=bn2, BLOCK_K=bk2, BLOCK_S=block_s, num_warps=gemv.NUM_WARPS, **launch)
        return out, res_out
    y = torch.empty(rows, di, device=dev, dtype=dtype)
    bd = triton.next_power_of_2(di)
    norm_z_shift_kernel[(rows,)](
        xbcdt, z, conv_state, v, layer.gnorm_w, y, xbcdt.stride(0), *conv_state.stride(), conv_state.shape[2], EPS,
        di, N=n, BLOCK_D=bd, BLOCK_S=block_s, num_warps=4 if bd <= 2048 else 8, **launch)
    return gemv.linear(y, layer.out_w), res_out


def step_now(layer, cache, hidden, residual, gate, shift, scale):
    proj, residual = ak.add_rmsnorm_modulate_linear(hidden, residual, layer.norm_w, shift, scale, EPS, gate,
                                                    layer.in_w)
    out = ak.mamba2_decode_step(proj, cache[0], cache[1], layer.conv_w, layer.conv_b, layer.A_log, layer.D,
                                layer.dt_bias, layer.gnorm_w, EPS, layer.p, 1, layer.out_w)
    return out, residual


def variant(fused_a, fused_c, z_first=False):
    def step(*args):
        return step_new(*args, fused_a=fused_a, fused_c=fused_c, z_first=z_first)
    return step


VARIANTS = {"now": step_now}
for a in (True, False):
    for c in (True, False):
        VARIANTS[f"A{'f' if a else 'u'}C{'f' if c else 'u'}"] = variant(a, c)
VARIANTS["AfCf-zfirst"] = variant(True, True, True)
VARIANTS["AuCu-zfirst"] = variant(False, False, True)


def chain(step, layers, caches, x0, mods):
    hidden, residual = x0
    for layer, cache, (gate, shift, scale) in zip(layers, caches, mods):
        hidden, residual = step(layer, cache, hidden, residual, gate, shift, scale)
    return hidden, residual


def setup(d, h, n_layers, dtype, device, rows=2):
    torch.manual_seed(0)
    layers = [Layer(d, h, dtype, device) for _ in range(n_layers)]
    mods = [tuple((0.1 * torch.randn(rows, d, device=device) + (1.0 if j == 0 else 0.0)).to(dtype) for j in range(3))
            for _ in range(n_layers)]
    x0 = (torch.randn(rows, d, device=device).to(dtype), torch.randn(rows, d, device=device))
    caches = [l.new_cache(rows, dtype, device) for l in layers]
    return layers, mods, x0, caches


def clone_caches(caches):
    return [(a.clone(), b.clone()) for a, b in caches]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(d, h, n_layers, dtype, device):
    layers, mods, x0, caches = setup(d, h, n_layers, dtype, device)
    worst = 0.0
    for name, step in VARIANTS.items():
        if name == "now":
            continue
        c1, c2 = clone_caches(caches), clone_caches(caches)
        for _ in range(3):  # three steps: the conv windows and states carry over
            a, _ = chain(step_now, layers, c1, x0, mods)
            b, _ = chain(step, layers, c2, x0, mods)
        errs = (rel(b, a), max(rel(x[0], y[0]) for x, y in zip(c2, c1)), max(rel(x[1], y[1]) for x, y in zip(c2, c1)))
        worst = max(worst, *errs)
        print(f"check d={d} h={h} {dtype} {name}: out {errs[0]:.1e} conv_state {errs[1]:.1e} "
              f"ssm_state {errs[2]:.1e}", flush=True)
    assert worst < (1e-5 if dtype == torch.float32 else 2e-2), worst
    return worst


def bench(d, h, n_layers, dtype):
    layers, mods, x0, caches = setup(d, h, n_layers, dtype, "cuda")
    check(d, h, 4, dtype, "cuda")
    results = {}
    for rnd in range(2):
        for name, step in VARIANTS.items():
            cs = clone_caches(caches)
            chain(step, layers, cs, x0, mods)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain(step, layers, cs, x0, mods)
            ms = triton.testing.do_bench(g.replay, warmup=30, rep=300)
            results.setdefault(name, []).append(ms * 1e3 / n_layers)
            del g
    base = min(results["now"])
    line = "  ".join(f"{k} {min(v):6.2f} ({base / min(v):.3f}x)" for k, v in results.items())
    print(f"d={d} h={h} {str(dtype)[6:]:8s} us/layer: {line}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["check"]:
        check(64, 2, 3, torch.float32, "cpu")
    else:
        print(torch.cuda.get_device_name(), flush=True)
        for dtype in (torch.bfloat16, torch.float32):
            bench(1536, 48, 48, dtype)   # AiM-XL
            bench(1024, 32, 48, dtype)   # AiM-L
            bench(768, 24, 24, dtype)    # AiM-B
