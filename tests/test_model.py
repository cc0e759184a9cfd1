"""The AiM model against the official implementation's golden vectors (float64), presets, decode/forward
agreement and input validation."""
import copy
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from aim import AiM, AiMConfig
from aim._state_dict import load_state_dict_strict

DATA = pathlib.Path(__file__).parent / "data"
CASES = {name: case for name, case in json.loads((DATA / "index.json").read_text())["cases"].items()
         if name.startswith("lm_")}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err == err, "NaN in output"
    return err


def golden_model(name: str) -> tuple[AiM, dict]:
    data = load_file(DATA / CASES[name]["file"])
    model = AiM(AiMConfig.from_dict(CASES[name]["official_config"])).double().eval()
    weights = {k: v for k, v in data.items() if k.startswith("mamba.")}
    weights["mamba.lm_head.weight"] = weights["mamba.backbone.embeddings.word_embeddings.weight"]
    load_state_dict_strict(model, weights, name)
    model.tie_weights()
    return model, data


@pytest.fixture(scope="module", params=sorted(CASES))
def golden(request):
    model, data = golden_model(request.param)
    return request.param, model, data


def test_golden_train_logits(golden):
    name, model, data = golden
    logits = model(data["inputs.tokens"], data["inputs.labels"])
    assert logits.shape == data["expected.train_logits"].shape
    assert rel_err(logits, data["expected.train_logits"]) < 1e-6


def forms(model) -> list[str]:
    return ["state", "replay"] if model.config.layer == "Mamba2" else ["state"]


@pytest.mark.parametrize("form", ["state", "replay"])
def test_golden_decode_logits(golden, form):
    name, model, data = golden
    if form not in forms(model):
        pytest.skip("the replay form is Mamba2's")
    tokens, logits = model.generate_tokens(data["inputs.labels"], cfg_scale=CASES[name]["cfg_scale"],
                                           forced_tokens=data["inputs.tokens"], return_logits=True,
                                           decode_form=form)
    assert torch.equal(tokens, data["inputs.tokens"])
    assert rel_err(logits, data["expected.decode_logits"]) < 1e-6


@pytest.mark.parametrize("form", ["state", "replay"])
@pytest.mark.parametrize("convention,offset", [("official", 1), ("train", 0)])
def test_decode_equals_forward(golden, convention, offset, form):
    """Teacher-forced decoding (no guidance) equals the full-sequence forward with matching position ids."""
    name, model, data = golden
    if form not in forms(model):
        pytest.skip("the replay form is Mamba2's")
    tokens, labels = data["inputs.tokens"], data["inputs.labels"]
    _, logits = model.generate_tokens(labels, cfg_scale=1.0, forced_tokens=tokens, return_logits=True,
                                      decode_positions=convention, decode_form=form)
    n = model.config.num_tokens
    forward = model(tokens, labels, positions=torch.arange(offset, n - 1 + offset))
    assert rel_err(logits, forward) < 1e-12


def test_guided_decode_combines_cond_and_uncond(golden):
    name, model, data = golden
    tokens, labels = data["inputs.tokens"], data["inputs.labels"]
    null = torch.full_like(labels, model.config.num_classes)
    pos = torch.arange(1, model.config.num_tokens)
    cond, uncond = model(tokens, labels, positions=pos), model(tokens, null, positions=pos)
    _, guided = model.generate_tokens(labels, cfg_scale=3.0, forced_tokens=tokens, return_logits=True)
    assert rel_err(guided, uncond + (cond - uncond) * 3.0) < 1e-12


@pytest.mark.parametrize("preset,count", [("AiM-B", 147.62e6), ("AiM-L", 349.76e6), ("AiM-XL", 763.29e6)])
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):
        model = AiM(AiMConfig.from_preset(preset))
    assert round(model.num_params() / 1e4) == round(count / 1e4)


def test_aim_1b_preset_shape():
    with torch.device("meta"):
        model = AiM(AiMConfig.from_preset("AiM-1B"))
    assert model.config.d_model == 2048 and model.config.n_layer == 48
    assert 1.33e9 < model.num_params() < 1.35e9


def small_model(**overrides) -> AiM:
    cfg = dict(d_model=64, n_layer=2, vocab_size=64, num_classes=5, num_tokens=9, num_groups=2,
               ssm_cfg={"layer": "Mamba2", "headdim": 16, "d_state": 8, "chunk_size": 4})
    return AiM(AiMConfig(**{**cfg, **overrides})).double().eval()


def test_chain_decoder_steps_like_the_blocks():
    """ChainDecoder (every block in one op: on the CPU its reference) gives model.step's logits, so its packed
    layout, adaLN rows and gates mean what the blocks do; refresh follows weights changed in place."""
    from aim.model import ChainDecoder
    model = small_model(n_layer=3)
    torch.nn.init.normal_(model.backbone.adaln_group[-1].weight, std=0.02)  # zero at init: give adaLN signal
    cond = model.class_embedding(torch.tensor([1, model.config.num_classes]))
    mods, final_mod = model.conditioning(cond)
    chain, cache = ChainDecoder(model, 2), model.allocate_cache(2)
    model.reset_cache(cache)
    chain.reset()
    adaln, last_gate = chain.adaln(mods), mods[-1][:, 2]
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                for layer in model.backbone.layers:
                    layer.mixer.out_proj.weight.mul_(-1.5)
                    layer.mixer.D.add_(1.0)
                    layer.norm.weight.mul_(0.5)
            chain.refresh()
            adaln = chain.adaln(mods)  # the block norm weights are in it
        hidden = torch.randn(2, model.config.d_model, dtype=torch.float64)
        ref = model.step(hidden, cache, mods, final_mod)
        out = chain.step(hidden, adaln, last_gate, final_mod)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-12, step
    assert ChainDecoder(model, 2).pack is chain.pack  # one pack per model, shared by its decoders
    model.float()
    assert ChainDecoder(model, 2).pack is not chain.pack  # the weights moved: packed again


def test_sampled_generation_is_reproducible_and_in_range():
    model = small_model()
    labels = torch.tensor([0, 4, 2])
    a = model.generate_tokens(labels, cfg_scale=2.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate_tokens(labels, cfg_scale=2.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 9) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 64


def test_decode_forms_sample_the_same_tokens():
    model = small_model()
    labels = torch.tensor([0, 4, 2])
    runs = [model.generate_tokens(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(3), decode_form=f)
            for f in ("state", "replay")]
    assert torch.equal(*runs)


def test_auto_decode_form_falls_back_when_the_replay_history_does_not_fit(monkeypatch):
    """replay_history_bytes is what the replay cache allocates; "auto" takes the state form when that
    history would not fit in the device's free memory (AiM-XL fp32 at batch 256 on an 80 GB H100)."""
    from aim import generation
    model = small_model().float()
    rows = generation.REPLAY_MIN_ROWS
    cache = model.allocate_cache(rows, replay_step=torch.zeros((), dtype=torch.long))
    history = sum(t.nbytes for layer in cache for t in (layer.hist_x, layer.hist_B, layer.hist_dt, layer.hist_cum))
    assert generation.replay_history_bytes(model, rows) == history
    for free, replay in ((None, True), (10 * history + 2 ** 31, True), (history, False)):
        monkeypatch.setattr(generation, "free_device_bytes", lambda device, free=free: free)
        assert generation.replay_form(model, rows, torch.float32) is replay
        assert generation.replay_form(model, rows, torch.float32, "replay")  # an explicit form is kept
    assert not generation.replay_form(model, rows - 1, torch.float32)


@pytest.mark.parametrize("form,cfg_scale,batch,blocks", [("state", 2.0, 3, 2), ("replay", 2.0, 3, 4),
                                                          ("replay", 1.0, 5, 2), ("replay", 1.0, 2, 3)])
def test_steps_in_row_blocks_decode_the_same(monkeypatch, form, cfg_scale, batch, blocks):
    """Each step as row blocks (on CUDA, one stream each) updates the shared cache as the whole batch does:
    the same tokens and teacher-forced logits, uneven blocks and more blocks than rows included."""
    from aim import generation
    model = small_model()
    labels = torch.arange(batch) % 5
    forced = torch.randint(64, (batch, 9), generator=torch.Generator().manual_seed(2))

    def run():
        tokens = model.generate_tokens(labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(4),
                                       decode_form=form)
        _, logits = model.generate_tokens(labels, cfg_scale=cfg_scale, forced_tokens=forced, return_logits=True,
                                          decode_form=form)
        return tokens, logits

    whole = run()
    monkeypatch.setattr(generation, "row_streams", lambda *args: blocks)
    split = run()
    assert torch.equal(whole[0], split[0])
    assert torch.allclose(whole[1], split[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset,dtype,rows,streams", [
    ("AiM-B", torch.bfloat16, 2, 2), ("AiM-L", torch.bfloat16, 2, 1), ("AiM-L", torch.bfloat16, 4, 2),
    ("AiM-B", torch.float32, 2, 1), ("AiM-XL", torch.bfloat16, 2, 1), ("AiM-B", torch.bfloat16, 1, 1),
    ("AiM-B", torch.bfloat16, 8, 2), ("AiM-B", torch.bfloat16, 16, 1)])
def test_row_streams_only_where_measured_faster(preset, dtype, rows, streams):
    """2-8 rows split over two streams, only on CUDA and while a block's weights are small (smaller at 2 rows)."""
    from aim import generation
    with torch.device("meta"):
        model = AiM(AiMConfig.from_preset(preset)).to(dtype)
    assert generation.row_streams(model, rows, torch.device("cuda")) == streams
    assert generation.row_streams(model, rows, torch.device("cpu")) == 1


def test_generation_respects_top_k():
    """Every sampled token is among the top-k guided logits of its step (teacher-forced replay)."""
    model = small_model()
    labels = torch.tensor([1, 3])
    tokens = model.generate_tokens(labels, cfg_scale=1.5, top_k=3, generator=torch.Generator().manual_seed(0))
    _, logits = model.generate_tokens(labels, cfg_scale=1.5, forced_tokens=tokens, return_logits=True)
    kth = logits.topk(3, dim=-1).values[..., -1]
    assert (logits.gather(-1, tokens[..., None])[..., 0] >= kth).all()


def test_label_dropout_only_in_training():
    model = small_model()
    tokens, labels = torch.randint(64, (64, 9)), torch.zeros(64, dtype=torch.long)
    assert torch.equal(model(tokens, labels), model(tokens, labels))
    model.train()
    torch.manual_seed(0)
    out = model(tokens, labels)
    null = model(tokens, torch.full_like(labels, 5)).detach()
    dropped = [(out[i] - null[i]).abs().max() < 1e-12 for i in range(64)]
    assert 0 < sum(dropped) < 64  # p = 0.1: some rows dropped, most kept


def test_mamba1_small_decode_equals_forward():
    model = small_model(ssm_cfg={"layer": "Mamba1", "d_state": 4})
    tokens, labels = torch.randint(64, (2, 9)), torch.tensor([1, 2])
    _, logits = model.generate_tokens(labels, cfg_scale=1.0, forced_tokens=tokens, return_logits=True,
                                      decode_positions="train")
    assert rel_err(logits, model(tokens, labels)) < 1e-12


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=[5]), "labels"),
    (dict(labels=[-1]), "labels"),
    (dict(labels=[0.5]), "labels"),
    (dict(labels=[0], cfg_scale=float("nan")), "cfg_scale"),
    (dict(labels=[0], temperature=0.0), "temperature"),
    (dict(labels=[0], top_p=0.0), "top_p"),
    (dict(labels=[0], top_p=1.5), "top_p"),
    (dict(labels=[0], top_k=-1), "top_k"),
    (dict(labels=[0], decode_positions="shifted"), "decode_positions"),
    (dict(labels=[0], decode_form="chunked"), "decode_form"),
    (dict(labels=[0], forced_tokens=torch.zeros(1, 8, dtype=torch.long)), "forced_tokens"),
    (dict(labels=[0], forced_tokens=torch.full((1, 9), 64)), "forced_tokens"),
])
def test_generate_tokens_rejects_bad_input(kwargs, match):
    model = small_model()
    with pytest.raises(ValueError, match=match):
        model.generate_tokens(**kwargs)


@pytest.mark.parametrize("tokens,labels,match", [
    (torch.zeros(2, 8, dtype=torch.long), [0, 1], "tokens"),
    (torch.full((2, 9), 64), [0, 1], "tokens"),
    (torch.zeros(2, 9), [0, 1], "tokens"),
    (torch.zeros(2, 9, dtype=torch.long), [0, 9], "labels"),
    (torch.zeros(2, 9, dtype=torch.long), [0], "labels"),
])
def test_forward_rejects_bad_input(tokens, labels, match):
    with pytest.raises(ValueError, match=match):
        small_model()(tokens, torch.tensor(labels))


@pytest.mark.parametrize("overrides,match", [
    (dict(d_intermediate=512), "d_intermediate"),
    (dict(attn_layer_idx=[1]), "attn_layer_idx"),
    (dict(ssm_cfg={"layer": "Mamba3"}), "Mamba3"),
    (dict(ssm_cfg={"layer": "Mamba2", "headdim": 48}), "headdim"),
    (dict(d_model=0), "d_model"),
])
def test_config_rejects_unsupported(overrides, match):
    with pytest.raises(ValueError, match=match):
        AiMConfig(**overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="AiM-B"):
        AiMConfig.from_preset("AiM-Huge")


def test_bf16_state_logit_error_is_small():
    """The bf16 SSM-state option (recurrent form): logit error against float64, teacher-forced.

    Measured (AiM-B width, 4 layers, random weights with non-zero adaLN, 256 tokens, CFG 1.75, fp32
    weights, reference ops): fp32 state 5.1e-7, bf16 state 6.1e-5 relative error (README, Precision).
    """
    torch.manual_seed(0)
    model = AiM(AiMConfig.from_preset("AiM-B", n_layer=2, num_tokens=64)).eval()
    for layer in model.backbone.layers:
        torch.nn.init.normal_(layer.adaLN_modulation[-1].weight, std=0.02)
    labels, tokens = torch.tensor([3, 999]), torch.randint(16384, (2, 64))
    _, ref = copy.deepcopy(model).double().generate_tokens(labels, cfg_scale=1.75, forced_tokens=tokens,
                                                          return_logits=True)
    errors = {}
    for state_dtype in (torch.float32, torch.bfloat16):
        _, logits = model.generate_tokens(labels, cfg_scale=1.75, forced_tokens=tokens, return_logits=True,
                                          state_dtype=state_dtype, decode_form="state")
        errors[state_dtype] = rel_err(logits, ref)
    assert errors[torch.float32] < 1e-5 and errors[torch.bfloat16] < 1e-3
