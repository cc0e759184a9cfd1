import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from aim._state_dict import load_state_dict_strict
from aim.vq import Upsample, VQConfig, VQModel

GOLDEN = Path(__file__).parent / "data" / "vq_decoder.safetensors"
# The config of the golden case (see tests/data/index.json, case "vq_decoder").
SMALL = dict(n_embed=64, embed_dim=8, z_channels=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


def rel_err(out: torch.Tensor, exp: torch.Tensor) -> float:
    err = ((out.double() - exp.double()).norm() / exp.double().norm()).item()
    return err if err == err else float("inf")  # NaN must fail the comparison


def golden_model() -> tuple[VQModel, dict]:
    """Small VQModel in float64 with the golden decoder-side weights (the file has no encoder)."""
    tensors = load_file(GOLDEN)
    model = VQModel(VQConfig(**SMALL)).double()
    for name in ("decoder", "quantize", "post_quant_conv"):
        prefix = f"vqvae.{name}."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_state_dict_strict(getattr(model, name), sub, f"golden {name}")
    return model, tensors


def small_model(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(VQConfig(**SMALL)).double().eval()


def test_golden_decode():
    model, tensors = golden_model()
    with torch.no_grad():
        out = model.decode_code(tensors["inputs.codes"])
    exp = tensors["expected.images"]
    assert out.shape == exp.shape == (2, 3, 16, 16)
    assert out.dtype == torch.float64
    assert rel_err(out, exp) < 1e-6


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c_in,h,w", [(3, 5, 7), (8, 4, 4), (5, 1, 9)])
def test_upsample_is_nearest_then_conv(c_in, h, w, channels_last):
    """The transposed-convolution Upsample equals the official nearest 2x upsampling + 3x3 convolution."""
    torch.manual_seed(c_in * h + w)
    up = Upsample(c_in).double()
    x = torch.randn(2, c_in, h, w, dtype=torch.float64)
    ref = up.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = torch.full_like(ref, float("nan"))
    out.copy_(up(x))
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-13


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_matches_eager(dtype):
    model = small_model().to(device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for seed in (1, 2):  # the second call replays the graph on new codes
        codes = torch.randint(0, model.config.n_embed, (3, 4, 4), device="cuda",
                              generator=torch.Generator("cuda").manual_seed(seed))
        eager = model.decode_code(codes)
        assert rel_err(model.decode_code(codes, cuda_graph=True), eager) < tol
    assert len(model._cuda_graphs) == 1
    model.to(torch.float64)  # the weights move: captured again
    assert rel_err(model.decode_code(codes, cuda_graph=True), model.decode_code(codes)) < 1e-12


def test_cuda_graph_decode_on_cpu_is_eager():
    model = small_model()
    codes = torch.randint(0, model.config.n_embed, (2, 4, 4))
    assert rel_err(model.decode_code(codes, cuda_graph=True), model.decode_code(codes)) == 0


def test_decode_flat_codes_match_grid():
    model, tensors = golden_model()
    codes = tensors["inputs.codes"]
    with torch.no_grad():
        grid = model.decode_code(codes)
        flat = model.decode_code(codes.reshape(2, 16).to(torch.int32))
    torch.testing.assert_close(flat, grid, rtol=0, atol=0)


def test_rel_err_fails_on_nan():
    exp = torch.ones(4, dtype=torch.float64)
    assert not rel_err(torch.full_like(exp, float("nan")), exp) < 1e-6


def test_encode_picks_nearest_normalised_code():
    model = small_model()
    torch.manual_seed(1)
    images = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 64

    with torch.no_grad():
        z = model.quant_conv(model.encoder(images))
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    e = F.normalize(model.quantize.embedding.weight, dim=-1)
    brute = torch.cdist(z, e).argmin(-1).reshape(3, 4, 4)
    assert torch.equal(codes, brute)
    assert codes.unique().numel() > 1  # not a degenerate test

    with torch.no_grad():
        images_out = model.decode_code(codes)
    assert images_out.shape == images.shape


def test_default_config_structure():
    config = VQConfig()
    with torch.device("meta"):  # no memory, no init: only the structure
        model = VQModel(config)
    assert model.downsample_factor == 16
    assert len(model.decoder.conv_blocks[0].attn) == 3
    assert len(model.encoder.conv_blocks[4].attn) == 2
    assert all(len(model.encoder.conv_blocks[i].attn) == 0 for i in range(4))
    assert all(len(model.decoder.conv_blocks[k].attn) == 0 for k in range(1, 5))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["quantize.embedding.weight"] == (16384, 8)
    assert shapes["quantize.codebook_used"] == (65536,)
    assert shapes["quant_conv.weight"] == (8, 256, 1, 1)
    assert shapes["post_quant_conv.weight"] == (256, 8, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["decoder.conv_blocks.3.res.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    # LlamaGen lists vq_ds16_c2i at 72M parameters.
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 72


def test_default_ch_mult_encodes_256_to_16x16():
    torch.manual_seed(0)
    model = VQModel(VQConfig(ch=32)).eval()
    images = torch.rand(1, 3, 256, 256) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (1, 16, 16) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 16384


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_embed=0), "n_embed"),
        (dict(ch=32.0), "ch must be a positive int"),
        (dict(num_res_blocks=True), "num_res_blocks"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(ch_mult=(1, -2)), "ch_mult"),
        (dict(ch=48), "divisible by 32"),
        (dict(ch=16, ch_mult=(2, 4)), "divisible by 32"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VQConfig(**kwargs)


def test_config_accepts_list_ch_mult():
    assert VQConfig(ch_mult=[1, 2]).ch_mult == (1, 2)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(3, 16, 16, dtype=torch.float64), r"shape \(B, 3, H, W\)"),
        (torch.zeros(1, 4, 16, 16, dtype=torch.float64), r"shape \(B, 3, H, W\)"),
        (torch.zeros(1, 3, 16, 14, dtype=torch.float64), "multiples of 4"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "floating-point"),
    ],
)
def test_encode_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        small_model().encode(images)


@pytest.mark.parametrize(
    "codes, match",
    [
        (torch.zeros(1, 4, 4), "integer tensor"),
        (torch.zeros(1, 4, 4, dtype=torch.bool), "integer tensor"),
        (torch.full((1, 4, 4), 64), r"\[0, 64\), got values in \[64, 64\]"),
        (torch.tensor([[[-1, 3], [5, 7]]]), r"\[0, 64\), got values in \[-1, 7\]"),
        (torch.zeros(1, 15, dtype=torch.long), "perfect square"),
        (torch.zeros(16, dtype=torch.long), r"\(B, h, w\) or \(B, h\*w\)"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.long), r"\(B, h, w\) or \(B, h\*w\)"),
        (torch.zeros(0, 4, 4, dtype=torch.long), "non-empty"),
    ],
)
def test_decode_rejects_bad_codes(codes, match):
    with pytest.raises(ValueError, match=match):
        small_model().decode_code(codes)


def save_checkpoint(tmp_path: Path, obj) -> Path:
    path = tmp_path / "vq.pt"
    torch.save(obj, path)
    return path


def test_from_llamagen_checkpoint_roundtrip(tmp_path):
    model = small_model()
    path = save_checkpoint(tmp_path, {"model": model.state_dict()})
    loaded = VQModel.from_llamagen_checkpoint(path, VQConfig(**SMALL))
    assert loaded.quant_conv.weight.dtype == torch.float32  # values cast to the new model's dtype
    codes = torch.randint(0, 64, (2, 4, 4))
    with torch.no_grad():
        assert rel_err(loaded.double().decode_code(codes), model.decode_code(codes)) == 0


def corrupt(state_dict: dict, kind: str) -> dict:
    sd = dict(state_dict)
    if kind == "missing":
        del sd["decoder.conv_out.bias"]
    elif kind == "unexpected":
        sd["decoder.extra.weight"] = torch.zeros(1)
    elif kind == "misshaped":
        sd["quantize.embedding.weight"] = torch.zeros(32, 8)
    return sd


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", r"missing keys \(1\):\n    decoder\.conv_out\.bias"),
        ("unexpected", r"unexpected keys \(1\):\n    decoder\.extra\.weight"),
        ("misshaped", r"quantize\.embedding\.weight: expected shape \(64, 8\), got \(32, 8\)"),
    ],
)
def test_from_llamagen_checkpoint_rejects_corrupt(tmp_path, kind, match):
    sd = corrupt(small_model().state_dict(), kind)
    path = save_checkpoint(tmp_path, {"model": sd})
    with pytest.raises(ValueError, match=match):
        VQModel.from_llamagen_checkpoint(path, VQConfig(**SMALL))


def test_from_llamagen_checkpoint_requires_model_key(tmp_path):
    path = save_checkpoint(tmp_path, {"state_dict": small_model().state_dict()})
    with pytest.raises(ValueError, match="key 'model'"):
        VQModel.from_llamagen_checkpoint(path, VQConfig(**SMALL))


def test_load_state_dict_strict_truncates_long_lists():
    model = small_model()
    sd = {f"junk.{i}": torch.zeros(1) for i in range(30)}
    with pytest.raises(ValueError) as info:
        load_state_dict_strict(model, sd, "test")
    message = str(info.value)
    n_keys = len(model.state_dict())
    assert f"missing keys ({n_keys})" in message and f"... and {n_keys - 20} more" in message
    assert "unexpected keys (30)" in message and "... and 10 more" in message


def test_bf16_decode_close_to_float64():
    model, tensors = golden_model()
    codes = tensors["inputs.codes"]
    with torch.no_grad():
        ref = model.decode_code(codes)
        out = copy.deepcopy(model).to(torch.bfloat16).decode_code(codes)
    assert out.dtype == torch.bfloat16
    # Rounding these random weights to bf16 alone costs 1.3e-2; end to end it measures 2.1e-2.
    assert rel_err(out, ref) < 3e-2


def test_float32_and_channels_last_encode():
    model = small_model().float()
    torch.manual_seed(2)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(images)
    assert torch.equal(model.encode(images.to(memory_format=torch.channels_last)), codes)
    # float64 input runs in the model's dtype
    assert torch.equal(model.encode(images.double()), codes)
