"""aim-kernels: fast kernels for AiM (autoregressive image generation with Mamba).

Every op is a `torch.library` custom op in the `aim_kernels` namespace whose default implementation
is the pure-PyTorch reference (`*_ref`); faster backends register for the CUDA dispatch key.
"""
from .causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref

__version__ = "0.1.0"
