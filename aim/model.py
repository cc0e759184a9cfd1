"""AiM stage 2: a class-conditional Mamba language model over VQ codes (AIM_SPEC §2).

The module tree mirrors the official one, so `state_dict()` has the official key names
(`mamba.backbone.layers.0.mixer.in_proj.weight`, ...). Every op goes through `aim_kernels`, so the
same code runs the references on the CPU and the fast kernels on the GPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aim_kernels as ak

from . import checkpoint, generation
from .config import AiMConfig
from .vq import VQConfig, VQModel

NORM_EPS = 1e-5
LABEL_DROP_PROB = 0.1  # classifier-free guidance training: labels become the null class


class StateCache(NamedTuple):
    """Recurrent decode state of one layer: the conv window and the SSM state."""
    conv_state: Tensor
    ssm_state: Tensor

    def rows(self, rows: slice) -> "StateCache":
        """Views of these rows: a step over them updates this cache in place."""
        return StateCache(self.conv_state[rows], self.ssm_state[rows])


class ReplayCache(NamedTuple):
    """Replay-form decode state of one Mamba2 layer: the conv window, this sequence's per-token SSM
    inputs, A = -exp(A_log) (computed once per generation) and the generation's step counter."""
    conv_state: Tensor
    hist_x: Tensor
    hist_B: Tensor
    hist_dt: Tensor
    hist_cum: Tensor
    A: Tensor
    step: Tensor

    def rows(self, rows: slice) -> "ReplayCache":
        """Views of these rows (A and the step counter are shared): a step over them updates this cache
        in place."""
        per_row = ("conv_state", "hist_x", "hist_B", "hist_dt", "hist_cum")
        return self._replace(**{name: getattr(self, name)[rows] for name in per_row})


class ChainPack:
    """Every block's parameters as `ak.mamba2_decode_chain` takes them: out_proj transposed with the gated-norm
    weight folded in (a copy: a third of the weights), the small parameters stacked in float32 (float64 models:
    float64). One per model (`of`), shared by its decoders; `refresh` re-packs, in place, parameters changed
    since (e.g. by training), so captured graphs keep their addresses."""

    def __init__(self, model: "AiM"):
        self.layers = list(model.backbone.layers)
        self.in_weight = [layer.mixer.in_proj.weight for layer in self.layers]
        self.dtype = torch.promote_types(model.dtype, torch.float32)
        self.pointers, self.versions = self._state()
        self.tensors = self._pack()

    @staticmethod
    def of(model: "AiM") -> "ChainPack":
        """The model's pack, packed again if its weights moved (`model.to(...)`), refreshed if they changed."""
        pack = model.__dict__.get("_chain_pack")
        if pack is None or pack._state()[0] != pack.pointers:
            pack = model.__dict__["_chain_pack"] = ChainPack(model)  # packed just now: nothing to refresh
        else:
            pack.refresh()
        return pack

    def _state(self) -> tuple[list[int], list[int]]:
        params = [t for layer in self.layers for t in (layer.norm.weight, layer.mixer.out_proj.weight,
                                                       layer.mixer.norm.weight, layer.mixer.conv1d.weight,
                                                       layer.mixer.conv1d.bias, layer.mixer.A_log, layer.mixer.D,
                                                       layer.mixer.dt_bias)]
        return [t.data_ptr() for t in params], [t._version for t in params]

    def _pack(self) -> dict:
        mixers = [layer.mixer for layer in self.layers]
        stack = lambda ts: torch.stack([t.detach().to(self.dtype) for t in ts]).contiguous()  # noqa: E731
        return dict(out_weight_t=ak.decode_chain.pack_out_weights([mx.out_proj.weight.detach() for mx in mixers],
                                                                  [mx.norm.weight.detach() for mx in mixers]),
                    conv_weight=stack(mx.conv1d.weight.squeeze(1) for mx in mixers),
                    conv_bias=stack(mx.conv1d.bias for mx in mixers), A_log=stack(mx.A_log for mx in mixers),
                    D=stack(mx.D for mx in mixers), dt_bias=stack(mx.dt_bias for mx in mixers),
                    norm_weight=stack(layer.norm.weight for layer in self.layers))

    def refresh(self) -> None:
        versions = self._state()[1]
        if versions != self.versions:
            for name, t in self._pack().items():
                self.tensors[name].copy_(t)
            self.versions = versions


class ChainDecoder:
    """Batch-1 decode (2 rows: one guided image) of every block in one kernel, `ak.mamba2_decode_chain`: the
    model's ChainPack and this decoder's caches, stacked over blocks."""

    def __init__(self, model: "AiM", rows: int):
        self.model, self.pack = model, ChainPack.of(model)
        m, layers = model.backbone.layers[0].mixer, len(model.backbone.layers)
        conv_dim, width, dtype = m.conv1d.weight.shape[0], m.conv1d.weight.shape[-1], self.pack.dtype
        self.conv_state = torch.zeros(layers, rows, conv_dim, width - 1, device=model.device, dtype=dtype)
        self.ssm_state = torch.zeros(layers, rows, m.nheads, m.headdim, m.d_state, device=model.device, dtype=dtype)

    def refresh(self) -> None:
        """Re-pack parameters changed in place since (before replaying a graph that captured this decoder)."""
        self.pack.refresh()

    def reset(self) -> None:
        self.conv_state.zero_()
        self.ssm_state.zero_()

    def adaln(self, mods: list[Tensor]) -> Tensor:
        """(3, L, R, d): per block the previous block's gate, norm weight * (1 + scale), shift (once per generation)."""
        shift, scale, gate = torch.stack(mods).to(self.pack.dtype).unbind(2)  # each (L, R, d)
        gate_prev = torch.cat([torch.ones_like(gate[:1]), gate[:-1]])
        return torch.stack([gate_prev, self.pack.tensors["norm_weight"][:, None] * (1 + scale), shift]).to(
            self.model.dtype).contiguous()

    def args(self, hidden: Tensor, adaln: Tensor) -> list:
        p = self.pack.tensors
        return [hidden, self.pack.in_weight, p["out_weight_t"], adaln, self.conv_state,
                self.ssm_state, p["conv_weight"], p["conv_bias"], p["A_log"], p["D"], p["dt_bias"], NORM_EPS]

    def not_supported_reasons(self, hidden: Tensor, adaln: Tensor) -> list[str]:
        return ak.decode_chain.not_supported_reasons(*self.args(hidden, adaln))

    def step(self, hidden: Tensor, adaln: Tensor, last_gate: Tensor, final_mod: Tensor) -> Tensor:
        """One decoding step: hidden (R, d) -> logits (R, vocab); updates the caches in place."""
        out, residual = ak.mamba2_decode_chain(*self.args(hidden, adaln))
        return self.model.head(out, last_gate, residual, final_mod)


class RMSNorm(nn.Module):
    """Holds the weight; the normalisation itself runs in the fused `aim_kernels` ops."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


def _inv_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


def _sample_dt(n: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> Tensor:
    """mamba_ssm's dt initialisation: log-uniform in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt.clamp(min=floor)


class Mamba2Mixer(nn.Module):
    """mamba_ssm's Mamba2 with AiM's settings: scalar A per head, shared B/C, gated RMSNorm."""

    def __init__(self, config: AiMConfig):
        super().__init__()
        m = config.mixer
        self.d_inner, self.d_state, self.ngroups = config.d_inner, m["d_state"], m["ngroups"]
        self.headdim, self.chunk_size = m["headdim"], m["chunk_size"]
        self.nheads = self.d_inner // self.headdim
        conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.in_proj = nn.Linear(config.d_model, self.d_inner + conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, m["d_conv"], groups=conv_dim, padding=m["d_conv"] - 1)
        self.dt_bias = nn.Parameter(_inv_softplus(_sample_dt(self.nheads)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=False)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        conv_dim = self.conv1d.weight.shape[0]
        return zxbcdt.split([self.d_inner, conv_dim, self.nheads], dim=-1)

    def _out(self, y: Tensor, z: Tensor) -> Tensor:
        y = ak.rmsnorm_gated(y, z, self.norm.weight, NORM_EPS, self.d_inner // self.ngroups)
        return ak.linear(y, self.out_proj.weight)

    def forward(self, u: Tensor) -> Tensor:
        """Full sequence: u (batch, seqlen, d_model) -> (batch, seqlen, d_model)."""
        z, xBC, dt = self._split(ak.linear(u, self.in_proj.weight))
        xBC = ak.causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                               "silu").transpose(1, 2)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
        y = ak.ssd_chunk_scan(x.unflatten(-1, (self.nheads, self.headdim)), dt, -torch.exp(self.A_log.float()),
                              B.unflatten(-1, (self.ngroups, self.d_state)),
                              C.unflatten(-1, (self.ngroups, self.d_state)), self.chunk_size,
                              D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        return self._out(y.flatten(-2), z)

    def block_step(self, hidden: Tensor, residual: Optional[Tensor], hidden_gate: Optional[Tensor],
                   norm_weight: Tensor, shift: Tensor, scale: Tensor, cache: StateCache) -> tuple[Tensor, Tensor]:
        """State form: the block's prologue (see Block.step) and this mixer's step as one op, from the block's
        input to (output, residual); updates the cache in place."""
        return ak.mamba2_block_step(hidden, residual, hidden_gate, norm_weight, shift, scale, self.in_proj.weight,
                                    cache.conv_state, cache.ssm_state, self.conv1d.weight.squeeze(1),
                                    self.conv1d.bias, self.A_log, self.D, self.dt_bias, self.norm.weight, NORM_EPS,
                                    self.headdim, self.ngroups, self.out_proj.weight)

    def step(self, zxbcdt: Tensor, cache: ReplayCache) -> tuple[Tensor, Optional[Tensor]]:
        """Replay form: one token from its in_proj output (batch, in_proj features); updates the cache in place.

        Returns (output, None), or with one norm group (output, mean_sq): the output before its gated
        RMSNorm's 1/rms, which the next prologue applies (out_proj is linear)."""
        z, xBC, dt = self._split(zxbcdt)
        args = (xBC, dt, cache.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, cache.A, self.D,
                self.dt_bias, cache.hist_x, cache.hist_B, cache.hist_dt, cache.hist_cum, cache.step)
        if self.ngroups == 1:
            u, mean_sq = ak.mamba2_replay_step_gated(*args, z, self.norm.weight)
            return ak.linear(u, self.out_proj.weight), mean_sq
        return self._out(ak.mamba2_replay_step(*args).flatten(-2), z), None

    def allocate_cache(self, batch: int, device, dtype, state_dtype, max_len: int,
                       step: Optional[Tensor]) -> Union[StateCache, ReplayCache]:
        """Replay form when given the generation's step counter, the recurrent state form otherwise."""
        conv_dim, width = self.conv1d.weight.shape[0], self.conv1d.weight.shape[-1]
        conv_state = torch.zeros(batch, conv_dim, width - 1, device=device, dtype=dtype)
        if step is None:
            return StateCache(conv_state, torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                                                      dtype=state_dtype))
        history = ak.allocate_replay_history(batch, max_len, self.nheads, self.headdim, self.ngroups,
                                             self.d_state, device, dtype)
        return ReplayCache(conv_state, *history, torch.empty(self.nheads, device=device), step)

    def reset_cache(self, cache: Union[StateCache, ReplayCache]) -> None:
        """Start of a generation: empty windows and state (the replay history needs no reset)."""
        cache.conv_state.zero_()
        if isinstance(cache, StateCache):
            cache.ssm_state.zero_()
        else:
            cache.A.copy_(-torch.exp(self.A_log.float()))


class Mamba1Mixer(nn.Module):
    """mamba_ssm's Mamba (v1): per-channel A (d_inner, d_state), input-dependent B, C and dt."""

    def __init__(self, config: AiMConfig):
        super().__init__()
        m = config.mixer
        self.d_inner, self.d_state, self.dt_rank = config.d_inner, m["d_state"], m["dt_rank"]
        self.in_proj = nn.Linear(config.d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, m["d_conv"], groups=self.d_inner,
                                padding=m["d_conv"] - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(_inv_softplus(_sample_dt(self.d_inner)))
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.d_state + 1).float()).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=False)

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C  # dt_proj's bias is added inside the scan

    def forward(self, u: Tensor) -> Tensor:
        x, z = ak.linear(u, self.in_proj.weight).chunk(2, dim=-1)
        x = ak.causal_conv1d(x.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        y = ak.selective_scan(x, dt.transpose(1, 2), -torch.exp(self.A_log.float()), B.transpose(1, 2),
                              C.transpose(1, 2), D=self.D, z=z.transpose(1, 2), delta_bias=self.dt_proj.bias,
                              delta_softplus=True)
        return ak.linear(y.transpose(1, 2), self.out_proj.weight)

    def step(self, xz: Tensor, cache: StateCache) -> tuple[Tensor, None]:
        """One token from its in_proj output (batch, 2 * d_inner); updates the cache in place."""
        conv_state, ssm_state = cache
        x, z = xz.chunk(2, dim=-1)
        x = ak.causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        dt, B, C = self._ssm_inputs(x)
        y = ak.selective_state_update(  # Mamba1 is one head of headdim d_inner
            ssm_state, x[:, None], dt[:, None], -torch.exp(self.A_log.float())[None], B[:, None], C[:, None],
            D=self.D[None], z=z[:, None], dt_bias=self.dt_proj.bias[None], dt_softplus=True)
        return ak.linear(y[:, 0], self.out_proj.weight), None

    def allocate_cache(self, batch: int, device, dtype, state_dtype, max_len: int,
                       step: Optional[Tensor]) -> StateCache:
        """Always the recurrent form (the replay form is Mamba2's)."""
        width = self.conv1d.weight.shape[-1]
        return StateCache(torch.zeros(batch, self.d_inner, width - 1, device=device, dtype=dtype),
                          torch.zeros(batch, 1, self.d_inner, self.d_state, device=device, dtype=state_dtype))

    def reset_cache(self, cache: StateCache) -> None:
        cache.conv_state.zero_()
        cache.ssm_state.zero_()


class Block(nn.Module):
    """residual += gate_prev * hidden; h = RMSNorm(residual) * (1 + scale) + shift; hidden = mixer(h)."""

    def __init__(self, config: AiMConfig):
        super().__init__()
        d = config.d_model
        self.norm = RMSNorm(d)
        self.mixer = (Mamba2Mixer if config.layer == "Mamba2" else Mamba1Mixer)(config)
        self.mixer_drop = config.mixer_drop
        if config.adaln_group:
            self.scale_shift_table = nn.Parameter(torch.randn(1, 3, d) / d ** 0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))

    def forward(self, hidden: Tensor, hidden_gate: Optional[Tensor], residual: Optional[Tensor],
                modulation: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden/residual (batch, seqlen, d); hidden_gate (batch, d) the previous block's gate (or None);
        modulation (batch, 3, d) = (shift, scale, gate).

        Returns (mixer output, this block's gate, residual): the gate multiplies the output inside the
        next fused residual add, saving a pass.
        """
        shift, scale, gate = modulation.unbind(1)
        h, residual = ak.add_rmsnorm_modulate(hidden, residual, self.norm.weight, shift, scale, NORM_EPS,
                                              x_gate=hidden_gate)
        return F.dropout(self.mixer(h), self.mixer_drop, self.training), gate, residual

    def step(self, hidden: Tensor, hidden_gate: Optional[Tensor], residual: Optional[Tensor], modulation: Tensor,
             cache: tuple, hidden_mean_sq: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """`forward` for one token (hidden (batch, d)), the mixer taking a recurrent step. A Mamba2 mixer in
        state form runs the whole block as one op (`mamba2_block_step`); otherwise the prologue and in_proj
        are one op (one kernel at few rows). hidden_mean_sq: the previous mixer's deferred norm
        (Mamba2Mixer.step), returned likewise for this block's output."""
        shift, scale, gate = modulation.unbind(1)
        if isinstance(self.mixer, Mamba2Mixer) and isinstance(cache, StateCache):
            h, residual = self.mixer.block_step(hidden, residual, hidden_gate, self.norm.weight, shift, scale, cache)
            return h, gate, residual, None
        projected, residual = ak.add_rmsnorm_modulate_linear(hidden, residual, self.norm.weight, shift, scale,
                                                             NORM_EPS, hidden_gate, self.mixer.in_proj.weight,
                                                             hidden_mean_sq, NORM_EPS)
        h, h_mean_sq = self.mixer.step(projected, cache)
        return h, gate, residual, h_mean_sq


class AiM(nn.Module):
    """AiM: `mamba` (the stage-2 language model) and, optionally, `vqvae` (the LlamaGen tokenizer).

    model(tokens, labels) -> teacher-forced logits; generate_tokens() and generate() sample (aim/generation.py).
    """

    def __init__(self, config: AiMConfig, vq_config: Optional[VQConfig] = None):
        super().__init__()
        self.config = config
        d, c = config.d_model, config
        backbone = nn.Module()
        backbone.embeddings = nn.ModuleDict(dict(
            word_embeddings=nn.Embedding(c.vocab_size, d),
            position_embeddings=nn.Embedding(c.num_tokens + 1, d)))
        backbone.cls_embed = nn.ModuleDict(dict(embedding_table=nn.Embedding(c.num_classes + 1, d)))
        if c.adaln_group:
            backbone.adaln_group = nn.Sequential(nn.SiLU(), nn.Linear(d, c.num_groups * 3 * d))
        backbone.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        backbone.norm_f = RMSNorm(d)
        backbone.final_layer = nn.ModuleDict(dict(
            norm_final=RMSNorm(d), adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))))
        self.mamba = nn.Module()
        self.mamba.backbone = backbone
        self.mamba.lm_head = nn.Linear(d, c.vocab_size, bias=False)
        self._init_weights()
        self.tie_weights()
        self.vqvae = VQModel(vq_config) if vq_config is not None else None

    # ---- parameters ----------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.mamba.backbone

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.mamba.lm_head.weight = self.backbone.embeddings.word_embeddings.weight

    def _init_weights(self) -> None:
        """The official initialisation (GPT-2 style, DiT-style zeroed adaLN outputs)."""
        n_layer = self.config.n_layer
        for module in self.mamba.modules():
            if isinstance(module, nn.Linear) and module.bias is not None \
                    and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for layer in self.backbone.layers:
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(n_layer)
            if not self.config.adaln_group:
                nn.init.zeros_(layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.backbone.final_layer.adaLN_modulation[-1].weight)

    def num_params(self) -> int:
        """Stage-2 parameters, the tied head counted once (the official get_num_params)."""
        return sum(p.numel() for p in self.mamba.parameters())

    @property
    def device(self) -> torch.device:
        return self.mamba.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mamba.lm_head.weight.dtype

    # ---- the model -----------------------------------------------------------------------------
    def check_labels(self, labels: Tensor, allow_null: bool = False) -> Tensor:
        """Class ids as int64 on the model's device; raises ValueError when out of range."""
        labels = torch.as_tensor(labels, device=self.device)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
        labels = labels.reshape(-1).long()
        hi = self.config.num_classes + (1 if allow_null else 0)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= hi:
            raise ValueError(f"labels must be non-empty class ids in [0, {hi}), got {labels.tolist()[:16]}")
        return labels

    def class_embedding(self, labels: Tensor) -> Tensor:
        """(B,) class ids, null class = num_classes -> (B, d). Labels are dropped only in training."""
        if self.training and LABEL_DROP_PROB > 0:
            drop = torch.rand(labels.shape, device=labels.device) < LABEL_DROP_PROB
            labels = torch.where(drop, self.config.num_classes, labels)
        return self.backbone.cls_embed.embedding_table(labels)

    def conditioning(self, cond: Tensor) -> tuple[list[Tensor], Tensor]:
        """Class-only adaLN parameters: per block (B, 3, d) = (shift, scale, gate); final (B, 2, d).

        With adaLN-group, block i uses piece i % G of the shared projection (interleaved).
        """
        c, b, d = self.config, cond.shape[0], self.config.d_model
        layers = self.backbone.layers
        if c.adaln_group:
            pieces = self.backbone.adaln_group(cond).view(b, c.num_groups * 3, d).chunk(c.num_groups, dim=1)
            mods = [pieces[i % c.num_groups] + layer.scale_shift_table for i, layer in enumerate(layers)]
        else:
            mods = [layer.adaLN_modulation(cond).view(b, 3, d) for layer in layers]
        final = self.backbone.final_layer.adaLN_modulation(cond).view(b, 2, d)
        return mods, final

    def embed_tokens(self, tokens: Tensor, positions: Tensor) -> Tensor:
        emb = self.backbone.embeddings
        h = F.dropout(emb.word_embeddings(tokens), self.config.token_drop, self.training)
        return h + emb.position_embeddings(positions)

    def head(self, hidden: Tensor, gate: Tensor, residual: Tensor, final_mod: Tensor,
             hidden_mean_sq: Optional[Tensor] = None) -> Tensor:
        """norm_f(gate * hidden + residual) -> RMSNorm -> adaLN modulate -> lm_head (hidden_mean_sq: as Block.step)."""
        bb = self.backbone
        h, _ = ak.add_rmsnorm(hidden, residual, bb.norm_f.weight, NORM_EPS, x_gate=gate, x_mean_sq=hidden_mean_sq,
                              x_eps=NORM_EPS)
        shift, scale = final_mod.unbind(1)
        h, _ = ak.add_rmsnorm_modulate(h, None, bb.final_layer.norm_final.weight, shift, scale, NORM_EPS)
        return ak.linear(h, self.mamba.lm_head.weight)

    def forward(self, tokens: Tensor, labels: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        """Teacher-forced logits (B, num_tokens, vocab) for image tokens (B, num_tokens) and classes (B,).

        The input is [class] + tokens[:-1]; token k gets position id k (`positions` overrides the
        ids of tokens[:-1], e.g. arange(1, num_tokens) for the official decoding convention).
        """
        c = self.config
        if tokens.dim() != 2 or tokens.shape[1] != c.num_tokens:
            raise ValueError(f"tokens must be (batch, {c.num_tokens}), got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise ValueError(f"tokens must be integer ids in [0, {c.vocab_size})")
        labels = self.check_labels(labels, allow_null=True)
        if labels.shape[0] != tokens.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for a batch of {tokens.shape[0]} token rows")
        tokens = tokens.to(self.device)
        if positions is None:
            positions = torch.arange(c.num_tokens - 1, device=self.device)
        cond = self.class_embedding(labels)
        mods, final_mod = self.conditioning(cond)
        hidden = torch.cat([cond[:, None], self.embed_tokens(tokens[:, :-1], positions)], dim=1)
        gate = residual = None
        for layer, mod in zip(self.backbone.layers, mods):
            hidden, gate, residual = layer(hidden, gate, residual, mod)
        return self.head(hidden, gate, residual, final_mod)

    def step(self, hidden: Tensor, cache: list, mods: list[Tensor], final_mod: Tensor) -> Tensor:
        """One decoding step: hidden (R, d) -> logits (R, vocab); updates `cache` in place."""
        gate = residual = mean_sq = None
        for layer, mod, layer_cache in zip(self.backbone.layers, mods, cache):
            hidden, gate, residual, mean_sq = layer.step(hidden, gate, residual, mod, layer_cache, mean_sq)
        return self.head(hidden, gate, residual, final_mod, mean_sq)

    def allocate_cache(self, rows: int, state_dtype: Optional[torch.dtype] = None,
                       replay_step: Optional[Tensor] = None) -> list:
        """Per-layer decode caches. The SSM state is float32 by default (float64 models: float64); with
        `replay_step` (the generation's device step counter) Mamba2 layers keep the replay form instead."""
        state_dtype = state_dtype or torch.promote_types(self.dtype, torch.float32)
        return [layer.mixer.allocate_cache(rows, self.device, self.dtype, state_dtype, self.config.num_tokens,
                                           replay_step) for layer in self.backbone.layers]

    def reset_cache(self, cache: list) -> None:
        for layer, layer_cache in zip(self.backbone.layers, cache):
            layer.mixer.reset_cache(layer_cache)

    # ---- generation and checkpoints, defined beside the sampler and the loader --------------------
    generate_tokens = generation.generate_tokens
    generate = generation.generate
    from_pretrained = classmethod(checkpoint.load_pretrained)
    save_pretrained = checkpoint.save_pretrained
