// Depthwise causal conv1d (+ optional SiLU) on CUDA: forward, backward and the one-step decode update.
//
// No torch headers here (fast to compile): csrc/ops.cpp checks the tensors and calls the launchers.
//
// Thread mapping (forward and backward): threadIdx.x walks channels, VEC channels per thread, so a
// warp reads 32 * VEC consecutive channels of one timestep -- coalesced for the channel-last layout
// the model uses (x = xBC(B, L, D).transpose(1, 2), stride(1) == 1); threadIdx.y walks chunks of
// CHUNK timesteps. Each thread keeps a sliding window of the last W inputs in registers and issues all
// the loads of its chunk before the first use. Any other layout takes the same kernels with VEC = 1
// and arbitrary strides (correct, slower). Accumulation is in float32; weight and bias are read in their
// own dtype (x's, or float32) and converted in registers, so the op needs no conversion kernels.
#include "causal_conv1d.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <type_traits>

namespace aimk {
namespace {

constexpr int kBlockX = 32;  // threads across channels (one warp)
constexpr int kBlockY = 4;   // threads across time chunks
// Timesteps per thread (forward / backward). AIMK_FWD_CHUNK / AIMK_BWD_CHUNK pick another compiled
// variant for tuning experiments (read at each launch; benchmarks/bench_causal_conv1d.py --sweep).
constexpr int kFwdChunk = 16;
constexpr int kBwdChunk = 8;
constexpr int kBwdIters = 8;  // backward: each thread does this many chunks (fewer dweight atomics)

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) {  // exact; plain bit ops (the intrinsic is inline asm)
  return __uint_as_float(static_cast<unsigned>(__bfloat16_as_ushort(v)) << 16);
}
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

template <int BYTES> struct RawT;
template <> struct RawT<2> { using type = unsigned short; };
template <> struct RawT<4> { using type = unsigned int; };
template <> struct RawT<8> { using type = uint2; };
template <> struct RawT<16> { using type = uint4; };

// VEC contiguous elements moved with one load/store instruction.
template <typename T, int VEC>
struct Pack {
  using raw_t = typename RawT<sizeof(T) * VEC>::type;
  raw_t raw;
  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const raw_t*>(p); }
  __device__ __forceinline__ void zero() { raw = raw_t{}; }
  __device__ __forceinline__ float get(int i) const { return to_f(reinterpret_cast<const T*>(&raw)[i]); }
  __device__ __forceinline__ void set(int i, float v) { reinterpret_cast<T*>(&raw)[i] = from_f<T>(v); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<raw_t*>(p) = raw; }
};

__device__ __forceinline__ float silu_f(float v) { return v / (1.f + __expf(-v)); }

// SiLU for outputs stored in bfloat16: v * sigmoid(v) = h + h * tanh(h), h = v / 2, with the hardware
// tanh (one MUFU op instead of two; its ~2^-11 relative error is far below bfloat16's 2^-8 rounding).
template <typename T> __device__ __forceinline__ float silu_out(float v) { return silu_f(v); }
template <> __device__ __forceinline__ float silu_out<__nv_bfloat16>(float v) {
  const float h = 0.5f * v;
  float t;
  asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(h));
  return fmaf(h, t, h);
}
template <typename T> __device__ __forceinline__ float sigmoid_f(float v) { return 1.f / (1.f + __expf(-v)); }
template <> __device__ __forceinline__ float sigmoid_f<__nv_bfloat16>(float v) {  // 1/2 + tanh(v/2)/2
  float t;
  asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(0.5f * v));
  return fmaf(0.5f, t, 0.5f);
}

// N contiguous values of type P as floats, moved with the widest loads (up to 16 bytes) that N * sizeof(P)
// allows: src must be aligned to that width (callers read chunk i of N values from a 16-byte aligned base).
template <typename P, int N>
__device__ __forceinline__ void load_floats(const P* src, float* dst) {
  constexpr int kBytes = N * sizeof(P);
  constexpr int kLoad = kBytes % 16 == 0 ? 16 : kBytes % 8 == 0 ? 8 : kBytes % 4 == 0 ? 4 : sizeof(P);
  constexpr int K = kLoad / sizeof(P);
#pragma unroll
  for (int j = 0; j < N / K; ++j) {
    Pack<P, K> v;
    v.load(src + j * K);
#pragma unroll
    for (int e = 0; e < K; ++e) dst[j * K + e] = v.get(e);
  }
}

// Weights of channels [c0, c0 + VEC) and their biases, in x's dtype T or float32 (params_f32: a runtime
// switch, uniform across the grid, not another instantiation). The weight is (dim, W) contiguous, so a
// thread's VEC * W weights are contiguous: width 4 in bfloat16 is one 8-byte load for one channel, four
// 16-byte loads for the vector path's 8 channels.
template <typename T, int W, int VEC, typename Params>
__device__ __forceinline__ void load_weights(const Params& p, int64_t c0, float (&w)[VEC][W], float (&bias)[VEC]) {
  const bool f32 = std::is_same_v<T, float> || p.params_f32;
  if (f32) load_floats<float, VEC * W>(static_cast<const float*>(p.weight) + c0 * W, &w[0][0]);
  else load_floats<T, VEC * W>(static_cast<const T*>(p.weight) + c0 * W, &w[0][0]);
  if (p.bias == nullptr) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) bias[i] = 0.f;
  } else if (f32) {
    load_floats<float, VEC>(static_cast<const float*>(p.bias) + c0, bias);
  } else {
    load_floats<T, VEC>(static_cast<const T*>(p.bias) + c0, bias);
  }
}

// ---- forward -----------------------------------------------------------------------------------

template <typename T, int W, int VEC, int CH>
__global__ void __launch_bounds__(kBlockX * kBlockY) fwd_kernel(ConvParams p) {
  const int64_t cblocks = (p.dim + kBlockX * VEC - 1) / (kBlockX * VEC);
  const int64_t b = blockIdx.x / cblocks;
  const int64_t c0 = ((blockIdx.x % cblocks) * kBlockX + threadIdx.x) * VEC;
  const int64_t t0 = ((int64_t)blockIdx.y * kBlockY + threadIdx.y) * CH;
  if (c0 >= p.dim || t0 >= p.seqlen) return;

  const T* x = static_cast<const T*>(p.x) + b * p.x_sb + c0 * p.x_sd;
  T* out = static_cast<T*>(p.out) + b * p.o_sb + c0 * p.o_sd;

  // Issue every load of the chunk (and its W - 1 halo) first.
  Pack<T, VEC> in[CH + W - 1];
#pragma unroll
  for (int j = 0; j < CH + W - 1; ++j) {
    const int64_t t = t0 - (W - 1) + j;
    if (t >= 0 && t < p.seqlen) in[j].load(x + t * p.x_st); else in[j].zero();
  }
  float w[VEC][W], bias[VEC];
  load_weights<T, W, VEC>(p, c0, w, bias);
  // Sliding window of the last W inputs as floats: each input is converted once.
  float win[W][VEC];
#pragma unroll
  for (int k = 0; k < W - 1; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) win[k + 1][i] = in[k].get(i);
  }
#pragma unroll
  for (int j = 0; j < CH; ++j) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
#pragma unroll
      for (int k = 0; k < W - 1; ++k) win[k][i] = win[k + 1][i];
      win[W - 1][i] = in[j + W - 1].get(i);
    }
    const int64_t t = t0 + j;
    if (t < p.seqlen) {
      Pack<T, VEC> o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float acc = bias[i];
#pragma unroll
        for (int k = 0; k < W; ++k) acc = fmaf(w[i][k], win[k][i], acc);
        o.set(i, p.silu ? silu_out<T>(acc) : acc);
      }
      o.store(out + t * p.o_st);
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------
// g[t] = dout[t] * act'(pre[t]);  dx[s] = sum_k w[k] g[s + W-1-k];  dw[k] = sum_t g[t] x[t-W+1+k];  db = sum_t g[t].
// A thread streams t over its chunk plus W - 1 steps, keeping windows of x and g in registers; dx of
// step s = t - (W-1) is ready once g[t] is known. dweight/dbias partial sums are reduced over the
// block's threadIdx.y in shared memory, then added to the float32 accumulator with one atomic each.

template <typename T, int W, int VEC, int CH>
__global__ void __launch_bounds__(kBlockX * kBlockY) bwd_kernel(ConvParams p) {
  __shared__ float red[kBlockY][W + 1][kBlockX * VEC];
  const int64_t cblocks = (p.dim + kBlockX * VEC - 1) / (kBlockX * VEC);
  const int64_t b = blockIdx.x / cblocks;
  const int64_t c0 = ((blockIdx.x % cblocks) * kBlockX + threadIdx.x) * VEC;
  const bool active = c0 < p.dim;

  float w[VEC][W], bias[VEC], dw[VEC][W], db[VEC];
  if (active) load_weights<T, W, VEC>(p, c0, w, bias);  // only active threads read w and bias
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
#pragma unroll
    for (int k = 0; k < W; ++k) dw[i][k] = 0.f;
    db[i] = 0.f;
  }

  if (active) {
    const T* x = static_cast<const T*>(p.x) + b * p.x_sb + c0 * p.x_sd;
    const T* dout = static_cast<const T*>(p.dout) + b * p.g_sb + c0 * p.g_sd;
    T* dx = static_cast<T*>(p.out) + b * p.o_sb + c0 * p.o_sd;
    const int64_t tile = (int64_t)CH * kBlockY * kBwdIters;
    for (int it = 0; it < kBwdIters; ++it) {
      const int64_t t0 = blockIdx.y * tile + ((int64_t)it * kBlockY + threadIdx.y) * CH;
      if (t0 >= p.seqlen) break;
      // x over [t0 - (W-1), t0 + CHUNK + W-1), dout over [t0, t0 + CHUNK + W-1); zero outside [0, L).
      Pack<T, VEC> xin[CH + 2 * (W - 1)], gin[CH + W - 1];
#pragma unroll
      for (int j = 0; j < CH + 2 * (W - 1); ++j) {
        const int64_t t = t0 - (W - 1) + j;
        if (t >= 0 && t < p.seqlen) xin[j].load(x + t * p.x_st); else xin[j].zero();
      }
#pragma unroll
      for (int j = 0; j < CH + W - 1; ++j) {
        const int64_t t = t0 + j;
        if (t < p.seqlen) gin[j].load(dout + t * p.g_st); else gin[j].zero();
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float xv[CH + 2 * (W - 1)];
#pragma unroll
        for (int j = 0; j < CH + 2 * (W - 1); ++j) xv[j] = xin[j].get(i);
        float g[CH + W - 1];
#pragma unroll
        for (int j = 0; j < CH + W - 1; ++j) {
          float gj = gin[j].get(i);
          if (p.silu) {
            float pre = bias[i];
#pragma unroll
            for (int k = 0; k < W; ++k) pre = fmaf(w[i][k], xv[j + k], pre);
            const float s = sigmoid_f<T>(pre);
            gj *= s * (1.f + pre * (1.f - s));
          }
          g[j] = gj;  // zero beyond the sequence end, since dout was loaded as zero there
        }
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          db[i] += g[j];
#pragma unroll
          for (int k = 0; k < W; ++k) dw[i][k] = fmaf(g[j], xv[j + k], dw[i][k]);
        }
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          float acc = 0.f;
#pragma unroll
          for (int k = 0; k < W; ++k) acc = fmaf(w[i][k], g[j + W - 1 - k], acc);
          gin[j].set(i, acc);  // gin[j] (dout at t0 + j) is no longer needed for channel i: reuse it for dx
        }
      }
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int64_t t = t0 + j;
        if (t < p.seqlen) gin[j].store(dx + t * p.o_st);
      }
    }
  }

  // Block reduction of dweight/dbias over threadIdx.y, then one atomic per (channel, tap) per block.
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
#pragma unroll
    for (int k = 0; k < W; ++k) red[threadIdx.y][k][threadIdx.x * VEC + i] = dw[i][k];
    red[threadIdx.y][W][threadIdx.x * VEC + i] = db[i];
  }
  __syncthreads();
  const int64_t cbase = (blockIdx.x % cblocks) * kBlockX * VEC;
  for (int e = threadIdx.y * kBlockX + threadIdx.x; e < (W + 1) * kBlockX * VEC; e += kBlockX * kBlockY) {
    const int k = e / (kBlockX * VEC), ci = e % (kBlockX * VEC);
    const int64_t c = cbase + ci;
    if (c < p.dim) {
      float s = 0.f;
#pragma unroll
      for (int y = 0; y < kBlockY; ++y) s += red[y][k][ci];
      atomicAdd(p.dweight_bias + c * (W + 1) + k, s);
    }
  }
}

// ---- decode update -----------------------------------------------------------------------------

template <typename T, int W>
__global__ void update_kernel(UpdateParams p) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.dim) return;
  const int64_t b = idx / p.dim, c = idx % p.dim;
  T* st = static_cast<T*>(p.state) + b * p.s_sb + c * p.s_sd;
  const T xr = static_cast<const T*>(p.x)[b * p.x_sb + c * p.x_sd];
  const int64_t S = p.state_len;
  float w[1][W], bias[1];
  load_weights<T, W, 1>(p, c, w, bias);
  float acc = bias[0];
  if (S == W - 1) {  // the model's layout: all loads first, then the shifted state and the output
    T s[W - 1];
#pragma unroll
    for (int k = 0; k < W - 1; ++k) s[k] = st[k * p.s_st];
#pragma unroll
    for (int k = 0; k < W - 1; ++k) acc = fmaf(w[0][k], to_f(s[k]), acc);
    acc = fmaf(w[0][W - 1], to_f(xr), acc);
#pragma unroll
    for (int k = 0; k + 1 < W - 1; ++k) st[k * p.s_st] = s[k + 1];
    st[(W - 2) * p.s_st] = xr;
    static_cast<T*>(p.out)[b * p.o_sb + c * p.o_sd] = from_f<T>(p.silu ? silu_out<T>(acc) : acc);
    return;
  }
#pragma unroll
  for (int k = 0; k < W - 1; ++k) acc = fmaf(w[0][k], to_f(st[(S - (W - 1) + k) * p.s_st]), acc);
  acc = fmaf(w[0][W - 1], to_f(xr), acc);
  // Shift the state left by one step (oldest out), then append x.
  for (int64_t i = 0; i + 1 < S; ++i) st[i * p.s_st] = st[(i + 1) * p.s_st];
  st[(S - 1) * p.s_st] = xr;
  static_cast<T*>(p.out)[b * p.o_sb + c * p.o_sd] = from_f<T>(p.silu ? silu_out<T>(acc) : acc);
}

// ---- dispatch ----------------------------------------------------------------------------------

template <typename T>
bool aligned(const void* ptr, int vec) { return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * vec) == 0; }

template <typename T, int VEC>
bool can_vectorize(const ConvParams& p, bool bwd) {
  if (VEC == 1 || p.dim % VEC != 0) return false;
  if (p.x_sd != 1 || p.o_sd != 1 || p.x_sb % VEC || p.x_st % VEC || p.o_sb % VEC || p.o_st % VEC) return false;
  if (!aligned<T>(p.x, VEC) || !aligned<T>(p.out, VEC)) return false;
  if (bwd && (p.g_sd != 1 || p.g_sb % VEC || p.g_st % VEC || !aligned<T>(p.dout, VEC))) return false;
  return true;
}

int env_int(const char* name, int dflt) {
  const char* v = getenv(name);
  return (v != nullptr && *v) ? atoi(v) : dflt;
}

template <typename T, int W, int VEC, int CH>
void launch_fwd(const ConvParams& p, cudaStream_t s) {
  const int64_t cblocks = (p.dim + kBlockX * VEC - 1) / (kBlockX * VEC);
  const int64_t tblocks = (p.seqlen + kBlockY * CH - 1) / (kBlockY * CH);
  dim3 grid((unsigned)(cblocks * p.batch), (unsigned)tblocks);
  fwd_kernel<T, W, VEC, CH><<<grid, dim3(kBlockX, kBlockY), 0, s>>>(p);
}

template <typename T, int W, int VEC, int CH>
void launch_bwd(const ConvParams& p, cudaStream_t s) {
  const int64_t cblocks = (p.dim + kBlockX * VEC - 1) / (kBlockX * VEC);
  const int64_t tile = (int64_t)CH * kBlockY * kBwdIters;
  const int64_t tblocks = (p.seqlen + tile - 1) / tile;
  dim3 grid((unsigned)(cblocks * p.batch), (unsigned)tblocks);
  bwd_kernel<T, W, VEC, CH><<<grid, dim3(kBlockX, kBlockY), 0, s>>>(p);
}

template <typename T, int W>
void fwd_w(const ConvParams& p, cudaStream_t s) {
  constexpr int V = 16 / sizeof(T);
  if (!can_vectorize<T, V>(p, false)) return launch_fwd<T, W, 1, kFwdChunk>(p, s);
  switch (env_int("AIMK_FWD_CHUNK", kFwdChunk)) {
    case 8: return launch_fwd<T, W, V, 8>(p, s);
    case 32: return launch_fwd<T, W, V, 32>(p, s);
    default: return launch_fwd<T, W, V, kFwdChunk>(p, s);
  }
}

template <typename T, int W>
void bwd_w(const ConvParams& p, cudaStream_t s) {
  constexpr int V = 8 / sizeof(T);
  if (!can_vectorize<T, V>(p, true)) return launch_bwd<T, W, 1, kBwdChunk>(p, s);
  switch (env_int("AIMK_BWD_CHUNK", kBwdChunk)) {
    case 16: return launch_bwd<T, W, V, 16>(p, s);
    default: return launch_bwd<T, W, V, kBwdChunk>(p, s);
  }
}

// dtype x width: a small switch, one instantiation per pair.
template <template <typename, int> class F, typename P>
cudaError_t dispatch(const P& p, cudaStream_t s) {
#define AIMK_WIDTHS(T)                          \
  switch (p.width) {                            \
    case 2: F<T, 2>::run(p, s); break;          \
    case 3: F<T, 3>::run(p, s); break;          \
    case 4: F<T, 4>::run(p, s); break;          \
    default: return cudaErrorInvalidValue;      \
  }
  switch (p.dtype) {
    case kFloat32: AIMK_WIDTHS(float) break;
    case kBFloat16: AIMK_WIDTHS(__nv_bfloat16) break;
    case kFloat16: AIMK_WIDTHS(__half) break;
    default: return cudaErrorInvalidValue;
  }
#undef AIMK_WIDTHS
  return cudaGetLastError();
}

template <typename T, int W> struct Fwd { static void run(const ConvParams& p, cudaStream_t s) { fwd_w<T, W>(p, s); } };
template <typename T, int W> struct Bwd { static void run(const ConvParams& p, cudaStream_t s) { bwd_w<T, W>(p, s); } };
template <typename T, int W> struct Upd {
  static void run(const UpdateParams& p, cudaStream_t s) {
    const int threads = 256;
    const int64_t blocks = (p.batch * p.dim + threads - 1) / threads;
    update_kernel<T, W><<<(unsigned)blocks, threads, 0, s>>>(p);
  }
};

}  // namespace

cudaError_t causal_conv1d_fwd(const ConvParams& p, cudaStream_t s) {
  if (p.batch * p.dim * p.seqlen == 0) return cudaSuccess;
  return dispatch<Fwd>(p, s);
}

cudaError_t causal_conv1d_bwd(const ConvParams& p, cudaStream_t s) {
  if (p.batch * p.dim * p.seqlen == 0) return cudaSuccess;
  return dispatch<Bwd>(p, s);
}

cudaError_t causal_conv1d_update(const UpdateParams& p, cudaStream_t s) {
  if (p.batch * p.dim == 0) return cudaSuccess;
  return dispatch<Upd>(p, s);
}

}  // namespace aimk
