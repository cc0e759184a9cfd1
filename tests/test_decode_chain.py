"""mamba2_decode_chain: a whole chain of Mamba2 blocks' decode step in one op, against mamba2_block_step_ref."""
import math

import pytest
import torch

import aim_kernels as ak
from aim_kernels import decode_chain


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def make_chain_inputs(layers, d, heads, headdim=64, d_state=128, width=4, weight_dtype=torch.bfloat16,
                      device="cpu", seed=0):
    """Random inputs of the packed layout (decode_chain's docstring), and the unpacked parameters they come from:
    block norm weights, adaLN (shift, scale, gate) rows, out_proj and gated-norm weights."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    d_inner = heads * headdim
    conv_dim, n1 = d_inner + 2 * d_state, 2 * d_inner + 2 * d_state + heads
    norm_weight, mixer_norm_weight = 1 + 0.1 * rn(layers, d), 1 + 0.1 * rn(layers, d_inner)
    shift, scale, gate = 0.1 * rn(layers, 2, d), 0.1 * rn(layers, 2, d), 1 + 0.1 * rn(layers, 2, d)
    out_weight = [(rn(d, d_inner) / math.sqrt(d_inner)).to(weight_dtype) for _ in range(layers)]
    dt = torch.exp(torch.empty(layers, heads).uniform_(math.log(1e-3), math.log(0.1), generator=g))
    gate_prev = torch.cat([torch.ones(1, 2, d), gate[:-1]])  # block l's input gate is block l - 1's gate
    inp = dict(
        x=rn(2, d),
        in_weight=[(rn(n1, d) / math.sqrt(d)).to(weight_dtype) for _ in range(layers)],
        out_weight_t=decode_chain.pack_out_weights(out_weight, list(mixer_norm_weight)),
        adaln=torch.stack([gate_prev, norm_weight[:, None].double() * (1 + scale.double()), shift]).to(weight_dtype),
        conv_state=0.5 * rn(layers, 2, conv_dim, width - 1),
        ssm_state=0.1 * rn(layers, 2, heads, headdim, d_state),
        conv_weight=0.5 * rn(layers, conv_dim, width), conv_bias=0.1 * rn(layers, conv_dim),
        A_log=torch.log(1 + 15 * torch.rand(layers, heads, generator=g)), D=1 + 0.1 * rn(layers, heads),
        dt_bias=dt + torch.log(-torch.expm1(-dt)), eps=1e-5)
    unpacked = dict(norm_weight=norm_weight, mixer_norm_weight=mixer_norm_weight, shift=shift, scale=scale, gate=gate,
                    out_weight=out_weight)
    return {k: ([w.to(device) for w in v] if isinstance(v, list) else v.to(device) if torch.is_tensor(v) else v)
            for k, v in inp.items()}, unpacked


NAMES = ("x", "in_weight", "out_weight_t", "adaln", "conv_state", "ssm_state", "conv_weight", "conv_bias", "A_log", "D",
         "dt_bias", "eps")


def args(inp):
    return [inp[k] for k in NAMES]


def cloned(inp, dtype=None, device=None):
    """A deep copy (the caches are updated in place), optionally every tensor in `dtype` / on `device`."""
    def cp(t):
        return t.to(device=device or t.device, dtype=dtype or t.dtype, copy=True)
    return {k: [cp(w) for w in v] if isinstance(v, list) else cp(v) if torch.is_tensor(v) else v for k, v in inp.items()}


def test_reference_is_the_model_block_chain():
    """The packed layout means what the model does: block after block, mamba2_block_step_ref with the block's norm
    weight, adaLN rows, previous gate, out_proj and gated-norm weight."""
    inp, up = make_chain_inputs(3, 32, 2, headdim=16, d_state=8, weight_dtype=torch.float64)
    inp = cloned(inp, torch.float64)
    ref = cloned(inp)
    out, residual = ak.mamba2_decode_chain(*args(inp))
    x, res = ref["x"], None
    for layer in range(3):
        x, res = ak.mamba2_block_step_ref(
            x, res, up["gate"][layer - 1].double() if layer else None, up["norm_weight"][layer].double(),
            up["shift"][layer].double(), up["scale"][layer].double(), ref["in_weight"][layer], ref["conv_state"][layer],
            ref["ssm_state"][layer], ref["conv_weight"][layer], ref["conv_bias"][layer], ref["A_log"][layer],
            ref["D"][layer], ref["dt_bias"][layer], up["mixer_norm_weight"][layer].double(), 1e-5, 16, 1,
            up["out_weight"][layer])
    assert rel_err(out, x) < 1e-12 and rel_err(residual, res) < 1e-12
    assert rel_err(inp["ssm_state"], ref["ssm_state"]) < 1e-12
    assert rel_err(inp["conv_state"], ref["conv_state"]) < 1e-12


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_opcheck(x_dtype):
    inp, _ = make_chain_inputs(2, 32, 2, headdim=16, d_state=8, weight_dtype=torch.float32)
    torch.library.opcheck(decode_chain._mamba2_decode_chain, args(dict(inp, x=inp["x"].to(x_dtype))))


def test_bfloat16_x_in_and_out():
    """A bfloat16 x (a bf16 model's hidden state) runs as its float32 value: the output comes back rounded to
    bfloat16 once, the residual in float32."""
    inp, _ = make_chain_inputs(2, 32, 2, headdim=16, d_state=8, weight_dtype=torch.bfloat16)
    x16 = inp["x"].bfloat16()
    wide, narrow = cloned(dict(inp, x=x16.float())), cloned(dict(inp, x=x16))
    out32, res32 = ak.mamba2_decode_chain(*args(wide))
    out16, res16 = ak.mamba2_decode_chain(*args(narrow))
    assert out16.dtype == torch.bfloat16 and res16.dtype == torch.float32
    assert torch.equal(out16, out32.bfloat16()) and torch.equal(res16, res32)
    assert torch.equal(narrow["ssm_state"], wide["ssm_state"])


def test_rejects_bad_inputs():
    inp, _ = make_chain_inputs(2, 32, 2, headdim=16, d_state=8, weight_dtype=torch.float32)
    with pytest.raises(ValueError, match="in_weight"):
        ak.mamba2_decode_chain(*args(dict(inp, in_weight=[])))
    with pytest.raises(ValueError, match=r"in_weight\[1\]"):
        ak.mamba2_decode_chain(*args(dict(inp, in_weight=[inp["in_weight"][0], inp["in_weight"][1][:-1]])))
    with pytest.raises(ValueError, match="adaln"):
        ak.mamba2_decode_chain(*args(dict(inp, adaln=inp["adaln"][:, :1])))
    with pytest.raises(ValueError, match="ssm_state"):
        ak.mamba2_decode_chain(*args(dict(inp, ssm_state=inp["ssm_state"][:, :, :1])))
    with pytest.raises(TypeError, match="x must have dtype"):
        ak.mamba2_decode_chain(*args(dict(inp, x=inp["x"].int())))


def test_not_supported_reasons():
    inp, _ = make_chain_inputs(2, 32, 2, headdim=16, d_state=8, weight_dtype=torch.float32)
    assert any("not a CUDA device" in r for r in decode_chain.not_supported_reasons(*args(inp)))
    assert any("not a CUDA device" in r for r in decode_chain.device_reasons(torch.device("cpu"), 768, 24))
    assert decode_chain._kernel_limits(1536, 48, 132) == []
    assert any("too few" in r for r in decode_chain._kernel_limits(1536, 48, 114))
    assert any("built for" in r for r in decode_chain._kernel_limits(640, 20, 132))


def check_cuda(inp, steps):
    """`steps` decode steps through the CUDA kernel against the float64 reference: outputs and both caches."""
    run, ref = cloned(inp), cloned(inp, torch.float64, "cpu")
    assert decode_chain.not_supported_reasons(*args(run)) == []
    out_tol = 1e-4 if inp["x"].dtype == torch.float32 else 4e-3  # a bf16 output is rounded once
    for step in range(steps):
        run["x"].normal_(), ref["x"].copy_(run["x"])
        out, residual = ak.mamba2_decode_chain(*args(run))
        out_ref, residual_ref = decode_chain.mamba2_decode_chain_ref(*args(ref))
        assert out.dtype == inp["x"].dtype and residual.dtype == torch.float32
        assert not out.isnan().any() and not residual.isnan().any()
        assert rel_err(out, out_ref) < out_tol, step
        assert rel_err(residual, residual_ref) < 1e-5, step
        assert rel_err(run["ssm_state"], ref["ssm_state"]) < 1e-5, step
        assert rel_err(run["conv_state"], ref["conv_state"]) < 1e-5, step


def needs_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    reasons = decode_chain.not_supported_reasons(*args(make_chain_inputs(1, 768, 24, device="cuda")[0]))
    if reasons:
        pytest.skip("the chain kernel cannot run here: " + "; ".join(reasons))


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d, heads, layers", [(768, 24, 3), (1024, 32, 2), (1536, 48, 3)])
def test_cuda_matches_float64(d, heads, layers, weight_dtype):
    needs_kernel()
    inp, _ = make_chain_inputs(layers, d, heads, weight_dtype=weight_dtype, device="cuda", seed=d + layers)
    check_cuda(inp, steps=3)


@pytest.mark.gpu
def test_cuda_bfloat16_x_matches_float64():
    needs_kernel()
    inp, _ = make_chain_inputs(3, 768, 24, device="cuda", seed=5)
    check_cuda(dict(inp, x=inp["x"].bfloat16()), steps=3)


@pytest.mark.gpu
def test_cuda_graph_replays_the_step():
    needs_kernel()
    inp, _ = make_chain_inputs(2, 768, 24, device="cuda")
    fresh = lambda: dict(inp, conv_state=inp["conv_state"].clone(), ssm_state=inp["ssm_state"].clone())  # noqa: E731
    eager, graphed = fresh(), fresh()
    out_e = [ak.mamba2_decode_chain(*args(eager))[0].clone() for _ in range(3)]
    ak.mamba2_decode_chain(*args(fresh()))  # the same weights: builds their pointer table outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, _ = ak.mamba2_decode_chain(*args(graphed))
    for step in range(3):  # capture does not run the kernel: replay i is step i
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_g, out_e[step]) or rel_err(out_g, out_e[step]) < 1e-5  # atomics: sum order varies
    assert rel_err(graphed["ssm_state"], eager["ssm_state"]) < 1e-5
