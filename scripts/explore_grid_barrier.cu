// Grid-barrier variants for the batch-1 chain kernel (csrc/decode_chain), timed alone: one persistent CTA per SM
// (shared memory forces it), ITERS barriers in a loop, optionally with the chain's payload before each barrier
// (every CTA adds a 2 x d_model row into one of K replicas with vector atomics) and its read-back after it.
//   nvcc -std=c++17 -O3 -arch=sm_90 scripts/explore_grid_barrier.cu -o /tmp/gb && /tmp/gb
// Prints one line per (variant, payload, K): microseconds per barrier period, median of 5 launches. Results and what
// they did (not) predict for the chain: benchmarks/notes_generate.md, "Session 17".
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace cg = cooperative_groups;

constexpr int D = 768, ROWS = 2, THREADS = 256, ITERS = 2000, SMEM = 200 * 1024;

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned ld_relaxed(const unsigned* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_add(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void red_relaxed_add(unsigned* p, unsigned v) {
  asm volatile("red.relaxed.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void fence_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }
__device__ __forceinline__ void red_add_v4(float* p, float a, float b, float c, float d) {
  asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ uint32_t peer_addr(uint32_t local, unsigned rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local), "r"(rank));
  return r;
}
__device__ __forceinline__ void st_async_v4(uint32_t dst, float4 v, uint32_t bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];"
               ::"r"(dst), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

enum Variant {
  COUNTER_ACQUIRE,    // the chain's: red.release on one counter, poll with ld.acquire
  COUNTER_RELAXED,    // fence, relaxed red, poll relaxed, fence
  FLAGS,              // each CTA stores its epoch to its own word; warp 0 polls every word, then one fence
  CLUSTER2_COUNTER,   // cluster barrier, one arrive per cluster of 2 on the counter, cluster barrier
  CLUSTER4_COUNTER,   // the same with clusters of 4
};
const char* kNames[] = {"counter_acquire", "counter_relaxed", "flags", "cluster2_counter", "cluster4_counter"};
// REDS: every CTA adds its row into replica cta % K; PAIR_SYNC: the odd CTA of a cluster pair writes its row into
// the even one's shared memory, a cluster barrier, the even one adds both; PAIR_ASYNC: the same handed over by
// st.async into the even CTA's mbarrier (no cluster barrier).
enum Payload { NONE, REDS, PAIR_SYNC, PAIR_ASYNC };
const char* kPayloads[] = {"none", "reds", "pair_sync", "pair_async"};

struct Args {
  unsigned* counter;
  unsigned* flags;  // (grid)
  float* acc;       // (8, ROWS, D)
  float* sink;
  int payload, K;
};

template <int V>
__global__ void __launch_bounds__(THREADS, 1) barrier_kernel(Args a) {
  extern __shared__ __align__(16) float smem[];  // PAIR_*: the partner's row (two buffers), two mbarriers
  const int tid = threadIdx.x, G = gridDim.x, cta = blockIdx.x;
  float sink = 0.f;
  if (a.payload == PAIR_ASYNC) {  // two mbarriers after the two row buffers, then every CTA of the pair ready
    if (tid < 2)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(reinterpret_cast<uint64_t*>(
                       smem + 2 * ROWS * D) + tid)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    cluster_sync();
  }
  for (int it = 1; it <= ITERS; ++it) {
    // payload: this CTA's partial out_proj row, 8 columns per thread of the first 96
    const int col = tid * 8;
    if (a.payload != NONE) {
      const float v = 1e-3f * (cta + 1);
      bool add = col < D;
      if (a.payload == PAIR_SYNC) {
        cg::cluster_group cluster = cg::this_cluster();
        const unsigned rank = cluster.block_rank();
        if (rank % 2 == 1 && col < D) {
          float* peer = cluster.map_shared_rank(smem, rank - 1);
          for (int r = 0; r < ROWS; ++r)
            for (int e = 0; e < 8; e += 4)
              *reinterpret_cast<float4*>(peer + r * D + col + e) = make_float4(v, v, v, v);
        }
        cluster.sync();
        add = add && rank % 2 == 0;
        if (add)
          for (int r = 0; r < ROWS; ++r)
            for (int e = 0; e < 8; ++e) sink += smem[r * D + col + e];
      } else if (a.payload == PAIR_ASYNC) {
        // buffer it % 2 of the even CTA; its mbarrier it % 2 expects ROWS * D * 4 bytes per phase
        const unsigned rank = cta % 2, buf = it % 2;
        float* rows = smem + buf * ROWS * D;
        uint64_t* bar = reinterpret_cast<uint64_t*>(smem + 2 * ROWS * D) + buf;
        if (rank == 1) {
          if (col < D)
            for (int r = 0; r < ROWS; ++r)
              for (int e = 0; e < 8; e += 4)
                st_async_v4(peer_addr(smem_addr(rows + r * D + col + e), 0), make_float4(v, v, v, v),
                            peer_addr(smem_addr(bar), 0));
          add = false;
        } else {
          if (tid == 0)
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
                         "r"(ROWS * D * 4) : "memory");
          mbar_wait(bar, ((it - 1) / 2) & 1);  // phase (it - 1) / 2 of barrier it % 2
          if (add)
            for (int r = 0; r < ROWS; ++r)
              for (int e = 0; e < 8; ++e) sink += rows[r * D + col + e];
        }
      }
      if (add) {
        float* acc = a.acc + (cta / (a.payload >= PAIR_SYNC ? 2 : 1) % a.K) * ROWS * D + col;
        for (int r = 0; r < ROWS; ++r) {
          red_add_v4(acc + r * D, v, v, v, v);
          red_add_v4(acc + r * D + 4, v, v, v, v);
        }
      }
    }
    __syncthreads();
    if constexpr (V == COUNTER_ACQUIRE) {
      if (tid == 0) {
        red_release_add(a.counter, 1);
        while (ld_acquire(a.counter) < static_cast<unsigned>(it * G)) {}
      }
    } else if constexpr (V == COUNTER_RELAXED) {
      if (tid == 0) {
        fence_gpu();
        red_relaxed_add(a.counter, 1);
        while (ld_relaxed(a.counter) < static_cast<unsigned>(it * G)) {}
        fence_gpu();
      }
    } else if constexpr (V == FLAGS) {
      if (tid == 0) st_release(a.flags + cta, it);
      if (tid < 32) {
        bool done;
        do {
          bool mine = true;
          for (int c = tid; c < G; c += 32) mine &= ld_relaxed(a.flags + c) >= static_cast<unsigned>(it);
          done = __all_sync(0xffffffffu, mine);
        } while (!done);
        fence_gpu();
      }
    } else {
      constexpr int CS = V == CLUSTER2_COUNTER ? 2 : 4;
      cluster_sync();
      if (tid == 0 && cta % CS == 0) {
        red_release_add(a.counter, 1);
        while (ld_acquire(a.counter) < static_cast<unsigned>(it * (G / CS))) {}
      }
      cluster_sync();
    }
    __syncthreads();
    // read-back: the row the next block needs, summed over the replicas
    if (a.payload != NONE) {
      const int K = a.K;
      for (int idx = tid * 4; idx < ROWS * D; idx += THREADS * 4)
        for (int rep = 0; rep < K; ++rep) {
          const float4 t = __ldcg(reinterpret_cast<const float4*>(a.acc + rep * ROWS * D + idx));
          sink += t.x + t.y + t.z + t.w;
        }
      __syncthreads();
    }
  }
  if (sink == 12345.f) *a.sink = sink;
}

template <int V>
float run(Args a, int grid, int cluster, bool cooperative) {
  auto kernel = barrier_kernel<V>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
  if (cluster > 1) cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = SMEM;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (cooperative) {
    attr[n].id = cudaLaunchAttributeCooperative;
    attr[n++].val.cooperative = 1;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster;
    attr[n].val.clusterDim.y = 1;
    attr[n++].val.clusterDim.z = 1;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> ms;
  for (int rep = 0; rep < 6; ++rep) {
    cudaMemset(a.counter, 0, 4);
    cudaMemset(a.flags, 0, 4096);
    cudaEventRecord(e0);
    cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, a);
    cudaEventRecord(e1);
    cudaError_t err2 = cudaEventSynchronize(e1);
    if (err != cudaSuccess || err2 != cudaSuccess) {
      printf("  launch failed (grid %d, cluster %d, cooperative %d): %s / %s\n", grid, cluster, cooperative,
             cudaGetErrorString(err), cudaGetErrorString(err2));
      cudaGetLastError();
      return -1.f;
    }
    float t;
    cudaEventElapsedTime(&t, e0, e1);
    if (rep > 0) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1000.f / ITERS;
}

int max_clusters(int cluster) {
  auto kernel = barrier_kernel<CLUSTER2_COUNTER>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(cluster * 64);
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = SMEM;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int n = 0;
  cudaError_t err = cudaOccupancyMaxActiveClusters(&n, kernel, &cfg);
  if (err != cudaSuccess) printf("  occupancy query failed: %s\n", cudaGetErrorString(err));
  return n;
}

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  const int sms = prop.multiProcessorCount;
  printf("%s, %d SMs\n", prop.name, sms);
  Args a;
  cudaMalloc(&a.counter, 4);
  cudaMalloc(&a.flags, 4096);
  cudaMalloc(&a.acc, 8 * ROWS * D * 4);
  cudaMalloc(&a.sink, 4);
  cudaMemset(a.acc, 0, 8 * ROWS * D * 4);
  int c2 = max_clusters(2), c4 = max_clusters(4), c8 = max_clusters(8);
  printf("max active clusters at %d KB smem: size 2 -> %d, size 4 -> %d, size 8 -> %d\n", SMEM / 1024, c2, c4, c8);
  const int g2 = std::min(sms, 2 * c2) / 2 * 2, g4 = std::min(sms, 4 * c4) / 4 * 4;
  printf("cooperative + cluster 2 launch: ");
  a.payload = NONE;
  const float coop_cluster = run<CLUSTER2_COUNTER>(a, g2, 2, true);
  printf("%s\n", coop_cluster < 0 ? "refused" : "ok");
  auto line = [&](const char* name, int p, int K, int grid, float us) {
    printf("variant %-17s payload %-10s K %d grid %3d: %6.3f us per period\n", name, kPayloads[p], K, grid, us);
  };
  a.payload = NONE;
  a.K = 1;
  line(kNames[COUNTER_ACQUIRE], NONE, 1, sms, run<COUNTER_ACQUIRE>(a, sms, 1, true));
  line(kNames[COUNTER_RELAXED], NONE, 1, sms, run<COUNTER_RELAXED>(a, sms, 1, true));
  line(kNames[FLAGS], NONE, 1, sms, run<FLAGS>(a, sms, 1, true));
  line(kNames[CLUSTER2_COUNTER], NONE, 1, g2, run<CLUSTER2_COUNTER>(a, g2, 2, false));
  line(kNames[CLUSTER4_COUNTER], NONE, 1, g4, run<CLUSTER4_COUNTER>(a, g4, 4, false));
  a.payload = REDS;
  for (int K : {1, 2, 3, 4, 6, 8}) {
    a.K = K;
    line(kNames[COUNTER_ACQUIRE], REDS, K, sms, run<COUNTER_ACQUIRE>(a, sms, 1, true));
  }
  for (int p : {PAIR_SYNC, PAIR_ASYNC})
    for (int K : {1, 2, 4}) {
      a.payload = p;
      a.K = K;
      line(kNames[COUNTER_ACQUIRE], p, K, g2, run<COUNTER_ACQUIRE>(a, g2, 2, true));
    }
  return 0;
}
