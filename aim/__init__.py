"""AiM (autoregressive image generation with Mamba): a small PyTorch model over aim_kernels ops.

    from aim import AiM
    model = AiM.from_pretrained("hp-l33/aim-large").cuda()
    images = model.generate(batch=8, temperature=1, top_p=0.98, top_k=600, cfg_scale=5)
"""
from .config import PRESETS, AiMConfig
from .model import AiM
from .vq import VQConfig, VQModel

__all__ = ["AiM", "AiMConfig", "PRESETS", "VQConfig", "VQModel"]
