"""Benchmark: one layer's Mamba2 decode step at batch 64 with CFG (128 rows), from the in_proj output to
the out_proj input, in the two forms generation chooses between (aim/generation.py `replay_form`):

- state: `mamba2_decode_step` (conv update + SSM state update + gated RMSNorm). Bytes: the fp32 SSM
  state read and written, plus the step's inputs and outputs.
- replay at step t: what aim/model.py runs in that form: `mamba2_replay_step_gated` (the conv update,
  the SSD form over this sequence's t earlier entries and the gate: two Triton kernels; the gated
  RMSNorm is deferred to the next block's prologue, which reads its per-head parts). Bytes:
  the t history entries read (x, B in the model dtype; dt, cum in float32), plus the step's inputs,
  appends and outputs. t = 128 is the mean over AiM's 256 steps.

Device time per call from CUDA-graph replay (benchmarks/_common.py), inputs rotated over sets larger than
the L2 where one set is smaller. Appends rows to benchmarks/results.jsonl (and --out).

  python benchmarks/bench_decode_step.py [--out results/results.jsonl] [--no-data-file]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import Recorder, bench_parser, no_cuda, n_sets, time_graph  # noqa: E402

import aim_kernels as ak  # noqa: E402

ROWS, P, N, W = 128, 64, 128, 4
MODELS = {"AiM-B": 24, "AiM-L": 32, "AiM-XL": 48}  # heads (d_inner = 64 heads)
STEPS = (32, 128, 255)


def make_set(h: int, dtype: torch.dtype, t: int) -> dict:
    d_inner, conv_dim = h * P, h * P + 2 * N
    dev = "cuda"
    zxbcdt = torch.randn(ROWS, d_inner + conv_dim + h, device=dev)
    zxbcdt[:, -h:] = zxbcdt[:, -h:] * 0.5 - 4.0
    hist = ak.allocate_replay_history(ROWS, 256, h, P, 1, N, dev, dtype)
    for x in hist[:2]:
        x.normal_()
    dt = torch.nn.functional.softplus(torch.randn(ROWS, 256, h, device=dev) * 0.5 - 4.0)
    A_log = torch.log(torch.empty(h, device=dev).uniform_(1, 16))
    hist[2].copy_(dt)
    hist[3].copy_(torch.cumsum(-dt * torch.exp(A_log), dim=1))
    return dict(zxbcdt=zxbcdt.to(dtype), conv_state=torch.randn(ROWS, conv_dim, W - 1, device=dev).to(dtype),
                ssm_state=torch.randn(ROWS, h, P, N, device=dev), hist=hist,
                step=torch.tensor(t, device=dev), conv_weight=torch.randn(conv_dim, W, device=dev).to(dtype) * 0.5,
                conv_bias=torch.randn(conv_dim, device=dev).to(dtype) * 0.1, A_log=A_log, A=-torch.exp(A_log),
                D=torch.randn(h, device=dev).to(dtype), dt_bias=torch.randn(h, device=dev).to(dtype) * 0.1 - 4,
                norm_weight=torch.ones(d_inner, device=dev, dtype=dtype))


def run_state(s, h):
    return ak.mamba2_decode_step(s["zxbcdt"], s["conv_state"], s["ssm_state"], s["conv_weight"], s["conv_bias"],
                                 s["A_log"], s["D"], s["dt_bias"], s["norm_weight"], 1e-5, P, 1)


def run_replay(s, h):
    d_inner = h * P
    z, xBC, dt = s["zxbcdt"].split([d_inner, d_inner + 2 * N, h], -1)
    return ak.mamba2_replay_step_gated(xBC, dt, s["conv_state"], s["conv_weight"], s["conv_bias"], s["A"], s["D"],
                                       s["dt_bias"], *s["hist"], s["step"], z, s["norm_weight"])


def step_bytes(h: int, es: int, form: str, t: int) -> int:
    d_inner, conv_dim = h * P, h * P + 2 * N
    io = ROWS * ((d_inner + conv_dim + h) * es + d_inner * es + 2 * conv_dim * (W - 1) * es)
    if form == "state":
        return io + 2 * ROWS * h * P * N * 4
    entry = h * P * es + N * es + 2 * h * 4
    return io + ROWS * t * entry + ROWS * entry  # t entries read, one appended


def main(argv=None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    args = ap.parse_args(argv)
    if no_cuda():
        return 1
    rec = Recorder.for_args("decode_step", args)
    for model in args.models:
        h = MODELS[model]
        for dtype in (torch.bfloat16, torch.float32):
            es = dtype.itemsize
            cases = [("state", run_state, 0)] + [("replay", run_replay, t) for t in STEPS]
            for form, fn, t in cases:
                nbytes = step_bytes(h, es, "state" if form == "state" else "replay", t)
                sets = [make_set(h, dtype, t) for _ in range(n_sets(nbytes, cap=4))]
                r = time_graph(lambda i: fn(sets[i], h), len(sets))
                row = rec.add(case="step", model=model, backend=form, dtype=str(dtype)[6:],
                              shape={"rows": ROWS, "heads": h, "t": t}, timing=r, bytes_moved=nbytes)
                print(f"{model:7s} {str(dtype)[6:]:9s} {form:13s} t={t:3d}: {r['median_us']:7.1f} us "
                      f"{row['gbps']:6.0f} GB/s ({row['frac_copy_measured']:.0%} of copy)", flush=True)
                del sets
                torch.cuda.empty_cache()
    rec.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
