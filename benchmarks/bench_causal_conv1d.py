"""Benchmark: depthwise causal conv1d (width 4, bias, SiLU) on the AiM shapes.

  training / prefill: x (64, D, 256) channel-last (the model's xBC.transpose(1, 2)), D = d_inner + 2 * 128
                      for AiM-B (1792), AiM-L (2304), AiM-XL (3328); forward, and forward + backward
  decode:             one update step at batch 128 (64 images with classifier-free guidance), state_len 3

Backends: aim_kernels (the public op: CUDA kernel), causal-conv1d (when installed; the official stack
uses 1.7.0) and PyTorch (F.conv1d via the reference). Bytes counted: each input read once, each output
written once (forward 2 x; forward + backward 5 x the tensor; update: x, out, and the state read and
written). Appends rows to benchmarks/results.jsonl (and --out); report.py writes BENCHMARKS.md.

  python benchmarks/bench_causal_conv1d.py [--out results/results.jsonl] [--no-data-file]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import Recorder, bench_parser, no_cuda, n_sets, peak_memory_mib, peer_version, time_eager, time_graph  # noqa: E402

import aim_kernels  # noqa: E402
from aim_kernels import _ext  # noqa: E402
from aim_kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref  # noqa: E402

MODELS = {"AiM-B": 768, "AiM-L": 1024, "AiM-XL": 1536}
BATCH, SEQLEN, WIDTH, DSTATE = 64, 256, 4, 128
DECODE_BATCH = 128
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def backends():
    """name -> (forward fn(x, w, b), update fn(x, state, w, b)), for the backends present."""
    out = {"aim_kernels": (lambda x, w, b: causal_conv1d(x, w, b, "silu"),
                           lambda x, s, w, b: causal_conv1d_update(x, s, w, b, "silu"))}
    try:
        import causal_conv1d as peer
        out[f"causal-conv1d {peer_version('causal_conv1d') or peer.__version__}"] = (
            lambda x, w, b: peer.causal_conv1d_fn(x, w, b, activation="silu"),
            lambda x, s, w, b: peer.causal_conv1d_update(x, s, w, b, "silu"))
    except Exception as e:  # noqa: BLE001
        print(f"# causal-conv1d not available: {type(e).__name__}: {e}", file=sys.stderr)
    out["pytorch (F.conv1d)"] = (lambda x, w, b: causal_conv1d_ref(x, w, b, True),
                                 lambda x, s, w, b: causal_conv1d_update_ref(x, s, w, b, True))
    return out


def main(argv=None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sweep", action="store_true",
                    help="also time the compiled tuning variants (AIMK_FWD_CHUNK / AIMK_BWD_CHUNK) on AiM-XL")
    args = ap.parse_args(argv)
    if no_cuda():
        return 1
    x0 = torch.randn(1, 8, 4, device="cuda", dtype=torch.bfloat16)
    w0 = torch.randn(8, 4, device="cuda", dtype=torch.bfloat16)
    print(f"# aim_kernels backend for bf16 CUDA inputs: {_ext.backend_for(sys.modules['aim_kernels.causal_conv1d']._causal_conv1d, x0, w0, None, True)}")
    rec = Recorder.for_args("causal_conv1d", args)
    bks = backends()
    torch.manual_seed(0)

    for model in args.models.split(","):
        d_model = MODELS[model]
        dim = 2 * d_model + 2 * DSTATE
        for dname, dtype in DTYPES.items():
            es = torch.finfo(dtype).bits // 8
            numel = BATCH * SEQLEN * dim
            k = n_sets(3 * numel * es, factor=3.0, cap=4)
            xs = [torch.randn(BATCH, SEQLEN, dim, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(k)]
            douts = [torch.randn(BATCH, SEQLEN, dim, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(k)]
            w = (torch.randn(dim, WIDTH, device="cuda", dtype=dtype) / 2)
            b = torch.randn(dim, device="cuda", dtype=dtype)
            shape = {"batch": BATCH, "dim": dim, "seqlen": SEQLEN, "width": WIDTH, "layout": "channel_last"}
            for name, (fwd, _) in bks.items():
                t = time_graph(lambda i: fwd(xs[i], w, b), k)
                rec.add(case="fwd", model=model, backend=name, dtype=dname, shape=shape, timing=t,
                        bytes_moved=2 * numel * es, eager_us=time_eager(lambda i: fwd(xs[i], w, b), k),
                        peak_mib=peak_memory_mib(lambda: fwd(xs[0], w, b)))
                xg = [x.detach().requires_grad_() for x in xs]
                wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()

                def fwd_bwd(i, fwd=fwd, xg=xg, wg=wg, bg=bg):
                    out = fwd(xg[i], wg, bg)
                    return torch.autograd.grad(out, (xg[i], wg, bg), douts[i])

                t = time_graph(fwd_bwd, k, calls=10)
                rec.add(case="fwd+bwd", model=model, backend=name, dtype=dname, shape=shape, timing=t,
                        bytes_moved=5 * numel * es, eager_us=time_eager(fwd_bwd, k, calls=20),
                        peak_mib=peak_memory_mib(lambda: fwd_bwd(0)))
            del xs, douts
            torch.cuda.empty_cache()

            # decode: one step at batch 128, state_len = width - 1
            dshape = {"batch": DECODE_BATCH, "dim": dim, "state_len": WIDTH - 1, "width": WIDTH}
            per_set = DECODE_BATCH * dim * es * (2 + 2 * (WIDTH - 1))
            k = n_sets(per_set, factor=4.0, cap=64)
            xd = [torch.randn(DECODE_BATCH, dim, device="cuda", dtype=dtype) for _ in range(k)]
            for name, (_, upd) in bks.items():
                states = [torch.randn(DECODE_BATCH, dim, WIDTH - 1, device="cuda", dtype=dtype) for _ in range(k)]
                t = time_graph(lambda i: upd(xd[i], states[i], w, b), k, calls=2 * k)
                rec.add(case="update", model=model, backend=name, dtype=dname, shape=dshape, timing=t,
                        bytes_moved=per_set, eager_us=time_eager(lambda i: upd(xd[i], states[i], w, b), k, calls=2 * k))
                del states
            del xd
            torch.cuda.empty_cache()
    if args.sweep:
        sweep(rec)
    rec.finish()
    rec.save()
    return 0


def sweep(rec) -> None:
    """Tuning variants of the CUDA kernels (timesteps per thread), AiM-XL shapes; rows tagged 'variant'."""
    import os
    dim = 2 * MODELS["AiM-XL"] + 2 * DSTATE
    for dname, dtype in DTYPES.items():
        es = torch.finfo(dtype).bits // 8
        numel = BATCH * SEQLEN * dim
        k = 3
        xs = [torch.randn(BATCH, SEQLEN, dim, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(k)]
        douts = [torch.randn(BATCH, SEQLEN, dim, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(k)]
        w = torch.randn(dim, WIDTH, device="cuda", dtype=dtype) / 2
        b = torch.randn(dim, device="cuda", dtype=dtype)  # weight and bias in x's dtype, as the op passes them
        shape = {"batch": BATCH, "dim": dim, "seqlen": SEQLEN, "width": WIDTH, "layout": "channel_last"}
        outs = [torch.empty_like(x) for x in xs]
        for chunk in ("8", "16", "32"):
            os.environ["AIMK_FWD_CHUNK"] = chunk
            t = time_graph(lambda i: torch.ops.aim_kernels_cuda.causal_conv1d_fwd(xs[i], w, b, outs[i], True), k)
            rec.add(case="fwd", model="AiM-XL", backend=f"aim_kernels raw fwd_chunk={chunk}", dtype=dname,
                    shape=shape, timing=t, bytes_moved=2 * numel * es, variant=True)
        os.environ.pop("AIMK_FWD_CHUNK")
        dwb = torch.zeros(dim, WIDTH + 1, device="cuda")
        for chunk in ("8", "16"):
            os.environ["AIMK_BWD_CHUNK"] = chunk
            t = time_graph(lambda i: torch.ops.aim_kernels_cuda.causal_conv1d_bwd(xs[i], w, b, douts[i], outs[i],
                                                                                  dwb, True), k)
            rec.add(case="bwd", model="AiM-XL", backend=f"aim_kernels raw bwd_chunk={chunk}", dtype=dname,
                    shape=shape, timing=t, bytes_moved=3 * numel * es, variant=True)
        os.environ.pop("AIMK_BWD_CHUNK")
        del xs, douts, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
