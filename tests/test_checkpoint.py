"""Official checkpoint format: load, save, round trip, and clear errors on bad files."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aim import AiM, AiMConfig, VQConfig
from aim.checkpoint import LM_HEAD

TINY_VQ = VQConfig(n_embed=32, embed_dim=8, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1)


def tiny_config(**overrides) -> AiMConfig:
    cfg = dict(d_model=64, n_layer=2, vocab_size=48, num_classes=4, num_tokens=4, num_groups=2,
               ssm_cfg={"layer": "Mamba2", "headdim": 16, "d_state": 8})
    return AiMConfig(**{**cfg, **overrides})


def write_official(directory, model: AiM, drop=(), extra=None, config=None, bin_format=False):
    """Write a checkpoint the way the official release does: config.json and a flat float32 state dict."""
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps((config or model.config).to_dict()))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
    state.update(extra or {})
    if bin_format:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, directory / "model.safetensors")
    return directory


def assert_same_weights(a: AiM, b: AiM):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("bin_format", [False, True])
def test_load_official_layout(tmp_path, with_head, bin_format):
    model = AiM(tiny_config(), vq_config=TINY_VQ)
    path = write_official(tmp_path / "ckpt", model, drop=() if with_head else (LM_HEAD,), bin_format=bin_format)
    loaded = AiM.from_pretrained(str(path))
    assert_same_weights(model, loaded)
    assert loaded.mamba.lm_head.weight is loaded.backbone.embeddings.word_embeddings.weight
    assert loaded.vqvae is not None and not loaded.training


def test_stage2_only_checkpoint_loads_without_tokenizer(tmp_path):
    model = AiM(tiny_config())
    loaded = AiM.from_pretrained(str(write_official(tmp_path / "ckpt", model)))
    assert loaded.vqvae is None
    with pytest.raises(ValueError, match="tokenizer"):
        loaded.generate(batch=1)


def test_untied_head_is_required_and_loaded(tmp_path):
    model = AiM(tiny_config(tie_embeddings=False))
    loaded = AiM.from_pretrained(str(write_official(tmp_path / "a", model)))
    assert torch.equal(loaded.mamba.lm_head.weight, model.mamba.lm_head.weight)
    with pytest.raises(ValueError, match="missing keys.*\n.*lm_head"):
        AiM.from_pretrained(str(write_official(tmp_path / "b", model, drop=(LM_HEAD,))))


def test_save_pretrained_round_trip(tmp_path):
    model = AiM(tiny_config(), vq_config=TINY_VQ)
    model.save_pretrained(str(tmp_path / "out"))
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert LM_HEAD not in saved and "vqvae.quantize.embedding.weight" in saved
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_groups"] == 2
    assert_same_weights(model, AiM.from_pretrained(str(tmp_path / "out")))


def test_dtype_and_device_arguments(tmp_path):
    path = write_official(tmp_path / "ckpt", AiM(tiny_config()))
    loaded = AiM.from_pretrained(str(path), device="cpu", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    model = AiM(tiny_config())
    bad_shape = {"mamba.backbone.norm_f.weight": torch.ones(65)}
    path = write_official(tmp_path / "ckpt", model, drop=("mamba.backbone.layers.1.mixer.D",),
                          extra={"mamba.backbone.surprise": torch.ones(1), **bad_shape})
    with pytest.raises(ValueError) as info:
        AiM.from_pretrained(str(path))
    message = str(info.value)
    assert "layers.1.mixer.D" in message and "surprise" in message and "norm_f.weight" in message
    assert "(64,)" in message and "(65,)" in message


def test_config_mismatching_the_weights(tmp_path):
    model = AiM(tiny_config())
    path = write_official(tmp_path / "ckpt", model, config=tiny_config(d_model=128))
    with pytest.raises(ValueError, match="mis-shaped"):
        AiM.from_pretrained(str(path))


def test_corrupt_files(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        AiM.from_pretrained(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        AiM.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(ValueError, match="model.safetensors"):
        AiM.from_pretrained(str(d))
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="could not be read"):
        AiM.from_pretrained(str(d))


def test_unknown_config_fields_warn(tmp_path):
    model = AiM(tiny_config())
    path = write_official(tmp_path / "ckpt", model)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MambaLMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="architectures"):
        AiM.from_pretrained(str(path))


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="local directory"):
        AiM.from_pretrained("hp-l33/aim-not-cached")


def test_not_a_path_nor_hub_id():
    with pytest.raises(ValueError, match="local directory"):
        AiM.from_pretrained("no/such/thing/here")


def test_official_generate_snippet_runs():
    """The official README's call, unchanged: images straight from the VQ decoder."""
    model = AiM(tiny_config(vocab_size=32), vq_config=TINY_VQ).eval()
    imgs = model.generate(batch=3, temperature=1, top_p=0.98, top_k=600, cfg_scale=5)
    assert imgs.shape == (3, 3, 4, 4) and torch.isfinite(imgs).all()
    labels = torch.tensor([[1], [2]])  # the official (B, 1) class tensor
    assert model.generate(c=labels, cfg_scale=1.5, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 4, 4)
