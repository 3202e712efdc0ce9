// Device helpers shared by the kernel files (header-only, device functions only: each .cu keeps
// its own __global__ kernels and their launches, see DESIGN.md §5 on CUDA 13 template stubs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "kernels.h"

namespace decdec {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Read-only, streamed once: keep it out of L1.
__device__ __forceinline__ uint4 ldg_stream_v4(const uint32_t* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
__device__ __forceinline__ uint32_t ldg_stream(const uint32_t* p) {
  uint32_t r;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ float lds_f32(uint32_t saddr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(saddr));
  return v;
}

// Number of DEC slices (size `slice`, partition of [0, out)) that overlap rows [lo, hi).
__device__ __forceinline__ int n_overlap(int lo, int hi, int slice) { return (hi - 1) / slice - lo / slice + 1; }

// Fused-op combine (see kernels.h `Fused`). Called by every thread of a block after it stored its
// partial for the tiles [t0, t1) of token m. The last block to arrive at a tile writes y there.
template <typename T>
__device__ void fused_arrive(const Fused& f, int m, int t0, int t1, int out, int* s_flags /* smem, blockDim ints */) {
  const int n_tiles = ceil_div(out, f.tile_rows);
  __threadfence();
  __syncthreads();
  const float* g = f.gpart + (size_t)m * out;
  const float* d = f.dpart + (size_t)m * out;
  T* y = reinterpret_cast<T*>(f.y) + (size_t)m * out;
  for (int tb = t0; tb < t1; tb += blockDim.x) {  // batches of blockDim tiles
    const int t = tb + (int)threadIdx.x;
    if (t < t1) {
      const int lo = t * f.tile_rows, hi = min(out, lo + f.tile_rows);
      const int expected = 1 + n_overlap(lo, hi, f.dec_slice);
      int* c = f.counters + (size_t)m * n_tiles + t;
      const int old = atomicAdd(c, 1);
      const bool last = old == expected - 1;
      if (last) *c = 0;  // everyone else has arrived: reset for the next call
      s_flags[threadIdx.x] = last;
    }
    __syncthreads();
    __threadfence();
    const int nb = min((int)blockDim.x, t1 - tb);
    for (int i = 0; i < nb; ++i) {
      if (!s_flags[i]) continue;
      const int lo = (tb + i) * f.tile_rows, hi = min(out, lo + f.tile_rows);
      for (int r = lo + (int)threadIdx.x; r < hi; r += blockDim.x) y[r] = from_f32<T>(__ldcg(g + r) + __ldcg(d + r));
    }
    __syncthreads();  // s_flags reused by the next batch
  }
}

}  // namespace decdec
