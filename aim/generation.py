"""Sampling 256 tokens with a recurrent state cache, classifier-free guidance, and VQ decoding.

Compared with the official decode loop (AIM_SPEC §5): the class-only adaLN conditioning is computed
once per call, B rows are sampled instead of 2B, temperature is honoured, and the position ids
follow the official decoding convention by default (token t_{k-1} fed at step k gets id k) or the
training-consistent one (id k - 1) with `decode_positions="train"`.

Each step reads its step number from a device tensor, so the same code runs eagerly (CPU, tests,
teacher forcing) and, on CUDA, as CUDA graphs captured once per (model, batch, settings): a prologue
graph (conditioning, cache reset) and a graph of STEPS_PER_GRAPH steps replayed num_tokens /
STEPS_PER_GRAPH times. The uniforms of the draws come from the caller's generator up front, so eager
and graph runs give the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

import aim_kernels as ak
from aim._graphs import cached_graph

DECODE_POSITIONS = ("official", "train")
DECODE_FORMS = ("auto", "state", "replay")
# From this many rows on, Mamba2 layers decode in replay (SSD) form: it moves fewer bytes than reading
# and writing the fp32 state (aim_kernels/replay.py). Below it launches dominate and the fused
# state-form step is faster (H200, AiM-XL per layer: 14 us vs 36 us at 32 rows, 9 us vs 6.5 us at 2).
REPLAY_MIN_ROWS = 32
# Up to batch 4 with guidance, each step's rows decode as two row blocks on two CUDA streams, so one
# block's latency-bound kernels overlap the other's (same machine, end to end: H200 batch 1 AiM-B bf16
# 1.10x, AiM-L bf16 1.08x; H100 batch 2 / 4 AiM-B bf16 1.15x / 1.15x, AiM-L bf16 batch 4 1.17x). Each
# block reads every weight, which pays only while the second stream finds a layer's weights in L2 (H200
# batch 1: AiM-B fp32, 15 MB of weights per layer, 0.99x; AiM-L fp32, 26 MB, 0.94x; AiM-XL bf16, 29 MB,
# 0.84x). More rows do not pay: batch 8 0.97x (H100), batch 16 0.98x, two or four blocks of 128 rows
# 0.74-0.95x (H200). At 2 rows the block step already runs in_proj's z rows beside the SSM update
# (aim_kernels.mamba2_block_step), and one stream is as fast or faster from AiM-L's 13 MB on (H100, batch 1:
# one stream against two, AiM-B bf16 0.99x, AiM-L bf16 1.15x; at batch 2 and 4 two streams stay 1.15-1.22x).
ROW_STREAMS_MAX_ROWS = 8
ROW_STREAMS_MAX_WEIGHT_BYTES = 14 * 10 ** 6
ROW_STREAMS_MAX_WEIGHT_BYTES_2_ROWS = 10 * 10 ** 6
STEPS_PER_GRAPH = 16


def replay_form(model, rows: int, state_dtype: torch.dtype, decode_form: str = "auto") -> bool:
    """Whether the Mamba2 layers decode in replay form (fewer bytes at many rows; float32 state only;
    "auto" also needs its history to fit in the device's free memory, else the state form runs)."""
    if decode_form == "auto":
        return (model.config.layer == "Mamba2" and rows >= REPLAY_MIN_ROWS and state_dtype == torch.float32
                and replay_history_fits(model, rows))
    return decode_form == "replay"


def chain_decoder(model, rows: int, state_dtype: torch.dtype, decode_form: str = "auto"):
    """The whole-chain kernel for this generation (aim.model.ChainDecoder), or None: then the blocks step one by one.
    Under decode_form "auto", at 2 rows (one guided image), where its kernel runs (sm_90, bf16 or float32 weights,
    float32 state, Mamba2 blocks with shared B/C), except float32 weights at d_model < 1024, where the blocks are as
    fast. Per block on an H200 (bf16, 2 rows): AiM-B 9.8 against 11.3 us, AiM-XL 14.8 against 20.0 us; on an H100
    (float32): AiM-B 11.1 against 11.0 us, AiM-L 14.1 against 15.3, AiM-XL 29.2 against 30.5
    (benchmarks/bench_block_step.py; AiM-XL float32 then gained 1.06x end to end from the kernel's producer hold)."""
    from aim.model import ChainDecoder  # aim.model imports this module
    c = model.config
    if (decode_form != "auto" or rows != 2 or model.device.type != "cuda" or c.layer != "Mamba2"
            or c.mixer["ngroups"] != 1 or state_dtype != torch.float32
            or model.dtype not in (torch.bfloat16, torch.float32)
            or (model.dtype == torch.float32 and c.d_model < 1024)
            or model.backbone.layers[0].mixer.conv1d.bias is None
            or ak.decode_chain.device_reasons(model.device, c.d_model, model.backbone.layers[0].mixer.nheads)):
        return None  # checked before ChainDecoder packs a third of the weights for the kernel
    chain = ChainDecoder(model, rows)
    probe = torch.zeros(rows, c.d_model, device=model.device, dtype=model.dtype)
    adaln = torch.zeros(3, c.n_layer, rows, c.d_model, device=model.device, dtype=model.dtype)
    return None if chain.not_supported_reasons(probe, adaln) else chain


def replay_history_bytes(model, rows: int) -> int:
    """The replay form's history over all layers, as the replay caches allocate it (on the meta device)."""
    step = torch.zeros((), dtype=torch.long, device="meta")
    caches = (layer.mixer.allocate_cache(rows, "meta", model.dtype, torch.float32, model.config.num_tokens, step)
              for layer in model.backbone.layers)
    return sum(t.nbytes for c in caches for t in (c.hist_x, c.hist_B, c.hist_dt, c.hist_cum))


def free_device_bytes(device: torch.device) -> Optional[int]:
    """Free memory on a CUDA device (what the caching allocator holds unused counts as free); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def replay_history_fits(model, rows: int) -> bool:
    """Whether the replay history fits with room to spare (10% and 1 GiB for activations and graphs): at
    batch 256 AiM-XL's float32 history takes 83 GB, more than an 80 GB H100 has."""
    free = free_device_bytes(model.device)
    return free is None or replay_history_bytes(model, rows) <= 0.9 * free - 2 ** 30


def step_weight_bytes(model) -> int:
    """The weight bytes one block's decode step reads: its mixer's (the adaLN conditioning is computed
    once per generation; every block has the same shapes)."""
    return sum(p.numel() * p.element_size() for p in model.backbone.layers[0].mixer.parameters())


def row_streams(model, rows: int, device: torch.device) -> int:
    """How many row blocks, each on its own CUDA stream, a decode step runs as (1: the whole batch)."""
    max_bytes = ROW_STREAMS_MAX_WEIGHT_BYTES_2_ROWS if rows == 2 else ROW_STREAMS_MAX_WEIGHT_BYTES
    split = 1 < rows <= ROW_STREAMS_MAX_ROWS and step_weight_bytes(model) <= max_bytes
    return 2 if device.type == "cuda" and split else 1


@dataclass(frozen=True)
class Settings:
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float
    decode_positions: str
    state_dtype: torch.dtype
    decode_form: str

    def replay_form(self, model, rows: int) -> bool:
        return replay_form(model, rows, self.state_dtype, self.decode_form)

    @property
    def guidance(self) -> Optional[float]:
        """The scale, or None at 1.0: then the guided logits are the cond logits and the uncond rows are skipped."""
        return None if self.cfg_scale == 1.0 else self.cfg_scale


class Decoding:
    """The device state of one generation: inputs, conditioning, cache, step counter, outputs."""

    def __init__(self, model, labels: Tensor, s: Settings, uniform: Optional[Tensor],
                 forced_tokens: Optional[Tensor], return_logits: bool):
        c, batch = model.config, labels.shape[0]
        self.model, self.s = model, s
        self.labels, self.uniform, self.forced_tokens = labels, uniform, forced_tokens
        self.num_rows = 2 * batch if s.guidance is not None else batch
        self.step = torch.zeros((), dtype=torch.long, device=labels.device)
        self.chain = chain_decoder(model, self.num_rows, s.state_dtype, s.decode_form)
        self.cache = [] if self.chain else model.allocate_cache(
            self.num_rows, s.state_dtype, replay_step=self.step if s.replay_form(model, self.num_rows) else None)
        parts = 1 if self.chain else row_streams(model, self.num_rows, labels.device)
        self.row_blocks = ([slice(self.num_rows * i // parts, self.num_rows * (i + 1) // parts) for i in range(parts)]
                           if parts > 1 else [])
        self.block_caches = [[layer.rows(rows) for layer in self.cache] for rows in self.row_blocks]
        # blocks 1.. on side streams (block 0 on the caller's)
        self.side_streams = ([torch.cuda.Stream(labels.device) for _ in self.row_blocks[1:]]
                             if labels.device.type == "cuda" else [])
        self.tokens = torch.zeros(batch, c.num_tokens, dtype=torch.long, device=labels.device)
        self.logits = (torch.empty(batch, c.num_tokens, c.vocab_size, device=labels.device,
                                   dtype=torch.promote_types(model.dtype, torch.float32)) if return_logits else None)

    def prologue(self) -> None:
        """Class-only conditioning (once per generation) and a fresh cache."""
        labels, null = self.labels, self.model.config.num_classes
        rows = torch.cat([labels, torch.full_like(labels, null)]) if self.s.guidance is not None else labels
        self.cond = self.model.class_embedding(rows)
        self.mods, self.final_mod = self.model.conditioning(self.cond)
        self.block_mods = [([m[block] for m in self.mods], self.final_mod[block]) for block in self.row_blocks]
        if self.chain:  # its pack is fresh: built just now (ChainPack.of), or refreshed by DecodeGraph before a replay
            self.adaln, self.last_gate = self.chain.adaln(self.mods), self.mods[-1][:, 2]
            self.chain.reset()
        else:
            self.model.reset_cache(self.cache)
        self.step.zero_()

    def advance(self) -> None:
        """Step k feeds the class embedding (k = 0) or token t_{k-1}, and writes token t_k."""
        model, s, k = self.model, self.s, self.step
        at = k.view(1)
        # the draw's uniform first: the sampler then directly follows the lm_head GEMV (both PDL kernels)
        uniform = self.uniform.index_select(1, at)[:, 0] if self.forced_tokens is None else None
        emb = model.backbone.embeddings
        hidden = ak.embed_step(self.cond, emb.word_embeddings.weight, emb.position_embeddings.weight, self.tokens, k,
                               position_offset=0 if s.decode_positions == "official" else 1)
        if self.chain:
            logits = self.chain.step(hidden, self.adaln, self.last_gate, self.final_mod)
        elif self.row_blocks:
            logits = self._step_in_row_blocks(hidden)
        else:
            logits = model.step(hidden, self.cache, self.mods, self.final_mod)
        if self.logits is not None:
            self.logits.index_copy_(1, at, ak.guided_logits(logits, s.guidance)[:, None])
        if self.forced_tokens is not None:
            token = self.forced_tokens.index_select(1, at)[:, 0]
        else:
            token = ak.sample_next_token(logits, s.guidance, s.temperature, s.top_k, s.top_p, uniform=uniform)
        ak.record_token(token, self.tokens, self.step)

    def _step_in_row_blocks(self, hidden: Tensor) -> Tensor:
        """model.step over each row block; on CUDA blocks 1.. on side streams, so all run at once."""
        def block(i: int) -> Tensor:
            return self.model.step(hidden[self.row_blocks[i]], self.block_caches[i], *self.block_mods[i])

        if not self.side_streams:
            return torch.cat([block(i) for i in range(len(self.row_blocks))])
        main = torch.cuda.current_stream(hidden.device)
        logits = [None] * len(self.row_blocks)
        for i, side in enumerate(self.side_streams, start=1):
            side.wait_stream(main)
            with torch.cuda.stream(side):
                logits[i] = block(i)
        logits[0] = block(0)
        for side in self.side_streams:  # later steps' side-stream work waits for main: no cross-stream reuse races
            main.wait_stream(side)
        return torch.cat(logits)


class DecodeGraph:
    """CUDA graphs of one generation for fixed (model weights, batch, settings)."""

    def __init__(self, model, batch: int, s: Settings):
        n = model.config.num_tokens
        self.steps = max(k for k in range(1, STEPS_PER_GRAPH + 1) if n % k == 0)
        labels = torch.zeros(batch, dtype=torch.long, device=model.device)
        self.run = Decoding(model, labels, s, torch.rand(batch, n, device=model.device), None, False)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: allocator, cuBLAS handles, Triton compilation
            self.run.prologue()
            for _ in range(self.steps):
                self.run.advance()
        torch.cuda.current_stream().wait_stream(stream)
        self.prologue, self.advance = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.prologue):
            self.run.prologue()
        with torch.cuda.graph(self.advance, pool=self.prologue.pool()):
            for _ in range(self.steps):
                self.run.advance()

    def __call__(self, labels: Tensor, uniform: Tensor) -> Tensor:
        if self.run.chain:
            self.run.chain.refresh()
        self.run.labels.copy_(labels)
        self.run.uniform.copy_(uniform)
        self.prologue.replay()
        for _ in range(self.run.tokens.shape[1] // self.steps):
            self.advance.replay()
        return self.run.tokens.clone()


@torch.no_grad()
def generate_tokens(model, labels, cfg_scale: float = 1.5, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, generator: Optional[torch.Generator] = None,
                    forced_tokens: Optional[Tensor] = None, return_logits: bool = False,
                    decode_positions: str = "official", state_dtype: Optional[torch.dtype] = None,
                    decode_form: str = "auto", cuda_graph: bool = True, progress: bool = False):
    """Sample image tokens (B, num_tokens) for class ids `labels` (B,).

    cfg_scale: guidance; 1.0 runs the cond rows only (identical logits, half the work).
    forced_tokens: (B, num_tokens) teacher-forces the tokens instead of sampling.
    return_logits: also return the guided logits of every step (B, num_tokens, vocab), before
        temperature and filtering.
    decode_positions: "official" (default, what the released checkpoints were evaluated with) or "train".
    state_dtype: SSM state dtype of the recurrent form (default float32; float64 for float64 models).
    decode_form: "state" (recurrent SSM state, block by block), "replay" (the SSD form over this sequence's
        inputs, Mamba2 only) or "auto": replay from REPLAY_MIN_ROWS rows on with a float32 state when its
        history fits in free device memory (`replay_history_fits`); at 2 rows the state form of every block in
        one kernel where it runs (`chain_decoder`); else state.
    cuda_graph: on CUDA, replay graphs captured on the first call with these settings (sampling
        only; teacher forcing and return_logits run eagerly).
    """
    c = model.config
    ak.check_sampling_args(cfg_scale, temperature, top_k, top_p)
    if decode_positions not in DECODE_POSITIONS:
        raise ValueError(f"decode_positions must be one of {DECODE_POSITIONS}, got {decode_positions!r}")
    if decode_form not in DECODE_FORMS or (decode_form == "replay" and c.layer != "Mamba2"):
        raise ValueError(f"decode_form must be one of {DECODE_FORMS} ('replay' needs Mamba2 layers), "
                         f"got {decode_form!r}")
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
    settings = Settings(float(cfg_scale), float(temperature), int(top_k), float(top_p), decode_positions,
                        state_dtype or torch.promote_types(model.dtype, torch.float32), decode_form)
    uniform = None if forced_tokens is not None else torch.rand(batch, c.num_tokens, generator=generator,
                                                                device=model.device)
    was_training = model.training
    model.eval()
    try:
        if cuda_graph and model.device.type == "cuda" and forced_tokens is None and not return_logits:
            graph = cached_graph(model, (batch, settings), lambda: DecodeGraph(model, batch, settings))
            return graph(labels, uniform)
        run = Decoding(model, labels, settings, uniform, forced_tokens, return_logits)
        run.prologue()
        for _ in tqdm(range(c.num_tokens), desc="tokens", disable=not progress, leave=False):
            run.advance()
    finally:
        model.train(was_training)
    return (run.tokens, run.logits) if return_logits else run.tokens


@torch.no_grad()
def generate(model, c=None, batch: int = 4, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             cfg_scale: float = 1.5, fast: bool = True, generator: Optional[torch.Generator] = None,
             **kwargs) -> Tensor:
    """The official API: images (B, 3, 256, 256), the raw VQ decoder output (about [-1, 1], unclamped).

    c: class ids (B,) or (B, 1); random classes for `batch` images when None. `fast` (the official
    CUDA-graph switch) maps to `cuda_graph`. Further keyword arguments go to `generate_tokens`.
    """
    if model.vqvae is None:
        raise ValueError("this model has no VQ tokenizer (a stage-2-only checkpoint): use "
                         "generate_tokens(), or attach one with model.vqvae = VQModel.from_llamagen_checkpoint(...)")
    if c is None:
        c = torch.randint(model.config.num_classes, (batch,), generator=generator, device=model.device)
    tokens = generate_tokens(model, c, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator, cuda_graph=fast, **kwargs)
    side = int(model.config.num_tokens ** 0.5)
    return model.vqvae.decode_code(tokens.view(-1, side, side), cuda_graph=fast)
