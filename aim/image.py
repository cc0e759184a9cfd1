"""Images out: decoder output -> uint8, a grid, and a PNG file (zlib only, no imaging library)."""
from __future__ import annotations

import math
import struct
import zlib

import torch
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """Decoder output (B, 3, H, W) about [-1, 1] -> uint8 (B, H, W, 3): clamp, (x + 1) / 2, round."""
    x = (images.detach().float().clamp(-1, 1) + 1) / 2
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def make_grid(images: Tensor, nrow: int = 0, pad: int = 2) -> Tensor:
    """uint8 (B, H, W, 3) -> one uint8 image (rows*H + pad, cols*W + pad, 3), white padding."""
    b, h, w, c = images.shape
    if nrow < 0:
        raise ValueError(f"nrow must be >= 0 (0: a square grid), got {nrow}")
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
    return grid


def write_png(path: str, image: Tensor) -> None:
    """Write a uint8 (H, W, 3) image as an 8-bit RGB PNG."""
    h, w, c = image.shape
    if image.dtype != torch.uint8 or c != 3:
        raise ValueError(f"write_png needs uint8 (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    raw = b"".join(b"\x00" + row.tobytes() for row in image.contiguous().numpy())  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
