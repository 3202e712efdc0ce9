// Same-run A/B of DEC's chunk selection (issue 4: DEC's fixed cost): the shipped select_chunk (session 9: 256
// threads, 4 channels each, two block barriers; each warp computes the floors in registers and searches them by
// shuffles, histograms per warp, no shared atomics) against the session 2-8 one (three block barriers: floors and
// the histogram in shared memory, shared atomics, a separate scan of the warps' sums). Both must choose exactly the
// same channels (the reference's rule: whole buckets from bucket 0, lowest channel indices first inside the
// overflow bucket), which this checks on random heavy-tailed x for several k_chunk and a ragged last chunk. Timing:
// %globaltimer from a block's first to its last instruction of the selection (median over blocks, one chunk per
// block, all chunks of the token at once), and the graph-timed kernel. Exits 1 if the selections differ.
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

// Bucket of |x| from the floors in shared memory (the shipped selection's search before session 9).
__device__ __forceinline__ int bucket_of(const float* floors, bool mono, float ax) {
  if (mono) {  // non-increasing floors: {i : floor_i > ax} is a prefix
    int pos = 0;
#pragma unroll
    for (int step = 16; step > 0; step >>= 1)
      if (floors[pos + step - 1] > ax) pos += step;
    if (pos == 31 && floors[31] > ax) pos = 32;
    return pos;
  }
  int c = 0;
#pragma unroll
  for (int i = 0; i < 32; ++i) c += floors[i] > ax;
  return c;
}

// The session-2..8 selection (three block barriers; floors and histogram in shared memory, shared atomics), kept
// here for the same-run A/B.
struct S8Smem {
  float floors[32];
  int hist[36];
  int wsum[kWarps];
  int mono;
  int list[kChunk];
  float listx[kChunk];
};

__device__ void compute_floors(const float* __restrict__ bounds, float* floors, int* mono_flag) {
  if (threadIdx.x < 32) {
    const int i = threadIdx.x;
    const float a = bounds[0], b = bounds[1];
    float f;
    if (i < 15) f = __fadd_rn(a, __fdiv_rn(__fmul_rn(__fsub_rn(b, a), (float)i), 15.0f));
    else if (i == 15) f = b;  // exactly b, as reference.bucket_floors (the formula can miss b by an ulp)
    else f = __fdiv_rn(__fmul_rn(b, (float)(31 - i)), 16.0f);
    floors[i] = f;
    const float nxt = __shfl_down_sync(0xffffffffu, f, 1);
    const unsigned ok = __ballot_sync(0xffffffffu, i == 31 || f >= nxt);
    if (i == 0) *mono_flag = ok == 0xffffffffu;
  }
}

template <typename T>
__device__ void select_chunk_s8(const T* __restrict__ xm, int in, int c, int quota, const float* __restrict__ bounds,
                             S8Smem& S) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int base = c * kChunk, L = min(kChunk, in - base);
  const int i0 = 4 * (int)threadIdx.x;
  float xv[4];
  if ((in & 3) == 0 && i0 + 4 <= L) {  // 8-byte aligned: 4 values in one load
    const uint2 r = *reinterpret_cast<const uint2*>(xm + base + i0);
    const T* h = reinterpret_cast<const T*>(&r);
#pragma unroll
    for (int j = 0; j < 4; ++j) xv[j] = to_f32(h[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) xv[j] = i0 + j < L ? to_f32(xm[base + i0 + j]) : 0.f;
  }
  if (warp == 0) compute_floors(bounds, S.floors, &S.mono);
  if (warp == 1) {
    S.hist[lane] = 0;
    if (lane < 4) S.hist[32 + lane] = 0;
  }
  __syncthreads();
  const bool mono = S.mono != 0;
  int b[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) b[j] = i0 + j < L ? bucket_of(S.floors, mono, fabsf(xv[j])) : 33;
  {  // warp histogram by bit-sliced ballots: lane L counts the warp's channels in bucket L (< 32)
    int cnt = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      unsigned mm = ~__ballot_sync(0xffffffffu, b[j] >= 32);
#pragma unroll
      for (int t = 0; t < 5; ++t) {
        const unsigned bt = __ballot_sync(0xffffffffu, (b[j] >> t) & 1);
        mm &= ((lane >> t) & 1) ? bt : ~bt;
      }
      cnt += __popc(mm);
    }
    if (cnt) atomicAdd(&S.hist[lane], cnt);
  }
  __syncthreads();
  // overflow bucket o and how many of it to take (every warp computes it, no extra barrier)
  int cum = S.hist[lane];
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, cum, off);
    if (lane >= off) cum += v;
  }
  const unsigned reach = __ballot_sync(0xffffffffu, cum >= quota);
  const int o = reach ? __ffs(reach) - 1 : 32;  // bucket 32 holds the rest: quota <= L
  const int before = __shfl_sync(0xffffffffu, cum, o > 0 ? min(o - 1, 31) : 0);
  const int need = quota - (o > 0 ? before : 0);
  // one block-wide exclusive scan of (channels in higher buckets, channels in bucket o), packed
  int n_lt = 0, n_eq = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    n_lt += b[j] < o;
    n_eq += b[j] == o;
  }
  const int packed = n_lt | (n_eq << 16);
  int inc = packed;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, inc, off);
    if (lane >= off) inc += v;
  }
  if (lane == 31) S.wsum[warp] = inc;
  __syncthreads();
  int pre = 0;
  for (int w = 0; w < warp; ++w) pre += S.wsum[w];
  const int ex = pre + inc - packed;
  int eq_before = ex >> 16;
  int pos = (ex & 0xFFFF) + min(eq_before, need);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const bool is_o = b[j] == o;
    const bool sel = b[j] < o || (is_o && eq_before < need);
    eq_before += is_o;
    if (sel) {
      S.list[pos] = base + i0 + j;
      S.listx[pos] = xv[j];
      ++pos;
    }
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) shipped_select(const T* x, const float* bounds, uint8_t* mask, int in, int k_chunk,
                                                       unsigned long long* ns) {
  __shared__ DecSmem S;
  const int c = blockIdx.x, quota = chunk_quota(k_chunk, in, c);
  const int base = c * kChunk, L = min(kChunk, in - base);
  for (int i = threadIdx.x; i < L; i += kThreads) mask[base + i] = 0;
  __syncthreads();
  const unsigned long long t0 = gtimer();
  if (quota > 0) {  // the floors inside the timed span, as s8 forms them (dec_kernel forms them before its PDL wait)
    bool mono;
    const float fl = warp_floor(bounds[0], bounds[1], threadIdx.x & 31, mono);
    select_chunk(x, in, c, quota, fl, mono, S);
  }
  const unsigned long long t1 = gtimer();
  if (threadIdx.x == 0) ns[c] = t1 - t0;
  for (int i = threadIdx.x; i < quota; i += kThreads) mask[S.list[i]] = 1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) s8_select(const T* x, const float* bounds, uint8_t* mask, int in, int k_chunk,
                                                      unsigned long long* ns) {
  __shared__ S8Smem S;
  const int c = blockIdx.x, quota = chunk_quota(k_chunk, in, c);
  const int base = c * kChunk, L = min(kChunk, in - base);
  for (int i = threadIdx.x; i < L; i += kThreads) mask[base + i] = 0;
  __syncthreads();
  const unsigned long long t0 = gtimer();
  if (quota > 0) select_chunk_s8(x, in, c, quota, bounds, S);
  const unsigned long long t1 = gtimer();
  if (threadIdx.x == 0) ns[c] = t1 - t0;
  for (int i = threadIdx.x; i < quota; i += kThreads) mask[S.list[i]] = 1;
}

int main() {
  const int ins[] = {4096, 14336, 17920};
  const int ks[] = {1, 4, 8, 32, 256};
  int differ = 0;  // (in, k) whose masks differ: the exit status
  printf("%-7s %-5s %12s %12s %14s %14s %s\n", "in", "k", "ns/chunk", "s8 ns/chunk", "graph us", "s8 graph us",
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
      shipped_select<__half><<<nc, kThreads>>>(x, bounds, m0, in, k, ns);
      CK(cudaMemcpy(t0.data(), ns, nc * 8, cudaMemcpyDeviceToHost));
      s8_select<__half><<<nc, kThreads>>>(x, bounds, m1, in, k, ns);
      CK(cudaMemcpy(t1.data(), ns, nc * 8, cudaMemcpyDeviceToHost));
      std::vector<uint8_t> h0(in), h1(in);
      CK(cudaMemcpy(h0.data(), m0, in, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(h1.data(), m1, in, cudaMemcpyDeviceToHost));
      int n0 = 0;
      for (int i = 0; i < in; ++i) n0 += h0[i];
      const bool eq = h0 == h1;
      differ += !eq;
      std::sort(t0.begin(), t0.end());
      std::sort(t1.begin(), t1.end());
      const float g0 = graph_us([&](cudaStream_t st, int) { shipped_select<__half><<<nc, kThreads, 0, st>>>(x, bounds, m0, in, k, ns); });
      const float g1 = graph_us([&](cudaStream_t st, int) { s8_select<__half><<<nc, kThreads, 0, st>>>(x, bounds, m1, in, k, ns); });
      printf("%-7d %-5d %12llu %12llu %14.2f %14.2f %s (%d selected)\n", in, k, t0[nc / 2], t1[nc / 2], g0, g1,
             eq ? "yes" : "NO", n0);
    }
    CK(cudaFree(x));
    CK(cudaFree(bounds));
    CK(cudaFree(m0));
    CK(cudaFree(m1));
    CK(cudaFree(ns));
  }
  if (differ) printf("the two selections differ at %d (in, k_chunk)\n", differ);
  return differ ? 1 : 0;
}
