"""Benchmark: GroupNorm (32 groups, eps 1e-6, affine) + SiLU at the VQ decoder's shapes, batch 64.

The shapes are those the LlamaGen VQ-f16 decoder (aim/vq.py) normalises when it decodes 64 images of
256 x 256 (read off a meta-device forward), in bf16 channels_last as generation runs it; each row says
how many times one decode runs that shape. Backends: aim_kernels (the public op: Triton) and PyTorch
(nn.GroupNorm's F.group_norm, then F.silu, in bf16 channels_last: what the decoder ran before). Bytes
counted: x read once, y written once (2 x the tensor); the two-pass kernel reads x twice, so its own
ceiling is 2/3 of the copy's. Device time from CUDA-graph replay; eager time beside it (the decoder
runs eagerly). 'decoder' rows: the sum over shapes of count x time. 'vq_decode' rows: the whole
decode (post_quant_conv + decoder, cuDNN autotuned) with either GroupNorm, eager wall time per call.
Appends rows to benchmarks/results.jsonl (and --out); report.py writes BENCHMARKS.md.

  python benchmarks/bench_group_norm.py [--out results/results.jsonl] [--no-data-file] [--no-vq-decode]
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import Recorder, bench_parser, no_cuda, n_sets, time_eager, time_graph  # noqa: E402

import aim.vq  # noqa: E402
from aim.vq import Normalize, VQConfig, VQModel  # noqa: E402
from aim_kernels import _ext, group_norm  # noqa: E402

BATCH, GROUPS, EPS = 64, 32, 1e-6
IMAGE = 256
PYTORCH = "pytorch (nn.GroupNorm + SiLU)"


def torch_group_norm(x, weight, bias, num_groups, eps=1e-5, silu=False, input_bias=None):
    """What the decoder ran before: nn.GroupNorm's functional form, then SiLU, in x's dtype (input_bias:
    the bias of the convolution before, added as PyTorch's convolution would)."""
    if input_bias is not None:
        x = x + input_bias.reshape(-1, 1, 1)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def decoder_norms(batch: int, config: VQConfig = VQConfig(), image: int = IMAGE) -> Counter:
    """(channels, height, width, silu) -> how many times one decode of `batch` images normalises it."""
    with torch.device("meta"):
        model = VQModel(config)
    seen = Counter()

    def hook(module, args, kwargs):
        x = args[0]
        seen[(x.shape[1], x.shape[2], x.shape[3], bool(kwargs.get("silu", args[1] if len(args) > 1 else False)))] += 1

    for m in model.decoder.modules():
        if isinstance(m, Normalize):
            m.register_forward_pre_hook(hook, with_kwargs=True)
    side = image // model.downsample_factor
    with torch.no_grad():
        model.decoder(torch.empty(batch, config.z_channels, side, side, device="meta"))
    return seen


def parse_args(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--no-vq-decode", action="store_true", help="skip the whole-decoder comparison")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if no_cuda():
        return 1
    dtype, dname, es = torch.bfloat16, "bfloat16", 2
    probe = torch.empty(1, 64, 2, 2, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    print(f"# aim_kernels backend for bf16 channels_last CUDA inputs: "
          f"{_ext.backend_for(sys.modules['aim_kernels.group_norm']._group_norm, probe, None, None, 32, EPS, True)}")
    rec = Recorder.for_args("group_norm", args)
    backends = {"aim_kernels": group_norm, PYTORCH: torch_group_norm}
    norms = decoder_norms(args.batch)
    totals = {name: {"median_us": 0.0, "eager_us": 0.0} for name in backends}
    total_bytes = 0
    torch.manual_seed(0)
    for (c, h, w, silu), count in sorted(norms.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2]):
        numel = args.batch * c * h * w
        k = n_sets(2 * numel * es, factor=3.0, cap=8)
        xs = [torch.empty(args.batch, c, h, w, device="cuda", dtype=dtype,
                          memory_format=torch.channels_last).normal_(0.3, 1.5) for _ in range(k)]
        weight = (1 + 0.1 * torch.randn(c, device="cuda")).to(dtype)
        bias = (0.1 * torch.randn(c, device="cuda")).to(dtype)
        shape = {"batch": args.batch, "channels": c, "height": h, "width": w, "groups": GROUPS, "silu": silu,
                 "layout": "channels_last", "per_decode": count}
        calls = 10 if numel * es >= 2**28 else 20
        for name, fn in backends.items():
            def call(i, fn=fn):
                return fn(xs[i], weight, bias, GROUPS, EPS, silu)
            t = time_graph(call, k, calls=calls, replays=10)
            eager = time_eager(call, k, calls=calls)
            rec.add(case="norm", backend=name, dtype=dname, shape=shape, timing=t, bytes_moved=2 * numel * es,
                    eager_us=eager)
            totals[name]["median_us"] += count * t["median_us"]
            totals[name]["eager_us"] += count * eager
        total_bytes += count * 2 * numel * es
        del xs
        torch.cuda.empty_cache()
    for name, tot in totals.items():
        rec.add(case="decoder", backend=name, dtype=dname, timing={"median_us": tot["median_us"]},
                bytes_moved=total_bytes, eager_us=tot["eager_us"],
                shape={"batch": args.batch, "image": IMAGE, "norms": sum(norms.values())})
    if not args.no_vq_decode:
        vq_decode(rec, args.batch, backends)
    rec.finish()
    rec.save()
    return 0


def vq_decode(rec: Recorder, batch: int, backends: dict) -> None:
    """The whole decode_code at `batch`, bf16 channels_last (random weights), with each GroupNorm."""
    torch.manual_seed(0)
    model = VQModel(VQConfig()).to("cuda", torch.bfloat16, memory_format=torch.channels_last).eval()
    side = IMAGE // model.downsample_factor
    codes = [torch.randint(0, model.config.n_embed, (batch, side, side), device="cuda") for _ in range(2)]
    try:
        for name, fn in backends.items():
            aim.vq.group_norm = fn  # Normalize.forward calls the module-level name
            with torch.no_grad():
                us = time_eager(lambda i: model.decode_code(codes[i]), 2, calls=6)
            rec.add(case="vq_decode", backend=name, dtype="bfloat16", timing={"median_us": us}, bytes_moved=0,
                    shape={"batch": batch, "image": IMAGE, "layout": "channels_last"}, eager_us=us)
    finally:
        aim.vq.group_norm = group_norm
    del model
    torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
