// See decode_chain.h. One CTA per SM: a producer lane streams this CTA's tiles into a ring of shared-memory
// slots with bulk copies (TMA), running ahead of the 8 consumer warps across layers; the consumers own a
// range of the DI channels (h, p) and take them from in_proj to out_proj without leaving the SM:
//   (1) the layer's constants tile (adaLN rows, conv weights and windows, A, D, dt bias: bulk-copied, never
//       loaded on the critical path)
//   (2) the grid barrier: every CTA has added its share of the previous block's output
//   (3) x = residual + gate * out (out = the K replicas' sums times their gated norm's rstd); h = norm(x) * a + shift
//   (4) this CTA's few B/C/dt rows of in_proj (conv + SiLU, or softplus), published to every CTA as
//       (epoch, value) 64-bit words that readers poll directly
//   (5) the z and x rows of its channels, their conv (it owns their windows)
//   (6) B, C and dt from the grid, then the SSM state update of its channels (both rows from one tile)
//   (7) out_proj over its channels (out_proj's columns, given transposed), added into the block's output with
//       vector atomics into one of K replicas; the gated norm's sum of squares beside it
// One grid barrier per block instead of one per kernel boundary. Measured against the three-kernel chain on an
// H100 (bf16, 2 rows): AiM-B 10.8 against 12.0 us per block, AiM-XL 17.3 against 22.7 (notes_generate.md).
#include "decode_chain/decode_chain.h"

#include <cuda_bf16.h>

namespace aimk {
namespace {

constexpr int ROWS = kChainRows, NS = kChainDState, K = kChainReplicas;
// The producer is one lane of a whole warpgroup (warps 8-11; the other three exit) so that the warpgroups can
// trade registers (setmaxnreg, sm_90a): the launch gives LAUNCH_REGS per thread; the producers drop to
// PRODUCER_REGS and the consumers grow to CONSUMER_REGS. AiM-XL float32 spilled at 168; with 232, 1.05x end to
// end at batch 1 (H200), the other presets 1.01x. The sm_90 image (no setmaxnreg) keeps LAUNCH_REGS.
constexpr int WARPS = 8, CONSUMERS = WARPS * 32, WARPGROUP = 128, THREADS = CONSUMERS + WARPGROUP;
constexpr int LAUNCH_REGS = 65536 / THREADS / 8 * 8;  // what __launch_bounds__(THREADS, 1) allows: 168
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;
static_assert(CONSUMERS * CONSUMER_REGS + WARPGROUP * PRODUCER_REGS <= THREADS * LAUNCH_REGS,
              "setmaxnreg only moves registers within what the launch allocated");
static_assert(kChainMaxBCDTRows == WARPS, "one B/C/dt row per consumer warp");

template <int D, typename W>
struct Ring {
  static constexpr int SLOT = WARPS * D * sizeof(W);  // 8 rows of in_proj or out_proj^T
  static constexpr int SLOTS = (210 * 1024 - ROWS * D * 4) / SLOT;
  static constexpr int SMEM = SLOTS * SLOT + 2 * SLOTS * 8 + ROWS * D * 4;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int P = kChainHeaddim, MAX_CH = kChainMaxChannels, MAX_HEADS = kChainMaxHeads, EPOCH = 1;
constexpr int ZX = WARPS / 2;  // channels per z/x tile: their z rows, then their x rows

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS) : "memory"); }
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_add(unsigned* p) {
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(p) : "memory");
}
__device__ __forceinline__ void red_add_v4(float* p, float a, float b, float c, float d) {
  asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}
__device__ __forceinline__ void st_relaxed_u64(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long ld_relaxed_u64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }
// 8 (load8) or 4 (load4) consecutive weights from shared memory as float32; 16- / 8-byte aligned for bf16
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float f[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(b[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void load8(const float* p, float f[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
// part's share [lo, hi) of n items split in parts
__device__ __forceinline__ void share(int n, int part, int parts, int& lo, int& hi) {
  lo = static_cast<int>(static_cast<long long>(n) * part / parts);
  hi = static_cast<int>(static_cast<long long>(n) * (part + 1) / parts);
}
// Every CTA arrives (its earlier writes and atomics ordered before) and waits for all `parties` arrivals.
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned target) {
  consumers_sync();
  if (threadIdx.x == 0) {
    red_release_add(counter);
    while (ld_acquire(counter) < target) {}
  }
  consumers_sync();
}

// The constants tile: pieces of (L, ...) tensors, each copied as the 16-byte-aligned span around the wanted
// elements. emit(piece, src, bytes, dst offset, offset of the first wanted element).
enum Piece { GATE, MOD, SHIFT, CW_X, CB_X, CS_X0, CS_X1, CW_BC, CB_BC, CS_BC0, CS_BC1, A_LOG, D_SKIP, DT_BIAS, PIECES };
template <int D, typename W, class Emit>
__device__ __forceinline__ void const_pieces(const ChainParams& p, int l, int c0, int nch, int bc0, int nbc, Emit emit) {
  constexpr int DI = 2 * D, CONV_DIM = DI + 2 * NS;
  const int H = p.heads;
  unsigned dst = 0;
  auto span = [&](int k, const void* base, size_t e0, size_t n, int esize) {
    if (n == 0) return;
    const size_t b0 = e0 * esize / 16 * 16, b1 = ((e0 + n) * esize + 15) / 16 * 16;
    emit(k, static_cast<const unsigned char*>(base) + b0, static_cast<unsigned>(b1 - b0), dst,
         dst + static_cast<unsigned>(e0 * esize - b0));
    dst += static_cast<unsigned>(b1 - b0);
  };
  const W* adaln = static_cast<const W*>(p.adaln);
  const size_t plane = static_cast<size_t>(p.layers) * ROWS * D, lrow = static_cast<size_t>(l) * ROWS * D;
  span(GATE, adaln, lrow, ROWS * D, sizeof(W));
  span(MOD, adaln, plane + lrow, ROWS * D, sizeof(W));
  span(SHIFT, adaln, 2 * plane + lrow, ROWS * D, sizeof(W));
  const size_t lc = static_cast<size_t>(l) * CONV_DIM;
  span(CW_X, p.conv_weight, (lc + c0) * 4, nch * 4, 4);
  span(CB_X, p.conv_bias, lc + c0, nch, 4);
  span(CS_X0, p.conv_state, (static_cast<size_t>(l) * ROWS * CONV_DIM + c0) * 3, nch * 3, 4);
  span(CS_X1, p.conv_state, ((static_cast<size_t>(l) * ROWS + 1) * CONV_DIM + c0) * 3, nch * 3, 4);
  span(CW_BC, p.conv_weight, (lc + DI + bc0) * 4, nbc * 4, 4);
  span(CB_BC, p.conv_bias, lc + DI + bc0, nbc, 4);
  span(CS_BC0, p.conv_state, (static_cast<size_t>(l) * ROWS * CONV_DIM + DI + bc0) * 3, nbc * 3, 4);
  span(CS_BC1, p.conv_state, ((static_cast<size_t>(l) * ROWS + 1) * CONV_DIM + DI + bc0) * 3, nbc * 3, 4);
  span(A_LOG, p.A_log, static_cast<size_t>(l) * H, H, 4);
  span(D_SKIP, p.D, static_cast<size_t>(l) * H, H, 4);
  span(DT_BIAS, p.dt_bias, static_cast<size_t>(l) * H, H, 4);
}
#endif

template <int D, typename W>
__global__ void __launch_bounds__(THREADS, 1) decode_chain_kernel(const ChainParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using S = Ring<D, W>;
  constexpr int WB = sizeof(W);
  constexpr int DI = 2 * D, CH = D / 256, NBC = 2 * NS, CONV_DIM = DI + NBC;
  constexpr int LL_PER_THREAD = (ROWS * (NBC + MAX_HEADS) + CONSUMERS - 1) / CONSUMERS;
  constexpr int A_PER_THREAD = (ROWS * D / 4 + CONSUMERS - 1) / CONSUMERS;
  const int G = gridDim.x, cta = blockIdx.x, H = p.heads, HP = H * P, NBCDT = NBC + H;
  int c0, c1, b0, b1;
  share(DI, cta, G, c0, c1);
  share(NBCDT, cta, G, b0, b1);
  const int nch = c1 - c0, nb = b1 - b0, nbc = max(0, min(b1, NBC) - b0);
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + S::SLOTS * S::SLOT);
  uint64_t* empty = full + S::SLOTS;
  float* resid_s = reinterpret_cast<float*>(empty + S::SLOTS);  // (ROWS, D): x of the current block
  __shared__ float red[WARPS][ROWS];
  __shared__ float zr[ROWS][MAX_CH], xr[ROWS][MAX_CH], xs[ROWS][MAX_CH], gs[ROWS][MAX_CH];
  __shared__ float bc[ROWS][NBC], dts[ROWS][MAX_HEADS];
  __shared__ float cw[MAX_CH][5], cst[ROWS][MAX_CH][3], cA[MAX_HEADS], cD[MAX_HEADS];
  // While the consumers wait on a dependent global load (the grid barrier and the output row after it, the
  // B/C/dt words), the producer holds back copies it has no hurry for (a load queues behind the SM's copies
  // in flight), while the ring is at least HOLD slots ahead of the consumers. Only with 48 KB copies (AiM-XL's
  // float32 tiles: end to end 1.06-1.07x on an H100); AiM-L float32 (32 KB) lost 2% and the bf16 models 1-6%.
  __shared__ volatile unsigned hold, released;
  constexpr unsigned HOLD = S::SLOT >= 48 * 1024 ? S::SLOTS * 3 / 4 : 0;
  static_assert(HOLD == 0 || HOLD >= 2, "a block's first two tiles (constants, B/C/dt rows) must be in flight");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tid = threadIdx.x;

  if (tid == 0) {
    for (int i = 0; i < S::SLOTS; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], WARPS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    hold = 0;
    released = 0;
  }
  __syncthreads();

  if (warp >= WARPS) {  // producer: per layer the constants, B/C/dt rows, z/x rows, state rows, out_proj^T rows
#ifdef __CUDA_ARCH_FEAT_SM90_ALL  // setmaxnreg: sm_90a only
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER_REGS));
#endif
    if (warp != WARPS || lane != 0) return;
    unsigned i = 0;
    auto acquire_slot = [&]() -> unsigned {  // a free slot, and at most one copy in flight before this one
      const unsigned slot = i % S::SLOTS;
      mbar_wait(&empty[slot], ((i / S::SLOTS) & 1) ^ 1);
      if (i >= 1) mbar_wait(&full[(i - 1) % S::SLOTS], ((i - 1) / S::SLOTS) & 1);
      if constexpr (HOLD > 0)
        while (hold && i - released >= HOLD) __nanosleep(32);
      return slot;
    };
    auto issue = [&](const void* src, unsigned bytes, const void* src2, unsigned bytes2, unsigned offset2) {
      const unsigned slot = acquire_slot();
      mbar_expect_tx(&full[slot], bytes + bytes2);
      bulk_copy(smem + slot * S::SLOT, src, bytes, &full[slot]);
      if (bytes2) bulk_copy(smem + slot * S::SLOT + offset2, src2, bytes2, &full[slot]);
      ++i;
    };
    const W* w_out_t = static_cast<const W*>(p.out_weight_t);
    for (int l = 0; l < p.layers; ++l) {
      {
        const unsigned slot = acquire_slot();
        unsigned total = 0;
        const_pieces<D, W>(p, l, c0, nch, b0, nbc, [&](int, const unsigned char*, unsigned bytes, unsigned, unsigned) {
          total += bytes;
        });
        mbar_expect_tx(&full[slot], total);
        const_pieces<D, W>(p, l, c0, nch, b0, nbc,
                           [&](int, const unsigned char* src, unsigned bytes, unsigned dst, unsigned) {
                             bulk_copy(smem + slot * S::SLOT + dst, src, bytes, &full[slot]);
                           });
        ++i;
      }
      const W* w = static_cast<const W*>(p.in_weight[l]);
      if (nb > 0) issue(w + static_cast<size_t>(2 * DI + b0) * D, nb * D * WB, nullptr, 0, 0);
      for (int t = 0; t < nch; t += ZX) {
        const int n = min(ZX, nch - t);
        issue(w + static_cast<size_t>(c0 + t) * D, n * D * WB, w + static_cast<size_t>(DI + c0 + t) * D, n * D * WB,
              ZX * D * WB);
      }
      const float* st = p.ssm_state + (static_cast<size_t>(l) * ROWS * HP + c0) * NS;
      issue(st, nch * NS * 4, st + static_cast<size_t>(HP) * NS, nch * NS * 4, nch * NS * 4);
      for (int t = 0; t < nch; t += WARPS)
        issue(w_out_t + (static_cast<size_t>(l) * DI + c0 + t) * D, min(WARPS, nch - t) * D * WB, nullptr, 0, 0);
    }
    return;
  }

#ifdef __CUDA_ARCH_FEAT_SM90_ALL
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGS));
#endif
  unsigned i = 0;
  auto wait_slot = [&](unsigned k) -> const unsigned char* {
    mbar_wait(&full[k % S::SLOTS], (k / S::SLOTS) & 1);
    return smem + (k % S::SLOTS) * S::SLOT;
  };
  auto release_slot = [&](unsigned k) {
    __syncwarp();
    if (lane == 0) {
      mbar_arrive(&empty[k % S::SLOTS]);
      if (HOLD > 0 && warp == 0 && k + 1 > released) released = k + 1;
    }
  };
  for (int idx = tid * 4; idx < ROWS * D; idx += CONSUMERS * 4)
    *reinterpret_cast<float4*>(resid_s + idx) = p.io_bf16 ? load4(static_cast<const __nv_bfloat16*>(p.x) + idx)
                                                          : __ldcg(reinterpret_cast<const float4*>(
                                                                static_cast<const float*>(p.x) + idx));
  float h[ROWS][CH][8];
  unsigned first[PIECES];
  for (int l = 0; l < p.layers; ++l) {
    // (1) the constants tile, held until the B/C/dt tile is done; what the rest needs is kept in small arrays
    const_pieces<D, W>(p, l, c0, nch, b0, nbc, [&](int k, const unsigned char*, unsigned, unsigned, unsigned f) {
      first[k] = f;
    });
    const unsigned const_index = i++;
    const unsigned char* ct = wait_slot(const_index);
    auto cf = [&](int k) { return reinterpret_cast<const float*>(ct + first[k]); };
    auto adaln_row = [&](int k) { return reinterpret_cast<const W*>(ct + first[k]); };  // in W
    if (tid < nch) {
#pragma unroll
      for (int k = 0; k < 4; ++k) cw[tid][k] = cf(CW_X)[tid * 4 + k];
      cw[tid][4] = cf(CB_X)[tid];
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        cst[0][tid][k] = cf(CS_X0)[tid * 3 + k];
        cst[1][tid][k] = cf(CS_X1)[tid * 3 + k];
      }
    } else if (tid >= 64 && tid < 64 + H) {
      cA[tid - 64] = -__expf(cf(A_LOG)[tid - 64]);
      cD[tid - 64] = cf(D_SKIP)[tid - 64];
    }
    // (2) the previous block's output is complete
    if (l > 0) {
      if (HOLD > 0 && tid == 0) hold = 1;
      grid_barrier(p.barrier, static_cast<unsigned>(l * G));
    } else {
      consumers_sync();
    }
    // (3) x = residual + gate * out; h = rmsnorm(x) * (norm weight * (1 + scale)) + shift
    {
      float4 a[A_PER_THREAD];
      float ss_prev[ROWS] = {};
#pragma unroll
      for (int k = 0; k < A_PER_THREAD; ++k) a[k] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int rep = 0; rep < K; ++rep) {
        const float* acc = p.acc + static_cast<size_t>(l * K + rep) * ROWS * D;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) ss_prev[r] += __ldcg(p.sumsq + (l * K + rep) * ROWS + r);
#pragma unroll
        for (int k = 0; k < A_PER_THREAD; ++k) {
          const int idx = (tid + k * CONSUMERS) * 4;
          if (idx < ROWS * D) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(acc + idx));
            a[k].x += v.x; a[k].y += v.y; a[k].z += v.z; a[k].w += v.w;
          }
        }
      }
      float ss[ROWS] = {};
#pragma unroll
      for (int k = 0; k < A_PER_THREAD; ++k) {
        const int idx = (tid + k * CONSUMERS) * 4;
        if (idx >= ROWS * D) break;
        const int r = idx / D;
        // block 0's "previous output" is zero (acc[0] is zeroed), whatever its scale
        const float s = rsqrtf((r == 0 ? ss_prev[0] : ss_prev[ROWS - 1]) / DI + p.eps);
        const float4 b = *reinterpret_cast<const float4*>(resid_s + idx);
        const float4 g = load4(adaln_row(GATE) + idx);
        const float4 x = l == 0 ? b : make_float4(b.x + g.x * a[k].x * s, b.y + g.y * a[k].y * s,
                                                  b.z + g.z * a[k].z * s, b.w + g.w * a[k].w * s);
        *reinterpret_cast<float4*>(resid_s + idx) = x;
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr)
          if (rr == r) ss[rr] += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float v = warp_sum(ss[r]);
        if (lane == 0) red[warp][r] = v;
      }
      consumers_sync();
      if (HOLD > 0 && tid == 0) hold = 0;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float t = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) t += red[w][r];
        const float rstd = rsqrtf(t / D + p.eps);
#pragma unroll
        for (int c = 0; c < CH; ++c) {
          const int col = r * D + c * 256 + lane * 8;
          const float4 u = reinterpret_cast<const float4*>(resid_s + col)[0];
          const float4 v = reinterpret_cast<const float4*>(resid_s + col)[1];
          float m[8], sh[8];
          load8(adaln_row(MOD) + col, m);
          load8(adaln_row(SHIFT) + col, sh);
          const float xv[8] = {u.x, u.y, u.z, u.w, v.x, v.y, v.z, v.w};
#pragma unroll
          for (int e = 0; e < 8; ++e) h[r][c][e] = xv[e] * rstd * m[e] + sh[e];
        }
      }
    }
    auto dot_rows = [&](const unsigned char* row, float dot[ROWS]) {  // this warp's row of a tile against h
#pragma unroll
      for (int r = 0; r < ROWS; ++r) dot[r] = 0.f;
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        float w[8];
        load8(reinterpret_cast<const W*>(row) + c * 256 + lane * 8, w);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
          for (int e = 0; e < 8; ++e) dot[r] += w[e] * h[r][c][e];
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) dot[r] = warp_sum(dot[r]);
    };
    // (4) this CTA's B/C/dt rows, published as (epoch, value) words
    float* conv_state = p.conv_state + static_cast<size_t>(l) * ROWS * CONV_DIM * 3;
    unsigned long long* bcdt = p.bcdt + static_cast<size_t>(l) * ROWS * NBCDT;
    if (nb > 0) {
      const unsigned k = i++;
      const unsigned char* tile = wait_slot(k);
      if (warp < nb) {
        float v[ROWS];
        dot_rows(tile + warp * D * WB, v);
        if (lane < ROWS) {
          const int r = lane, row = b0 + warp;
          const float raw = r == 0 ? v[0] : v[ROWS - 1];
          float out;
          if (row < NBC) {
            const float* w4 = cf(CW_BC) + warp * 4;
            const float* s = (r == 0 ? cf(CS_BC0) : cf(CS_BC1)) + warp * 3;
            out = silu(w4[0] * s[0] + w4[1] * s[1] + w4[2] * s[2] + w4[3] * raw + cf(CB_BC)[warp]);
            float* cs = conv_state + (static_cast<size_t>(r) * CONV_DIM + DI + row) * 3;
            cs[0] = s[1]; cs[1] = s[2]; cs[2] = raw;
          } else {
            const float dtr = raw + cf(DT_BIAS)[row - NBC];
            out = dtr > 20.f ? dtr : log1pf(__expf(dtr));
          }
          st_relaxed_u64(bcdt + r * NBCDT + row, static_cast<unsigned long long>(EPOCH) << 32 | __float_as_uint(out));
        }
      }
      release_slot(k);
    }
    release_slot(const_index);
    // the B/C/dt words this thread gathers: requested now, checked after the z/x rows
    unsigned long long ll[LL_PER_THREAD];
#pragma unroll
    for (int k = 0; k < LL_PER_THREAD; ++k) {
      const int q = tid + k * CONSUMERS;
      if (q < ROWS * NBCDT) ll[k] = ld_relaxed_u64(bcdt + q);
    }
    // (5) the z and x rows of this CTA's channels, then the x channels' conv
    for (int t = 0; t < nch; t += ZX) {
      const unsigned k = i++;
      const unsigned char* tile = wait_slot(k);
      const int j = t + warp % ZX;
      if (j < nch) {
        float v[ROWS];
        dot_rows(tile + warp * D * WB, v);
        if (lane < ROWS) (warp < ZX ? zr : xr)[lane][j] = lane == 0 ? v[0] : v[ROWS - 1];
      }
      release_slot(k);
    }
    consumers_sync();
    if (tid < ROWS * nch) {
      const int r = tid / nch, j = tid % nch;
      const float raw = xr[r][j], *s = cst[r][j], *w4 = cw[j];
      xs[r][j] = silu(w4[0] * s[0] + w4[1] * s[1] + w4[2] * s[2] + w4[3] * raw + w4[4]);
      float* cs = conv_state + (static_cast<size_t>(r) * CONV_DIM + c0 + j) * 3;
      cs[0] = s[1]; cs[1] = s[2]; cs[2] = raw;
    }
    // (6) B, C and dt: spin on any word not yet of this epoch; then the SSM update, four (row, channel) pairs
    // per warp at a time, eight lanes each
    if (HOLD > 0 && tid == 0) hold = 1;
#pragma unroll
    for (int k = 0; k < LL_PER_THREAD; ++k) {
      const int q = tid + k * CONSUMERS;
      if (q < ROWS * NBCDT) {
        while (static_cast<unsigned>(ll[k] >> 32) != EPOCH) ll[k] = ld_relaxed_u64(bcdt + q);
        const int r = q / NBCDT, e = q % NBCDT;
        const float v = __uint_as_float(static_cast<unsigned>(ll[k]));
        if (e < NBC) bc[r][e] = v;
        else dts[r][e - NBC] = v;
      }
    }
    consumers_sync();
    if (HOLD > 0 && tid == 0) hold = 0;
    {
      const unsigned k = i++;
      const float4* tile = reinterpret_cast<const float4*>(wait_slot(k));
      float* state = p.ssm_state + static_cast<size_t>(l) * ROWS * HP * NS;
      const int g = lane / 8, li = lane % 8;
      for (int q0 = warp * 4; q0 < ROWS * nch; q0 += WARPS * 4) {
        const int q = q0 + g, r = q / nch, j = q % nch;
        float part = 0.f;
        if (q < ROWS * nch) {
          const int hh = (c0 + j) / P;
          const float dt = dts[r][hh], decay = __expf(dt * cA[hh]), dtx = dt * xs[r][j];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int idx = e * 8 + li;
            const float4 B = reinterpret_cast<const float4*>(bc[r])[idx];
            const float4 C = reinterpret_cast<const float4*>(bc[r] + NS)[idx];
            float4 s = tile[q * (NS / 4) + idx];
            s.x = s.x * decay + dtx * B.x; s.y = s.y * decay + dtx * B.y;
            s.z = s.z * decay + dtx * B.z; s.w = s.w * decay + dtx * B.w;
            reinterpret_cast<float4*>(state + (static_cast<size_t>(r) * HP + c0 + j) * NS)[idx] = s;
            part += s.x * C.x + s.y * C.y + s.z * C.z + s.w * C.w;
          }
        }
        part += __shfl_xor_sync(0xffffffffu, part, 4);
        part += __shfl_xor_sync(0xffffffffu, part, 2);
        part += __shfl_xor_sync(0xffffffffu, part, 1);
        if (q < ROWS * nch && li == 0) gs[r][j] = (part + cD[(c0 + j) / P] * xs[r][j]) * silu(zr[r][j]);
      }
      release_slot(k);
    }
    consumers_sync();
    const int rep = cta % K;
    if (tid < ROWS) {
      float t = 0.f;
      for (int j = 0; j < nch; ++j) t += gs[tid][j] * gs[tid][j];
      atomicAdd(p.sumsq + ((l + 1) * K + rep) * ROWS + tid, t);
    }
    // (7) out_proj over this CTA's channels, added into every output of the block
    {
      const int col = tid * 8;
      float o[ROWS][8] = {};
      for (int t = 0; t < nch; t += WARPS) {
        const unsigned k = i++;
        const unsigned char* tile = wait_slot(k);
        if (col < D) {
          const int n = min(WARPS, nch - t);
          for (int j = 0; j < n; ++j) {
            float w[8];
            load8(reinterpret_cast<const W*>(tile) + j * D + col, w);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
              const float gv = gs[r][t + j];
#pragma unroll
              for (int e = 0; e < 8; ++e) o[r][e] += gv * w[e];
            }
          }
        }
        release_slot(k);
      }
      if (col < D) {
        float* acc = p.acc + static_cast<size_t>((l + 1) * K + rep) * ROWS * D + col;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          red_add_v4(acc + r * D, o[r][0], o[r][1], o[r][2], o[r][3]);
          red_add_v4(acc + r * D + 4, o[r][4], o[r][5], o[r][6], o[r][7]);
        }
      }
    }
  }
  // the last block's output, once every CTA has added its share
  grid_barrier(p.barrier, static_cast<unsigned>(p.layers * G));
  if (cta == 0) {
    const int L = p.layers;
    float rs[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float t = 0.f;
#pragma unroll
      for (int rep = 0; rep < K; ++rep) t += __ldcg(p.sumsq + (L * K + rep) * ROWS + r);
      rs[r] = rsqrtf(t / DI + p.eps);
    }
    for (int idx = tid; idx < ROWS * D; idx += CONSUMERS) {
      float t = 0.f;
#pragma unroll
      for (int rep = 0; rep < K; ++rep) t += __ldcg(p.acc + static_cast<size_t>(L * K + rep) * ROWS * D + idx);
      const float o = t * (idx < D ? rs[0] : rs[ROWS - 1]);
      if (p.io_bf16) static_cast<__nv_bfloat16*>(p.out)[idx] = __float2bfloat16_rn(o);
      else static_cast<float*>(p.out)[idx] = o;
      p.residual[idx] = resid_s[idx];
    }
  }
#else
  __trap();  // built for an arch without bulk copies; the host side only launches on sm_90+
#endif
}

template <int D, typename W>
cudaError_t launch(const ChainParams& p, int grid, cudaStream_t stream) {
  auto kernel = decode_chain_kernel<D, W>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Ring<D, W>::SMEM);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(THREADS);
  config.dynamicSmemBytes = Ring<D, W>::SMEM;
  config.stream = stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeCooperative;  // every CTA resident: the grid barrier needs it
  attribute.val.cooperative = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, p);
}

template <typename W>
cudaError_t launch_d(const ChainParams& p, int grid, cudaStream_t stream) {
  switch (p.d_model) {
    case 768: return launch<768, W>(p, grid, stream);
    case 1024: return launch<1024, W>(p, grid, stream);
    case 1536: return launch<1536, W>(p, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename W>
int smem_bytes(int d_model) {
  switch (d_model) {
    case 768: return Ring<768, W>::SMEM + kChainStaticSmem;
    case 1024: return Ring<1024, W>::SMEM + kChainStaticSmem;
    case 1536: return Ring<1536, W>::SMEM + kChainStaticSmem;
    default: return 0;
  }
}

// The scratch's layout: bcdt first (8-byte words), then acc, sumsq (padded to 16 bytes) and the barrier.
struct ScratchLayout {
  size_t bcdt, acc, sumsq, barrier, total;
  ScratchLayout(int layers, int d_model, int heads) {
    auto pad16 = [](size_t n) { return (n + 15) / 16 * 16; };
    bcdt = 0;
    acc = pad16(static_cast<size_t>(layers) * ROWS * (2 * NS + heads) * 8);
    sumsq = acc + static_cast<size_t>(layers + 1) * K * ROWS * d_model * 4;
    barrier = sumsq + pad16(static_cast<size_t>(layers + 1) * K * ROWS * 4);
    total = barrier + 16;
  }
};

}  // namespace

int decode_chain_smem_bytes(int d_model, bool weights_f32) {
  return weights_f32 ? smem_bytes<float>(d_model) : smem_bytes<__nv_bfloat16>(d_model);
}

size_t decode_chain_scratch_bytes(int layers, int d_model, int heads) {
  return ScratchLayout(layers, d_model, heads).total;
}

cudaError_t decode_chain(ChainParams p, void* scratch, int grid, cudaStream_t stream) {
  const ScratchLayout s(p.layers, p.d_model, p.heads);
  auto* base = static_cast<unsigned char*>(scratch);
  p.bcdt = reinterpret_cast<unsigned long long*>(base + s.bcdt);
  p.acc = reinterpret_cast<float*>(base + s.acc);
  p.sumsq = reinterpret_cast<float*>(base + s.sumsq);
  p.barrier = reinterpret_cast<unsigned*>(base + s.barrier);
  const cudaError_t err = cudaMemsetAsync(scratch, 0, s.total, stream);
  if (err != cudaSuccess) return err;
  return p.weights_f32 ? launch_d<float>(p, grid, stream) : launch_d<__nv_bfloat16>(p, grid, stream);
}

}  // namespace aimk
