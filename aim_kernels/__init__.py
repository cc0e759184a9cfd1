"""aim-kernels: fast kernels for AiM (autoregressive image generation with Mamba).

Every op is a `torch.library` custom op in the `aim_kernels` namespace whose default implementation
is the pure-PyTorch reference (`*_ref`); faster backends register for the CUDA dispatch key.
"""
from .causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref
from .gemv import add_rmsnorm_modulate_linear, add_rmsnorm_modulate_linear_ref, linear, linear_ref
from .decode import mamba2_block_step, mamba2_block_step_ref, mamba2_decode_step, mamba2_decode_step_ref
from .decode_chain import mamba2_decode_chain, mamba2_decode_chain_ref
from .decode_loop import embed_step, embed_step_ref, record_token, record_token_ref
from .elementwise import add_bias, add_bias_ref
from .group_norm import group_norm, group_norm_ref
from .norm import (adaln_modulate, adaln_modulate_ref, add_rmsnorm, add_rmsnorm_modulate,
                   add_rmsnorm_modulate_ref, add_rmsnorm_ref, rmsnorm_gated, rmsnorm_gated_ref)
from .replay import (allocate_replay_history, mamba2_replay_step, mamba2_replay_step_gated,
                     mamba2_replay_step_gated_ref, mamba2_replay_step_ref, ssd_replay_step, ssd_replay_step_ref)
from .sampling import check_sampling_args, guided_logits, sample_next_token, sample_next_token_ref
from .ssm import (selective_scan, selective_scan_ref, selective_state_update, selective_state_update_ref,
                  ssd_chunk_scan, ssd_chunk_scan_ref)

__version__ = "0.1.0"
