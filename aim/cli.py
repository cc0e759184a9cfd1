"""The `aim` command line: `aim generate` writes a PNG grid of samples."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import aim_kernels as ak

from .config import PRESETS, AiMConfig
from .image import make_grid, to_uint8, write_png
from .model import AiM
from .vq import VQConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device ({e})") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():  # 0 without CUDA
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return device


def load_model(args, device: torch.device) -> AiM:
    dtype = DTYPES[args.dtype]
    if args.checkpoint:
        return AiM.from_pretrained(args.checkpoint, device=device, dtype=dtype)
    config = AiMConfig.from_json(args.config) if args.config else AiMConfig.from_preset(args.preset)
    print(f"*** RANDOM WEIGHTS: {args.config or args.preset} with an untrained tokenizer. The image is noise; it "
          f"shows the pipeline runs. Pass --checkpoint hp-l33/aim-base (or a local directory) for real samples. ***",
          file=sys.stderr)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AiM(config, vq_config=VQConfig())
    return model.to(dtype).eval()


def check_generate_args(args) -> torch.device:
    """The arguments that need no model, checked before the (slow) model build; returns the device."""
    if not args.classes and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.nrow < 0:
        raise ValueError(f"--nrow must be >= 0 (0: a square grid), got {args.nrow}")
    ak.check_sampling_args(args.cfg_scale, args.temperature, args.top_k, args.top_p)
    folder = os.path.dirname(args.out) or "."
    if not os.path.isdir(folder):
        raise ValueError(f"--out {args.out}: folder {folder} does not exist")
    return _device(args.device)


def cmd_generate(args) -> None:
    model = load_model(args, check_generate_args(args))
    generator = torch.Generator(model.device).manual_seed(args.seed)
    labels = (torch.tensor(args.classes) if args.classes else
              torch.randint(model.config.num_classes, (args.batch,), generator=generator, device=model.device))
    start = time.perf_counter()
    tokens = model.generate_tokens(labels, cfg_scale=args.cfg_scale, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, generator=generator, progress=True)
    side = int(model.config.num_tokens ** 0.5)
    images = model.vqvae.decode_code(tokens.view(-1, side, side))
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    write_png(args.out, make_grid(to_uint8(images), nrow=args.nrow))
    print(f"wrote {args.out}: {len(labels)} images, classes {labels.tolist()}, {seconds:.2f} s on {model.device}")


def cmd_bench_generate(args) -> None:
    from . import bench
    results = bench.main(args)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aim", description="AiM image generation with aim-kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="sample images and write a PNG grid")
    gen.add_argument("--checkpoint", help="official checkpoint directory or hub id (e.g. hp-l33/aim-base); "
                                          "without it, a random-weights demo of --preset")
    gen.add_argument("--preset", default="AiM-B", choices=sorted(PRESETS), help="model for the random-weights demo")
    gen.add_argument("--config", help="an AiMConfig JSON file for the random-weights demo (instead of --preset)")
    gen.add_argument("--classes", type=int, nargs="+", help="ImageNet class ids (default: random)")
    gen.add_argument("--batch", type=int, default=4, help="number of images when --classes is not given")
    gen.add_argument("--cfg-scale", type=float, default=2.0)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    gen.add_argument("--nrow", type=int, default=0, help="images per grid row (default: square)")
    gen.add_argument("--out", default="samples.png")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    bgen = bench.add_parser("generate", help="sampling speed vs the official stack and the byte floor (GPU)")
    bgen.add_argument("--presets", nargs="+", default=["AiM-B", "AiM-L", "AiM-XL"], choices=sorted(PRESETS))
    bgen.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    bgen.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    bgen.add_argument("--cfg-scale", type=float, default=2.0)
    bgen.add_argument("--repeats", type=int, default=3)
    bgen.add_argument("--with-vq", action="store_true", help="also time the VQ decode at batch 64")
    bgen.add_argument("--json", help="append one JSON object per result to this file")
    bgen.set_defaults(func=cmd_bench_generate)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # bad input or an unreadable/unwritable path: a message, not a traceback
        raise SystemExit(f"aim {args.command}: error: {e}")


if __name__ == "__main__":
    main()
