"""Generation on the GPU: the fast path (fused kernels, CUDA graphs) against the float64 reference."""
import copy

import pytest
import torch

from aim import AiM, AiMConfig

pytestmark = pytest.mark.gpu


def rel_err(out, ref) -> float:
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err == err, "NaN in output"
    return err


def few_layers(n_layer: int, preset: str = "AiM-B", **overrides) -> AiM:
    """A preset's width with fewer layers: the real kernel shapes at test cost."""
    torch.manual_seed(0)
    model = AiM(AiMConfig.from_preset(preset, n_layer=n_layer, **overrides))
    adaln = [model.backbone.adaln_group] if model.config.adaln_group else \
        [layer.adaLN_modulation for layer in model.backbone.layers]
    for mod in adaln:  # the official init zeroes adaLN: give it signal to test
        torch.nn.init.normal_(mod[-1].weight, std=0.02)
    torch.nn.init.normal_(model.backbone.final_layer.adaLN_modulation[-1].weight, std=0.02)
    return model.eval()


# 2 rows: bf16 decodes on two streams (aim.generation.row_streams); 6 / 10: GEMV / GEMM (float32) projections
@pytest.fixture(scope="module", params=[1, 3, 5], ids=["2rows", "6rows", "10rows"])
def reference_and_inputs(request):
    model = few_layers(4)
    labels = torch.tensor([3, 999, 512, 7, 0][:request.param])
    tokens = torch.randint(model.config.vocab_size, (len(labels), model.config.num_tokens))
    ref64 = copy.deepcopy(model).double().cuda()
    _, logits = ref64.generate_tokens(labels, cfg_scale=1.75, forced_tokens=tokens, return_logits=True)
    return model, labels, tokens, logits


# "auto" at 2 rows in bf16: every block in one kernel (aim.generation.chain_decoder) where it runs (float32 at
# AiM-B's width steps block by block: test_chain_kernel_float32_matches_float64 covers the chain in float32)
@pytest.mark.parametrize("form", ["state", "replay", "auto"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_teacher_forced_decode_matches_float64(reference_and_inputs, dtype, tol, form):
    model, labels, tokens, ref = reference_and_inputs
    fast = copy.deepcopy(model).to("cuda", dtype)
    _, logits = fast.generate_tokens(labels, cfg_scale=1.75, forced_tokens=tokens, return_logits=True,
                                     decode_form=form)
    assert rel_err(logits, ref) < tol
    if dtype == torch.float32:
        agree = (logits.argmax(-1) == ref.argmax(-1)).double().mean().item()
        assert agree >= 0.999


@pytest.mark.parametrize("batch", [1, 5, 17])  # 2 rows: two streams in bf16; 10: state form; 34: replay form
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager(dtype, batch):
    model = few_layers(3).to("cuda", dtype)
    labels = torch.arange(batch, device="cuda")

    def run(cuda_graph):
        g = torch.Generator("cuda").manual_seed(7)
        return model.generate_tokens(labels, cfg_scale=2.0, top_k=100, top_p=0.95, generator=g,
                                     cuda_graph=cuda_graph)

    eager, graphed, again = run(False), run(True), run(True)  # the second graph call replays the capture
    assert torch.equal(graphed, again)
    assert (eager == graphed).double().mean().item() > 0.99  # same kernels; allow a rare near-tie flip


@pytest.mark.parametrize("batch,dtype,tol", [(1, torch.bfloat16, 1e-2), (17, torch.float32, 1e-5)])
def test_steps_in_row_blocks_on_streams_match_one_stream(monkeypatch, batch, dtype, tol):
    """Each step as two row blocks on two CUDA streams (2 rows: 1 + 1; 34 rows: 17 + 17, replay form) gives
    the teacher-forced logits of the whole-batch step."""
    from aim import generation
    model = few_layers(3).to("cuda", dtype)
    labels = torch.arange(batch, device="cuda")
    tokens = torch.randint(model.config.vocab_size, (batch, model.config.num_tokens), device="cuda")

    def logits():  # "state": block by block (at 2 rows "auto" may run every block in one kernel, on one stream)
        return model.generate_tokens(labels, cfg_scale=2.0, forced_tokens=tokens, return_logits=True,
                                     decode_form="state")[1]

    monkeypatch.setattr(generation, "row_streams", lambda *args: 2)
    two_streams = logits()
    monkeypatch.setattr(generation, "row_streams", lambda *args: 1)
    one_stream = logits()
    assert rel_err(two_streams, one_stream) < tol


def test_chain_kernel_matches_blocks_and_follows_weight_updates():
    """At batch 1 in bf16 the whole-chain kernel decodes (where it runs): its teacher-forced logits match the
    block-by-block state form, and a captured generation re-packs weights changed in place since."""
    from aim import generation
    model = few_layers(3).to("cuda", torch.bfloat16)
    if generation.chain_decoder(model, 2, torch.float32) is None:
        pytest.skip("the chain kernel does not run on this GPU")
    labels = torch.tensor([5], device="cuda")
    tokens = torch.randint(model.config.vocab_size, (1, model.config.num_tokens), device="cuda")

    def logits(form):
        return model.generate_tokens(labels, cfg_scale=2.0, forced_tokens=tokens, return_logits=True,
                                     decode_form=form)[1]

    assert rel_err(logits("auto"), logits("state")) < 1e-2

    def sample(cuda_graph):
        g = torch.Generator("cuda").manual_seed(3)
        return model.generate_tokens(labels, cfg_scale=2.0, generator=g, cuda_graph=cuda_graph)

    before = sample(True)  # captures the graph
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.out_proj.weight.mul_(-1.5)
            layer.mixer.D.add_(1.0)
    graphed, eager = sample(True), sample(False)
    assert (graphed == eager).double().mean().item() > 0.99
    assert (graphed != before).double().mean().item() > 0.5


def test_chain_kernel_float32_matches_float64():
    """float32 weights through the whole-chain kernel ("auto" takes it from d_model 1024, AiM-L's width):
    teacher-forced logits within 1e-4 of float64, the per-step argmax the reference's at >= 99.9% of steps."""
    from aim import generation
    model = few_layers(3, "AiM-L")
    fast = copy.deepcopy(model).to("cuda", torch.float32)
    if generation.chain_decoder(fast, 2, torch.float32) is None:
        pytest.skip("the chain kernel does not run on this GPU")
    labels = torch.tensor([11])
    tokens = torch.randint(model.config.vocab_size, (1, model.config.num_tokens))
    _, ref = copy.deepcopy(model).double().cuda().generate_tokens(labels, cfg_scale=1.75, forced_tokens=tokens,
                                                                  return_logits=True)
    _, logits = fast.generate_tokens(labels, cfg_scale=1.75, forced_tokens=tokens, return_logits=True)
    assert rel_err(logits, ref) < 1e-4
    assert (logits.argmax(-1) == ref.argmax(-1)).double().mean().item() >= 0.999


def test_graph_is_recaptured_when_weights_move():
    model = few_layers(2).cuda()
    labels = torch.tensor([0], device="cuda")
    model.generate_tokens(labels)
    (first,) = model._cuda_graphs.values()
    model.generate_tokens(labels)
    assert model._cuda_graphs[next(iter(model._cuda_graphs))] is first  # replayed, not captured again
    model.to(torch.bfloat16)
    model.generate_tokens(labels)
    (second,) = model._cuda_graphs.values()
    assert second[1] is not first[1]


@pytest.mark.parametrize("preset,batches", [("AiM-B", (1, 256)), ("AiM-L", (1, 16)), ("AiM-XL", (1, 64)),
                                            ("AiM-1B", (1,))])
def test_every_preset_generates(preset, batches):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AiM(AiMConfig.from_preset(preset)).to(torch.bfloat16).eval()
    for batch in batches:
        tokens = model.generate_tokens(torch.randint(1000, (batch,), device="cuda"), cfg_scale=1.5)
        assert tokens.shape == (batch, 256) and tokens.min() >= 0 and tokens.max() < 16384
    del model
    torch.cuda.empty_cache()


def test_mamba1_decode_on_gpu_matches_float64():
    torch.manual_seed(0)
    model = AiM(AiMConfig(d_model=256, n_layer=3, ssm_cfg={"layer": "Mamba1"})).eval()
    labels, tokens = torch.tensor([5, 7]), torch.randint(16384, (2, 256))
    _, ref = copy.deepcopy(model).double().cuda().generate_tokens(labels, forced_tokens=tokens, return_logits=True)
    _, logits = model.cuda().generate_tokens(labels, forced_tokens=tokens, return_logits=True)
    assert rel_err(logits, ref) < 1e-4
    sampled = model.generate_tokens(labels)  # the graphed sampling path runs Mamba1 too
    assert sampled.shape == (2, 256)
