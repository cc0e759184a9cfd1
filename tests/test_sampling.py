"""Tests for next-token sampling (aim_kernels/sampling.py).

The official rules (AIM_SPEC section 5): guided logits = uncond + (cond - uncond) * cfg_scale for rows
[cond; uncond]; temperature divides the logits; top_k (if > 0) keeps the k largest (ties with the k-th
value kept), then top_p (if < 1) sorts ascending, takes the cumulative softmax, drops the tokens whose
cumulative probability is <= 1 - top_p and always keeps the most likely token; then one draw per row.
"""
import math
import random

import pytest
import torch

from aim_kernels import check_sampling_args, guided_logits, sample_next_token
from aim_kernels.sampling import filter_logits

F64 = torch.float64


# ---- an independent float64 model of the distribution the sampler must draw from -------------------

def expected_probs(logits, cfg_scale=None, temperature=1.0, top_k=0, top_p=1.0):
    """(rows, V) probabilities, built token by token from the rules in the module docstring."""
    logits = logits.double()
    if cfg_scale is not None:
        cond, uncond = logits[: len(logits) // 2], logits[len(logits) // 2:]
        logits = uncond + (cond - uncond) * cfg_scale
    logits = logits / temperature
    rows = []
    for row in logits.tolist():
        keep = [True] * len(row)
        if 0 < top_k < len(row):
            kth = sorted(row, reverse=True)[top_k - 1]
            keep = [v >= kth for v in row]
        if top_p < 1.0:
            m = max(v for v, k in zip(row, keep) if k)
            w = [math.exp(v - m) if k else 0.0 for v, k in zip(row, keep)]
            total = sum(w)
            mass_before = 0.0  # mass of the strictly more likely kept tokens, walking down from the top
            new_keep = [False] * len(row)
            for i in sorted(range(len(row)), key=lambda i: -w[i]):
                if w[i] > 0 and (mass_before < top_p or mass_before == 0.0):
                    new_keep[i] = True
                mass_before += w[i] / total
            keep = new_keep
        m = max(v for v, k in zip(row, keep) if k)
        w = [math.exp(v - m) if k else 0.0 for v, k in zip(row, keep)]
        rows.append([x / sum(w) for x in w])
    return torch.tensor(rows, dtype=F64)


def assert_frequencies(tokens, probs, sigmas=5.0):
    """Counts of each token within `sigmas` binomial standard deviations; impossible tokens never drawn."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = n * probs
    sd = torch.sqrt(n * probs * (1 - probs))
    assert torch.all(counts[probs == 0] == 0), counts
    dev = ((counts - expected).abs() / sd.clamp_min(1e-300))[probs > 0]
    assert dev.max() < sigmas, (counts.tolist(), expected.tolist())


# ---- classifier-free guidance (guided_logits; was cfg_combine) ----------------------------------------

@pytest.mark.parametrize("scale", [0.0, 1.0, 1.75, 4.0])
def test_guided_logits_formula(scale):
    b, v = 3, 11
    cond, uncond = torch.randn(b, v, dtype=F64), torch.randn(b, v, dtype=F64)
    out = guided_logits(torch.cat([cond, uncond]), scale)
    assert out.shape == (b, v) and out.dtype == F64
    torch.testing.assert_close(out, uncond + (cond - uncond) * scale, rtol=1e-15, atol=1e-15)


def test_guided_logits_widens_low_precision():
    logits = torch.randn(4, 9).bfloat16()
    out = guided_logits(logits, 2.0)
    assert out.dtype == torch.float32
    cond, uncond = logits.double().chunk(2)
    torch.testing.assert_close(out.double(), uncond + (cond - uncond) * 2.0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.float32), (F64, F64)])
def test_no_guidance_keeps_rows(dtype, out_dtype):
    logits = torch.randn(5, 9).to(dtype)
    out = guided_logits(logits, None)
    assert out.dtype == out_dtype and torch.equal(out, logits.to(out_dtype))


# ---- top-k -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_scale", [None, 1.5])
@pytest.mark.parametrize("top_k", [1, 5, 17])
def test_never_outside_top_k(top_k, cfg_scale):
    rows, v = 2000, 50
    logits = torch.randn(rows * (2 if cfg_scale else 1), v, dtype=F64) * 3
    tokens = sample_next_token(logits, cfg_scale=cfg_scale, top_k=top_k)
    guided = guided_logits(logits, cfg_scale)
    kth = guided.topk(top_k, dim=-1).values[:, -1]
    assert tokens.shape == (rows,) and tokens.dtype == torch.int64
    assert torch.all(guided.gather(1, tokens[:, None])[:, 0] >= kth)
    if top_k > 1:
        assert len(set(tokens.tolist())) > top_k  # not trivially always the argmax


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_top_k_keeps_ties(top_k):
    """Integer-valued logits have many ties; every token equal to the k-th value stays allowed."""
    rows, v = 500, 12
    logits = torch.randint(0, 5, (rows, v)).double()
    kth = logits.topk(top_k, dim=-1).values[:, -1:]
    filtered = filter_logits(logits, 1.0, top_k, 1.0)
    assert torch.equal(torch.isfinite(filtered), logits >= kth)
    tokens = sample_next_token(logits, top_k=top_k)
    assert torch.all(logits.gather(1, tokens[:, None]) >= kth)


def test_top_k_at_least_vocab_is_disabled():
    logits = torch.randn(5, 8, dtype=F64)
    for k in (0, 8, 100):
        assert torch.equal(filter_logits(logits, 1.0, k, 1.0), logits)


# ---- top-p -------------------------------------------------------------------------------------------

PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]  # cumulative from the top: 0.4 .65 .8 .9 .96 1


@pytest.mark.parametrize("top_p,n_kept", [(0.3, 1), (0.5, 2), (0.7, 3), (0.85, 4), (0.93, 5), (0.99, 6),
                                          (1.0, 6)])
def test_top_p_keeps_smallest_set(top_p, n_kept):
    perm = torch.randperm(len(PROBS))
    probs = torch.tensor(PROBS, dtype=F64)[perm]
    logits = (probs.log() + 3 * torch.randn(1, dtype=F64)).expand(4, -1)  # softmax-invariant shift
    filtered = filter_logits(logits, 1.0, 0, top_p)
    kept = set(torch.nonzero(torch.isfinite(filtered[0]))[:, 0].tolist())
    assert kept == set(perm.argsort()[:n_kept].tolist())  # the n_kept most likely tokens
    torch.testing.assert_close(filtered.softmax(-1)[0], expected_probs(logits[:1], top_p=top_p)[0],
                               rtol=1e-12, atol=1e-15)
    tokens = sample_next_token(logits.repeat(500, 1), top_p=top_p)
    assert set(tokens.tolist()) <= kept


def test_top_k_before_top_p():
    """top_k 3 renormalises to (.5, .3125, .1875): top_p .7 then keeps 2 (top_p first would keep 3)."""
    logits = torch.tensor(PROBS, dtype=F64).log()[None]
    kept = torch.isfinite(filter_logits(logits, 1.0, 3, 0.7))[0]
    assert kept.tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("top_p", [1e-9, 1e-3])
def test_tiny_top_p_keeps_argmax(top_p, dtype):
    logits = torch.randn(300, 40, dtype=dtype)
    filtered = filter_logits(logits, 1.0, 0, top_p)
    assert torch.equal(torch.isfinite(filtered), logits == logits.max(-1, keepdim=True).values)
    assert torch.equal(sample_next_token(logits, top_p=top_p), logits.argmax(-1))


# ---- the draw matches the distribution ---------------------------------------------------------------

N_DRAWS = 200_000


@pytest.mark.parametrize("cfg_scale,temperature,top_k,top_p", [
    (None, 1.0, 0, 1.0),
    (None, 0.7, 4, 1.0),
    (None, 1.3, 0, 0.8),
    (2.0, 1.0, 5, 0.9),
    (1.75, 1.0, 0, 1.0),
])
def test_frequencies_match_distribution(cfg_scale, temperature, top_k, top_p):
    v = 7
    base = torch.randn(2 if cfg_scale else 1, v, dtype=F64)
    probs = expected_probs(base, cfg_scale, temperature, top_k, top_p)[0]
    if cfg_scale:
        logits = torch.cat([base[:1].expand(N_DRAWS, v), base[1:].expand(N_DRAWS, v)])
    else:
        logits = base.expand(N_DRAWS, v)
    tokens = sample_next_token(logits, cfg_scale, temperature, top_k, top_p)
    assert tokens.shape == (N_DRAWS,)
    assert_frequencies(tokens, probs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frequencies_low_precision_logits(dtype):
    v = 7
    base = torch.randn(1, v).to(dtype)
    probs = expected_probs(base)[0]
    tokens = sample_next_token(base.expand(N_DRAWS, v))
    assert_frequencies(tokens, probs)


def test_explicit_uniform_is_inverse_cdf():
    """Token = the first index whose cumulative probability exceeds u."""
    rows, v = 1000, 13
    logits = torch.randn(rows, v, dtype=F64)
    u = torch.rand(rows, dtype=F64)
    tokens = sample_next_token(logits, top_k=9, uniform=u)
    cdf = expected_probs(logits, top_k=9).cumsum(-1)
    first = (cdf <= u[:, None]).sum(-1)
    near_edge = ((cdf - u[:, None]).abs() < 1e-12).any(-1)  # rounding may go either way there
    assert torch.equal(tokens[~near_edge], first[~near_edge])
    assert torch.equal(sample_next_token(logits, top_k=9, uniform=u), tokens)  # deterministic


# ---- temperature -------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_temperature_divides_logits(t):
    logits = torch.randn(500, 30, dtype=F64)
    assert torch.equal(filter_logits(logits, t, 0, 1.0), logits / t)
    u = torch.rand(500, dtype=F64)
    assert torch.equal(sample_next_token(logits, temperature=t, uniform=u),
                       sample_next_token(logits / t, uniform=u))
    torch.testing.assert_close(filter_logits(logits, t, 0, 1.0).softmax(-1), expected_probs(logits, temperature=t),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("t", [1e-3, 1e-8])
def test_tiny_temperature_is_argmax(t):
    rows, v = 2000, 64
    logits = torch.randn(rows, v, dtype=F64)
    best = torch.randint(0, v, (rows,))
    logits[torch.arange(rows), best] = logits.max(-1).values + 1  # a clear winner in every row
    assert torch.equal(sample_next_token(logits, temperature=t), best)
    assert torch.equal(sample_next_token(logits, temperature=t, uniform=torch.full((rows,), 1 - 1e-12,
                                                                                 dtype=F64)), best)


# ---- generator, uniforms, rows -----------------------------------------------------------------------

def test_seeded_generator_reproducible():
    logits = torch.randn(64, 1000)
    seed = random.randrange(2**40)
    draw = lambda s: sample_next_token(logits, generator=torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(draw(seed), draw(seed))
    assert not torch.equal(draw(seed), draw(seed + 1))


def test_generator_does_not_touch_global_rng():
    logits = torch.randn(8, 50)
    state = torch.get_rng_state()
    sample_next_token(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("filt", [dict(top_k=3), dict(top_p=0.5), dict(top_k=4, top_p=0.9), dict()])
def test_extreme_uniforms_never_pick_impossible_token(filt, dtype):
    rows, v = 200, 16
    logits = torch.randn(rows, v)
    logits[:, :3] = -torch.inf  # tokens the caller masked out, at both ends of the vocabulary
    logits[:, -3:] = -torch.inf
    allowed = expected_probs(logits, **filt) > 0
    one_minus = torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    for u in (torch.zeros(rows, dtype=dtype), one_minus.expand(rows)):
        tokens = sample_next_token(logits, uniform=u, **filt)
        assert torch.all(allowed.gather(1, tokens[:, None])), u[0].item()


def test_uniform_zero_and_one_pick_the_ends_of_the_allowed_set():
    logits = torch.tensor([[-torch.inf, 0.0, 1.0, 2.0, -torch.inf]], dtype=F64)
    assert sample_next_token(logits, uniform=torch.zeros(1, dtype=F64)).item() == 1
    assert sample_next_token(logits, uniform=torch.full((1,), 1 - 1e-16, dtype=F64)).item() == 3


def test_rows_with_and_without_cfg():
    logits = torch.randn(6, 10)
    assert sample_next_token(logits).shape == (6,)
    assert sample_next_token(logits, cfg_scale=1.5).shape == (3,)
    with pytest.raises(ValueError):
        sample_next_token(torch.randn(5, 10), cfg_scale=1.5)


def test_cfg_sampling_uses_guided_logits():
    """cond rows that strongly prefer token 2, uncond rows token 0: scale 0 follows uncond, 1 follows cond."""
    b, v = 50, 4
    cond = torch.full((b, v), -20.0)
    cond[:, 2] = 20
    uncond = torch.full((b, v), -20.0)
    uncond[:, 0] = 20
    logits = torch.cat([cond, uncond])
    assert torch.all(sample_next_token(logits, cfg_scale=0.0) == 0)
    assert torch.all(sample_next_token(logits, cfg_scale=1.0) == 2)
    assert torch.all(sample_next_token(logits, cfg_scale=3.0) == 2)


# ---- bad input ---------------------------------------------------------------------------------------

BAD_ARGS = [
    dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.1), dict(top_p=float("nan")),
    dict(top_k=-1), dict(top_k=2.0), dict(top_k=2.5),
    dict(cfg_scale=float("nan")), dict(cfg_scale=-1.0), dict(cfg_scale=float("inf")),
]


@pytest.mark.parametrize("bad", BAD_ARGS, ids=[str(b) for b in BAD_ARGS])
def test_bad_sampling_args(bad):
    name = next(iter(bad))
    args = dict(cfg_scale=None, temperature=1.0, top_k=0, top_p=1.0)
    check_sampling_args(**args)  # valid
    with pytest.raises(ValueError, match=name):
        check_sampling_args(**{**args, **bad})
    with pytest.raises(ValueError, match=name):
        sample_next_token(torch.randn(4, 10), **bad)


def test_valid_edge_args_accepted():
    check_sampling_args(0.0, 1e-6, 0, 1.0)
    check_sampling_args(None, 100.0, 10**6, 1e-9)
    sample_next_token(torch.randn(2, 10), cfg_scale=0.0, top_k=100, top_p=1.0)


@pytest.mark.parametrize("case", ["logits 1-D", "logits 3-D", "logits integer", "generator device",
                                  "uniform rows", "uniform dtype", "uniform on meta"])
def test_bad_tensors(case):
    logits, kw = torch.randn(4, 10), {}
    if case == "logits 1-D":
        logits = logits[0]
    elif case == "logits 3-D":
        logits = logits[None]
    elif case == "logits integer":
        logits = torch.ones(4, 10, dtype=torch.int64)
    elif case == "generator device":  # logits on another device type than the generator
        logits, kw = logits.to("meta"), dict(generator=torch.Generator(device="cpu"))
    elif case == "uniform rows":
        kw = dict(uniform=torch.rand(5))
    elif case == "uniform dtype":
        kw = dict(uniform=torch.rand(4).half())
    elif case == "uniform on meta":
        kw = dict(uniform=torch.rand(4, device="meta"))
    with pytest.raises((ValueError, TypeError), match="generator" if case == "generator device" else
                       case.split()[0]):
        sample_next_token(logits, **kw)


# ---- opcheck -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("guided,top_k,top_p,dtype", [
    (False, 0, 1.0, torch.float32), (True, 5, 0.9, torch.float32), (False, 3, 1.0, torch.float64),
    (True, 0, 0.5, torch.bfloat16)])
def test_sample_next_token_opcheck(guided, top_k, top_p, dtype):
    rows, v = 5, 37
    logits = torch.randn(rows * (2 if guided else 1), v).to(dtype)
    torch.library.opcheck(torch.ops.aim_kernels.sample_next_token.default,
                          (logits, 1.5 if guided else 0.0, 0.8, top_k, top_p, torch.rand(rows)))
