"""aim_kernels.linear's Triton paths (the decode GEMV; the float32 3xTF32 GEMM at 9-512 rows) against
float64, on the interpreter and on the GPU."""
import pytest
import torch

import aim_kernels as ak
from aim_kernels import _ext, _triton, gemv

needs_triton = pytest.mark.skipif(bool(_triton.reasons()), reason="; ".join(_triton.reasons()))
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref) -> float:
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err == err, "NaN in output"
    return err


def poisoned_output(monkeypatch):
    alloc = gemv._alloc_output
    monkeypatch.setattr(gemv, "_alloc_output", lambda *a: alloc(*a).fill_(float("nan")))


def operands(rows, k, n, dtype, device):
    return (torch.randn(rows, k, device=device).to(dtype),
            (torch.randn(n, k, device=device) / k ** 0.5).to(dtype))


def test_reference_is_a_matmul():
    x, w = operands(3, 17, 5, torch.float64, "cpu")
    assert torch.allclose(ak.linear(x, w), x @ w.t())
    x3 = torch.randn(2, 4, 17, dtype=torch.float64)
    assert torch.allclose(ak.linear(x3, w), x3 @ w.t())


def test_opcheck_and_gradcheck():
    x, w = operands(3, 9, 4, torch.float64, "cpu")
    x.requires_grad_(), w.requires_grad_()
    torch.library.opcheck(torch.ops.aim_kernels.linear.default, (x, w))
    assert torch.autograd.gradcheck(ak.linear, (x, w))
    x3 = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ak.linear, (x3, w))


def test_bad_input_is_rejected():
    x, w = operands(2, 8, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight must have shape"):
        ak.linear(x, w[:, :5])
    with pytest.raises(TypeError, match="x must have dtype"):
        ak.linear(x.double(), w)


@needs_triton
def test_not_supported_reasons():
    x, w = operands(2, 8, 4, torch.float32, "cpu")
    assert gemv.not_supported_reasons(torch.randn(9, 8), w) == []  # float32: the 3xTF32 GEMM
    assert "9 rows" in gemv.not_supported_reasons(torch.randn(9, 8).half(), w.half())[-1]
    assert "513 rows" in gemv.not_supported_reasons(torch.randn(513, 8), w)[-1]
    assert any("float64" in r for r in gemv.not_supported_reasons(x.double(), w.double()))
    assert any("in_features" in r for r in gemv.not_supported_reasons(*operands(1, 8193, 2, torch.float32, "cpu")))
    assert gemv.not_supported_reasons(*operands(9, 8193, 2, torch.float32, "cpu")) == []
    assert any("-D" in r for r in gemv.not_supported_reasons(x[None], w))
    with pytest.raises(ValueError, match="cannot run these inputs"):
        gemv.linear_triton(torch.randn(9, 8).half(), w.half())


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU test covers CUDA)")
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("k,n", [(7, 5), (768, 33), (1000, 17), (129, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreter(rows, k, n, dtype, monkeypatch):
    poisoned_output(monkeypatch)
    x, w = operands(rows, k, n, dtype, "cpu")
    out = gemv.linear_triton(x, w)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert rel_err(out, x.double() @ w.double().t()) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("k,n", [(768, 3352), (1536, 768), (768, 16384), (3072, 1536), (999, 77)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_dispatch_uses_triton(rows, k, n, dtype, monkeypatch):
    poisoned_output(monkeypatch)
    x, w = operands(rows, k, n, dtype, "cuda")
    assert _ext.backend_for(gemv._linear, x, w) == "triton"
    assert rel_err(ak.linear(x, w), x.double() @ w.double().t()) < TOL[dtype]
    x9 = torch.randn(9, k, device="cuda").to(dtype)
    assert _ext.backend_for(gemv._linear, x9, w) == ("triton" if dtype == torch.float32 else "reference")


def test_gemm_config():
    """Small grids split K (up to 8 ranges of >= 128); big ones do not."""
    cpu = torch.device("cpu")
    assert gemv.gemm_config(32, 768, 1536, cpu) == (32, 64, 8)
    assert gemv.gemm_config(128, 6448, 1536, cpu) == (64, 64, 2)
    assert gemv.gemm_config(512, 6448, 1536, cpu) == (64, 64, 1)
    assert gemv.gemm_config(100, 10, 200, cpu)[2] == 1  # K too short to split


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU test covers CUDA)")
@pytest.mark.parametrize("rows,k,n", [(9, 7, 5), (33, 300, 70), (70, 1000, 17), (130, 129, 65)])
def test_gemm_interpreter(rows, k, n, monkeypatch):
    poisoned_output(monkeypatch)
    x, w = operands(rows, k, n, torch.float32, "cpu")
    out = gemv.linear_triton(x, w)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    assert rel_err(out, x.double() @ w.double().t()) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [9, 32, 128, 300, 512])
@pytest.mark.parametrize("k,n", [(768, 3352), (1536, 768), (3072, 1536), (1024, 16384), (999, 77)])
def test_gemm_cuda(rows, k, n, monkeypatch):
    """float32 at 9..512 rows: the split-K 3xTF32 GEMM, float32-accurate (the target: fp32 path 1e-5)."""
    poisoned_output(monkeypatch)
    x, w = operands(rows, k, n, torch.float32, "cuda")
    assert _ext.backend_for(gemv._linear, x, w) == "triton"
    ref = x.double() @ w.double().t()
    out = ak.linear(x, w)
    assert rel_err(out, ref) < 1e-6
    assert torch.equal(ak.linear(x, w), out)  # deterministic (no atomics)


def _chain(x, weights):
    for w_in, w_out in weights:
        x = ak.linear(ak.linear(x, w_in)[:, :w_out.shape[1]], w_out)
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pdl_chain_in_a_cuda_graph(dtype, monkeypatch):
    """24 dependent GEMVs pairs (AiM-B's in_proj -> out_proj) in one CUDA graph: with programmatic
    dependent launch each kernel starts before its predecessor ends; the result must not change."""
    torch.manual_seed(0)
    weights = [((torch.randn(3352, 768, device="cuda") / 768 ** 0.5).to(dtype),
                (torch.randn(768, 1536, device="cuda") / 1536 ** 0.5).to(dtype)) for _ in range(24)]
    x = torch.randn(2, 768, device="cuda").to(dtype)
    ref = x.double()
    for w_in, w_out in weights:
        ref = (ref @ w_in.double().t())[:, :1536].to(dtype).double() @ w_out.double().t()
        ref = ref.to(dtype).double()
    eager = _chain(x, weights)
    graph = torch.cuda.CUDAGraph()
    _chain(x, weights)  # warm-up before capture
    with torch.cuda.graph(graph):
        graphed = _chain(x, weights)
    for _ in range(3):
        graphed.zero_()
        graph.replay()
        assert torch.equal(graphed, eager)
    monkeypatch.setenv("AIM_KERNELS_DISABLE", "pdl")
    assert not _triton.pdl(x.device)
    assert torch.equal(_chain(x, weights), eager)
    assert rel_err(eager, ref) < TOL[dtype]


# ---- the block prologue fused with in_proj ------------------------------------------------------

def prologue_operands(rows, k, n, dtype, device, residual=True, gate=True):
    t = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    return dict(x=t(rows, k).to(dtype), residual=t(rows, k) if residual else None,
                norm_weight=(1 + 0.1 * t(k)).to(dtype), shift=(0.1 * t(rows, k)).to(dtype),
                scale=(0.1 * t(rows, k)).to(dtype), eps=1e-5, x_gate=t(rows, k).to(dtype) if gate else None,
                weight=(t(n, k) / k ** 0.5).to(dtype))


def check_prologue(args, y, residual_out, tol):
    ref_y, ref_r = ak.add_rmsnorm_modulate_linear_ref(
        *[v.double() if isinstance(v, torch.Tensor) else v for v in args.values()])
    assert y.dtype == args["x"].dtype and residual_out.dtype == torch.float32
    assert rel_err(y, ref_y) < tol and rel_err(residual_out, ref_r) < 1e-6


def test_prologue_reference_is_the_composition():
    args = prologue_operands(3, 16, 5, torch.float64, "cpu")
    y, r = ak.add_rmsnorm_modulate_linear(*args.values())
    h, r_ref = ak.add_rmsnorm_modulate(args["x"], args["residual"], args["norm_weight"], args["shift"],
                                       args["scale"], 1e-5, x_gate=args["x_gate"])
    assert torch.allclose(y, h @ args["weight"].t()) and torch.equal(r, r_ref)
    torch.library.opcheck(torch.ops.aim_kernels.add_rmsnorm_modulate_linear.default, tuple(args.values()))
    first_layer = prologue_operands(2, 16, 5, torch.float64, "cpu", residual=False, gate=False)
    torch.library.opcheck(torch.ops.aim_kernels.add_rmsnorm_modulate_linear.default, tuple(first_layer.values()))


def test_prologue_rejects_bad_input():
    args = prologue_operands(2, 16, 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match="shift"):
        ak.add_rmsnorm_modulate_linear(*dict(args, shift=args["shift"][:1]).values())
    with pytest.raises(TypeError, match="weight"):
        ak.add_rmsnorm_modulate_linear(*dict(args, weight=args["weight"].double()).values())


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU test covers CUDA)")
@pytest.mark.parametrize("rows,k,n", [(1, 7, 5), (2, 96, 33), (3, 130, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [True, False])
def test_prologue_triton_interpreter(rows, k, n, dtype, residual, monkeypatch):
    poisoned_output(monkeypatch)
    args = prologue_operands(rows, k, n, dtype, "cpu", residual=residual, gate=residual)
    check_prologue(args, *gemv.add_rmsnorm_modulate_linear_triton(*args.values()), TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("rows,k,n,fused", [(1, 768, 3352, True), (2, 768, 3352, True), (2, 1024, 4384, True),
                                            (8, 768, 3352, False), (9, 768, 3352, False), (2, 1536, 6448, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prologue_cuda(rows, k, n, fused, dtype, monkeypatch):
    """AiM-B/L batch 1 take the fused kernel; more rows or AiM-XL's width the two unfused kernels."""
    poisoned_output(monkeypatch)
    args = prologue_operands(rows, k, n, dtype, "cuda")
    expect = "triton" if fused else "reference"
    assert _ext.backend_for(gemv._add_rmsnorm_modulate_linear, *args.values()) == expect
    check_prologue(args, *ak.add_rmsnorm_modulate_linear(*args.values()), TOL[dtype])


def test_prologue_linear_with_deferred_norm():
    """x_mean_sq (the previous mixer's deferred norm) reaches the unfused prologue; the fused kernel declines it."""
    f64 = dict(dtype=torch.float64)
    x, res, norm_w = torch.randn(4, 16, **f64), torch.randn(4, 16, **f64), torch.randn(16, **f64)
    shift, scale, gate = (torch.randn(4, 16, **f64) for _ in range(3))
    weight, mean_sq = torch.randn(10, 16, **f64), torch.rand(4, 3, **f64)
    y, r = ak.add_rmsnorm_modulate_linear(x, res, norm_w, shift, scale, 1e-5, gate, weight, mean_sq, 1e-3)
    scaled = x * torch.rsqrt(mean_sq.sum(-1, keepdim=True) + 1e-3)
    y_ref, r_ref = ak.add_rmsnorm_modulate_linear(scaled, res, norm_w, shift, scale, 1e-5, gate, weight)
    assert torch.allclose(y, y_ref, rtol=1e-13, atol=1e-13) and torch.allclose(r, r_ref, rtol=1e-13, atol=1e-13)
    # the unfused path the CUDA dispatch falls back to (the ops inside it dispatch by device)
    y_unfused, r_unfused = gemv._add_rmsnorm_modulate_then_linear(x, res, norm_w, shift, scale, 1e-5, gate, weight,
                                                                  mean_sq, 1e-3)
    assert torch.allclose(y_unfused, y_ref, rtol=1e-13, atol=1e-13) and torch.allclose(r_unfused, r_ref, rtol=1e-13,
                                                                                        atol=1e-13)
    torch.library.opcheck(torch.ops.aim_kernels.add_rmsnorm_modulate_linear.default,
                          (x, res, norm_w, shift, scale, 1e-5, gate, weight, mean_sq, 1e-3))
    reasons = gemv.add_rmsnorm_modulate_linear_not_supported_reasons(x.float(), res.float(), norm_w.float(),
                                                                     shift.float(), scale.float(), 1e-5, gate.float(),
                                                                     weight.float(), mean_sq.float(), 1e-3)
    assert any("x_mean_sq" in r for r in reasons)
