// A batch-1 (two CFG rows) decode step through a chain of Mamba2 blocks in ONE persistent kernel: the
// CUDA implementation of aim_kernels::mamba2_decode_chain (aim_kernels/decode_chain.py has the reference).
//
// Torch-free launcher, like csrc/causal_conv1d: only csrc/ops.cpp includes torch. Needs sm_90 (bulk copies,
// mbarriers, vector atomics) and every CTA resident at once (a cooperative launch, one CTA per SM).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace aimk {

struct ChainParams {
  // weights and adaln: all bf16, or all float32 (weights_f32)
  const void* const* in_weight;  // device array of L pointers to (N1, D) in_proj weights, N1 = 2 DI + 2 NS + H
  const void* out_weight_t;      // (L, DI, D): out_proj transposed, the mixer's norm weight folded in
  const void* adaln;             // (3, L, 2, D): gate on the previous block's output, norm weight * (1 + scale), shift
  bool weights_f32;
  float* conv_state;             // (L, 2, DI + 2 NS, 3), updated in place
  float* ssm_state;              // (L, 2, H, P, NS), updated in place
  const float* conv_weight;      // (L, DI + 2 NS, 4)
  const float* conv_bias;        // (L, DI + 2 NS)
  const float* A_log;            // (L, H)
  const float* D;                // (L, H)
  const float* dt_bias;          // (L, H)
  const void* x;                 // (2, D): block 0's input (its residual too), float32 or bf16 (io_bf16)
  float* residual;               // (2, D): the last block's residual
  void* out;                     // (2, D): the last block's mixer output, in x's dtype
  bool io_bf16;
  // Carved by decode_chain() from one scratch allocation, zeroed by one memset:
  unsigned long long* bcdt;      // (L, 2, 2 NS + H)
  float* acc;                    // (L + 1, K, 2, D): each block's out_proj sums, K replicas
  float* sumsq;                  // (L + 1, K, 2): the gated norms' sums of squares
  unsigned* barrier;             // (1)
  int layers, d_model, heads;
  float eps;
};

// Fixed by the kernel: 2 rows, headdim 64, d_state 128, conv width 4; per CTA at most kChainMaxChannels of the DI
// channels (and at most d_model / 64, so that both rows' state rows fill one ring slot), kChainMaxBCDTRows of the
// 2 d_state + H B/C/dt rows, kChainMaxHeads heads.
constexpr int kChainRows = 2, kChainReplicas = 2, kChainHeaddim = 64, kChainDState = 128, kChainConvWidth = 4;
constexpr int kChainMaxChannels = 32, kChainMaxBCDTRows = 8, kChainMaxHeads = 64;
constexpr int kChainStaticSmem = 6 * 1024;  // the kernel's static shared memory, rounded up

// Shared memory the kernel needs for d_model and the weights' dtype, or 0 if d_model is not one it was built for
// (768, 1024, 1536).
int decode_chain_smem_bytes(int d_model, bool weights_f32);
// Bytes of the scratch that decode_chain() carves into bcdt, acc, sumsq and barrier.
size_t decode_chain_scratch_bytes(int layers, int d_model, int heads);
// Launches the chain on `grid` CTAs (the SM count): zeroes `scratch` (decode_chain_scratch_bytes, 16-byte aligned)
// with one memset, then one cooperative launch. p's scratch pointers are set from it.
cudaError_t decode_chain(ChainParams p, void* scratch, int grid, cudaStream_t stream);

}  // namespace aimk
