// ap (any-precision / SqueezeLLM-style) GEMV and dequantize.
//
// qweight [b, out, in/32] int32: bit j of word [p, r, w] is bit p of the code of weight (r, 32w+j);
// lut [out, 2^b]. W[r, i] = lut[r, code(r, i)].
//
// GEMV design (decode, M = 1 per grid.y): a warp holds RW = 32 / 2^b rows x KL = 2^b k-lanes, so the
// RW fp32 LUTs of the warp fill the 32 shared-memory banks exactly and every LUT lookup of the warp
// is conflict-free (same-row lanes hit distinct banks or broadcast). Each lane streams VEC words of
// each bit-plane (16-byte loads when in % 128 == 0) and turns them into byte-spaced codes with two
// LOP3s per plane and one funnel rotate per 4 codes: byte m of `u` holds 4*code(8m+k) + 4*2^b*rr,
// so one PRMT against the 256-byte aligned LUT base gives the shared-memory address of the
// centroid. x is staged in fp32 in shared memory, permuted so that the 4 channels a lane needs
// next (8m+k, m = 0..3) are one 16-byte load; the 16-byte groups of a word are XOR-swizzled by
// the lane's word index, so the 8 k-lanes of a row hit 8 distinct bank quads (conflict-free).
// Accumulation is fp32 (FFMA), like the reference. Warps of a block split K (KS ways) when out is
// small, so that enough blocks exist; partial sums are reduced in shared memory, no atomics.
//
// 3-bit fp16 has three faster kernels (dispatch in launch_gemv): the tensor-core kernel
// (ap3_gemv_mma_kernel, in % 512 == 0 unless the streaming kernel keeps every lane busy), the
// streaming kernel (ap3_gemv_stream_kernel, in = 4096-like rows) and the per-row PRMT kernel
// (ap3_gemv_prmt_kernel, the rest). All three decode with the PRMT register LUT (ap3_decode8).
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace decdec {
#ifdef DECDEC_GEMV_PROBE
// scripts/dec_timeline.cu -DDECDEC_GEMV_PROBE: per tensor-core / streaming GEMV block (token 0) its SM and %globaltimer
// at start, after x was staged, after the main loop, at the end, and (chain mode) once it has seen DEC complete.
// Nothing in a normal build.
__device__ unsigned long long g_gemv_probe[1024][6];
void* gemv_probe_ptr() {
  void* p = nullptr;
  cudaGetSymbolAddress(&p, g_gemv_probe);
  return p;
}
#define GEMV_STAMP(i)                                                                                       \
  if (threadIdx.x == 0 && blockIdx.y == 0 && blockIdx.x < 1024) {                                          \
    unsigned long long t_;                                                                                  \
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                                                  \
    g_gemv_probe[blockIdx.x][1 + (i)] = t_;                                                                 \
    if ((i) == 0) {                                                                                         \
      unsigned sm_;                                                                                         \
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm_));                                                      \
      g_gemv_probe[blockIdx.x][0] = sm_;                                                                    \
    }                                                                                                       \
  }
#else
#define GEMV_STAMP(i)
#endif
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileWords = 128;  // x tile: 4096 channels

template <int BITS, int VEC, typename T>
__global__ void __launch_bounds__(kThreads, BITS >= 4 ? 3 : 4)
    ap_gemv_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qw, const T* __restrict__ lut,
                   T* __restrict__ y, int in, int out, int ks_log2, Fused fused) {
  constexpr int LUTN = 1 << BITS;
  constexpr int KL = LUTN;       // k-lanes per row
  constexpr int RW = 32 / LUTN;  // rows per warp
  constexpr int STEP = KL * VEC; // words per warp step
  constexpr uint32_t CODEMASK = (uint32_t)((LUTN - 1) << 2) * 0x01010101u;

  __shared__ __align__(256) float lut_s[kWarps][64];
  __shared__ __align__(16) float xs[kTileWords * 32];
  __shared__ float red[kWarps][RW];
  __shared__ int flags[kThreads];

  const int KS = 1 << ks_log2;
  const int RB = (kWarps >> ks_log2) * RW;
  const int words = in >> 5;
  const int m = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rg = warp >> ks_log2, ks = warp & (KS - 1);
  const int rr = lane / KL, kl = lane % KL;
  const int row0 = blockIdx.x * RB;
  const int row = row0 + rg * RW + rr;
  const bool row_ok = row < out;

  for (int i = threadIdx.x; i < RB * LUTN; i += kThreads) {
    const int r = i / LUTN, c = i % LUTN, gr = row0 + r;
    lut_s[r / RW][(r % RW) * LUTN + c] = gr < out ? to_f32(lut[(size_t)gr * LUTN + c]) : 0.f;
  }
  pdl_wait();  // x (and y) belong to the previous kernel; the LUT above does not
  gemv_trigger_dependents();
  const uint32_t lut_base = (uint32_t)__cvta_generic_to_shared(&lut_s[rg][0]);
  const uint32_t rowbyte = (uint32_t)(rr * LUTN * 4) * 0x01010101u;

  const size_t plane_stride = (size_t)out * words;
  const uint32_t* qrow = qw + (size_t)(row_ok ? row : 0) * words;
  const T* xm = x + (size_t)m * in;
  float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;

  uint32_t cur[BITS][VEC], nxt[BITS][VEC];
  auto load = [&](uint32_t (&dst)[BITS][VEC], int gw) {
#pragma unroll
    for (int q = 0; q < BITS; ++q) {
      const uint32_t* p = qrow + q * plane_stride + gw;
      if constexpr (VEC == 4) {
        const uint4 v = ldg_stream_v4(p);
        dst[q][0] = v.x; dst[q][1] = v.y; dst[q][2] = v.z; dst[q][3] = v.w;
      } else {
        dst[q][0] = ldg_stream(p);
      }
    }
  };

  for (int tw0 = 0; tw0 < words; tw0 += kTileWords) {
    const int tw = min(kTileWords, words - tw0);
    const int nsteps = ceil_div(tw, STEP);
    int st = ks;
    bool have = row_ok && st < nsteps && st * STEP + kl * VEC < tw;
    if (have) load(cur, tw0 + st * STEP + kl * VEC);  // in flight while x is staged
    __syncthreads();  // previous tile consumed (and LUT stored, first time)
    {
      // 16-byte loads of 8 channels (8j..8j+7 of word wl), all issued before the stores
      constexpr int UNR = kTileWords * 4 / kThreads;
      uint4 v[UNR];
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int p = threadIdx.x + u * kThreads;
        if (p < tw * 4) v[u] = *reinterpret_cast<const uint4*>(xm + (size_t)tw0 * 32 + p * 8);
      }
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int p = threadIdx.x + u * kThreads;
        if (p >= tw * 4) continue;
        const int wl = p >> 2, j = p & 3, key = (wl / VEC) & 7;
        const T* h = reinterpret_cast<const T*>(&v[u]);
#pragma unroll
        for (int k = 0; k < 8; ++k) xs[wl * 32 + ((k ^ key) << 2) + j] = to_f32(h[k]);
      }
    }
    __syncthreads();
    while (st < nsteps) {
      const int st_n = st + KS;
      const bool have_n = row_ok && st_n < nsteps && st_n * STEP + kl * VEC < tw;
      if (have_n) load(nxt, tw0 + st_n * STEP + kl * VEC);
      if (have) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          uint32_t rp[BITS];
          rp[0] = cur[0][v];
#pragma unroll
          for (int q = 1; q < BITS; ++q) rp[q] = __funnelshift_l(cur[q][v], cur[q][v], q);
          const int wl = st * STEP + kl * VEC + v, key = (wl / VEC) & 7;
          const float* xw = xs + wl * 32;
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            uint32_t t = rp[0];
#pragma unroll
            for (int q = 1; q < BITS; ++q) {
              const uint32_t msk = 0x01010101u << ((k + q) & 7);
              t = (rp[q] & msk) | (t & ~msk);
            }
            const uint32_t u = (__funnelshift_r(t, t, (k + 30) & 31) & CODEMASK) | rowbyte;
            const float4 xv = *reinterpret_cast<const float4*>(xw + ((k ^ key) << 2));
            acc0 = fmaf(lds_f32(__byte_perm(u, lut_base, 0x7650)), xv.x, acc0);
            acc1 = fmaf(lds_f32(__byte_perm(u, lut_base, 0x7651)), xv.y, acc1);
            acc2 = fmaf(lds_f32(__byte_perm(u, lut_base, 0x7652)), xv.z, acc2);
            acc3 = fmaf(lds_f32(__byte_perm(u, lut_base, 0x7653)), xv.w, acc3);
          }
        }
      }
      if (have_n) {
#pragma unroll
        for (int q = 0; q < BITS; ++q)
#pragma unroll
          for (int v = 0; v < VEC; ++v) cur[q][v] = nxt[q][v];
      }
      have = have_n;
      st = st_n;
    }
  }

  float acc = (acc0 + acc1) + (acc2 + acc3);
#pragma unroll
  for (int off = KL / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (kl == 0) red[warp][rr] = acc;
  __syncthreads();
  float* gpart = fused.gpart ? fused.gpart + (size_t)m * out : nullptr;
  for (int i = threadIdx.x; i < RB; i += kThreads) {
    const int r = row0 + i;
    if (r >= out) continue;
    const int g = i / RW, q = i % RW;
    float s = 0.f;
    for (int k = 0; k < KS; ++k) s += red[g * KS + k][q];
    if (gpart) gpart[r] = s;
    else y[(size_t)m * out + r] = from_f32<T>(s);
  }
  if (fused.on()) fused_arrive<T, 2>(fused, m, blockIdx.x, blockIdx.x + 1, out, flags);
}

// 3-bit fp16 variant: the 8-entry LUT of a lane's row lives in 4 registers (low and high bytes of
// the 8 fp16 centroids) and PRMT is the lookup: a selector of 4 3-bit codes picks 4 low bytes and
// 4 high bytes, two more PRMTs interleave them into 2 half2 weights. No shared-memory traffic per
// weight (only one 16-byte x load per 8 weights), so the kernel is bound by integer issue instead of
// the shared-memory pipe. Products accumulate in half2 over 16 weights, then in fp32.
// Codes: u_k (k = 0..3) holds the code of channel 4n+k in nibble n (n = 0..7); x is staged as
// fp16 in the same order: slot k of word w = x[32w + k + 4n], n = 0..7 (16 bytes).
template <int VEC>
__global__ void __launch_bounds__(kThreads, 4)
    ap3_gemv_prmt_kernel(const __half* __restrict__ x, const uint32_t* __restrict__ qw,
                         const __half* __restrict__ lut, __half* __restrict__ y, int in, int out, int ks_log2,
                         Fused fused) {
  constexpr int BITS = 3, KL = 8, RW = 4, STEP = KL * VEC;
  __shared__ __align__(16) __half xs[kTileWords * 32];
  __shared__ float red[kWarps][RW];
  __shared__ int flags[kThreads];

  const int KS = 1 << ks_log2;
  const int RB = (kWarps >> ks_log2) * RW;
  const int words = in >> 5;
  const int m = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rg = warp >> ks_log2, ks = warp & (KS - 1);
  const int rr = lane / KL, kl = lane % KL;
  const int row0 = blockIdx.x * RB;
  const int row = row0 + rg * RW + rr;
  const bool row_ok = row < out;
  const int rowc = row_ok ? row : 0;

  // the row's LUT as byte tables: lo/hi bytes of centroids 0..3 (a) and 4..7 (b)
  const uint4 l8 = *reinterpret_cast<const uint4*>(lut + (size_t)rowc * 8);
  const uint32_t lo_a = __byte_perm(l8.x, l8.y, 0x6420), hi_a = __byte_perm(l8.x, l8.y, 0x7531);
  const uint32_t lo_b = __byte_perm(l8.z, l8.w, 0x6420), hi_b = __byte_perm(l8.z, l8.w, 0x7531);
  pdl_wait();  // x (and y) belong to the previous kernel; the LUT above does not
  gemv_trigger_dependents();

  const size_t plane_stride = (size_t)out * words;
  const uint32_t* qrow = qw + (size_t)rowc * words;
  const __half* xm = x + (size_t)m * in;
  float acc = 0.f;

  uint32_t cur[BITS][VEC], nxt[BITS][VEC];
  auto load = [&](uint32_t (&dst)[BITS][VEC], int gw) {
#pragma unroll
    for (int q = 0; q < BITS; ++q) {
      const uint32_t* p = qrow + q * plane_stride + gw;
      if constexpr (VEC == 4) {
        const uint4 v = ldg_stream_v4(p);
        dst[q][0] = v.x; dst[q][1] = v.y; dst[q][2] = v.z; dst[q][3] = v.w;
      } else {
        dst[q][0] = ldg_stream(p);
      }
    }
  };

  for (int tw0 = 0; tw0 < words; tw0 += kTileWords) {
    const int tw = min(kTileWords, words - tw0);
    const int nsteps = ceil_div(tw, STEP);
    int st = ks;
    bool have = row_ok && st < nsteps && st * STEP + kl * VEC < tw;
    if (have) load(cur, tw0 + st * STEP + kl * VEC);
    __syncthreads();
    {
      constexpr int UNR = kTileWords * 4 / kThreads;
      uint4 v[UNR];
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int p = threadIdx.x + u * kThreads;
        if (p < tw * 4) v[u] = *reinterpret_cast<const uint4*>(xm + (size_t)tw0 * 32 + p * 8);
      }
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int p = threadIdx.x + u * kThreads;
        if (p >= tw * 4) continue;
        const int wl = p >> 2, j = p & 3, key = (wl / VEC) & 3;  // channels 8j .. 8j+7 of word wl
        const __half* h = reinterpret_cast<const __half*>(&v[u]);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int c = 8 * j + e, k = c & 3, n = c >> 2;
          xs[wl * 32 + ((k ^ key) << 3) + n] = h[e];
        }
      }
    }
    __syncthreads();
    while (st < nsteps) {
      const int st_n = st + KS;
      const bool have_n = row_ok && st_n < nsteps && st_n * STEP + kl * VEC < tw;
      if (have_n) load(nxt, tw0 + st_n * STEP + kl * VEC);
      if (have) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const uint32_t A = cur[0][v];
          const uint32_t B = __funnelshift_l(cur[1][v], cur[1][v], 1);
          const uint32_t C = __funnelshift_l(cur[2][v], cur[2][v], 2);
          const int wl = st * STEP + kl * VEC + v, key = (wl / VEC) & 3;
          const __half* xw = xs + wl * 32;
#pragma unroll
          for (int kp = 0; kp < 4; kp += 2) {
            __half2 hacc0 = __float2half2_rn(0.f), hacc1 = hacc0;
#pragma unroll
            for (int k = kp; k < kp + 2; ++k) {
              const uint32_t m1 = 0x11111111u << ((k + 1) & 3), m2 = 0x11111111u << ((k + 2) & 3);
              uint32_t t = (B & m1) | (A & ~m1);
              t = (C & m2) | (t & ~m2);
              const uint32_t u = __funnelshift_r(t, t, k) & 0x77777777u;
              const uint4 xv = *reinterpret_cast<const uint4*>(xw + ((k ^ key) << 3));
              const uint32_t u_hi = u >> 16;
              const uint32_t LO0 = __byte_perm(lo_a, lo_b, u), HI0 = __byte_perm(hi_a, hi_b, u);
              const uint32_t LO1 = __byte_perm(lo_a, lo_b, u_hi), HI1 = __byte_perm(hi_a, hi_b, u_hi);
              const uint32_t w01 = __byte_perm(LO0, HI0, 0x5140), w23 = __byte_perm(LO0, HI0, 0x7362);
              const uint32_t w45 = __byte_perm(LO1, HI1, 0x5140), w67 = __byte_perm(LO1, HI1, 0x7362);
              hacc0 = __hfma2(*reinterpret_cast<const __half2*>(&w01), *reinterpret_cast<const __half2*>(&xv.x), hacc0);
              hacc1 = __hfma2(*reinterpret_cast<const __half2*>(&w23), *reinterpret_cast<const __half2*>(&xv.y), hacc1);
              hacc0 = __hfma2(*reinterpret_cast<const __half2*>(&w45), *reinterpret_cast<const __half2*>(&xv.z), hacc0);
              hacc1 = __hfma2(*reinterpret_cast<const __half2*>(&w67), *reinterpret_cast<const __half2*>(&xv.w), hacc1);
            }
            const float2 f0 = __half22float2(hacc0), f1 = __half22float2(hacc1);
            acc += (f0.x + f0.y) + (f1.x + f1.y);
          }
        }
      }
      if (have_n) {
#pragma unroll
        for (int q = 0; q < BITS; ++q)
#pragma unroll
          for (int v = 0; v < VEC; ++v) cur[q][v] = nxt[q][v];
      }
      have = have_n;
      st = st_n;
    }
  }

#pragma unroll
  for (int off = KL / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (kl == 0) red[warp][rr] = acc;
  __syncthreads();
  float* gpart = fused.gpart ? fused.gpart + (size_t)m * out : nullptr;
  for (int i = threadIdx.x; i < RB; i += kThreads) {
    const int r = row0 + i;
    if (r >= out) continue;
    const int g = i / RW, q = i % RW;
    float s = 0.f;
    for (int k = 0; k < KS; ++k) s += red[g * KS + k][q];
    if (gpart) gpart[r] = s;
    else y[(size_t)m * out + r] = __float2half_rn(s);
  }
  if (fused.on()) fused_arrive<__half, 2>(fused, m, blockIdx.x, blockIdx.x + 1, out, flags);
}

// 3-bit fp16 streaming kernel (Llama's in = 4096 rows; needs in % 128 == 0). A warp owns a pair of
// rows at a time and the whole warp walks them: lane l reads 16 bytes of each bit-plane of both rows
// at words 4g..4g+3, g = l + 32t, so every load instruction of the warp reads 512 contiguous bytes
// and the two rows share each x load. The grid is sized to the device (2 blocks per SM, minus the
// DEC blocks of a fused call) and every block owns a contiguous range of rows: x is staged in
// shared memory once per block, the row-pair loop never synchronizes, and the next item's 96 bytes
// per lane are in flight while the current one is computed. Decoding is the PRMT register LUT of
// ap3_gemv_prmt_kernel. x layout in shared memory: 16-byte chunk c = 4w + k holds
// x[32w + 4n + k], n = 0..7; chunk c is stored at c ^ ((c >> 4) & 7), so the 8 lanes of a
// quarter-warp (consecutive g at the same w%4, k) hit 8 distinct bank quads.
constexpr int kStreamThreads = 256;
constexpr int kStreamWarps = kStreamThreads / 32;

__device__ __forceinline__ int xs_swz(int c) { return c ^ ((c >> 4) & 7); }

// Stage x (one token, in % 8 == 0) into shared memory in the layout above: 16-byte loads of 8
// channels, all of a thread's loads issued before its stores. The caller synchronizes.
template <int kThreadsPerBlock>
__device__ __forceinline__ void stage_x_swizzled(const __half* __restrict__ xm, int in, uint4* xs) {
  __half* xh = reinterpret_cast<__half*>(xs);
  const int n16 = in >> 3;
  for (int b = 0; b < n16; b += kThreadsPerBlock * 4) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int j = b + u * kThreadsPerBlock + (int)threadIdx.x;
      if (j < n16) v[u] = *reinterpret_cast<const uint4*>(xm + (size_t)j * 8);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int j = b + u * kThreadsPerBlock + (int)threadIdx.x;
      if (j >= n16) continue;
      const int w = j >> 2, q = j & 3;  // channels 32w + 8q + e
      const __half* h = reinterpret_cast<const __half*>(&v[u]);
#pragma unroll
      for (int e = 0; e < 8; ++e) xh[xs_swz(4 * w + (e & 3)) * 8 + 2 * q + (e >> 2)] = h[e];
    }
  }
}

// The add + RMSNorm prologue (kernels.h `AddNorm`, in <= 8192: each thread keeps its <= 4 chunks in registers):
// h = a + b in fp16, the block's sum of h^2 in fp32, then x = gamma * fp16(h * r), r = rsqrt(mean + eps), into the
// layout of stage_x_swizzled. Block 0 writes h. Two block barriers; the caller synchronizes after.
template <int kThreadsPerBlock>
__device__ __forceinline__ void stage_x_addnorm(const __half* __restrict__ am, const AddNorm& an, int m, int in,
                                                uint4* xs, float* s_red) {
  __half* xh = reinterpret_cast<__half*>(xs);
  const __half* bm = static_cast<const __half*>(an.b) + (size_t)m * in;
  const __half* gm = static_cast<const __half*>(an.gamma);
  __half* hm = blockIdx.x == 0 ? static_cast<__half*>(an.h_out) + (size_t)m * in : nullptr;
  const int n16 = in >> 3;
  uint4 h[4], g[4];
  float ss = 0.f;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int j = u * kThreadsPerBlock + (int)threadIdx.x;
    if (j < n16) {
      const uint4 av = *reinterpret_cast<const uint4*>(am + (size_t)j * 8);
      const uint4 bv = *reinterpret_cast<const uint4*>(bm + (size_t)j * 8);
      g[u] = *reinterpret_cast<const uint4*>(gm + (size_t)j * 8);
      const __half2* a2 = reinterpret_cast<const __half2*>(&av);
      const __half2* b2 = reinterpret_cast<const __half2*>(&bv);
      __half2* h2 = reinterpret_cast<__half2*>(&h[u]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        h2[e] = __hadd2(a2[e], b2[e]);
        const float2 f = __half22float2(h2[e]);
        ss = fmaf(f.x, f.x, fmaf(f.y, f.y, ss));
      }
      if (hm) *reinterpret_cast<uint4*>(hm + (size_t)j * 8) = h[u];
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = ss;
  __syncthreads();
  float tot = 0.f;
#pragma unroll
  for (int w = 0; w < kThreadsPerBlock / 32; ++w) tot += s_red[w];
  const float r = rsqrtf(tot / (float)in + an.eps);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int j = u * kThreadsPerBlock + (int)threadIdx.x;
    if (j >= n16) continue;
    const __half* hv = reinterpret_cast<const __half*>(&h[u]);
    const __half* gv = reinterpret_cast<const __half*>(&g[u]);
    const int w = j >> 2, q = j & 3;  // channels 32w + 8q + e, placed as stage_x_swizzled places them
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const __half t = __float2half_rn(__half2float(hv[e]) * r);
      xh[xs_swz(4 * w + (e & 3)) * 8 + 2 * q + (e >> 2)] = __float2half_rn(__half2float(t) * __half2float(gv[e]));
    }
  }
}

template <int R>
struct StreamItem {  // one lane's share of R rows: 3 planes x 4 words per row, and the rows' LUTs
  uint4 w[R][3];
  uint4 l[R];
};

// R rows per warp item (2: the rows share every x load; 1: fewer registers, 3 blocks per SM).
template <int R>
constexpr int stream_blocks_per_sm() { return R == 2 ? 2 : 3; }

// GLU (R = 2, rows interleaved as (gate_i, up_i) = rows (2 i, 2 i + 1): QuantLinear.use_glu_layout): a warp item's
// two rows are one pair, and the kernel writes y[i] = fp16(silu(g) * u) with g, u the fp16-rounded rows (out / 2
// outputs): SiLU x up without a kernel of its own, so the down projection's GEMV chains directly behind this one.
__device__ __forceinline__ __half glu_out(float g, float u) {
  const float gh = __half2float(__float2half_rn(g)), uh = __half2float(__float2half_rn(u));
  return __float2half_rn(gh / (1.0f + expf(-gh)) * uh);
}

// ---- Chain mode, the GEMV's side (kernels.h `Fused::chain`).
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// In place of pdl_wait(): wait until DEC has seen the kernel before it complete (x is readable). The last of the
// GEMV's blocks to pass resets the counter (DEC added 1, every block adds 1).
__device__ __forceinline__ void chain_wait_x(const Fused& f) {
  if (threadIdx.x == 0) {
    while (ld_acquire_gpu(f.chain) < 1) __nanosleep(32);
    if (atomicAdd(f.chain, 1) == (int)(gridDim.x * gridDim.y)) f.chain[0] = 0;
  }
  __syncthreads();
}

// DEC's sum for output r of token m: its chunk partials in chunk order, their loads in flight together (14 at
// in = 14336: one L2 round trip).
__device__ __forceinline__ float chain_dec_sum(const Fused& f, int m, int out, int r) {
  constexpr int kBatch = 16;
  const size_t ps = (size_t)f.n_tokens * out;
  const float* dp = f.dpart + (size_t)m * out;
  float acc = 0.f;
  for (int c0 = 0; c0 < f.dec_parts; c0 += kBatch) {
    float t[kBatch];
#pragma unroll
    for (int q = 0; q < kBatch; ++q) t[q] = c0 + q < f.dec_parts ? __ldcg(dp + (c0 + q) * ps + r) : 0.f;
#pragma unroll
    for (int q = 0; q < kBatch; ++q) acc += t[q];
  }
  return acc;
}

// The block's rows [r0, r1) of token m, their fp32 GEMV sums in rows[i * stride] (shared memory, complete after the
// barrier): wait for every DEC unit of token m, then y = cast(gemv + scale * sum of the chunk partials in chunk
// order), as fused_arrive writes it; GLU (rows in (gate_i, up_i) pairs, DEC and scales in the original order, r0
// even): y[i] = silu(g) * u of the combined pair, as glu_out. Then the block counts itself as a reader of the counter;
// the last reader resets it.
template <bool GLU>
__device__ void chain_combine(const Fused& f, const float* rows, int stride, int m, int r0, int r1, int out,
                              __half* __restrict__ y) {
  __syncthreads();
  if (threadIdx.x == 0)
    while (ld_acquire_gpu(f.chain + 1 + m) < f.chain_units) __nanosleep(32);
  __syncthreads();
  GEMV_STAMP(4);
  const __half* sc = static_cast<const __half*>(f.dec_scales);
  auto dsum = [&](int r) { return chain_dec_sum(f, m, out, r); };
  if constexpr (GLU) {
    const int half = out / 2;
    for (int p = threadIdx.x; 2 * p < r1 - r0; p += blockDim.x) {
      const int i = (r0 >> 1) + p;
      const float g = fmaf(dsum(i), __half2float(sc[i]), rows[2 * p * stride]);
      const float u = fmaf(dsum(half + i), __half2float(sc[half + i]), rows[(2 * p + 1) * stride]);
      y[(size_t)m * half + i] = glu_out(g, u);
    }
  } else {
    for (int i = threadIdx.x; i < r1 - r0; i += blockDim.x) {
      const int r = r0 + i;
      y[(size_t)m * out + r] = __float2half_rn(fmaf(dsum(r), __half2float(sc[r]), rows[i * stride]));
    }
  }
  if (threadIdx.x == 0 && atomicAdd(f.chain + 1 + m, 1) == f.chain_units + (int)gridDim.x - 1) f.chain[1 + m] = 0;
}

template <int R, bool NORM = false, bool PACKED = false, bool GLU = false, bool CHAIN = false>
__global__ void __launch_bounds__(kStreamThreads, stream_blocks_per_sm<R>())
    ap3_gemv_stream_kernel(const __half* __restrict__ x, const uint32_t* __restrict__ qw,
                           const __half* __restrict__ lut, __half* __restrict__ y, int in, int out, int block_rows,
                           Fused fused, AddNorm an) {
  extern __shared__ __align__(16) uint4 xs[];  // in / 8 chunks (CHAIN: then block_rows floats, the rows' sums)
  __shared__ int flags[kStreamThreads];
  const int words = in >> 5, G4 = words >> 2, T = ceil_div(G4, 32);
  float* s_rows = reinterpret_cast<float*>(xs + (in >> 3));
  const int m = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r0 = blockIdx.x * block_rows, r1 = min(out, r0 + block_rows);
  const int ngroups = ceil_div(r1 - r0, R);
  const int my_groups = ngroups > warp ? ceil_div(ngroups - warp, kStreamWarps) : 0;
  const int n_items = my_groups * T;
  const size_t plane = (size_t)out * words;

  // item i: row group p = warp + (i / T) * warps (rows r0 + R p ...), 4-word group g = lane + 32 (i % T)
  auto load = [&](StreamItem<R>& d, int i) {
    const int pi = i / T, t = i - pi * T;
    const int ra = r0 + R * (warp + pi * kStreamWarps);
    const int g = min(lane + 32 * t, G4 - 1);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int r = ra + j < r1 ? ra + j : ra;
      const uint32_t* p = PACKED ? qw + kl_offset(r, words, 4 * g) : qw + (size_t)r * words + 4 * g;
#pragma unroll  // d.w[j][q][v]: plane q (PACKED: word W_q) of the lane's group 4 g + v
      for (int q = 0; q < 3; ++q) d.w[j][q] = ldg_stream_v4(p + (PACKED ? 8 * q : q * plane));
      d.l[j] = __ldg(reinterpret_cast<const uint4*>(lut + (size_t)r * 8));
    }
  };
  GEMV_STAMP(0);
  StreamItem<R> bufA, bufB;
  if (n_items > 0) load(bufA, 0);
  if constexpr (CHAIN) chain_wait_x(fused);  // DEC before this kernel has seen x complete
  else pdl_wait();  // the first weights are in flight; x (and y) belong to the previous kernel
  gemv_trigger_dependents();

  if constexpr (NORM) stage_x_addnorm<kStreamThreads>(x + (size_t)m * in, an, m, in, xs, reinterpret_cast<float*>(flags));
  else stage_x_swizzled<kStreamThreads>(x + (size_t)m * in, in, xs);
  __syncthreads();
  GEMV_STAMP(1);

  float* gpart = fused.gpart ? fused.gpart + (size_t)m * out : nullptr;
  // chunk 16g + j of group g sits at 16g + (j ^ (g & 7)), and g & 7 == lane & 7 for every item
  const uint32_t xs_base = (uint32_t)__cvta_generic_to_shared(xs);
  const uint32_t swz = 16u * (uint32_t)(lane & 7);
  float acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;

  auto compute = [&](const StreamItem<R>& c, int i) {
    const int pi = i / T, t = i - pi * T;
    const int g = lane + 32 * t;
    if (g < G4) {
      uint32_t lt[R][4];
#pragma unroll
      for (int j = 0; j < R; ++j) lut_tables(c.l[j], lt[j][0], lt[j][1], lt[j][2], lt[j][3]);
      const uint32_t gbase = xs_base + 256u * (uint32_t)g;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        uint32_t A[R], B[R], C[R];
#pragma unroll
        for (int j = 0; j < R; ++j) {
          if constexpr (PACKED) {
            A[j] = reinterpret_cast<const uint32_t*>(&c.w[j][0])[v];
            B[j] = reinterpret_cast<const uint32_t*>(&c.w[j][1])[v];
            C[j] = reinterpret_cast<const uint32_t*>(&c.w[j][2])[v];
          } else {
            const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&c.w[j][0]);
            const uint32_t* w1 = reinterpret_cast<const uint32_t*>(&c.w[j][1]);
            const uint32_t* w2 = reinterpret_cast<const uint32_t*>(&c.w[j][2]);
            A[j] = w0[v];
            B[j] = __funnelshift_l(w1[v], w1[v], 1);
            C[j] = __funnelshift_l(w2[v], w2[v], 2);
          }
        }
        // chunks 4v .. 4v+3 of the group: physical (4v + k) ^ (lane & 7); v >= 2 adds 128 bytes
        const uint32_t p01 = gbase + ((16u * (4 * (v & 1))) ^ swz) + 128u * (v >> 1);
        const uint32_t p23 = gbase + ((16u * (4 * (v & 1) + 2)) ^ swz) + 128u * (v >> 1);
        uint4 xv[4];
        asm("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(xv[0].x), "=r"(xv[0].y), "=r"(xv[0].z), "=r"(xv[0].w) : "r"(p01));
        asm("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(xv[1].x), "=r"(xv[1].y), "=r"(xv[1].z), "=r"(xv[1].w) : "r"(p01 ^ 16u));
        asm("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(xv[2].x), "=r"(xv[2].y), "=r"(xv[2].z), "=r"(xv[2].w) : "r"(p23));
        asm("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(xv[3].x), "=r"(xv[3].y), "=r"(xv[3].z), "=r"(xv[3].w) : "r"(p23 ^ 16u));
#pragma unroll
        for (int j = 0; j < R; ++j) {
          __half2 h0 = __float2half2_rn(0.f), h1 = h0;
          ap3_dot8<0, PACKED>(A[j], B[j], C[j], lt[j][0], lt[j][1], lt[j][2], lt[j][3], xv[0], h0, h1);
          ap3_dot8<1, PACKED>(A[j], B[j], C[j], lt[j][0], lt[j][1], lt[j][2], lt[j][3], xv[1], h0, h1);
          const float2 f0 = __half22float2(h0), f1 = __half22float2(h1);
          __half2 h2 = __float2half2_rn(0.f), h3 = h2;
          ap3_dot8<2, PACKED>(A[j], B[j], C[j], lt[j][0], lt[j][1], lt[j][2], lt[j][3], xv[2], h2, h3);
          ap3_dot8<3, PACKED>(A[j], B[j], C[j], lt[j][0], lt[j][1], lt[j][2], lt[j][3], xv[3], h2, h3);
          const float2 f2 = __half22float2(h2), f3 = __half22float2(h3);
          acc[j] += ((f0.x + f0.y) + (f1.x + f1.y)) + ((f2.x + f2.y) + (f3.x + f3.y));
        }
      }
    }
    if (t + 1 == T) {  // the row group is done: reduce over the warp and write its rows
#pragma unroll
      for (int j = 0; j < R; ++j)
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
      const int ra = r0 + R * (warp + pi * kStreamWarps);
      if constexpr (CHAIN) {  // the combine with DEC at the block's end (chain_combine)
#pragma unroll
        for (int j = 0; j < R; ++j) {
          if (lane == j && ra + j < r1) s_rows[ra + j - r0] = acc[j];
          acc[j] = 0.f;
        }
      } else if constexpr (GLU) {  // R == 2, ra even, out even: the pair (ra, ra + 1) is (gate, up) of output ra / 2
        if (lane == 0 && ra < r1) y[(size_t)m * (out / 2) + ra / 2] = glu_out(acc[0], acc[1]);
#pragma unroll
        for (int j = 0; j < R; ++j) acc[j] = 0.f;
      } else {
#pragma unroll
        for (int j = 0; j < R; ++j) {
          if (lane == j && ra + j < r1) {
            if (gpart) gpart[ra + j] = acc[j];
            else y[(size_t)m * out + ra + j] = __float2half_rn(acc[j]);
          }
          acc[j] = 0.f;
        }
      }
    }
  };

  ping_pong(n_items, bufA, bufB, load, compute);
  GEMV_STAMP(2);
  if constexpr (CHAIN) chain_combine<GLU>(fused, s_rows, 1, m, r0, r1, out, y);
  else if (fused.on()) fused_arrive<__half, R == 2 ? 4 : 2>(fused, m, blockIdx.x, blockIdx.x + 1, out, flags);
  GEMV_STAMP(3);
}

// 3-bit fp16 tensor-core GEMV (in % 512 == 0; the decode hot path). A warp item is 16 rows x 16 words
// (512 channels): lane (g = lane / 4, t = lane % 4) streams words 4 (4 ks + t) .. +3 of rows g and
// g + 8 (one 16-byte load per plane and row), decodes each word's 32 weights with the PRMT LUT
// lookup (ap3_decode8) into half2 pairs, and feeds mma.m16n8k16 (fp16 products, fp32 accumulation)
// whose B operand is x from shared memory in every column. The k-order inside an MMA is a
// permutation of the word's channels that is the same for all 16 rows (rows g and g + 8 of lanes
// with the same t read the same word), so A's rows times B's column is the row's dot product. Compared
// with HFMA2 this drops the half-precision partial sums and their conversions (fewer instructions per
// weight: the kernel is bound by integer issue) and accumulates in fp32 like the reference.
// Items are group-major (16-row group, k-slice); warp w takes items w, w + 8, ...; a warp's items of
// one group are consecutive, so it flushes its fp32 sums once per group into red[row][warp], and the
// rows are summed over the warps in a fixed order (deterministic).
constexpr int kMmaThreads = 256;
constexpr int kMmaWarps = kMmaThreads / 32;

struct MmaItem {  // one lane's share: rows g and g + 8, 3 planes x 4 words each, and the two LUTs
  uint32_t w[2][3][4];
  uint4 l[2];
};

__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int K, bool PACKED>
__device__ __forceinline__ void ap3_mma_step(const uint32_t (&A)[2], const uint32_t (&B)[2], const uint32_t (&C)[2],
                                             const uint32_t (&lt)[2][4], uint32_t xaddr, float (&acc0)[4],
                                             float (&acc1)[4]) {
  uint32_t w0[4], w1[4];
  ap3_decode8_any<K, PACKED>(A[0], B[0], C[0], lt[0][0], lt[0][1], lt[0][2], lt[0][3], w0);
  ap3_decode8_any<K, PACKED>(A[1], B[1], C[1], lt[1][0], lt[1][1], lt[1][2], lt[1][3], w1);
  uint4 xv;
  asm("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(xv.x), "=r"(xv.y), "=r"(xv.z), "=r"(xv.w) : "r"(xaddr));
  // a0 / a2: row g, a1 / a3: row g + 8; b0 / b1: the x pairs of the same channels
  mma16816(acc0, w0[0], w1[0], w0[1], w1[1], xv.x, xv.y);
  mma16816(acc1, w0[2], w1[2], w0[3], w1[3], xv.z, xv.w);
}

// One lane's share of warp item (16-row group with first row rb, k-slice ks): rows rb + g and rb + g + 8 (rows at or
// past r1 decode row r1 - 1, never stored), 3 planes x 4 words, and the two rows' LUTs.
template <bool PACKED>
__device__ __forceinline__ void mma_load_item(MmaItem& d, const uint32_t* __restrict__ qw, const __half* __restrict__ lut,
                                              int rb, int r1, int ks, int g, int t, int words, size_t plane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    int r = rb + g + 8 * h;
    r = r < r1 ? r : r1 - 1;
    const uint32_t* p = PACKED ? qw + kl_offset(r, words, 4 * (4 * ks + t)) : qw + (size_t)r * words + 4 * (4 * ks + t);
#pragma unroll
    for (int q = 0; q < 3; ++q) {  // d.w[h][q][v]: plane q (PACKED: word W_q) of group 4 (4 ks + t) + v
      const uint4 v = ldg_stream_v4(p + (PACKED ? 8 * q : q * plane));
      d.w[h][q][0] = v.x; d.w[h][q][1] = v.y; d.w[h][q][2] = v.z; d.w[h][q][3] = v.w;
    }
    d.l[h] = __ldg(reinterpret_cast<const uint4*>(lut + (size_t)r * 8));
  }
}

// acc0 / acc1 += the item's 16 rows times x's k-slice ks (x staged by stage_x_swizzled at xs_base).
template <bool PACKED>
__device__ __forceinline__ void mma_compute_item(const MmaItem& c, int ks, int t, uint32_t xs_base, float (&acc0)[4],
                                                 float (&acc1)[4]) {
  uint32_t lt[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) lut_tables(c.l[h], lt[h][0], lt[h][1], lt[h][2], lt[h][3]);
  // the lane's words 4 (4 ks + t) + v; chunk c of x sits at xs_swz(c) = c ^ ((c >> 4) & 7), so for
  // the 4-word group g4 = 4 ks + t chunk 16 g4 + c' sits at 16 g4 + (c' ^ (g4 & 7))
  const int g4 = 4 * ks + t;
  const uint32_t gbase = xs_base + 256u * (uint32_t)g4, sw = (uint32_t)(g4 & 7);
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    uint32_t A[2], B[2], C[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (PACKED) {
        A[h] = c.w[h][0][v]; B[h] = c.w[h][1][v]; C[h] = c.w[h][2][v];
      } else {
        A[h] = c.w[h][0][v];
        B[h] = __funnelshift_l(c.w[h][1][v], c.w[h][1][v], 1);
        C[h] = __funnelshift_l(c.w[h][2][v], c.w[h][2][v], 2);
      }
    }
    ap3_mma_step<0, PACKED>(A, B, C, lt, gbase + 16u * ((4u * v + 0) ^ sw), acc0, acc1);
    ap3_mma_step<1, PACKED>(A, B, C, lt, gbase + 16u * ((4u * v + 1) ^ sw), acc0, acc1);
    ap3_mma_step<2, PACKED>(A, B, C, lt, gbase + 16u * ((4u * v + 2) ^ sw), acc0, acc1);
    ap3_mma_step<3, PACKED>(A, B, C, lt, gbase + 16u * ((4u * v + 3) ^ sw), acc0, acc1);
  }
}

// Token m's x into shared memory for the tensor-core kernels (NORM: formed from a + b and RMSNorm), then a block
// barrier.
template <bool NORM>
__device__ __forceinline__ void mma_stage_x(const __half* __restrict__ x, const AddNorm& an, int m, int in, uint4* xs,
                                            int* flags) {
  if constexpr (NORM) stage_x_addnorm<kMmaThreads>(x + (size_t)m * in, an, m, in, xs, reinterpret_cast<float*>(flags));
  else stage_x_swizzled<kMmaThreads>(x + (size_t)m * in, in, xs);
  __syncthreads();
}

// The row's fp32 sum over the 8 warps' slots, in a fixed order (deterministic).
__device__ __forceinline__ float mma_row_sum(const float* red_row) {
  const float4 a = *reinterpret_cast<const float4*>(red_row);
  const float4 b = *reinterpret_cast<const float4*>(red_row + 4);
  return ((a.x + a.y) + (a.z + a.w)) + ((b.x + b.y) + (b.z + b.w));
}

// A warp's items j = 0 .. my_items - 1 (item i = base + warp + kMmaWarps j: 16-row group i / KS, k-slice i % KS) on the
// tensor cores, ping-pong buffers (no register copies): the next item's loads are in flight during compute; bufA
// holds item 0's loads on entry (issued before the kernel waited for x). At the warp's last item of each group its
// rows' fp32 sums go to red[16 (group - gbase) + row][warp]. H200 (scripts/gemv_ab.cu, session 3 code, run in
// session 4): one buffer, 2 words per lane or 3-4 blocks per SM (64-113 registers) were all slower, 4096x28672
// 27.8-35.3 us against 24.0 us here.
template <bool PACKED, typename Load>
__device__ __forceinline__ void mma_run_items(MmaItem& bufA, MmaItem& bufB, const Load& load, int my_items, int base,
                                              int gbase, int KS, int warp, int g, int t, const uint4* xs, float* red) {
  const uint32_t xs_base = (uint32_t)__cvta_generic_to_shared(xs);
  float acc0[4] = {0.f, 0.f, 0.f, 0.f}, acc1[4] = {0.f, 0.f, 0.f, 0.f};
  auto compute = [&](const MmaItem& c, int j) {
    const int i = base + warp + kMmaWarps * j, grp = i / KS, ks = i - grp * KS;
    mma_compute_item<PACKED>(c, ks, t, xs_base, acc0, acc1);
    if (j + 1 >= my_items || (i + kMmaWarps) / KS != grp) {  // the warp's last item of this group: flush
      const int q = grp - gbase;
      if (t == 0) {  // every column of D is the same dot product: lanes t = 0 keep column 0
        red[(16 * q + g) * kMmaWarps + warp] = acc0[0] + acc1[0];
        red[(16 * q + g + 8) * kMmaWarps + warp] = acc0[2] + acc1[2];
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) acc0[e] = acc1[e] = 0.f;
    }
  };
  ping_pong(my_items, bufA, bufB, load, compute);
}

// PACKED: qweight in the kernel layout [out, in/256, 3, 8] (common.cuh).
// NORM: x is formed from a + b and RMSNorm while staging (kernels.h `AddNorm`, in <= 8192), as the streaming kernel.
// CHAIN: chain mode with a fixed share per block (kernels.h `Fused::chain`; ap3_gemv_mma_split_kernel where
// mma_chain_equal_shares picks equal shares instead).
template <bool PACKED, bool NORM = false, bool CHAIN = false>
__global__ void __launch_bounds__(kMmaThreads, 2)
    ap3_gemv_mma_kernel(const __half* __restrict__ x, const uint32_t* __restrict__ qw, const __half* __restrict__ lut,
                        __half* __restrict__ y, int in, int out, int block_rows, Fused fused, AddNorm an) {
  extern __shared__ __align__(16) uint4 xs[];  // in / 8 chunks of x, then red [groups * 16][kMmaWarps]
  __shared__ int flags[kMmaThreads];
  const int words = in >> 5, KS = words >> 4;  // k-slices of 16 words
  const int m = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int r0 = blockIdx.x * block_rows, r1 = min(out, r0 + block_rows);
  const int ngroups = ceil_div(r1 - r0, 16);
  const int n_items = ngroups * KS;
  const int my_items = n_items > warp ? ceil_div(n_items - warp, kMmaWarps) : 0;
  const size_t plane = (size_t)out * words;
  float* red = reinterpret_cast<float*>(xs + (in >> 3));

  auto load = [&](MmaItem& d, int j) {  // this warp's j-th item
    const int i = warp + kMmaWarps * j, grp = i / KS, ks = i - grp * KS;
    mma_load_item<PACKED>(d, qw, lut, r0 + 16 * grp, r1, ks, g, t, words, plane);
  };
  GEMV_STAMP(0);
  MmaItem bufA, bufB;
  if (my_items > 0) load(bufA, 0);
  if constexpr (CHAIN) chain_wait_x(fused);  // DEC before this kernel has seen x complete
  else pdl_wait();  // the first weights are in flight; x (and y) belong to the previous kernel
  gemv_trigger_dependents();

  for (int i = threadIdx.x; i < ngroups * 16 * kMmaWarps; i += kMmaThreads) red[i] = 0.f;
  mma_stage_x<NORM>(x, an, m, in, xs, flags);
  GEMV_STAMP(1);

  mma_run_items<PACKED>(bufA, bufB, load, my_items, 0, 0, KS, warp, g, t, xs, red);
  __syncthreads();
  GEMV_STAMP(2);
  float* gpart = fused.gpart ? fused.gpart + (size_t)m * out : nullptr;
  for (int r = threadIdx.x; r < r1 - r0; r += kMmaThreads) {
    const float s = mma_row_sum(red + r * kMmaWarps);
    if constexpr (CHAIN) red[r * kMmaWarps] = s;  // the row's own slots: chain_combine reads it
    else if (gpart) gpart[r0 + r] = s;
    else y[(size_t)m * out + r0 + r] = __float2half_rn(s);
  }
  if constexpr (CHAIN) {
    chain_combine<false>(fused, red, kMmaWarps, m, r0, r1, out, y);
    GEMV_STAMP(3);
    return;
  }
  if (fused.on()) fused_arrive<__half, 4>(fused, m, blockIdx.x, blockIdx.x + 1, out, flags);
  GEMV_STAMP(3);
}

// Chain mode of the tensor-core GEMV with equal shares (where mma_chain_equal_shares picks it). One block per SM
// slot DEC leaves (at most one per group); block b takes the b-th equal run of the flattened (group, k-slice) items -- 28.9 items at 14336x4096
// beside 16 DEC blocks, instead of 1 or 2 whole groups -- so every SM runs two equal blocks (one beside a DEC block)
// wherever the scheduler put them, and the items interleave over the warps across group boundaries. A run is at
// least one group long (grid <= groups), so a group is split over at most two blocks: each stores its rows' fp32 sums
// for that group in gsplit (part 0: the block holding the group's first items), and the second to arrive at the
// group's counter adds part 0 + part 1 (a fixed order: deterministic) and writes the rows. Whole groups are written
// by their block; every row gets y = cast(gemv + scale * DEC's sum) as chain_combine writes it.
template <bool PACKED, bool NORM = false>
__global__ void __launch_bounds__(kMmaThreads, 2)
    ap3_gemv_mma_split_kernel(const __half* __restrict__ x, const uint32_t* __restrict__ qw,
                              const __half* __restrict__ lut, __half* __restrict__ y, int in, int out, int qmax,
                              Fused fused, AddNorm an) {
  extern __shared__ __align__(16) uint4 xs[];  // x (in / 8 chunks), then red [qmax * 16][kMmaWarps]
  __shared__ int flags[kMmaThreads];
  const int words = in >> 5, KS = words >> 4;
  const int m = blockIdx.y, groups = ceil_div(out, 16), T = groups * KS;
  const int i0 = (int)((long long)blockIdx.x * T / gridDim.x), i1 = (int)((long long)(blockIdx.x + 1) * T / gridDim.x);
  const int g0 = i0 / KS, ng = (i1 - 1) / KS - g0 + 1;  // groups this block touches (i1 - i0 >= KS, ng <= qmax)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int my_items = i1 - i0 > warp ? ceil_div(i1 - i0 - warp, kMmaWarps) : 0;
  const size_t plane = (size_t)out * words;
  float* red = reinterpret_cast<float*>(xs + (in >> 3));

  auto load = [&](MmaItem& d, int j) {  // this warp's j-th item: i0 + warp + 8 j
    const int i = i0 + warp + kMmaWarps * j, grp = i / KS, ks = i - grp * KS;
    mma_load_item<PACKED>(d, qw, lut, 16 * grp, out, ks, g, t, words, plane);
  };
  GEMV_STAMP(0);
  MmaItem bufA, bufB;
  if (my_items > 0) load(bufA, 0);
  chain_wait_x(fused);  // DEC before this kernel has seen x complete
  gemv_trigger_dependents();
  for (int k = threadIdx.x; k < ng * 16 * kMmaWarps; k += kMmaThreads) red[k] = 0.f;
  mma_stage_x<NORM>(x, an, m, in, xs, flags);
  GEMV_STAMP(1);

  mma_run_items<PACKED>(bufA, bufB, load, my_items, i0, g0, KS, warp, g, t, xs, red);
  __syncthreads();
  GEMV_STAMP(2);
  // Everything that does not need DEC happens before the wait for it: the rows' sums (a whole group's into red's first
  // slot of the row, a split group's part into gsplit) and the split groups' handoff (release this block's part,
  // acquire the other's; the second arrival writes). After DEC is seen complete, one batch of loads remains: DEC's
  // partials, the scales and the other part (session 16: the handoff after the wait put ~3.8 us between DEC's end
  // and the blocks' end at 14336x4096).
  float* split = fused.gsplit + (size_t)m * groups * 32;
  const bool head = g0 * KS < i0;              // group g0 began in the block before: this block holds its part 1
  const int gl = g0 + ng - 1;
  const bool tail = (gl + 1) * KS > i1;        // group gl goes on in the block after: this block holds its part 0
  for (int k = threadIdx.x; k < ng * 16; k += kMmaThreads) {
    const int q = k >> 4, rr = k & 15, grp = g0 + q;
    const float sum = mma_row_sum(red + k * kMmaWarps);  // this thread alone reads and writes row k's slots
    if (q == 0 && head) split[grp * 32 + 16 + rr] = sum;
    else if (q == ng - 1 && tail) split[grp * 32 + rr] = sum;
    else red[k * kMmaWarps] = sum;
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    const bool mine = threadIdx.x == 0 ? head : tail;
    int fin = 0;
    if (mine) {
      int* c = fused.chain + kChainGroups + m * groups + (threadIdx.x == 0 ? g0 : gl);
      int old;
      asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(old) : "l"(c) : "memory");
      fin = old == 1;
      if (fin) *c = 0;  // both parts have arrived: reset for the next call
    }
    flags[threadIdx.x] = fin;
    if (threadIdx.x == 0)  // then wait for DEC (the barrier below passes its acquire on to the block)
      while (ld_acquire_gpu(fused.chain + 1 + m) < fused.chain_units) __nanosleep(32);
  }
  __syncthreads();
  GEMV_STAMP(4);
  const __half* sc = static_cast<const __half*>(fused.dec_scales);
  for (int k = threadIdx.x; k < ng * 16; k += kMmaThreads) {
    const int q = k >> 4, rr = k & 15, r = 16 * (g0 + q) + rr;
    if (!((q == 0 && head) || (q == ng - 1 && tail)) && r < out)
      y[(size_t)m * out + r] = __float2half_rn(fmaf(chain_dec_sum(fused, m, out, r), __half2float(sc[r]), red[k * kMmaWarps]));
  }
  const int sx = threadIdx.x - (kMmaThreads - 32);  // the split groups' rows on the last warp, beside the whole rows
  if (sx >= 0 && flags[sx >> 4]) {
    const int grp = (sx >> 4) == 0 ? g0 : gl, rr = sx & 15, r = 16 * grp + rr;
    if (r < out) {
      const float sum = __ldcg(split + grp * 32 + rr) + __ldcg(split + grp * 32 + 16 + rr);  // part 0 + part 1
      y[(size_t)m * out + r] = __float2half_rn(fmaf(chain_dec_sum(fused, m, out, r), __half2float(sc[r]), sum));
    }
  }
  if (threadIdx.x == 0 && atomicAdd(fused.chain + 1 + m, 1) == fused.chain_units + (int)gridDim.x - 1)
    fused.chain[1 + m] = 0;  // every block has passed: reset for the next call
  GEMV_STAMP(3);
}

// Dequantize (prefill): one thread per (row, 32-channel group). PACKED (BITS = 3): the kernel layout (common.cuh).
template <int BITS, typename T, bool PACKED = false>
__global__ void __launch_bounds__(256)
    ap_dequant_kernel(const uint32_t* __restrict__ qw, const T* __restrict__ lut, T* __restrict__ w, int in, int out) {
  static_assert(!PACKED || BITS == 3, "the kernel layout holds 3-bit codes");
  constexpr int LUTN = 1 << BITS;
  const int words = in >> 5;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)out * words) return;
  const int r = (int)(i / words), wd = (int)(i % words);
  uint32_t p[BITS];  // bit-planes, or PACKED: W0, W1, W2
#pragma unroll
  for (int q = 0; q < BITS; ++q)
    p[q] = __ldg(qw + (PACKED ? kl_offset(r, words, wd) + 8 * q : ((size_t)q * out + r) * words + wd));
  T vals[LUTN];
#pragma unroll
  for (int c = 0; c < LUTN; ++c) vals[c] = lut[(size_t)r * LUTN + c];
  T* dst = w + (size_t)r * in + (size_t)wd * 32;
#pragma unroll
  for (int j0 = 0; j0 < 32; j0 += 8) {
    __align__(16) T o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      int code = 0;
      if constexpr (PACKED) {  // channel 4 n + k: nibble n of W_k (k < 3), or bit 3 of nibble n of W0, W1, W2
        const int n = (j0 + j) >> 2, k = (j0 + j) & 3;
        code = k < 3 ? (p[k] >> (4 * n)) & 7
                     : ((p[0] >> (4 * n + 3)) & 1) | (((p[1] >> (4 * n + 3)) & 1) << 1) | (((p[2] >> (4 * n + 3)) & 1) << 2);
      } else {
#pragma unroll
        for (int q = 0; q < BITS; ++q) code |= ((p[q] >> (j0 + j)) & 1u) << q;
      }
      T v = vals[0];
#pragma unroll
      for (int c = 1; c < LUTN; ++c) v = code == c ? vals[c] : v;  // no local-memory indexing
      o[j] = v;
    }
    if ((in & 7) == 0) *reinterpret_cast<uint4*>(dst + j0) = *reinterpret_cast<const uint4*>(o);
    else for (int j = 0; j < 8; ++j) dst[j0 + j] = o[j];
  }
}

int ks_log2_for(int bits, int in, int out) {
  const int RW = 32 >> bits;
  const int vec = ((in >> 5) % 4 == 0) ? 4 : 1;
  const int steps = ceil_div(min(in >> 5, kTileWords), (1 << bits) * vec);
  const int sms = device_sms();
  int ks = 0;
  while (ks < 3 && (1 << (ks + 1)) <= steps && ceil_div(out, (kWarps >> ks) * RW) < 4 * sms) ++ks;
  return ks;
}

// The streaming kernel's lanes walk a row in 4-word groups, 32 groups per pass: rows whose group
// count leaves many lanes idle in the last pass (in = 5120: 40 groups, 62 % busy) run the older
// kernel instead (H200, 2026-11-27: 5120x35840 45 us there vs 54 us streaming).
bool use_stream_kernel(int bits, bool f16, int in) {
  if (bits != 3 || !f16 || in % 128 != 0) return false;
  const int g4 = in / 128;
  return 5 * g4 >= 4 * 32 * ceil_div(g4, 32);
}

// The tensor-core kernel: 3-bit fp16 with in % 512 == 0 (16-word k-slices), except where the streaming
// kernel's lanes all stay busy (in / 128 a multiple of 32, e.g. 4096), where it is as fast or faster.
// H200, 2026-11-27, same-run A/B (scripts/gemv_ab.cu, docs/PERF.md): 5120x7680 15.7 -> 10.9 us,
// 5120x5120 11.4 -> 8.8, 5120x35840 43.1 -> 36.9, 17920x5120 26.9 -> 24.0, 14336x4096 14.8 -> 14.6;
// 4096x6144 / 4096x4096 stay on the streaming kernel (6.8 / 5.2 us there, 7.3 / 5.6 here).
// DECDEC_MMA4096=1 sends those widths to the tensor-core kernel too (same-machine A/B).
bool mma_everywhere() {
  static const bool on = [] {
    const char* e = std::getenv("DECDEC_MMA4096");
    return e && e[0] == '1';
  }();
  return on;
}
bool use_mma_kernel(int bits, bool f16, int in) {
  return bits == 3 && f16 && in % 512 == 0 && ((in / 128) % 32 != 0 || mma_everywhere());
}

// Rows per block of the tensor-core kernel, in whole 16-row groups. What sets the time is the most
// groups any SM runs (at most two blocks resident per SM): take the fewest groups per block that fit
// one wave (two blocks per SM, less the `reserve` slots of a concurrent DEC kernel), unless the
// blocks then pile up unevenly (some SMs two blocks, the measured 5120x5120 / 17920x5120 case) and
// one block per SM runs clearly fewer groups per SM.
// A/B knob (environment DECDEC_GEMV_RESERVE, default 0): SM slots every fast 3-bit GEMV leaves free beyond those of
// its own DEC, e.g. for the DEC blocks of the next projection's chain op, which otherwise become resident only as this
// GEMV's blocks drain (docs/PERF.md, session 12, next calls).
int gemv_extra_reserve() {
  static const int r = [] {
    const char* e = std::getenv("DECDEC_GEMV_RESERVE");
    return e ? max(0, atoi(e)) : 0;
  }();
  return r;
}

int mma_block_rows(int out, int reserve) {
  const int sms = device_sms();
  const int slots = max(sms, 2 * sms - max(reserve, 0) - gemv_extra_reserve());
  const int groups = ceil_div(out, 16);
  int gpb = ceil_div(groups, slots);
  const int per_sm = gpb * ceil_div(ceil_div(groups, gpb), sms);
  const int one_block = ceil_div(groups, sms);
  if (4 * per_sm > 5 * one_block) gpb = one_block;
  return 16 * gpb;
}

// Chain mode's tensor-core GEMV: equal shares (ap3_gemv_mma_split_kernel) where the fixed plan is one block per SM on
// at least 90 % of the SMs -- Llama-3's down (128 blocks of 132) at n_tb >= 9, where DEC's blocks leave too few SMs
// and the scheduler puts two fixed-share blocks on some, which end last; elsewhere the fixed share
// (ap3_gemv_mma_kernel<..., CHAIN>): Phi-3's 17920x5120 (107 blocks, room beside DEC) and the 5120-input plans of two
// blocks per SM, where equal shares measured slower (H200, docs/PERF.md session 14). A/B knob (environment
// DECDEC_MMA_CHAIN=split or =fixed): that kernel everywhere.
bool mma_chain_equal_shares(int out, int reserve) {
  static const int force = [] {  // 0: the rule, 1: equal shares, 2: fixed share
    const char* e = std::getenv("DECDEC_MMA_CHAIN");
    if (!e || !*e || std::strcmp(e, "auto") == 0) return 0;
    if (std::strcmp(e, "split") == 0) return 1;
    if (std::strcmp(e, "fixed") == 0) return 2;
    std::fprintf(stderr, "decdec: DECDEC_MMA_CHAIN=%s is not one of auto, split, fixed; using auto\n", e);
    return 0;
  }();
  if (force) return force == 1;
  const int sms = device_sms(), blocks = ceil_div(ceil_div(out, 16), mma_block_rows(out, reserve) / 16);
  return blocks <= sms && 10 * blocks >= 9 * sms;
}

template <bool PACKED, bool NORM = false, bool CHAIN = false>
cudaError_t launch_mma(const void* x, const uint32_t* qw, const void* lut, void* y, int M, int in, int out,
                       const Fused& fused, cudaStream_t stream, const AddNorm& an = AddNorm{}) {
  const int br = mma_block_rows(out, fused.reserve_blocks);
  const size_t smem = (size_t)in * sizeof(__half) + (size_t)br * kMmaWarps * sizeof(float);
  const cudaError_t err = allow_smem(ap3_gemv_mma_kernel<PACKED, NORM, CHAIN>, smem);
  if (err != cudaSuccess) return err;
  return launch_gemv_kernel(ap3_gemv_mma_kernel<PACKED, NORM, CHAIN>, dim3(ceil_div(out, br), M), dim3(kMmaThreads), smem, stream,
                            static_cast<const __half*>(x), qw, static_cast<const __half*>(lut), static_cast<__half*>(y),
                            in, out, br, fused, an);
}

// The equal-shares chain GEMV (ap3_gemv_mma_split_kernel): one block per SM slot DEC leaves, at most one per group.
template <bool NORM = false>
cudaError_t launch_mma_split(const void* x, const uint32_t* qw, const void* lut, void* y, int M, int in, int out,
                             const Fused& fused, cudaStream_t stream, const AddNorm& an = AddNorm{}) {
  const int sms = device_sms(), groups = ceil_div(out, 16), KS = in / 512;
  if ((long long)M * groups > kChainGroupCap) return cudaErrorInvalidValue;  // bindings.cpp names the limit first
  const int grid = min(groups, max(sms, 2 * sms - max(fused.reserve_blocks, 0) - gemv_extra_reserve()));
  const int run = ceil_div(groups * KS, grid);           // the longest run of items
  const int qmax = min(groups, ceil_div(run, KS) + 1);  // the most groups a run touches
  const size_t smem = (size_t)in * sizeof(__half) + (size_t)qmax * 16 * kMmaWarps * sizeof(float);
  const cudaError_t err = allow_smem(ap3_gemv_mma_split_kernel<true, NORM>, smem);
  if (err != cudaSuccess) return err;
  return launch_gemv_kernel(ap3_gemv_mma_split_kernel<true, NORM>, dim3(grid, M), dim3(kMmaThreads), smem, stream,
                            static_cast<const __half*>(x), qw, static_cast<const __half*>(lut), static_cast<__half*>(y),
                            in, out, qmax, fused, an);
}

// Rows per warp item of the streaming kernel. 1 row (3 blocks/SM) measured slower than 2 at every
// Llama-3-8B shape on an H200 (docs/PERF.md), so only R = 2 is launched.
constexpr int kStreamRows = 2;

// Rows per block of the streaming kernel: the grid fills its blocks per SM, less the `reserve`
// blocks a concurrent DEC kernel occupies (fused op), so no GEMV block waits for a slot.
int stream_block_rows(int out, int reserve) {
  const int sms = device_sms();
  constexpr int R = kStreamRows, per_sm = stream_blocks_per_sm<R>();
  // a DEC block (256 threads x 128 registers) displaces one 2-row block or two 1-row blocks
  const int blocks = max(sms, per_sm * sms - (max(reserve, 0) + gemv_extra_reserve()) * (R == 2 ? 1 : 2));
  return max(R, ceil_div(ceil_div(out, blocks), R) * R);
}

template <int R, bool NORM = false, bool PACKED = false, bool GLU = false, bool CHAIN = false>
cudaError_t launch_stream(const void* x, const uint32_t* qw, const void* lut, void* y, int M, int in, int out,
                          const Fused& fused, cudaStream_t stream, const AddNorm& an = AddNorm{}) {
  const int br = stream_block_rows(out, fused.reserve_blocks);
  const size_t smem = (size_t)in * sizeof(__half) + (CHAIN ? (size_t)br * sizeof(float) : 0);
  const cudaError_t err = allow_smem(ap3_gemv_stream_kernel<R, NORM, PACKED, GLU, CHAIN>, smem);
  if (err != cudaSuccess) return err;
  return launch_gemv_kernel(ap3_gemv_stream_kernel<R, NORM, PACKED, GLU, CHAIN>, dim3(ceil_div(out, br), M), dim3(kStreamThreads), smem,
                            stream, static_cast<const __half*>(x), qw, static_cast<const __half*>(lut),
                            static_cast<__half*>(y), in, out, br, fused, an);
}

// The 3-bit kernel layout (common.cuh) is read by the tensor-core and streaming kernels only.
bool packed_ok(DType dt, int bits, int in) {
  return dt == DType::F16 && in % 256 == 0 && (use_mma_kernel(bits, true, in) || use_stream_kernel(bits, true, in));
}

template <int BITS, typename T>
cudaError_t launch_gemv(const void* x, const uint32_t* qw, const void* lut, void* y, int M, int in, int out,
                        const Fused& fused, cudaStream_t stream, bool packed) {
  if constexpr (BITS == 3 && std::is_same_v<T, __half>) {
    if (use_mma_kernel(BITS, true, in))
      return packed ? launch_mma<true>(x, qw, lut, y, M, in, out, fused, stream)
                    : launch_mma<false>(x, qw, lut, y, M, in, out, fused, stream);
    if (use_stream_kernel(BITS, true, in))
      return packed ? launch_stream<kStreamRows, false, true>(x, qw, lut, y, M, in, out, fused, stream)
                    : launch_stream<kStreamRows>(x, qw, lut, y, M, in, out, fused, stream);
  }
  if (packed) return cudaErrorInvalidValue;  // the checks in bindings.cpp name the cause first
  const int ks = ks_log2_for(BITS, in, out);
  const int RB = (kWarps >> ks) * (32 >> BITS);
  const dim3 grid(ceil_div(out, RB), M);
  if constexpr (BITS == 3 && std::is_same_v<T, __half>) {
    const auto* xh = static_cast<const __half*>(x);
    const auto* lh = static_cast<const __half*>(lut);
    auto* yh = static_cast<__half*>(y);
    return (in >> 5) % 4 == 0
               ? launch_gemv_kernel(ap3_gemv_prmt_kernel<4>, grid, dim3(kThreads), 0, stream, xh, qw, lh, yh, in, out, ks, fused)
               : launch_gemv_kernel(ap3_gemv_prmt_kernel<1>, grid, dim3(kThreads), 0, stream, xh, qw, lh, yh, in, out, ks, fused);
  }
  const auto* xt = static_cast<const T*>(x);
  const auto* lt = static_cast<const T*>(lut);
  auto* yt = static_cast<T*>(y);
  return (in >> 5) % 4 == 0
             ? launch_gemv_kernel(ap_gemv_kernel<BITS, 4, T>, grid, dim3(kThreads), 0, stream, xt, qw, lt, yt, in, out, ks, fused)
             : launch_gemv_kernel(ap_gemv_kernel<BITS, 1, T>, grid, dim3(kThreads), 0, stream, xt, qw, lt, yt, in, out, ks, fused);
}

template <int BITS, typename T>
cudaError_t launch_dequant(const uint32_t* qw, const void* lut, void* w, int in, int out, cudaStream_t stream,
                           bool packed) {
  const long long n = (long long)out * (in >> 5);
  if (n == 0) return cudaSuccess;
  if (packed) {
    if constexpr (BITS == 3) {
      ap_dequant_kernel<3, T, true><<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(qw, static_cast<const T*>(lut),
                                                                                  static_cast<T*>(w), in, out);
      return cudaGetLastError();
    }
    return cudaErrorInvalidValue;
  }
  ap_dequant_kernel<BITS, T><<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(qw, static_cast<const T*>(lut),
                                                                               static_cast<T*>(w), in, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gemv_dispatch(int bits, const void* x, const uint32_t* qw, const void* lut, void* y, int M, int in,
                          int out, const Fused& f, cudaStream_t s, bool packed) {
  switch (bits) {
    case 2: return launch_gemv<2, T>(x, qw, lut, y, M, in, out, f, s, packed);
    case 3: return launch_gemv<3, T>(x, qw, lut, y, M, in, out, f, s, packed);
    case 4: return launch_gemv<4, T>(x, qw, lut, y, M, in, out, f, s, packed);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t dequant_dispatch(int bits, const uint32_t* qw, const void* lut, void* w, int in, int out, cudaStream_t s,
                             bool packed) {
  switch (bits) {
    case 2: return launch_dequant<2, T>(qw, lut, w, in, out, s, packed);
    case 3: return launch_dequant<3, T>(qw, lut, w, in, out, s, packed);
    case 4: return launch_dequant<4, T>(qw, lut, w, in, out, s, packed);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool ap_bits_supported(int bits) { return bits >= 2 && bits <= 4; }

int ap_gemv_tile_rows(DType dt, int bits, int in, int out, int reserve_blocks) {
  if (use_mma_kernel(bits, dt == DType::F16, in)) return mma_block_rows(out, reserve_blocks);
  if (use_stream_kernel(bits, dt == DType::F16, in)) return stream_block_rows(out, reserve_blocks);
  return (kWarps >> ks_log2_for(bits, in, out)) * (32 >> bits);
}

// Both fast kernels stage x with the add + norm (4 chunks of 8 channels per thread: in <= 8192).
bool ap_addnorm_supported(DType dt, int bits, int in) {
  static_assert(kStreamThreads == kMmaThreads, "stage_x_addnorm holds 4 chunks per thread of either kernel");
  return dt == DType::F16 && (use_mma_kernel(bits, true, in) || use_stream_kernel(bits, true, in)) &&
         in <= 4 * kStreamThreads * 8;
}

bool ap3_packed_supported(DType dt, int bits, int in) { return packed_ok(dt, bits, in); }

cudaError_t ap_gemv_addnorm(const void* a, const AddNorm& an, const uint32_t* qweight, const void* lut, void* y, int M,
                            int in, int out, cudaStream_t stream, bool packed, const Fused& fused) {
  if (M == 0 || out == 0) return cudaSuccess;
  if (!ap_addnorm_supported(DType::F16, 3, in)) return cudaErrorInvalidValue;
  if (use_mma_kernel(3, true, in))
    return packed ? launch_mma<true, true>(a, qweight, lut, y, M, in, out, fused, stream, an)
                  : launch_mma<false, true>(a, qweight, lut, y, M, in, out, fused, stream, an);
  return packed ? launch_stream<kStreamRows, true, true>(a, qweight, lut, y, M, in, out, fused, stream, an)
                : launch_stream<kStreamRows, true>(a, qweight, lut, y, M, in, out, fused, stream, an);
}

bool ap_glu_supported(DType dt, int bits, int in) {
  return ap_addnorm_supported(dt, bits, in) && !use_mma_kernel(bits, true, in) && use_stream_kernel(bits, true, in);
}

cudaError_t ap_gemv_addnorm_glu(const void* a, const AddNorm& an, const uint32_t* qweight, const void* lut, void* y,
                                int M, int in, int out, cudaStream_t stream, bool packed) {
  if (M == 0 || out == 0) return cudaSuccess;
  if (!ap_glu_supported(DType::F16, 3, in) || out % 2 != 0) return cudaErrorInvalidValue;
  static_assert(kStreamRows == 2, "the GLU epilogue pairs a warp item's two rows");
  return packed ? launch_stream<kStreamRows, true, true, true>(a, qweight, lut, y, M, in, out, Fused{}, stream, an)
                : launch_stream<kStreamRows, true, false, true>(a, qweight, lut, y, M, in, out, Fused{}, stream, an);
}

size_t chain_scratch_floats(int in, int out, int M) {
  return (size_t)dec_parts(in) * M * out + (size_t)M * ceil_div(out, 16) * 32;
}

bool ap_dec_chain_supported(DType dt, int bits, int in) { return bits == 3 && packed_ok(dt, bits, in); }

cudaError_t ap_gemv_dec_chain(const void* x, const uint32_t* qweight, const void* lut, const uint32_t* q_residual,
                              const void* scales, const float* bounds, void* y, float* dpart, int* chain, int M, int in,
                              int out, int k_chunk, int n_tb, cudaStream_t stream, const AddNorm* norm, bool glu) {
  if (M == 0 || out == 0) return cudaSuccess;
  if (!ap_dec_chain_supported(DType::F16, 3, in) || k_chunk <= 0 || n_tb <= 0) return cudaErrorInvalidValue;
  if (norm && !ap_addnorm_supported(DType::F16, 3, in)) return cudaErrorInvalidValue;
  if (glu && (!norm || !ap_glu_supported(DType::F16, 3, in) || out % 2 != 0)) return cudaErrorInvalidValue;
  Fused f;
  f.dpart = dpart;
  f.dec_parts = dec_parts(in);
  f.n_tokens = M;
  f.dec_slice = dec_slice_size(in, out, n_tb);
  f.reserve_blocks = n_tb;
  f.dec_scales = scales;
  f.chain = chain;
  f.chain_units = f.dec_parts * ceil_div(out, f.dec_slice);
  f.gsplit = dpart + (size_t)f.dec_parts * M * out;
  Fused fd = f;  // DEC's view: the add + norm inputs when it forms x itself
  if (norm) fd.norm = *norm;
  const cudaError_t err = dec(DType::F16, x, q_residual, scales, bounds, M, in, out, k_chunk, n_tb, fd, stream);
  if (err != cudaSuccess) return err;
  if (use_mma_kernel(3, true, in)) {
    if (mma_chain_equal_shares(out, f.reserve_blocks))
      return norm ? launch_mma_split<true>(x, qweight, lut, y, M, in, out, f, stream, *norm)
                  : launch_mma_split<false>(x, qweight, lut, y, M, in, out, f, stream);
    return norm ? launch_mma<true, true, true>(x, qweight, lut, y, M, in, out, f, stream, *norm)
                : launch_mma<true, false, true>(x, qweight, lut, y, M, in, out, f, stream);
  }
  if (!norm) return launch_stream<kStreamRows, false, true, false, true>(x, qweight, lut, y, M, in, out, f, stream);
  return glu ? launch_stream<kStreamRows, true, true, true, true>(x, qweight, lut, y, M, in, out, f, stream, *norm)
             : launch_stream<kStreamRows, true, true, false, true>(x, qweight, lut, y, M, in, out, f, stream, *norm);
}

cudaError_t ap_gemv(DType dt, const void* x, const uint32_t* qweight, const void* lut, void* y, int M, int in,
                    int out, int bits, const Fused& fused, cudaStream_t stream, bool packed) {
  if (M == 0 || out == 0) return cudaSuccess;
  if (packed && !packed_ok(dt, bits, in)) return cudaErrorInvalidValue;
  return dt == DType::F16 ? gemv_dispatch<__half>(bits, x, qweight, lut, y, M, in, out, fused, stream, packed)
                          : gemv_dispatch<__nv_bfloat16>(bits, x, qweight, lut, y, M, in, out, fused, stream, packed);
}

cudaError_t ap_dequant(DType dt, const uint32_t* qweight, const void* lut, void* w, int in, int out, int bits,
                       cudaStream_t stream, bool packed) {
  if (packed && !packed_ok(dt, bits, in)) return cudaErrorInvalidValue;
  return dt == DType::F16 ? dequant_dispatch<__half>(bits, qweight, lut, w, in, out, stream, packed)
                          : dequant_dispatch<__nv_bfloat16>(bits, qweight, lut, w, in, out, stream, packed);
}

}  // namespace decdec
