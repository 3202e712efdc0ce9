// Same-run A/B of DEC's chunk selection (issue 4: DEC's fixed cost). The shipped select_chunk (256 threads,
// 4 channels each, three block barriers) against a one-warp selection (32 channels per lane, no block
// barrier: bucket histogram by bit-sliced ballots, the overflow bucket from a warp scan over buckets, the
// placement from one warp scan over lanes). Both must choose exactly the same channels (the reference's
// rule: whole buckets from bucket 0, lowest channel indices first inside the overflow bucket), which this
// checks on random heavy-tailed x for several k_chunk and a ragged last chunk. Timing: %globaltimer from a
// block's first to its last instruction of the selection (median over blocks, one chunk per block, all
// chunks of the token at once), and the graph-timed kernel.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc scripts/select_ab.cu -o /tmp/sel && /tmp/sel
#include "../csrc/dec.cu"
#include "graph_timer.cuh"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

using namespace decdec;

__device__ __forceinline__ unsigned long long gtimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// One warp selects chunk c (channels base .. base + L) of x into mask. Lane l owns channels 32 l .. 32 l + 31.
template <typename T>
__device__ void warp_select_chunk(const T* __restrict__ xm, int in, int c, int quota, const float* __restrict__ bounds,
                                  float* floors_s, uint8_t* __restrict__ mask) {
  const int lane = threadIdx.x & 31;
  const int base = c * kChunk, L = min(kChunk, in - base);
  const int i0 = 32 * lane;
  float xv[32];
  if ((in & 7) == 0 && i0 + 32 <= L) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 r = *reinterpret_cast<const uint4*>(xm + base + i0 + 8 * q);
      const T* h = reinterpret_cast<const T*>(&r);
#pragma unroll
      for (int j = 0; j < 8; ++j) xv[8 * q + j] = to_f32(h[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 32; ++j) xv[j] = i0 + j < L ? to_f32(xm[base + i0 + j]) : 0.f;
  }
  int mono_flag;
  {  // the warp's own floors (compute_floors' expressions), in shared memory for the searches
    const float a = bounds[0], b = bounds[1];
    float f;
    if (lane < 15) f = __fadd_rn(a, __fdiv_rn(__fmul_rn(__fsub_rn(b, a), (float)lane), 15.0f));
    else if (lane == 15) f = b;
    else f = __fdiv_rn(__fmul_rn(b, (float)(31 - lane)), 16.0f);
    floors_s[lane] = f;
    const float nxt = __shfl_down_sync(0xffffffffu, f, 1);
    mono_flag = __ballot_sync(0xffffffffu, lane == 31 || f >= nxt) == 0xffffffffu;
    __syncwarp();
  }
  int bk[32];
#pragma unroll
  for (int j = 0; j < 32; ++j) bk[j] = i0 + j < L ? bucket_of(floors_s, mono_flag, fabsf(xv[j])) : 33;
  // lane B counts the chunk's channels in bucket B (< 32)
  int cnt = 0;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    unsigned mm = ~__ballot_sync(0xffffffffu, bk[j] >= 32);
#pragma unroll
    for (int t = 0; t < 5; ++t) {
      const unsigned bt = __ballot_sync(0xffffffffu, (bk[j] >> t) & 1);
      mm &= ((lane >> t) & 1) ? bt : ~bt;
    }
    cnt += __popc(mm);
  }
  int cum = cnt;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, cum, off);
    if (lane >= off) cum += v;
  }
  const unsigned reach = __ballot_sync(0xffffffffu, cum >= quota);
  const int o = reach ? __ffs(reach) - 1 : 32;
  const int before = __shfl_sync(0xffffffffu, cum, o > 0 ? min(o - 1, 31) : 0);
  const int need = quota - (o > 0 ? before : 0);
  int n_eq = 0;
#pragma unroll
  for (int j = 0; j < 32; ++j) n_eq += bk[j] == o;
  int inc = n_eq;  // lanes in channel order: bucket-o channels of lower lanes come first
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, inc, off);
    if (lane >= off) inc += v;
  }
  int eq_before = inc - n_eq;
  uint32_t sel = 0;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const bool is_o = bk[j] == o;
    sel |= (uint32_t)(bk[j] < o || (is_o && eq_before < need)) << j;
    eq_before += is_o;
  }
  // (a DEC unit would compact `sel` into its row list with one more warp scan of __popc(sel))
  if (i0 < L) {
#pragma unroll
    for (int j = 0; j < 32; ++j)
      if (i0 + j < L) mask[base + i0 + j] = (sel >> j) & 1;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) old_select(const T* x, const float* bounds, uint8_t* mask, int in, int k_chunk,
                                                       unsigned long long* ns) {
  __shared__ DecSmem S;
  const int c = blockIdx.x, quota = chunk_quota(k_chunk, in, c);
  const int base = c * kChunk, L = min(kChunk, in - base);
  for (int i = threadIdx.x; i < L; i += kThreads) mask[base + i] = 0;
  __syncthreads();
  const unsigned long long t0 = gtimer();
  if (quota > 0) select_chunk(x, in, c, quota, bounds, S);
  const unsigned long long t1 = gtimer();
  if (threadIdx.x == 0) ns[c] = t1 - t0;
  for (int i = threadIdx.x; i < quota; i += kThreads) mask[S.list[i]] = 1;
}

template <typename T>
__global__ void __launch_bounds__(32) warp_select(const T* x, const float* bounds, uint8_t* mask, int in, int k_chunk,
                                                  unsigned long long* ns) {
  __shared__ float floors[32];
  const int c = blockIdx.x, quota = chunk_quota(k_chunk, in, c);
  const int base = c * kChunk, L = min(kChunk, in - base);
  if (quota == 0) {
    for (int i = threadIdx.x; i < L; i += 32) mask[base + i] = 0;
    return;
  }
  const unsigned long long t0 = gtimer();
  warp_select_chunk(x, in, c, quota, bounds, floors, mask);
  __syncwarp();
  const unsigned long long t1 = gtimer();
  if (threadIdx.x == 0) ns[c] = t1 - t0;
}

int main() {
  const int ins[] = {4096, 14336, 17920};
  const int ks[] = {1, 4, 8, 32, 256};
  printf("%-7s %-5s %12s %12s %14s %14s %s\n", "in", "k", "old ns/chunk", "warp ns/chunk", "old graph us", "warp graph us",
         "masks equal");
  for (int in : ins) {
    const int nc = n_chunks(in);
    std::vector<__half> hx(in);
    uint32_t s = 12345u + in;
    for (int i = 0; i < in; ++i) {  // heavy-tailed: a few large channels, many small, some exact ties
      s = s * 1664525u + 1013904223u;
      const float u = (s >> 8) / 16777216.f;
      float v = (u - 0.5f) * 2.f;
      if ((s & 31) == 0) v *= 8.f;
      if ((s & 255) == 7) v = 1.0f;
      hx[i] = __float2half(v);
    }
    __half* x;
    float* bounds;
    uint8_t *m0, *m1;
    unsigned long long* ns;
    CK(cudaMalloc(&x, in * 2));
    CK(cudaMemcpy(x, hx.data(), in * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&bounds, 8));
    CK(cudaMalloc(&m0, in));
    CK(cudaMalloc(&m1, in));
    CK(cudaMalloc(&ns, nc * 8));
    // thresholds as the calibration makes them: descending |x| of a perturbed token
    std::vector<float> ax(in);
    for (int i = 0; i < in; ++i) ax[i] = fabsf(__half2float(hx[i])) * 1.1f;
    std::sort(ax.begin(), ax.end(), std::greater<float>());
    for (int k : ks) {
      const float hb[2] = {ax[0], ax[std::max(1, k * in / 1024) - 1]};
      CK(cudaMemcpy(bounds, hb, 8, cudaMemcpyHostToDevice));
      std::vector<unsigned long long> t0(nc), t1(nc);
      old_select<__half><<<nc, kThreads>>>(x, bounds, m0, in, k, ns);
      CK(cudaMemcpy(t0.data(), ns, nc * 8, cudaMemcpyDeviceToHost));
      warp_select<__half><<<nc, 32>>>(x, bounds, m1, in, k, ns);
      CK(cudaMemcpy(t1.data(), ns, nc * 8, cudaMemcpyDeviceToHost));
      std::vector<uint8_t> h0(in), h1(in);
      CK(cudaMemcpy(h0.data(), m0, in, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(h1.data(), m1, in, cudaMemcpyDeviceToHost));
      int n0 = 0;
      for (int i = 0; i < in; ++i) n0 += h0[i];
      const bool eq = h0 == h1;
      std::sort(t0.begin(), t0.end());
      std::sort(t1.begin(), t1.end());
      const float g0 = graph_us([&](cudaStream_t st, int) { old_select<__half><<<nc, kThreads, 0, st>>>(x, bounds, m0, in, k, ns); });
      const float g1 = graph_us([&](cudaStream_t st, int) { warp_select<__half><<<nc, 32, 0, st>>>(x, bounds, m1, in, k, ns); });
      printf("%-7d %-5d %12llu %12llu %14.2f %14.2f %s (%d selected)\n", in, k, t0[nc / 2], t1[nc / 2], g0, g1,
             eq ? "yes" : "NO", n0);
    }
    CK(cudaFree(x));
    CK(cudaFree(bounds));
    CK(cudaFree(m0));
    CK(cudaFree(m1));
    CK(cudaFree(ns));
  }
  return 0;
}
