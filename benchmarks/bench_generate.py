"""End-to-end sampling: 256 tokens with CFG (and the VQ decode at batch 64), per preset, batch and
weight dtype, against the official stack (AIM_SPEC §8) and the recurrent per-step byte floor.

  python benchmarks/bench_generate.py [--out benchmarks/results.jsonl] [--full] [--batches 16 64]

The default grid fits the one-call GPU harness; --full runs every preset x batch {1, 16, 64, 256} x
{bf16, fp32}. The same measurement is `aim bench generate`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, Recorder  # noqa: E402

from aim.bench import bench_generate, format_row  # noqa: E402

QUICK = [("AiM-B", 1, "bfloat16"), ("AiM-B", 16, "bfloat16"), ("AiM-B", 64, "bfloat16"), ("AiM-B", 256, "bfloat16"),
         ("AiM-B", 1, "float32"), ("AiM-L", 1, "bfloat16"), ("AiM-L", 64, "bfloat16"),
         ("AiM-XL", 1, "bfloat16"), ("AiM-XL", 64, "bfloat16"), ("AiM-XL", 64, "float32")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, action="append")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", help="only these batch sizes")
    args = parser.parse_args()
    grid = ([(p, b, d) for p in ("AiM-B", "AiM-L", "AiM-XL") for d in ("bfloat16", "float32")
             for b in (1, 16, 64, 256)] if args.full else QUICK)
    grid = [g for g in grid if not args.batches or g[1] in args.batches]
    rec = Recorder("generate", args.out or [DATA])
    for preset, batch, dtype in grid:
        r = bench_generate(preset, batch, dtype, with_vq=batch == 64)
        print(format_row(r), flush=True)
        bytes_moved = round(r["floor_s"] * 4.25e12)  # the recurrent floor's bytes over the whole generation
        rec.add(case="tokens", model=preset, backend="aim", dtype=dtype, shape={"batch": batch, "tokens": 256},
                timing={"median_us": r["tokens_s"] * 1e6}, bytes_moved=bytes_moved,
                **{k: v for k, v in r.items() if k not in ("preset", "batch", "dtype")})
        rec.save()  # row by row: a long grid cut short by the call's time limit keeps what it measured
        rec.rows.clear()


if __name__ == "__main__":
    main()
