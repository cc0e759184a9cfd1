"""embed_step and record_token: references against plain PyTorch indexing, the Triton kernels (interpreter on
the CPU, compiled on a GPU) against the references with poisoned outputs, opcheck, argument checks."""
import pytest
import torch

import aim_kernels as ak
from aim_kernels import _triton
from aim_kernels import decode_loop as dl

needs_triton = pytest.mark.skipif(bool(_triton.reasons()), reason="; ".join(_triton.reasons()))
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU tests cover CUDA)")


def make_case(batch, rows, d, vocab, positions, T, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(rows, d, generator=g).to(dtype)
    word = torch.randn(vocab, d, generator=g).to(dtype)
    pos = torch.randn(positions, d, generator=g).to(dtype)
    tokens = torch.randint(vocab, (batch, T), generator=g)
    return [t.to(device) for t in (cond, word, pos, tokens)]


def expected_input(cond, word, pos, tokens, k, offset):
    if k == 0:
        return cond.clone()
    batch = tokens.shape[0]
    rows = torch.arange(cond.shape[0])
    return word[tokens[rows % batch, k - 1].to(word.device)] + pos[k - offset]


@pytest.mark.parametrize("k", [0, 1, 6])
@pytest.mark.parametrize("offset", [0, 1])
def test_embed_step_ref(k, offset):
    cond, word, pos, tokens = make_case(3, 6, 37, 50, 9, 8, torch.float32)
    out = ak.embed_step(cond, word, pos, tokens, torch.tensor(k), offset)
    torch.testing.assert_close(out, expected_input(cond, word, pos, tokens, k, offset), rtol=0, atol=0)


@pytest.mark.parametrize("step", [0, 5])
def test_record_token_ref(step):
    tokens = torch.full((3, 8), -1)
    token, s = torch.tensor([4, 0, 9]), torch.tensor(step)
    ak.record_token(token, tokens, s)
    assert s.item() == step + 1
    assert tokens[:, step].tolist() == [4, 0, 9] and (tokens[:, :step] == -1).all() and (tokens[:, step + 1:] == -1).all()


@needs_triton
@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,rows,d", [(1, 1, 8), (3, 6, 37), (2, 4, 1030)])
@pytest.mark.parametrize("k,offset", [(0, 0), (1, 0), (7, 0), (7, 1)])
def test_embed_step_triton_interpreter(dtype, batch, rows, d, k, offset, monkeypatch):
    alloc = dl._alloc_output
    monkeypatch.setattr(dl, "_alloc_output", lambda cond: alloc(cond).fill_(float("nan")))
    cond, word, pos, tokens = make_case(batch, rows, d, 50, 9, 8, dtype, seed=k + d)
    step = torch.tensor(k)
    out = dl.embed_step_triton(cond, word, pos, tokens, step, offset)
    # one rounding of a float32 sum, as the reference's add: bitwise equal
    torch.testing.assert_close(out, dl.embed_step_ref(cond, word, pos, tokens, step, offset), rtol=0, atol=0)


@needs_triton
@interpreter_only
@pytest.mark.parametrize("batch", [1, 5, 300])
def test_record_token_triton_interpreter(batch):
    tokens = torch.full((batch, 6), -1)
    token = torch.randint(100, (batch,))
    step = torch.tensor(4)
    expect = tokens.clone()
    expect[:, 4] = token
    dl.record_token_triton(token, tokens, step)
    assert step.item() == 5
    assert torch.equal(tokens, expect)


@needs_triton
@interpreter_only
def test_bad_tokens_and_steps_stay_in_bounds():
    """Out-of-range token ids and positions are clamped as the reference clamps them; a step past T records
    nothing (no out-of-bounds access on the GPU)."""
    cond, word, pos, tokens = make_case(2, 4, 16, 20, 5, 6, torch.float32)
    tokens[0, 2], tokens[1, 2] = -3, 99
    for k in (3, 6):  # position k = 6 is past pos's 5 rows
        step = torch.tensor(k)
        out = dl.embed_step_triton(cond, word, pos, tokens, step, 0)
        torch.testing.assert_close(out, dl.embed_step_ref(cond, word, pos, tokens, step, 0), rtol=0, atol=0)
    before, step = tokens.clone(), torch.tensor(6)
    dl.record_token_triton(torch.tensor([1, 2]), tokens, step)
    assert torch.equal(tokens, before) and step.item() == 7


def test_opcheck():
    cond, word, pos, tokens = make_case(2, 4, 16, 20, 5, 6, torch.float32)
    torch.library.opcheck(torch.ops.aim_kernels.embed_step.default, (cond, word, pos, tokens, torch.tensor(3), 1))
    torch.library.opcheck(torch.ops.aim_kernels.record_token.default, (tokens[:, 0].clone(), tokens, torch.tensor(2)))


@pytest.mark.parametrize("call,error,match", [
    (lambda c, w, p, t, s: ak.embed_step(c[0], w, p, t, s), ValueError, r"cond must be \(rows, d\)"),
    (lambda c, w, p, t, s: ak.embed_step(c, w[:, :3], p, t, s), ValueError, "word_weight must have shape"),
    (lambda c, w, p, t, s: ak.embed_step(c, w.double(), p, t, s), TypeError, "word_weight must have dtype"),
    (lambda c, w, p, t, s: ak.embed_step(c, w, p, t.int(), s), TypeError, "tokens must have dtype"),
    (lambda c, w, p, t, s: ak.embed_step(c[:3], w, p, t, s), ValueError, "multiple of the batch"),
    (lambda c, w, p, t, s: ak.embed_step(c, w, p, t, s.view(1)), ValueError, r"step must have shape \(\)"),
    (lambda c, w, p, t, s: ak.embed_step(c, w, p, t, s, 2), ValueError, "position_offset must be 0 or 1"),
    (lambda c, w, p, t, s: ak.record_token(t[:, 0], t[0], s), ValueError, r"tokens must be \(batch, T\)"),
    (lambda c, w, p, t, s: ak.record_token(t[:1, 0], t, s), ValueError, "token must have shape"),
    (lambda c, w, p, t, s: ak.record_token(t[:, 0], t, s.float()), TypeError, "step must have dtype"),
])
def test_argument_checks(call, error, match):
    cond, word, pos, tokens = make_case(2, 4, 16, 20, 5, 6, torch.float32)
    with pytest.raises(error, match=match):
        call(cond, word, pos, tokens, torch.tensor(1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda_graph"])
def test_gpu_steps(dtype, graphed):
    """Both ops over 6 steps, eagerly (compute-sanitizer runs this one) or replayed from one captured
    CUDA graph, against the references step by step."""
    batch, rows, d, T = 3, 6, 1030, 6
    cond, word, pos, tokens = make_case(batch, rows, d, 50, 9, T, dtype, device="cuda")
    sampled = torch.randint(50, (T, batch), device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    inputs = torch.empty(T, rows, d, dtype=dtype, device="cuda")
    ref_tokens, ref_step = tokens.clone(), step.clone()
    expected = []
    for k in range(T):
        expected.append(dl.embed_step_ref(cond, word, pos, ref_tokens, ref_step, 1))
        dl.record_token_ref(sampled[k], ref_tokens, ref_step)

    def run():
        for k in range(T):
            inputs[k].copy_(ak.embed_step(cond, word, pos, tokens, step, 1))
            ak.record_token(sampled[k], tokens, step)

    if graphed:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # warm-up: compiles
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        step.zero_()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    step.zero_()
    inputs.fill_(float("nan"))
    run()
    torch.cuda.synchronize()
    assert step.item() == T and torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(inputs, torch.stack(expected), rtol=0, atol=0)
