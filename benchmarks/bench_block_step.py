"""Benchmark: one AiM block's decode step at batch 1 with CFG (2 rows), from the block's input to its mixer's
output, as aim/model.py runs it in the state form:

- block step: `mamba2_block_step` (prologue + in_proj + conv + SSM state update + gated RMSNorm + out_proj;
  at few rows in_proj's z rows run in the SSM update's launch, see aim_kernels/decode.py);
- two ops: `add_rmsnorm_modulate_linear` then `mamba2_decode_step` with out_proj (what the block step falls
  back to, and what the model ran before it);
- chain (2 rows, where its kernel runs): `mamba2_decode_chain` over the model's depth of blocks in one
  persistent kernel, its time divided by the depth.

At batch 1 a layer is latency-bound: the time is device time per layer over a chain of 20 calls on distinct
layers' weights in one CUDA graph (programmatic dependent launch chains them as in the model), rotating over
enough layers that their weights exceed the L2. Bytes: the layer's in_proj and out_proj weights read once,
the fp32 SSM state read and written, plus the step's small inputs and outputs. Appends rows to
benchmarks/results.jsonl (and --out).

  python benchmarks/bench_block_step.py [--out results/results.jsonl] [--no-data-file] [--rows 2]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import Recorder, bench_parser, no_cuda, n_sets, time_graph  # noqa: E402

import aim_kernels as ak  # noqa: E402
from aim_kernels import decode_chain  # noqa: E402

P, N, W = 64, 128, 4
MODELS = {"AiM-B": (768, 24), "AiM-L": (1024, 32), "AiM-XL": (1536, 48)}  # (d_model, heads)
DEPTH = {"AiM-B": 24, "AiM-L": 48, "AiM-XL": 48}
EPS = 1e-5


def make_layer(d: int, h: int, rows: int, dtype: torch.dtype) -> dict:
    d_inner, conv_dim = h * P, h * P + 2 * N
    dev = "cuda"
    mod = 0.1 * torch.randn(rows, 3, d, device=dev)
    return dict(
        x=torch.randn(rows, d, device=dev).to(dtype), residual=torch.randn(rows, d, device=dev),
        x_gate=(1 + 0.1 * torch.randn(rows, d, device=dev)).to(dtype),
        block_norm_weight=torch.ones(d, device=dev, dtype=dtype), shift=mod[:, 0].to(dtype),
        scale=mod.to(dtype)[:, 1],
        in_weight=(torch.randn(d_inner + conv_dim + h, d, device=dev) / d ** 0.5).to(dtype),
        conv_state=torch.randn(rows, conv_dim, W - 1, device=dev).to(dtype),
        ssm_state=torch.randn(rows, h, P, N, device=dev),
        conv_weight=(torch.randn(conv_dim, W, device=dev) * 0.5).to(dtype),
        conv_bias=(torch.randn(conv_dim, device=dev) * 0.1).to(dtype),
        A_log=torch.log(torch.empty(h, device=dev).uniform_(1, 16)), D=torch.randn(h, device=dev).to(dtype),
        dt_bias=(torch.randn(h, device=dev) * 0.1 - 4).to(dtype),
        norm_weight=torch.ones(d_inner, device=dev, dtype=dtype),
        out_weight=(torch.randn(d, d_inner, device=dev) / d_inner ** 0.5).to(dtype))


def run_block(s: dict):
    return ak.mamba2_block_step(s["x"], s["residual"], s["x_gate"], s["block_norm_weight"], s["shift"], s["scale"],
                                s["in_weight"], s["conv_state"], s["ssm_state"], s["conv_weight"], s["conv_bias"],
                                s["A_log"], s["D"], s["dt_bias"], s["norm_weight"], EPS, P, 1, s["out_weight"])


def run_two_ops(s: dict):
    zxbcdt, residual = ak.add_rmsnorm_modulate_linear(s["x"], s["residual"], s["block_norm_weight"], s["shift"],
                                                      s["scale"], EPS, s["x_gate"], s["in_weight"])
    return ak.mamba2_decode_step(zxbcdt, s["conv_state"], s["ssm_state"], s["conv_weight"], s["conv_bias"],
                                 s["A_log"], s["D"], s["dt_bias"], s["norm_weight"], EPS, P, 1,
                                 s["out_weight"]), residual


def make_chain(d: int, h: int, depth: int, dtype: torch.dtype) -> list:
    """mamba2_decode_chain's arguments for `depth` blocks of random weights (in dtype) and caches."""
    d_inner, conv_dim, dev = h * P, h * P + 2 * N, "cuda"
    weight = lambda *s: (torch.randn(*s, device=dev) / s[-1] ** 0.5).to(dtype)  # noqa: E731
    return [torch.randn(2, d, device=dev), [weight(2 * d_inner + 2 * N + h, d) for _ in range(depth)],
            weight(depth, d_inner, d), (1 + 0.1 * torch.randn(3, depth, 2, d, device=dev)).to(dtype),
            torch.randn(depth, 2, conv_dim, W - 1, device=dev), torch.randn(depth, 2, h, P, N, device=dev),
            0.5 * torch.randn(depth, conv_dim, W, device=dev), 0.1 * torch.randn(depth, conv_dim, device=dev),
            torch.log(torch.empty(depth, h, device=dev).uniform_(1, 16)), torch.randn(depth, h, device=dev),
            0.1 * torch.randn(depth, h, device=dev) - 4, EPS]


def layer_bytes(d: int, h: int, rows: int, es: int) -> int:
    d_inner, conv_dim = h * P, h * P + 2 * N
    weights = (d_inner + conv_dim + h) * d * es + d * d_inner * es
    # x, x_gate, shift, scale and the output in the model dtype, the float32 residual in and out, the conv windows
    io = rows * (d * (5 * es + 8) + 2 * conv_dim * (W - 1) * es)
    return weights + 2 * rows * h * P * N * 4 + io


def main(argv=None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--rows", type=int, default=2, help="rows per step (batch 1 with CFG: 2)")
    args = ap.parse_args(argv)
    if no_cuda():
        return 1
    rec = Recorder.for_args("block_step", args)
    for model in args.models:
        d, h = MODELS[model]
        for dtype in (torch.bfloat16, torch.float32):
            nbytes = layer_bytes(d, h, args.rows, dtype.itemsize)
            layers = [make_layer(d, h, args.rows, dtype) for _ in range(n_sets(nbytes, cap=32))]
            for path, fn in (("block step", run_block), ("two ops", run_two_ops)):
                r = time_graph(lambda i: fn(layers[i]), len(layers))
                rec.add(case="block", model=model, backend=path, dtype=str(dtype)[6:],
                        shape={"rows": args.rows, "d_model": d, "heads": h}, timing=r, bytes_moved=nbytes)
            del layers
            if args.rows == 2:
                chain = make_chain(d, h, DEPTH[model], dtype)
                reasons = decode_chain.not_supported_reasons(*chain)
                if reasons:
                    print(f"# chain {model}: its kernel cannot run here: {'; '.join(reasons)}")
                else:
                    r = time_graph(lambda i: ak.mamba2_decode_chain(*chain), 1, calls=4)
                    per_layer = {k: v / DEPTH[model] if k.endswith("_us") else v for k, v in r.items()}
                    rec.add(case="block", model=model, backend="chain", dtype=str(dtype)[6:],
                            shape={"rows": 2, "d_model": d, "heads": h, "layers": DEPTH[model]}, timing=per_layer,
                            bytes_moved=nbytes)
                del chain
            torch.cuda.empty_cache()
    rec.finish()
    rec.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
