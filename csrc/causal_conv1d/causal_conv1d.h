// Depthwise causal conv1d (+ optional SiLU): launchers for the CUDA kernels.
//
// This header is deliberately free of torch headers: the kernels (causal_conv1d.cu) compile with
// nvcc alone, fast, and only csrc/ops.cpp includes torch. Every size and stride is in elements.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace aimk {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Weight (dim, width) and bias (dim,) or null: contiguous, 16-byte aligned, both of x's dtype or both
// float32 (params_f32), read in that dtype and converted to float32 in registers.
struct ConvParams {
  // x (batch, dim, seqlen), out and dout/dx alike.
  const void* x;
  const void* dout;    // backward only
  void* out;           // forward: out; backward: dx
  const void* weight;
  const void* bias;
  bool params_f32;
  float* dweight_bias; // backward only: (dim, width + 1) float32 accumulator, zero-initialised; column `width` = dbias
  int64_t batch, dim, seqlen;
  int64_t x_sb, x_sd, x_st;
  int64_t o_sb, o_sd, o_st;
  int64_t g_sb, g_sd, g_st;  // dout strides (backward)
  int width;
  bool silu;
  DType dtype;
};

struct UpdateParams {
  const void* x;       // (batch, dim)
  void* state;         // (batch, dim, state_len), same dtype as x; updated in place
  void* out;           // (batch, dim)
  const void* weight;  // as in ConvParams
  const void* bias;
  bool params_f32;
  int64_t batch, dim, state_len;
  int64_t x_sb, x_sd;
  int64_t s_sb, s_sd, s_st;
  int64_t o_sb, o_sd;
  int width;
  bool silu;
  DType dtype;
};

// Each returns cudaSuccess, or the error of the launch (cudaGetLastError right after it). The
// kernels take the channel-vector path (16-byte loads forward, 8-byte backward) when the channel
// stride is 1 and sizes, strides and pointers are aligned to it, and a scalar any-stride path otherwise.
cudaError_t causal_conv1d_fwd(const ConvParams& p, cudaStream_t stream);
cudaError_t causal_conv1d_bwd(const ConvParams& p, cudaStream_t stream);
cudaError_t causal_conv1d_update(const UpdateParams& p, cudaStream_t stream);

}  // namespace aimk
