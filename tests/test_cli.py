"""The `aim` command line and the PNG writer."""
import json
import struct
import zlib

import pytest
import torch

from aim.cli import main
from aim.image import make_grid, to_uint8, write_png


def read_png(path) -> torch.Tensor:
    """Minimal reader for the 8-bit RGB, filter-0 PNGs write_png makes."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[i * (3 * w + 1) + 1:(i + 1) * (3 * w + 1)] for i in range(h)]
    return torch.tensor(list(b"".join(rows)), dtype=torch.uint8).view(h, w, 3)


def test_png_round_trip(tmp_path):
    images = torch.rand(3, 3, 5, 7) * 2.4 - 1.2  # beyond [-1, 1]: clamped
    grid = make_grid(to_uint8(images), nrow=2, pad=1)
    assert grid.shape == (2 * 6 + 1, 2 * 8 + 1, 3)
    write_png(tmp_path / "g.png", grid)
    assert torch.equal(read_png(tmp_path / "g.png"), grid)
    assert to_uint8(torch.full((1, 3, 1, 1), -5.0)).max() == 0 and to_uint8(torch.full((1, 3, 1, 1), 5.0)).min() == 255


def test_generate_writes_a_grid(tmp_path, capsys):
    config = dict(d_model=64, n_layer=1, vocab_size=16384, num_classes=10, num_tokens=256, num_groups=1,
                  ssm_cfg={"layer": "Mamba2", "headdim": 16, "d_state": 8})
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    main(["generate", "--config", str(tmp_path / "tiny.json"), "--classes", "3", "7", "--nrow", "2",
          "--out", str(tmp_path / "s.png")])
    image = read_png(tmp_path / "s.png")
    assert image.shape == (256 + 4, 2 * 258 + 2, 3)
    assert "classes [3, 7]" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["generate", "--classes", "1000"], "labels"),
    (["generate", "--top-p", "0"], "top_p"),
    (["generate", "--checkpoint", "no/such/dir/x"], "local directory"),
    (["generate", "--batch", "0"], "--batch"),
    (["generate", "--nrow", "-1"], "--nrow"),
    (["generate", "--temperature", "0"], "temperature"),
    (["generate", "--device", "nodevice"], "not a device"),
    (["generate", "--device", "cuda:99"], "CUDA device"),
    (["generate", "--config", "no/such/config.json"], "no/such/config.json"),
])
def test_bad_input_is_a_message_not_a_traceback(argv, message, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--out", str(tmp_path / "x.png"), "--preset", "AiM-B"])
    assert message in str(info.value)


def test_missing_output_folder_is_reported_before_generating(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "--out", str(tmp_path / "no" / "x.png")])
