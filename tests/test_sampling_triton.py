"""The Triton sampler (guidance, temperature, top-k, top-p, inverse-CDF draw) against the reference."""
import pytest
import torch

import aim_kernels as ak
from aim_kernels import _ext, _triton, sampling

needs_triton = pytest.mark.skipif(bool(_triton.reasons()), reason="; ".join(_triton.reasons()))
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU test covers CUDA)")

if _triton.triton is not None:
    tl = _triton.tl

    @_triton.triton.jit
    def _kept_kernel(LOGITS, KEPT, vocab, uncond_offset, stride_row, cfg_scale, inv_temperature, top_k, drop_mass,
                     GUIDED: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, BLOCK: tl.constexpr):
        """The sampler's filters alone: which tokens it may draw."""
        row = tl.program_id(0)
        cols, weight = sampling._filtered_weights(LOGITS, row, vocab, uncond_offset, stride_row, cfg_scale,
                                                  inv_temperature, top_k, drop_mass, GUIDED, TOP_K, TOP_P, BLOCK)
        tl.store(KEPT + row * vocab + cols, weight > 0, mask=cols < vocab)


def triton_kept(logits, cfg_scale, temperature, top_k, top_p):
    rows = logits.shape[0] // (2 if cfg_scale is not None else 1)
    kept = torch.ones(rows, logits.shape[1], dtype=torch.bool, device=logits.device)  # poisoned: all kept
    args, meta = sampling.sample_kernel_args(logits, float(cfg_scale or 0.0), temperature, top_k, top_p, rows)
    _kept_kernel[(rows,)](logits, kept, *args, **meta)
    return kept


def near_tie(x, cutoff, eps):
    """Tokens within eps of the cutoff, in rows where some token is near it without equalling it:
    float32 rounding may merge or split that tie (exact ties are decided exactly)."""
    near = (x - cutoff).abs() <= eps
    return near & (near & (x != cutoff)).any(-1, keepdim=True)


def reference_kept(logits, cfg_scale, temperature, top_k, top_p):
    """The float64 reference's kept set, and the tokens so close to a cutoff that float32 rounding decides.

    Close: near a tie at the k-th largest logit or at the smallest kept logit (`near_tie`), or a mass
    up to the token (stable ascending order) within rounding of 1 - top_p. The token the reference
    always keeps (the last of the most likely) is never close.
    """
    x = ak.guided_logits(logits.double(), cfg_scale) / temperature
    kept = torch.isfinite(sampling.filter_logits(x, 1.0, top_k, top_p))
    eps = 1e-6 * (1 + (cfg_scale or 0)) * x.nan_to_num(neginf=0.0).abs().amax(-1, keepdim=True)
    close = near_tie(x, x.masked_fill(~kept, torch.inf).amin(-1, keepdim=True), eps)
    if 0 < top_k < x.shape[-1]:
        close |= near_tie(x, x.topk(top_k, dim=-1).values[:, -1:], eps)
    if top_p < 1.0:
        sorted_x, order = sampling.filter_logits(x, 1.0, top_k, 1.0).sort(dim=-1, stable=True)
        mass_up_to = torch.empty_like(x).scatter_(-1, order, sorted_x.softmax(-1).cumsum(-1))
        close |= (mass_up_to - (1 - top_p)).abs() <= 1e-5 * (1 - top_p)
    last_top = torch.zeros_like(kept).scatter_(-1, order[:, -1:], True) if top_p < 1.0 else torch.zeros_like(kept)
    return kept, close & ~last_top


def compare(logits, cfg_scale, temperature, device_call, top_k=0, top_p=1.0):
    """Tokens against the float64 reference; returns how many rows were compared in full."""
    rows = logits.shape[0] // (2 if cfg_scale is not None else 1)
    uniform = torch.rand(rows, device=logits.device)
    uniform[0] = 0.0  # the ends of the CDF
    uniform[-1] = 1 - 2 ** -24
    got = device_call(logits, float(cfg_scale or 0.0), temperature, top_k, top_p, uniform).cpu()
    ref = ak.sample_next_token_ref(logits.double(), float(cfg_scale or 0.0), temperature, top_k, top_p,
                                   uniform.double()).cpu()
    kept, close = (t.cpu() for t in reference_kept(logits, cfg_scale, temperature, top_k, top_p))
    # the two CDFs differ by rounding: a draw may land on the neighbour only when it sits on a boundary
    probs = sampling.filter_logits(ak.guided_logits(logits.double(), cfg_scale), temperature, top_k, top_p)
    cdf = probs.softmax(-1).cumsum(-1).cpu()
    decided = ~close.any(-1)  # rows where rounding may change the kept set are only checked for a kept token
    for i in range(rows):
        assert kept[i, got[i]] or close[i, got[i]], (i, got[i])
        if decided[i] and got[i] != ref[i]:
            boundary = cdf[i, min(got[i], ref[i])]
            assert abs(boundary - uniform[i].double().cpu()) < 1e-5, (i, got[i], ref[i])
    return decided.sum().item()


@needs_triton
@interpreter_only
@pytest.mark.parametrize("rows,vocab", [(3, 37), (2, 1000)])
@pytest.mark.parametrize("cfg_scale", [None, 1.75])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (9, 0.7)])
def test_triton_interpreter(rows, vocab, cfg_scale, top_k, top_p):
    logits = torch.randn(rows * (2 if cfg_scale else 1), vocab) * 3
    if cfg_scale is None:
        logits[:, 5] = -torch.inf  # a token that can never be drawn (guidance would make it NaN, as officially)
    assert compare(logits, cfg_scale, 0.7, sampling.sample_next_token_triton, top_k, top_p) * 2 >= rows


def filter_settings(vocab):
    """(top_k, top_p): each filter alone at its extremes, and both together."""
    return [(1, 1.0), (vocab - 1, 1.0), (min(50, vocab // 3), 1.0), (0, 1e-9), (0, 0.5), (0, 0.999),
            (min(50, vocab // 3), 0.9), (vocab - 1, 0.999)]


@needs_triton
@interpreter_only
@pytest.mark.parametrize("vocab,rows", [(1, 2), (7, 3), (1000, 1), (16384, 1)])
@pytest.mark.parametrize("dtype,cfg_scale,temperature", [
    (torch.float32, 1.75, 0.7), (torch.float16, None, 1.3), (torch.bfloat16, None, 1.0)])  # bf16: many ties
def test_kept_set_matches_reference(vocab, rows, dtype, cfg_scale, temperature):
    checked = decided = 0
    for top_k, top_p in filter_settings(vocab):
        logits = (torch.randn(rows * (2 if cfg_scale else 1), vocab) * 3).to(dtype)
        got = triton_kept(logits, cfg_scale, temperature, top_k, top_p)
        kept, close = reference_kept(logits, cfg_scale, temperature, top_k, top_p)
        assert torch.equal(got[~close], kept[~close]), (top_k, top_p, (got != kept).nonzero().tolist()[:8])
        if top_p < 1e-6 or (top_k == 1 and dtype == torch.float32):
            assert torch.all(got.sum(-1) == 1)  # only the argmax
        checked, decided = checked + rows, decided + (~close.any(-1)).sum().item()
    assert decided * 2 >= checked  # the comparison is not vacuous


@needs_triton
@interpreter_only
@pytest.mark.parametrize("vocab,rows", [(7, 3), (1000, 1), (16384, 1)])
@pytest.mark.parametrize("cfg_scale,temperature", [(None, 1.0), (2.0, 1.3)])
def test_filtered_tokens_match_reference(vocab, rows, cfg_scale, temperature):
    decided = 0
    for top_k, top_p in filter_settings(vocab):
        logits = torch.randn(rows * (2 if cfg_scale else 1), vocab) * 3
        decided += compare(logits, cfg_scale, temperature, sampling.sample_next_token_triton, top_k, top_p)
    assert decided * 2 >= rows * len(filter_settings(vocab))  # the comparison is not vacuous


@needs_triton
@interpreter_only
@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (20, 1.0), (0, 0.3), (0, 0.9), (12, 0.6)])
def test_ties_match_reference(top_k, top_p):
    """Integer logits tie often: top-k keeps every token equal to the k-th value (-0 ties with +0);
    top-p takes tokens tied at its cutoff in vocabulary order, as the reference's stable sort."""
    logits = torch.randint(-3, 3, (6, 40)).float()
    logits[:, ::2] *= -1  # the zeros of every other column become -0
    got = triton_kept(logits, None, 1.0, top_k, top_p)
    kept, close = reference_kept(logits, None, 1.0, top_k, top_p)
    assert torch.equal(got[~close], kept[~close]) and close.sum() <= 2
    if top_p == 1.0:
        assert torch.equal(got, logits >= logits.topk(top_k, dim=-1).values[:, -1:])


@needs_triton
def test_filtering_runs_in_triton():
    logits = torch.randn(2, 10)
    assert sampling.sample_not_supported_reasons(logits, 0.0, 1.0, 3, 0.9, torch.rand(2)) == \
        sampling.sample_not_supported_reasons(logits, 0.0, 1.0, 0, 1.0, torch.rand(2))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (600, 1.0), (0, 0.98), (600, 0.98), (1, 1.0), (0, 1e-9)])
def test_cuda_dispatch_uses_triton(rows, dtype, top_k, top_p):
    logits = (torch.randn(2 * rows, 16384, device="cuda") * 4).to(dtype)
    assert _ext.backend_for(sampling._sample_next_token, logits, 2.0, 1.0, top_k, top_p,
                            torch.rand(rows, device="cuda")) == "triton"
    decided = compare(logits, 2.0, 1.0, lambda *a: ak.sample_next_token(a[0], a[1], a[2], a[3], a[4], uniform=a[5]),
                      top_k, top_p)
    assert decided * 2 >= rows - 1
    kept, close = reference_kept(logits, 2.0, 1.0, top_k, top_p)
    got = triton_kept(logits, 2.0, 1.0, top_k, top_p)
    assert torch.equal(got[~close], kept[~close])


@pytest.mark.gpu
def test_cuda_frequencies_match_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, -torch.inf]], device="cuda").repeat(200_000, 1)
    tokens = ak.sample_next_token(logits)
    freq = torch.bincount(tokens, minlength=5).double() / tokens.numel()
    probs = logits[0].double().softmax(-1)
    assert freq[4] == 0 and (freq - probs).abs().max() < 5 * (0.25 / tokens.numel()) ** 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k,top_p", [(600, 1.0), (0, 0.98), (50, 0.9)])
def test_cuda_draws_at_the_top_of_the_cdf_are_kept(dtype, top_k, top_p):
    """torch.rand's largest uniform, 1 - 2**-24, in 2048 rows: the float32 CDF's rounding next to the end
    of the kept mass never yields a dropped token (a parallel scan's partial sums need not be monotone)."""
    rows = 2048
    logits = (torch.randn(2 * rows, 16384, device="cuda") * 4).to(dtype)
    got = ak.sample_next_token(logits, 2.0, 1.0, top_k, top_p, uniform=torch.full((rows,), 1 - 2 ** -24, device="cuda"))
    kept, close = reference_kept(logits, 2.0, 1.0, top_k, top_p)
    assert (kept | close)[torch.arange(rows, device="cuda"), got].all()
