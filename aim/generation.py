"""Sampling 256 tokens with a recurrent state cache, classifier-free guidance, and VQ decoding.

Compared with the official decode loop (AIM_SPEC §5): the class-only adaLN conditioning is computed
once per call, B rows are sampled instead of 2B, temperature is honoured, and the position ids
follow the official decoding convention by default (token t_{k-1} fed at step k gets id k) or the
training-consistent one (id k - 1) with `decode_positions="train"`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

import aim_kernels as ak

DECODE_POSITIONS = ("official", "train")


@torch.no_grad()
def generate_tokens(model, labels, cfg_scale: float = 1.5, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, generator: Optional[torch.Generator] = None,
                    forced_tokens: Optional[Tensor] = None, return_logits: bool = False,
                    decode_positions: str = "official", state_dtype: Optional[torch.dtype] = None,
                    progress: bool = False):
    """Sample image tokens (B, num_tokens) for class ids `labels` (B,).

    cfg_scale: guidance; 1.0 runs the cond rows only (identical logits, half the work).
    forced_tokens: (B, num_tokens) teacher-forces the tokens instead of sampling.
    return_logits: also return the guided logits of every step (B, num_tokens, vocab), before
        temperature and filtering.
    decode_positions: "official" (default, what the released checkpoints were evaluated with) or "train".
    state_dtype: SSM state dtype (default float32; float64 for float64 models).
    """
    c = model.config
    ak.check_sampling_args(cfg_scale, temperature, top_k, top_p)
    if decode_positions not in DECODE_POSITIONS:
        raise ValueError(f"decode_positions must be one of {DECODE_POSITIONS}, got {decode_positions!r}")
    labels = model.check_labels(labels)
    batch = labels.shape[0]
    if forced_tokens is not None:
        forced_tokens = torch.as_tensor(forced_tokens, device=model.device)
        if forced_tokens.shape != (batch, c.num_tokens) or forced_tokens.dtype.is_floating_point:
            raise ValueError(f"forced_tokens must be integer ids of shape ({batch}, {c.num_tokens}), "
                             f"got {tuple(forced_tokens.shape)} {forced_tokens.dtype}")
        if forced_tokens.min() < 0 or forced_tokens.max() >= c.vocab_size:
            raise ValueError(f"forced_tokens must lie in [0, {c.vocab_size})")
    if generator is not None and generator.device.type != model.device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {model.device}")

    guided = cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if guided else labels
    was_training = model.training
    model.eval()
    try:
        cond = model.class_embedding(rows)
        mods, final_mod = model.conditioning(cond)
        cache = model.allocate_cache(rows.shape[0], state_dtype)
        tokens = torch.empty(batch, c.num_tokens, dtype=torch.long, device=model.device)
        all_logits = [] if return_logits else None
        hidden = cond
        for k in tqdm(range(c.num_tokens), desc="tokens", disable=not progress, leave=False):
            logits = model.step(hidden, cache, mods, final_mod)
            if return_logits:
                all_logits.append(ak.guided_logits(logits, cfg_scale if guided else None))
            if forced_tokens is not None:
                token = forced_tokens[:, k]
            else:
                token = ak.sample_next_token(logits, cfg_scale if guided else None, temperature, top_k, top_p,
                                             generator=generator)
            tokens[:, k] = token
            if k + 1 == c.num_tokens:
                break
            position = k + 1 if decode_positions == "official" else k
            hidden = model.embed_tokens(token.repeat(2) if guided else token,
                                        torch.full((rows.shape[0],), position, device=model.device))
    finally:
        model.train(was_training)
    return (tokens, torch.stack(all_logits, dim=1)) if return_logits else tokens


@torch.no_grad()
def generate(model, c=None, batch: int = 4, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             cfg_scale: float = 1.5, fast: bool = True, generator: Optional[torch.Generator] = None,
             **kwargs) -> Tensor:
    """The official API: images (B, 3, 256, 256), the raw VQ decoder output (about [-1, 1], unclamped).

    c: class ids (B,) or (B, 1); random classes for `batch` images when None. `fast` is accepted
    for compatibility. Further keyword arguments go to `generate_tokens`.
    """
    if model.vqvae is None:
        raise ValueError("this model has no VQ tokenizer (a stage-2-only checkpoint): use "
                         "generate_tokens(), or attach one with model.vqvae = VQModel.from_llamagen_checkpoint(...)")
    if c is None:
        c = torch.randint(model.config.num_classes, (batch,), generator=generator, device=model.device)
    tokens = generate_tokens(model, c, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator, **kwargs)
    side = int(model.config.num_tokens ** 0.5)
    return model.vqvae.decode_code(tokens.view(-1, side, side))
