"""The Triton sampler (guidance, temperature, softmax, inverse-CDF draw) against the reference."""
import pytest
import torch

import aim_kernels as ak
from aim_kernels import _ext, _triton, sampling

needs_triton = pytest.mark.skipif(bool(_triton.reasons()), reason="; ".join(_triton.reasons()))


def compare(logits, cfg_scale, temperature, device_call):
    rows = logits.shape[0] // (2 if cfg_scale is not None else 1)
    uniform = torch.rand(rows, device=logits.device)
    uniform[0] = 0.0  # the ends of the CDF
    uniform[-1] = 1 - 2 ** -24
    got = device_call(logits, float(cfg_scale or 0.0), temperature, 0, 1.0, uniform)
    ref = ak.sample_next_token_ref(logits.double(), float(cfg_scale or 0.0), temperature, 0, 1.0, uniform.double())
    # the two CDFs differ by rounding: a draw may land on the neighbour only when it sits on a boundary
    probs = ak.guided_logits(logits.double(), cfg_scale).div(temperature).softmax(-1)
    cdf = probs.cumsum(-1)
    for i in range(rows):
        if got[i] != ref[i]:
            boundary = cdf[i, min(got[i], ref[i])]
            assert abs(boundary - uniform[i].double()) < 1e-5, (i, got[i], ref[i])
        assert probs[i, got[i]] > 0


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU test covers CUDA)")
@pytest.mark.parametrize("rows,vocab", [(3, 37), (2, 1000)])
@pytest.mark.parametrize("cfg_scale", [None, 1.75])
def test_triton_interpreter(rows, vocab, cfg_scale):
    logits = torch.randn(rows * (2 if cfg_scale else 1), vocab) * 3
    if cfg_scale is None:
        logits[:, 5] = -torch.inf  # a token that can never be drawn (guidance would make it NaN, as officially)
    compare(logits, cfg_scale, 0.7, sampling.sample_next_token_triton)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dispatch_uses_triton(rows, dtype):
    logits = (torch.randn(2 * rows, 16384, device="cuda") * 4).to(dtype)
    assert _ext.backend_for(sampling._sample_next_token, logits, 2.0, 1.0, 0, 1.0,
                            torch.rand(rows, device="cuda")) == "triton"
    compare(logits, 2.0, 1.0, lambda *a: ak.sample_next_token(a[0], a[1], a[2], a[3], a[4], uniform=a[5]))


@pytest.mark.gpu
def test_cuda_frequencies_match_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, -torch.inf]], device="cuda").repeat(200_000, 1)
    tokens = ak.sample_next_token(logits)
    freq = torch.bincount(tokens, minlength=5).double() / tokens.numel()
    probs = logits[0].double().softmax(-1)
    assert freq[4] == 0 and (freq - probs).abs().max() < 5 * (0.25 / tokens.numel()) ** 0.5


def test_filtering_falls_back_to_the_reference():
    logits = torch.randn(2, 10)
    reasons = sampling.sample_not_supported_reasons(logits, 0.0, 1.0, 3, 0.9, torch.rand(2))
    assert any("top-k" in r for r in reasons) and any("top-p" in r for r in reasons)
