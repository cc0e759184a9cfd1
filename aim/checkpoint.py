"""Official AiM checkpoints (AIM_SPEC §4): config.json + model.safetensors (or pytorch_model.bin),
keys `mamba.*` (stage 2) and optionally `vqvae.*` (the tokenizer), read and written unchanged."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch

from ._state_dict import load_state_dict_strict
from .config import AiMConfig
from .vq import VQConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
LM_HEAD = "mamba.lm_head.weight"
WORD_EMBEDDINGS = "mamba.backbone.embeddings.word_embeddings.weight"


def resolve_checkpoint_dir(path_or_repo_id: str) -> str:
    """A local directory as is; otherwise a Hugging Face hub id, downloaded (or taken from the cache)."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    how = ("pass a local directory holding config.json and model.safetensors "
           f"(e.g. `huggingface-cli download {path_or_repo_id} --local-dir ./{path_or_repo_id.split('/')[-1]}` "
           "on a machine with network access)")
    if os.path.exists(path_or_repo_id) or path_or_repo_id.count("/") != 1:
        raise ValueError(f"{path_or_repo_id!r} is neither a checkpoint directory nor a hub id 'owner/name': {how}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{path_or_repo_id!r} is not a local directory and huggingface_hub is not installed "
                         f"(pip install 'aim-kernels[hub]'), or {how}") from None
    try:
        return snapshot_download(path_or_repo_id, allow_patterns=["config.json", *WEIGHT_FILES])
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise ValueError(f"could not fetch {path_or_repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                         f"{e}); {how}") from None


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} could not be read as a checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} does not hold a flat state dict of tensors")
        return state
    raise ValueError(f"{directory} holds none of {WEIGHT_FILES}")


def load_pretrained(cls, path_or_repo_id: str, device=None, dtype: Optional[torch.dtype] = None):
    """Load an official AiM checkpoint (directory or hub id such as "hp-l33/aim-large").

    The tokenizer is loaded when the checkpoint holds `vqvae.*` weights (its shape read off them); a
    stage-2-only checkpoint gives a model with `vqvae = None`. Weights are kept as stored (float32)
    unless `dtype` is given.
    """
    directory = resolve_checkpoint_dir(path_or_repo_id)
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{directory} has no config.json")
    config = AiMConfig.from_json(config_path)
    state = read_state_dict(directory)
    if config.tie_embeddings and LM_HEAD in state:
        head = state.pop(LM_HEAD)
        if WORD_EMBEDDINGS in state and not torch.equal(head, state[WORD_EMBEDDINGS]):
            warnings.warn(f"{directory}: tie_embeddings is set but {LM_HEAD} differs from the word "
                          "embeddings; using the word embeddings, as the tied official model does", stacklevel=2)
    if config.tie_embeddings and WORD_EMBEDDINGS in state:
        state[LM_HEAD] = state[WORD_EMBEDDINGS]  # the module lists the shared weight under both names
    has_vq = any(k.startswith("vqvae.") for k in state)
    with torch.device("meta"):
        model = cls(config, vq_config=VQConfig.from_state_dict(state, "vqvae.") if has_vq else None)
    load_state_dict_strict(model, state, f"checkpoint {directory}", assign=True)
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model, directory: str, safe_serialization: bool = True) -> None:
    """Write config.json and model.safetensors (or pytorch_model.bin) in the official format."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop(LM_HEAD)  # shared with the word embeddings; the official files omit it too
    if safe_serialization:
        from safetensors.torch import save_file
        save_file(state, os.path.join(directory, WEIGHT_FILES[0]), metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(directory, WEIGHT_FILES[1]))
