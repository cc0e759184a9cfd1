"""`aim bench generate`: end-to-end sampling speed against the official stack (AIM_SPEC §8) and the
per-step byte floor, with random weights, as the official figures were taken."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Optional

import torch

from .config import AiMConfig
from .generation import chain_decoder, replay_form
from .model import AiM
from .vq import VQConfig

# AIM_SPEC §8: official generate(fast=True), 256 tokens with CFG, H200, seconds ("tokens" = no VQ decode).
OFFICIAL_TOKENS_S = {
    ("AiM-B", "float32"): {1: 0.567, 16: 0.918, 64: 1.320},
    ("AiM-B", "bfloat16"): {1: 0.561, 16: 0.683, 64: 1.053},
    ("AiM-L", "float32"): {1: 0.927, 16: 1.418, 64: 2.475},
    ("AiM-L", "bfloat16"): {1: 0.952, 16: 1.130, 64: 1.878},
    ("AiM-XL", "float32"): {1: 1.188, 16: 1.790, 64: 3.486},
    ("AiM-XL", "bfloat16"): {1: 1.009, 16: 1.420, 64: 2.481},
}
OFFICIAL_GENERATE_B64_S = {("AiM-B", "float32"): 1.496, ("AiM-B", "bfloat16"): 1.083, ("AiM-L", "float32"): 2.607,
                           ("AiM-L", "bfloat16"): 1.974, ("AiM-XL", "float32"): 3.637,
                           ("AiM-XL", "bfloat16"): 2.625}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def step_bytes(model: AiM, rows: int, state_dtype: torch.dtype) -> int:
    """Fewest bytes one recurrent decode step must move: every per-step weight read once (the
    embedding tables only one row; the class-only adaLN weights not at all) and the conv and SSM
    states read and written once."""
    per_generation = ("cls_embed", "adaln_group", "adaLN_modulation", "scale_shift_table", "position_embeddings")
    weights = sum(p.numel() * p.element_size() for name, p in model.mamba.named_parameters()
                  if not any(part in name for part in per_generation))
    states = sum(conv.numel() * conv.element_size() + ssm.numel() * torch.finfo(state_dtype).bits // 8
                 for conv, ssm in (layer.mixer.allocate_cache(rows, "meta", model.dtype, state_dtype,
                                                              model.config.num_tokens, None)
                                   for layer in model.backbone.layers))
    return weights + 2 * states


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_generate(preset: str, batch: int, dtype: str, cfg_scale: float = 2.0, repeats: int = 3,
                   state_dtype: Optional[torch.dtype] = None, with_vq: bool = False) -> dict:
    """Median wall time of generate_tokens (CUDA graphs, after the capturing first call)."""
    gc.collect()  # earlier configurations' models (a model and its cached graphs reference each other)
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AiM(AiMConfig.from_preset(preset), vq_config=VQConfig() if with_vq else None)
    model = model.to(DTYPES[dtype]).eval()
    state_dtype = state_dtype or torch.float32
    labels = torch.randint(model.config.num_classes, (batch,), device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)

    def run():
        return model.generate_tokens(labels, cfg_scale=cfg_scale, generator=generator, state_dtype=state_dtype)

    rows = 2 * batch if cfg_scale != 1.0 else batch
    # as the first call decides (free memory; whether the whole-chain kernel runs)
    form = ("replay" if replay_form(model, rows, state_dtype) else
            "chain" if chain_decoder(model, rows, state_dtype, "auto") else "state")
    first, _ = _timed(run, 1)  # includes the CUDA-graph capture
    tokens_s, times = _timed(run, repeats)
    floor_s = model.config.num_tokens * step_bytes(model, rows, state_dtype) / 4.25e12
    official = OFFICIAL_TOKENS_S.get((preset, dtype), {}).get(batch)
    result = dict(preset=preset, batch=batch, dtype=dtype, state_dtype=str(state_dtype).removeprefix("torch."),
                  decode_form=form,
                  cfg_scale=cfg_scale, tokens_s=tokens_s, times_s=times, first_call_s=first,
                  floor_s=floor_s, x_floor=tokens_s / floor_s, official_tokens_s=official,
                  speedup_vs_official=official / tokens_s if official else None)
    if with_vq:
        tokens = run()
        vq = model.vqvae.to(torch.bfloat16, memory_format=torch.channels_last)
        # as generate(fast=True) decodes: a CUDA graph captured by the first call (after cuDNN picks its algorithms)
        decode = lambda: vq.decode_code(tokens.view(batch, 16, 16), cuda_graph=True)  # noqa: E731
        _timed(decode, 1)
        vq_s, _ = _timed(decode, repeats)
        official_gen = OFFICIAL_GENERATE_B64_S.get((preset, dtype)) if batch == 64 else None
        result.update(vq_decode_s=vq_s, generate_s=tokens_s + vq_s, vq_fraction=vq_s / (tokens_s + vq_s),
                      official_generate_s=official_gen,
                      generate_speedup_vs_official=official_gen / (tokens_s + vq_s) if official_gen else None)
    del model
    torch.cuda.empty_cache()
    return result


def format_row(r: dict) -> str:
    official = (f"official {r['official_tokens_s']:.3f} s -> {r['speedup_vs_official']:.2f}x"
                if r["official_tokens_s"] else "official -")
    vq = f"  +VQ {r['vq_decode_s'] * 1e3:.1f} ms ({100 * r['vq_fraction']:.0f}%)" if "vq_decode_s" in r else ""
    return (f"{r['preset']:<7} {r['dtype']:<9} batch {r['batch']:>3} {r['decode_form']:<6}: {r['tokens_s'] * 1e3:8.1f} ms  "
            f"floor {r['floor_s'] * 1e3:6.1f} ms ({r['x_floor']:.1f}x)  {official}  "
            f"first call {r['first_call_s']:.1f} s{vq}")


def main(args) -> list[dict]:
    if not torch.cuda.is_available():
        raise ValueError("aim bench generate needs a CUDA GPU")
    results = []
    for preset in args.presets:
        for dtype in args.dtypes:
            for batch in args.batches:
                r = bench_generate(preset, batch, dtype, cfg_scale=args.cfg_scale, repeats=args.repeats,
                                   with_vq=args.with_vq and batch == 64)
                print(format_row(r), flush=True)
                results.append(r)
    return results
