"""LlamaGen's VQ-f16 image tokenizer (stage 1 of AiM).

Reproduces the architecture and state-dict names of hp-l33/AiM models/stage1/vq_model.py (itself
LlamaGen's VQModel), so official checkpoints load strictly. Differences from the official code:
`ch` is honoured (the official code always used 128), only inference is provided (no losses,
no codebook-usage tracking), each GroupNorm with the SiLU after it is one op (aim_kernels.group_norm:
float32 statistics, a Triton kernel on the GPU), and the residual blocks and upsampling run their
convolutions without bias, adding it in the next op (the norm, or the residual add: aim_kernels.add_bias);
each nearest 2x upsampling + 3x3 convolution is one equal transposed convolution (see Upsample).
"""

import math
from dataclasses import dataclass
from os import PathLike
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from aim._graphs import cached_graph
from aim._state_dict import load_state_dict_strict
from aim.config import is_positive_int
from aim_kernels import add_bias, group_norm


@dataclass
class VQConfig:
    """Shape of the tokenizer; the defaults are LlamaGen's VQ-f16 (16384 codes of dim 8)."""

    n_embed: int = 16384
    embed_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("n_embed", "embed_dim", "z_channels", "ch", "num_res_blocks", "in_channels", "out_channels"):
            value = getattr(self, name)
            if not is_positive_int(value):
                raise ValueError(f"VQConfig.{name} must be a positive int, got {value!r}")
        self.ch_mult = tuple(self.ch_mult)
        if not self.ch_mult or not all(is_positive_int(m) for m in self.ch_mult):
            raise ValueError(f"VQConfig.ch_mult must be a non-empty sequence of positive ints, got {self.ch_mult!r}")
        # Every feature map width is ch * m (m = 1 at the encoder input) and goes through GroupNorm(32).
        for m in (1,) + self.ch_mult:
            if self.ch * m % 32:
                raise ValueError(
                    f"VQConfig: ch * ch_mult must be divisible by 32 (GroupNorm groups), "
                    f"got ch={self.ch}, ch_mult={self.ch_mult}"
                )


    @classmethod
    def from_state_dict(cls, state: dict, prefix: str = "") -> "VQConfig":
        """Infer the shape from a state dict's tensor shapes (official checkpoints store no VQ config)."""
        try:
            n_embed, embed_dim = state[prefix + "quantize.embedding.weight"].shape
            z_channels = state[prefix + "post_quant_conv.weight"].shape[0]
            out_channels, ch = state[prefix + "decoder.conv_out.weight"].shape[:2]
            in_channels = state[prefix + "encoder.conv_in.weight"].shape[1]
            levels = 1 + max(int(k[len(prefix):].split(".")[2]) for k in state
                             if k.startswith(prefix + "encoder.conv_blocks."))
            ch_mult = tuple(state[f"{prefix}encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch
                            for i in range(levels))
            num_res_blocks = 1 + max(int(k[len(prefix):].split(".")[4]) for k in state
                                     if k.startswith(prefix + "encoder.conv_blocks.0.res."))
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(f"cannot infer the VQ tokenizer's shape from the {prefix!r} weights: {e!r}") from None
        return cls(n_embed=n_embed, embed_dim=embed_dim, z_channels=z_channels, ch=ch, ch_mult=ch_mult,
                   num_res_blocks=num_res_blocks, in_channels=in_channels, out_channels=out_channels)


class Normalize(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-6), optionally followed by SiLU in the same op (aim_kernels.group_norm).

    An nn.GroupNorm, so parameter names and checkpoints are unchanged.
    """

    def __init__(self, channels: int):
        super().__init__(num_groups=32, num_channels=channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor, silu: bool = False, input_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """GroupNorm of x + input_bias (per channel: a convolution's bias not yet added), then SiLU."""
        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu, input_bias)


def conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) less conv.bias: the caller adds the bias in its next op (PyTorch's own bias pass is slow)."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = conv_without_bias(self.conv1, self.norm1(x, silu=True))
        h = conv_without_bias(self.conv2, self.norm2(h, silu=True, input_bias=self.conv1.bias))
        bias = self.conv2.bias
        if self.nin_shortcut is not None:
            x = conv_without_bias(self.nin_shortcut, x)
            bias = bias + self.nin_shortcut.bias
        return add_bias(h, bias, residual=x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (b, c, h, w) -> (b, 1, h*w, c): one head; SDPA's default scale is c**-0.5, as in the official code.
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(-1, -2).reshape(b, c, h, w)
        return add_bias(conv_without_bias(self.proj_out, y), self.proj_out.bias, residual=x)


# Row r of a 3x3 convolution (padding 1) over a nearest-2x-upsampled input reads input rows
# (r - 1) // 2, r // 2, (r + 1) // 2: even rows tap rows i-1 (k0) and i (k1 + k2), odd rows i (k0 + k1) and
# i+1 (k2). That is a 4x4 transposed convolution of stride 2 and padding 1 with taps [k2, k1+k2, k0+k1, k0]
# per axis: 2x2 instead of 3x3 products per output pixel, and no upsampled tensor in memory.
def _subpixel_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    k0, k1, k2 = weight.unbind(dim)
    return torch.stack((k2, k1 + k2, k0 + k1, k0), dim)


def upsample_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (C_in, C_out, 4, 4) transposed-convolution weight equal to nearest 2x upsampling then a
    (C_out, C_in, 3, 3) convolution with padding 1; the taps are summed in float32 (or float64)."""
    wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return _subpixel_taps(_subpixel_taps(wide, 2), 3).transpose(0, 1).to(weight.dtype)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # folded per call, not cached: a captured decode graph then follows in-place weight updates
        # (a few small kernels against a multi-millisecond decode)
        weight = upsample_conv_weight(self.conv.weight)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            weight = weight.contiguous(memory_format=torch.channels_last)
        return add_bias(F.conv_transpose2d(x, weight, None, stride=2, padding=1), self.conv.bias)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only), as in the official code.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _middle(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


class Encoder(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        ch, ch_mult, n_res = config.ch, config.ch_mult, config.num_res_blocks
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, padding=1)
        in_ch_mult = (1,) + ch_mult
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            block_in, block_out = ch * in_ch_mult[i], ch * mult
            level = nn.Module()
            level.res = nn.ModuleList(ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(n_res))
            # Attention only at the lowest resolution.
            level.attn = nn.ModuleList(AttnBlock(block_out) for _ in range(n_res) if last)
            if not last:
                level.downsample = Downsample(block_out)
            self.conv_blocks.append(level)
        block_in = ch * ch_mult[-1]
        self.mid = _middle(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(self.norm_out(h, silu=True))


class Decoder(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        ch, ch_mult, n_res = config.ch, config.ch_mult, config.num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _middle(block_in)
        # Levels from the lowest resolution up; conv_blocks[0] is the lowest.
        self.conv_blocks = nn.ModuleList()
        for k, mult in enumerate(reversed(ch_mult)):
            block_out = ch * mult
            level = nn.Module()
            level.res = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(n_res + 1)
            )
            level.attn = nn.ModuleList(AttnBlock(block_out) for _ in range(n_res + 1) if k == 0)
            if k != len(ch_mult) - 1:
                level.upsample = Upsample(block_out)
            self.conv_blocks.append(level)
            block_in = block_out
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out(h, silu=True))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in an L2-normalised codebook."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        # Unused; kept (persistent) because the official checkpoints contain it.
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) latents -> (B, h, w) int64 codes."""
        # The search runs in at least float32: in bfloat16 the distances of nearby codes collide.
        dtype = torch.promote_types(z.dtype, torch.float32)
        z = F.normalize(z.permute(0, 2, 3, 1).to(dtype), p=2, dim=-1)
        e = self.codebook().to(dtype)
        d = z.square().sum(-1, keepdim=True) + e.square().sum(-1) - 2 * z @ e.T
        return d.argmin(-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, embed_dim, h, w) codebook entries."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer: images in [-1, 1] <-> grids of codebook indices."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per code along each side (16 for VQ-f16)."""
        return 2 ** (len(self.config.ch_mult) - 1)

    @torch.no_grad()  # codes are integers: nothing to differentiate
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Tokenize images (B, in_channels, H, W) in [-1, 1] into int64 codes (B, H/f, W/f), f = downsample_factor.

        Runs in the model's dtype and device; codes are in raster order.
        """
        f, c = self.downsample_factor, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"images must have shape (B, {c}, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor in [-1, 1], got dtype {images.dtype}")
        h, w = images.shape[2:]
        if h == 0 or w == 0 or h % f or w % f:
            raise ValueError(f"image height and width must be positive multiples of {f}, got {h}x{w}")
        weight = self.quant_conv.weight
        z = self.quant_conv(self.encoder(images.to(device=weight.device, dtype=weight.dtype)))
        return self.quantize.nearest(z)

    def decode_code(self, codes: torch.Tensor, cuda_graph: bool = False) -> torch.Tensor:
        """Decode codes (B, h, w), or (B, h*w) with a square grid, into images (B, out_channels, h*f, w*f).

        The output is not clamped: callers clamp to [-1, 1]. Runs in the model's dtype and device.
        cuda_graph: on CUDA, replay a CUDA graph captured by the first call for this shape of codes (and
            captured again when the weights move): the decode then costs no per-op launches. Without
            gradients; the graph keeps the memory of the decode's activations.
        """
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.ndim == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"flat codes (B, n) need n to be a perfect square, got shape {tuple(codes.shape)}")
            codes = codes.reshape(codes.shape[0], side, side)
        if codes.ndim != 3 or codes.numel() == 0:
            raise ValueError(f"codes must have shape (B, h, w) or (B, h*w) and be non-empty, got {tuple(codes.shape)}")
        lo, hi, n = codes.min().item(), codes.max().item(), self.config.n_embed
        if lo < 0 or hi >= n:
            raise ValueError(f"codes must lie in [0, {n}), got values in [{lo}, {hi}]")
        codes = codes.to(device=self.post_quant_conv.weight.device, dtype=torch.long)
        if cuda_graph and codes.device.type == "cuda":
            return cached_graph(self, codes.shape, lambda: _DecodeGraph(self, codes.shape))(codes)
        return self._decode(codes)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        quant = self.quantize.lookup(codes).to(self.post_quant_conv.weight.dtype)
        if self.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last):  # a channels_last model
            quant = quant.contiguous(memory_format=torch.channels_last)
        # fixed shapes, called repeatedly: let cuDNN pick its fastest convolution algorithms
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False):
            return self.decoder(self.post_quant_conv(quant))

    @classmethod
    def from_llamagen_checkpoint(
        cls, path: Union[str, PathLike], config: Optional[VQConfig] = None
    ) -> "VQModel":
        """Load a standalone LlamaGen tokenizer checkpoint (e.g. vq_ds16_c2i.pt) in float32 on the CPU.

        The file holds {"model": state_dict} with official names and no `vqvae.` prefix.
        """
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or "model" not in checkpoint:
            found = list(checkpoint)[:20] if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise ValueError(f"{path}: not a LlamaGen VQ checkpoint: expected a dict with key 'model', found {found}")
        model = cls(config if config is not None else VQConfig())
        load_state_dict_strict(model, checkpoint["model"], f"LlamaGen VQ checkpoint {path}")
        return model.eval()


class _DecodeGraph:
    """VQModel._decode captured as one CUDA graph, for one shape of codes and fixed weights."""

    @torch.no_grad()
    def __init__(self, model: VQModel, shape: torch.Size):
        self.codes = torch.zeros(shape, dtype=torch.long, device=model.post_quant_conv.weight.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: cuDNN picks its algorithms, Triton compiles
            model._decode(self.codes)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.images = model._decode(self.codes)

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        self.codes.copy_(codes)
        self.graph.replay()
        return self.images.clone()
