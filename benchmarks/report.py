"""Regenerate BENCHMARKS.md (and benchmarks/causal_conv1d.png when matplotlib is installed) from the
data file benchmarks/results.jsonl written by the bench_*.py scripts.

  python benchmarks/report.py [--data benchmarks/results.jsonl] [--md BENCHMARKS.md] [--plot-dir benchmarks]

For each kernel the latest run on each GPU model is shown; older runs stay in the data file.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OFFICIAL_E2E = """\
The official stack (hp-l33/AiM on mamba_ssm 2.3.2 + causal-conv1d 1.7.0), measured on an H200 with random
weights (AIM_SPEC.md section 8, 2026-11-22). Generation = 256 tokens with CFG + VQ decode, official
`generate(fast=True)`, median of 3 after warm-up; tokens = the same without VQ decode. This is the
reference the end-to-end section above compares with.

| model | weights | batch 1 tokens | batch 16 tokens | batch 64 tokens | batch 64 generate (img/s) |
|---|---|---|---|---|---|
| AiM-B | fp32 | 0.567 s | 0.918 s | 1.320 s | 1.496 s (42.8) |
| AiM-B | bf16 | 0.561 s | 0.683 s | 1.053 s | 1.083 s (59.1) |
| AiM-L | fp32 | 0.927 s | 1.418 s | 2.475 s | 2.607 s (24.6) |
| AiM-L | bf16 | 0.952 s | 1.130 s | 1.878 s | 1.974 s (32.4) |
| AiM-XL | fp32 | 1.188 s | 1.790 s | 3.486 s | 3.637 s (17.6) |
| AiM-XL | bf16 | 1.009 s | 1.420 s | 2.481 s | 2.625 s (24.4) |

Training step (one AdamW step, bf16 autocast, batch 64): AiM-B 0.131 s (489 img/s, 12.3 GiB), AiM-L
0.222 s (288 img/s, 27.2 GiB), AiM-XL 0.294 s (217 img/s, 41.7 GiB).
Official kernels, batch 64 x 256 tokens, bf16: Mamba2 chunk scan forward 0.41-0.46 ms, forward+backward
3.1 ms (any model size); one decode step of selective_state_update for 128 rows: 67 us (AiM-B), 127 us
(AiM-XL). Ceilings on that H200: device-to-device copy 4.25 TB/s; bf16 matmul 748 TFLOP/s.
"""


def load(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def latest_runs(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(kernel, gpu name) -> the rows of the latest run."""
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[(r["kernel"], (r.get("gpu") or {}).get("name", "?"))][r["run_id"]].append(r)
    out = {}
    for key, runs in by.items():
        last = max(runs, key=lambda rid: max(r["timestamp"] for r in runs[rid]))
        out[key] = runs[last]
    return out


def _fmt_us(us):
    return f"{us:.1f}" if us < 1000 else f"{us / 1000:.2f} ms"


def _fmt_time(us):
    return _fmt_us(us) if us >= 1000 else f"{us:.1f} us"


def conv_section(gpu: str, rows: list[dict]) -> list[str]:
    variants = [r for r in rows if r.get("variant")]
    rows = [r for r in rows if not r.get("variant")]
    meta = rows[0]
    g = meta.get("gpu") or {}
    copy = next((r for r in rows if r["case"] == "copy"), None)
    lines = [f"### {gpu}", ""]
    lines.append(f"Run `{meta['run_id']}` ({meta['timestamp']}, git {meta.get('git') or '?'}): driver {meta.get('driver')}, "
                 f"torch {meta.get('torch')} (CUDA {meta.get('torch_cuda')}), Triton {meta.get('triton')}, "
                 f"SM clock {g.get('sm_clock_mhz', '?')} MHz (max {g.get('max_sm_clock_mhz', '?')}), memory clock "
                 f"{g.get('mem_clock_mhz', '?')} MHz, power limit {g.get('power_limit_w', '?')} W, extension built for "
                 f"{';'.join(meta.get('extension_archs') or []) or '?'}.")
    if copy:
        lines.append(f"Copy ceiling measured in the same run: **{copy['copy_tbps_measured']:.2f} TB/s** "
                     f"(bytes read + written); the H200 reference ceiling is 4.25 TB/s.")
    lines.append("")
    peers = sorted({r["backend"] for r in rows if r["backend"].startswith("causal-conv1d")})
    peer = peers[0] if peers else None
    for case, title in (("fwd", "forward"), ("fwd+bwd", "forward + backward"), ("update", "decode update, batch 128")):
        sel = [r for r in rows if r["case"] == case]
        if not sel:
            continue
        shp = sel[0]["shape"]
        if case == "update":
            desc = f"x ({shp['batch']}, D), state ({shp['batch']}, D, {shp['state_len']}), width {shp['width']}, bias, SiLU"
        else:
            desc = f"x ({shp['batch']}, D, {shp['seqlen']}) channel-last, width {shp['width']}, bias, SiLU"
        lines.append(f"**{title}** -- {desc}. Device time per call (CUDA-graph replay, median), us.")
        lines.append("")
        head = "| model (D) | dtype | aim-kernels us | GB/s | % copy (measured) | % of 4.25 TB/s |"
        sep = "|---|---|---|---|---|---|"
        if peer:
            head += f" {peer} us | speed-up vs {peer} |"
            sep += "---|---|"
        head += " PyTorch us | aim-kernels eager us |"
        sep += "---|---|"
        if case != "update":
            head += " peak MiB (aim / peer / PyTorch) |"
            sep += "---|"
        lines += [head, sep]
        keyed = defaultdict(dict)
        for r in sel:
            keyed[(r["model"], r["dtype"], r["shape"]["dim"])][r["backend"]] = r
        for (model, dtype, dim), bk in keyed.items():
            a = bk.get("aim_kernels")
            if a is None:
                continue
            cells = [f"{model} ({dim})", dtype, _fmt_us(a["median_us"]), f"{a['gbps']:.0f}",
                     f"{100 * a['frac_copy_measured']:.0f}%", f"{100 * a['frac_h200_copy']:.0f}%"]
            if peer:
                p = bk.get(peer)
                cells += [_fmt_us(p["median_us"]) if p else "-",
                          f"**{p['median_us'] / a['median_us']:.2f}x**" if p else "-"]
            t = bk.get("pytorch (F.conv1d)")
            cells += [_fmt_us(t["median_us"]) if t else "-", _fmt_us(a.get("eager_us") or float("nan"))]
            if case != "update":
                mems = [bk.get(n, {}).get("peak_mib") for n in ("aim_kernels", peer, "pytorch (F.conv1d)")]
                cells.append(" / ".join("-" if m is None else f"{m:.0f}" for m in mems))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if variants:
        lines += ["**Tuning variants** of the compiled kernels (raw op, AiM-XL shape; timesteps per thread), us:", "",
                  "| case | dtype | variant | us | GB/s | % copy (measured) |", "|---|---|---|---|---|---|"]
        for r in variants:
            lines.append(f"| {r['case']} | {r['dtype']} | {r['backend'].replace('aim_kernels raw ', '')} | "
                         f"{_fmt_us(r['median_us'])} | {r['gbps']:.0f} | {100 * r['frac_copy_measured']:.0f}% |")
        lines.append("")
    return lines


def plot(gpu: str, rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    cases = [r for r in rows if r["case"] != "copy" and not r.get("variant")]
    labels = sorted({(r["case"], r["model"], r["dtype"]) for r in cases},
                    key=lambda t: (["fwd", "fwd+bwd", "update"].index(t[0]), t[1], t[2]))
    bks = sorted({r["backend"] for r in cases}, key=lambda b: (b != "aim_kernels", b))
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(labels)), 4.5))
    width = 0.8 / max(1, len(bks))
    for j, bk in enumerate(bks):
        vals = []
        for lab in labels:
            r = next((r for r in cases if (r["case"], r["model"], r["dtype"]) == lab and r["backend"] == bk), None)
            vals.append(r["gbps"] / 1e3 if r else 0)
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=bk)
    copy = next((r["copy_tbps_measured"] for r in rows), None)
    if copy:
        ax.axhline(copy, color="k", ls="--", lw=1, label=f"copy ceiling (measured) {copy:.2f} TB/s")
    ax.axhline(4.25, color="grey", ls=":", lw=1, label="H200 copy 4.25 TB/s")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{c}\n{m}\n{d[:4]}" for c, m, d in labels], fontsize=7)
    ax.set_ylabel("TB/s (bytes counted / device time)")
    ax.set_title(f"causal conv1d on {gpu}: achieved bandwidth")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _run_header(rows: list[dict]) -> str:
    """"Run `id` (time, git): versions, copy ceiling. " for a section drawn from one run."""
    meta = rows[0]
    copy = next((r for r in rows if r["case"] == "copy"), None)
    return (f"Run `{meta['run_id']}` ({meta['timestamp']}, git {meta.get('git') or '?'}): torch {meta.get('torch')}, "
            f"Triton {meta.get('triton')}"
            + (f", copy ceiling measured {copy['copy_tbps_measured']:.2f} TB/s" if copy else "") + ". ")


def group_norm_section(gpu: str, rows: list[dict]) -> list[str]:
    """GroupNorm + SiLU at the VQ decoder's shapes: per shape, per decode, and the whole decode."""
    norms = [r for r in rows if r["case"] == "norm"]
    batch = norms[0]["shape"]["batch"] if norms else "?"
    lines = [f"### {gpu}", "",
             _run_header(rows) +
             f"32 groups, eps 1e-6, affine, bf16 channels_last, batch {batch} (256 x 256 images); PyTorch = "
             "F.group_norm then F.silu. Device time per call (CUDA-graph replay, median); bandwidth counts x read once "
             "and y written once (the two-pass kernel reads x twice: its ceiling is 2/3 of copy).", "",
             "| C x H x W | SiLU | per decode | aim-kernels us | GB/s | % copy (measured) | eager us | PyTorch us | "
             "speed-up | PyTorch eager us |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keyed = defaultdict(dict)
    for r in norms:
        s = r["shape"]
        keyed[(s["channels"], s["height"], s["width"], s["silu"], s["per_decode"])][r["backend"]] = r
    for (c, h, w, silu, count), bk in keyed.items():
        a = bk.get("aim_kernels")
        t = next((r for name, r in bk.items() if name.startswith("pytorch")), None)
        if a is None:
            continue
        lines.append(f"| {c} x {h} x {w} | {'yes' if silu else 'no'} | {count} | {_fmt_us(a['median_us'])} | "
                     f"{a['gbps']:.0f} | {100 * a['frac_copy_measured']:.0f}% | {_fmt_us(a['eager_us'])} | "
                     + (f"{_fmt_us(t['median_us'])} | **{t['median_us'] / a['median_us']:.2f}x** | "
                        f"{_fmt_us(t['eager_us'])} |" if t else "- | - | - |"))
    lines.append("")
    for case, title in (("decoder", "All GroupNorms of one decode (sum of count x time)"),
                        ("vq_decode", "Whole VQ decode (`decode_code`, eager wall time per call, cuDNN autotuned)")):
        sel = {r["backend"]: r for r in rows if r["case"] == case}
        a = sel.get("aim_kernels")
        t = next((r for name, r in sel.items() if name.startswith("pytorch")), None)
        if a is None:
            continue
        line = f"{title}: aim-kernels {_fmt_time(a['median_us'])}"
        if case == "decoder":
            line += f" device ({_fmt_time(a['eager_us'])} eager)"
        if t:
            line += f", PyTorch GroupNorm {_fmt_time(t['median_us'])}"
            line += f" device ({_fmt_time(t['eager_us'])} eager)" if case == "decoder" else ""
            line += f": **{t['median_us'] / a['median_us']:.2f}x**"
        lines += [line + ".", ""]
    return lines


def decode_step_section(gpu: str, rows: list[dict]) -> list[str]:
    """One layer's decode step at 128 rows: the state form and the replay form at steps t."""
    lines = [f"### {gpu}", "",
             _run_header(rows) +
             "One Mamba2 layer, batch 64 with CFG (128 rows), from the in_proj output to the out_proj input. "
             "state: `mamba2_decode_step` (bytes: the fp32 SSM state read and written + the step's I/O); replay at "
             "step t: conv update + SSD replay + gate, as the model runs it at the run's git (since git 48f272d "
             "`mamba2_replay_step_gated`, whose RMSNorm the next block's prologue applies; before it "
             "`mamba2_replay_step` + `rmsnorm_gated`; earlier, a separate conv update and `ssd_replay_step`) (bytes: t "
             "history entries read + the step's I/O). Device time per call (CUDA-graph replay, median).", "",
             "| model | weights | form | t | us | GB/s | % copy (measured) | % of 4.25 TB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["case"] == "step"):
        t = r["shape"]["t"] if r["backend"] != "state" else "-"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['backend']} | {t} | {r['median_us']:.1f} | {r['gbps']:.0f} | "
                     f"{100 * r['frac_copy_measured']:.0f}% | {100 * r['frac_h200_copy']:.0f}% |")
    return lines + [""]


def block_step_section(gpu: str, rows: list[dict]) -> list[str]:
    """One block's decode step at batch 1: the block step op against the two ops it replaced, and the whole chain
    of blocks in one kernel (per block)."""
    lines = [f"### {gpu}", "",
             _run_header(rows) +
             "One AiM block, state form, from the block's input to its mixer's output (`mamba2_block_step` against "
             "`add_rmsnorm_modulate_linear` + `mamba2_decode_step`). Device time per layer over a chain of 20 calls on "
             "distinct layers' weights in one CUDA graph (median). Chain: `mamba2_decode_chain` over the model's depth "
             "of blocks in one kernel (2 rows), its time divided by the depth. Bytes: the layer's in_proj and "
             "out_proj weights, the fp32 SSM state read and written, the step's I/O.", "",
             "| model | weights | rows | block step us | two ops us | speed-up | chain us per block | chain speed-up "
             "| GB/s (block step) | % copy (measured) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["dtype"], r["shape"]["rows"], r["backend"]): r for r in rows if r["case"] == "block"}
    for (model, dtype, n_rows, path), b in by.items():
        if path != "block step":
            continue
        two, chain = by.get((model, dtype, n_rows, "two ops")), by.get((model, dtype, n_rows, "chain"))
        two_us = f"{two['median_us']:.2f}" if two else "-"
        speedup = f"**{two['median_us'] / b['median_us']:.2f}x**" if two else "-"
        chain_us = f"{chain['median_us']:.2f}" if chain else "-"
        chain_speedup = f"**{b['median_us'] / chain['median_us']:.2f}x**" if chain else "-"
        lines.append(f"| {model} | {dtype} | {n_rows} | {b['median_us']:.2f} | {two_us} | {speedup} | {chain_us} | "
                     f"{chain_speedup} | {b['gbps']:.0f} | {100 * b['frac_copy_measured']:.0f}% |")
    return lines + [""]


def latest_per_config(rows: list[dict]) -> list[dict]:
    """The latest "tokens" row of each (model, weights, batch), from whichever run measured it last."""
    best = {}
    for r in (r for r in rows if r["case"] == "tokens"):
        key = (r["model"], r["dtype"], r["shape"]["batch"])
        if key not in best or r["timestamp"] > best[key]["timestamp"]:
            best[key] = r
    return list(best.values())


def generate_section(gpu: str, rows: list[dict]) -> list[str]:
    """End to end: 256 tokens with CFG, against the official stack and the recurrent byte floor."""
    rows = latest_per_config(rows)
    runs = sorted({(r["run_id"], r["timestamp"], r.get("git") or "?", r.get("torch"), r.get("triton")) for r in rows},
                  key=lambda run: run[1])
    described = "; ".join(f"`{rid}` ({ts}, git {git}): torch {torch_v}, Triton {triton_v}"
                          for rid, ts, git, torch_v, triton_v in runs)
    lines = [f"### {gpu}", "",
             f"Latest measurement of each configuration, from run{'s' if len(runs) > 1 else ''} {described}. Wall time of `generate_tokens` (random weights, cfg 2.0, temperature 1, "
             "no top-k/top-p, fp32 SSM state; CUDA graphs captured by the first call), median of 3 after it. "
             "Floor: the bytes one recurrent step must move (weights read once, conv and SSM state read and "
             "written once) x 256 steps at 4.25 TB/s. Official: AIM_SPEC section 8, "
             + ("same GPU model." if "H200" in gpu else
                "measured on an H200: the official stack was not run on this GPU, so the speed-ups compare "
                "across GPUs (this one has less memory bandwidth; the issue's targets are H200 figures)."), "",
             "| model | weights | batch | SSM decode form | aim-kernels | official | speed-up vs official | byte floor | "
             "x floor | VQ decode (share of total) | first call (capture) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["case"] == "tokens"),
                    key=lambda r: (r["model"], r["dtype"], r["shape"]["batch"])):
        official = f"{r['official_tokens_s']:.3f} s" if r.get("official_tokens_s") else "-"
        speedup = f"**{r['speedup_vs_official']:.2f}x**" if r.get("speedup_vs_official") else "-"
        vq = (f"{1e3 * r['vq_decode_s']:.0f} ms ({100 * r['vq_fraction']:.0f}%)" if r.get("vq_decode_s") else "-")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['shape']['batch']} | {r.get('decode_form', 'state')} | "
                     f"{r['tokens_s']:.3f} s | {official} | "
                     f"{speedup} | {r['floor_s']:.3f} s | {r['x_floor']:.1f}x | {vq} | {r['first_call_s']:.1f} s |")
    lines.append("")
    return lines


def render(rows: list[dict], plot_dir: Path) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results.jsonl` (one JSON row per",
             "measurement, appended by `benchmarks/bench_*.py`; `scripts/gpu_check.sh` runs them all). Times are",
             "device times from CUDA events over CUDA-graph replays (median); inputs rotate over sets larger than the",
             "L2; bandwidth counts each input read once and each output written once. Only measured numbers appear here.",
             ""]
    runs = latest_runs(rows)
    lines += ["## End to end: sampling 256 tokens", ""]
    gen = defaultdict(list)  # every run: each configuration shows its latest measurement
    for r in rows:
        if r["kernel"] == "generate":
            gen[(r.get("gpu") or {}).get("name", "?")].append(r)
    if not gen:
        lines += ["No measurements yet.", ""]
    for gpu, rr in sorted(gen.items()):
        lines += generate_section(gpu, rr)
    notes = ROOT / "benchmarks" / "notes_generate.md"
    if gen and notes.exists():
        lines += [notes.read_text().strip(), ""]
    steps = {gpu: r for (k, gpu), r in runs.items() if k == "decode_step"}
    if steps:
        lines += ["## Decode step (one layer, batch 64)", ""]
    for gpu, rr in sorted(steps.items()):
        lines += decode_step_section(gpu, rr)
    blocks = {gpu: r for (k, gpu), r in runs.items() if k == "block_step"}
    if blocks:
        lines += ["## Decode block (one layer, batch 1)", ""]
    for gpu, rr in sorted(blocks.items()):
        lines += block_step_section(gpu, rr)
    conv = {gpu: r for (k, gpu), r in runs.items() if k == "causal_conv1d"}
    lines += ["## causal conv1d", ""]
    if not conv:
        lines += ["No measurements yet.", ""]
    for gpu, rr in sorted(conv.items()):
        lines += conv_section(gpu, rr)
        notes = ROOT / "benchmarks" / "notes_causal_conv1d.md"
        if notes.exists():
            lines += [notes.read_text().strip(), ""]
        png = plot_dir / "causal_conv1d.png"
        if plot(gpu, rr, png):
            try:
                rel = png.resolve().relative_to(ROOT)
            except ValueError:
                rel = png.name
            lines += [f"![causal conv1d bandwidth]({rel})", ""]
    gnorm = {gpu: r for (k, gpu), r in runs.items() if k == "group_norm"}
    lines += ["## GroupNorm + SiLU (VQ decoder)", ""]
    if not gnorm:
        lines += ["No measurements yet.", ""]
    for gpu, rr in sorted(gnorm.items()):
        lines += group_norm_section(gpu, rr)
    lines += ["## Reference: the official AiM stack end to end", "", OFFICIAL_E2E]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "results.jsonl")
    ap.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--plot-dir", type=Path, default=ROOT / "benchmarks")
    args = ap.parse_args(argv)
    text = render(load(args.data), args.plot_dir)
    args.md.write_text(text)
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
