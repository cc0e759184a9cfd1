"""AiMConfig: the official checkpoint's config.json fields (AIM_SPEC §4), validated, with presets."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

# Mixer hyper-parameters are mamba_ssm's defaults; AiM overrides none of them (AIM_SPEC §2).
MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256)
MAMBA1_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto")


def is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class AiMConfig:
    d_model: int = 1024
    n_layer: int = 48
    vocab_size: int = 16384
    num_classes: int = 1000
    num_tokens: int = 256
    adaln_group: bool = True
    num_groups: int = 4
    ssm_cfg: dict = field(default_factory=lambda: {"layer": "Mamba2"})
    tie_embeddings: bool = True
    d_intermediate: int = 0
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    token_drop: float = 0.0
    mixer_drop: float = 0.0
    mlp_drop: float = 0.0

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "num_classes", "num_tokens", "num_groups"):
            value = getattr(self, name)
            if not is_positive_int(value):
                raise ValueError(f"AiMConfig.{name} must be a positive int, got {value!r}")
        unsupported = []
        if self.d_intermediate:
            unsupported.append(f"d_intermediate={self.d_intermediate} (MLP blocks)")
        if self.attn_layer_idx:
            unsupported.append(f"attn_layer_idx={self.attn_layer_idx} (attention layers)")
        if not self.rms_norm:
            unsupported.append("rms_norm=False (LayerNorm)")
        if not self.residual_in_fp32:
            unsupported.append("residual_in_fp32=False")
        if self.layer not in ("Mamba1", "Mamba2"):
            unsupported.append(f"ssm_cfg.layer={self.layer!r}")
        unknown = set(self.ssm_cfg) - {"layer"} - set(self.mixer_defaults)
        if unknown:
            unsupported.append(f"ssm_cfg keys {sorted(unknown)}")
        if unsupported:
            raise ValueError("AiMConfig: not supported by this implementation (no released AiM model uses "
                             "them): " + "; ".join(unsupported))
        if self.layer == "Mamba2" and self.d_inner % self.mixer["headdim"]:
            raise ValueError(f"d_inner {self.d_inner} must be a multiple of headdim {self.mixer['headdim']}")

    # ---- derived -------------------------------------------------------------------------------
    @property
    def layer(self) -> str:
        return self.ssm_cfg.get("layer", "Mamba1")  # mamba_ssm's default when unspecified

    @property
    def mixer_defaults(self) -> dict:
        return MAMBA2_DEFAULTS if self.layer == "Mamba2" else MAMBA1_DEFAULTS

    @property
    def mixer(self) -> dict:
        """The mixer's hyper-parameters: mamba_ssm defaults overridden by ssm_cfg."""
        cfg = {**self.mixer_defaults, **{k: v for k, v in self.ssm_cfg.items() if k != "layer"}}
        if cfg.get("dt_rank") == "auto":
            cfg["dt_rank"] = -(-self.d_model // 16)
        return cfg

    @property
    def d_inner(self) -> int:
        return self.mixer["expand"] * self.d_model

    # ---- presets and I/O -----------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "AiMConfig":
        """`AiM-B`, `AiM-L`, `AiM-XL` (released), `AiM-1B` (paper only, shape inferred)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> "AiMConfig":
        """From an official config.json dict; unknown fields are ignored with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            warnings.warn(f"AiMConfig: ignoring unknown config fields {extra}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, path: str) -> "AiMConfig":
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object of AiMConfig fields")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "AiM-B": dict(d_model=768, n_layer=24, adaln_group=False, num_groups=1),
    "AiM-L": dict(d_model=1024, n_layer=48, adaln_group=True, num_groups=4),
    "AiM-XL": dict(d_model=1536, n_layer=48, adaln_group=True, num_groups=4),
    "AiM-1B": dict(d_model=2048, n_layer=48, adaln_group=True, num_groups=4),
}
