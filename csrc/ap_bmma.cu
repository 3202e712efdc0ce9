// ap 3-bit GEMV on the binary tensor cores (decode, M tokens one after another), fp16 and bf16.
//
// Math. The LUT of a row is a function of the code's three bits b0 b1 b2, so it is a multilinear polynomial in them:
// lut[c] = sum over T of a_T * prod_{p in T} b_p (T a subset of {0, 1, 2}, a_T the Moebius transform of the 8
// entries). Hence y_r = a_{}(r) * sum(x) + sum over the 7 non-empty T of a_T(r) * (x . m_T(r)), where m_T is the AND
// of the bit-planes in T (4 LOP3 per 32 weights). x is taken as 24-bit fixed point X = round(x * 2^sh), |X| < 2^22
// (sh from the token's max |x|: every x within 2^-11 of the max is exact, smaller ones round at 2^-22 of it), split
// into its 24 two's-complement bit-planes P_j; then x . m_T = 2^-sh * sum_j w_j popc(m_T & P_j), w_j = 2^j (w_23 =
// -2^23): integer dot products of bit vectors, which mma.m16n8k256.b1.and.popc forms for 16 rows x 8 planes x 256
// channels per instruction. The popcount sums are exact int32, combined with w_j and a_T once per row in fp64, so the
// result is the exact LUT dot product of the fixed-point x, rounded once to the output dtype.
//
// Kernels. ap3_xplanes_kernel forms x's planes in the MMA's B-fragment order (each block finds max |x| itself, then
// one warp per 32-channel word transposes it with ballots) and the fixed-point sum per block; for ap_gemv_addnorm(_glu)
// it forms x = rms_norm(a + b) first (and writes h). ap3_bmma_kernel: a warp item is one 16-row group over in / KP
// channels (KP > 1 splits K where the row groups are too few), in steps of 512; per step each lane streams 6 x 16
// bytes through its own cp.async ring (kBmmaStages deep, nothing in registers while in flight), forms the 7 masks and
// issues 2 halves x 3 plane blocks x 7 masks = 42 MMAs into 84 int32 accumulators; x's planes sit in shared memory.
// Both are programmatic dependents (the GEMV's first weight loads go out before it waits for the planes). The weights
// are in the layout of decdec/formats.py pack_ap3_bmma ([out/16, in/512, 6, 32, 4] int32: a step is 3 KB contiguous
// per warp and every 16-byte piece is an MMA A operand as loaded). Measured against the PRMT GEMVs in
// scripts/bmma_gemv_ab.cu and per projection op in scripts/bench_bmma_ops.py (docs/PERF.md, Kernels, sessions 20-21).
// Forming the planes inside the GEMV (every block all of them) was slower everywhere (session 21: 4096x28672 23.2 us
// against 14.6 us plus a 2.9 us planes kernel), and so was prefetching the GEMV's next steps into L2 while it waits
// for the planes (2 to 16 steps per warp: no shape gained more than the noise; again in session 22 with the planes
// kernel's early trigger, end to end: 8 steps 484.9 / 484.6 against 499.0 / 497.8 tokens/s without).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "common.cuh"
#include "kernels.h"

namespace decdec {
namespace {

constexpr int kBmmaStages = 4;                   // cp.async ring depth per warp
constexpr int kBmmaMaxWarps = 10;                // warps per block (one block per SM)
constexpr int kStepU4 = 6 * 32;                  // uint4 per warp step: 2 halves x 3 planes x 32 lanes
constexpr int kNB = 3, kXBits = 8 * kNB;         // x as 24-bit fixed point: 3 blocks of 8 planes (the MMA's n = 8)
constexpr int kPlaneWarps = 8;                   // 32-channel words per block of ap3_xplanes_kernel
constexpr int kBmmaMaxKP = 7;                   // the largest K split bmma_kp picks (slots of partial rows)
constexpr int kMaxIn = 20480;                    // kMaxPlaneBlocks words-blocks of xplanes
constexpr int kMaxPlaneBlocks = kMaxIn / 32 / kPlaneWarps;

struct XMeta {
  int sh;
  int blocks;
  double psum[kMaxPlaneBlocks];  // per xplanes block: the sum of its fixed-point X (integers: exact in any order)
};

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// SiLU(gate) x up of the T-rounded pair, in fp32, rounded to T (reference.ap_gemv_addnorm_glu).
template <typename T>
__device__ __forceinline__ T glu_act(float gate, float up) {
  const float g = to_f(from_f<T>(gate)), u = to_f(from_f<T>(up));
  return from_f<T>(g / (1.0f + expf(-g)) * u);
}

// Word wd (32 channels) of plane j in B-fragment order: at step kb = wd / 16, lane (g, t) holds for half h and plane
// block nb the registers b0 / b1 = plane 8 nb + g of words 4t + 2h / 4t + 2h + 1; kNB uint4 per lane per step.
__device__ __forceinline__ int b_index(int wd, int j) {
  const int kb = wd >> 4, wi = wd & 15, t = wi >> 2, h = (wi >> 1) & 1, e = wi & 1;
  const int nb = j >> 3, g = j & 7;
  const int f = h * 2 * kNB + nb * 2 + e;
  return ((kb * kNB + (f >> 2)) * 32 + (4 * g + t)) * 4 + (f & 3);
}

// 8 consecutive elements (16-byte aligned) as floats.
__device__ __forceinline__ void load8f(const __half* p, float (&f)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x, f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void load8f(const __nv_bfloat16* p, float (&f)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x, f[2 * i + 1] = t.y;
  }
}

// The GEMV's input channel values: x itself, or (kNorm) x = gamma * T(h * r), h = T(a + b) (kernels.h AddNorm; the
// streaming GEMV's stage_x_addnorm: the sum of h^2 in fp32, r = rsqrt(mean + eps)); a = x.
template <typename T, bool kNorm>
struct XSource {
  const T* x;
  const T* b;
  const T* gamma;
  float r;
  __device__ __forceinline__ float h_of(float a, float bb) const { return to_f(from_f<T>(a + bb)); }
  // elements i .. i + 7 (i % 8 == 0)
  __device__ __forceinline__ void get8(int i, float (&f)[8]) const {
    load8f(x + i, f);
    if constexpr (kNorm) {
      float bb[8], g[8];
      load8f(b + i, bb);
      load8f(gamma + i, g);
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = to_f(from_f<T>(to_f(from_f<T>(h_of(f[e], bb[e]) * r)) * g[e]));
    }
  }
  __device__ __forceinline__ float get(int i) const {
    if constexpr (kNorm) return to_f(from_f<T>(to_f(from_f<T>(h_of(to_f(x[i]), to_f(b[i])) * r)) * to_f(gamma[i])));
    return to_f(x[i]);
  }
};

// The sum over the block's warps of a per-thread value (red: one T per warp); every thread returns it, summed in warp
// order (the same in every block).
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, V* red, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int o = 16; o; o >>= 1) v = op(v, __shfl_xor_sync(~0u, v, o));
  if (lane == 0) red[warp] = v;
  __syncthreads();
  V t = red[0];
  for (int w = 1; w < warps; ++w) t = op(t, red[w]);
  __syncthreads();  // red may be reused
  return t;
}

// The shift that makes |X| < 2^(kXBits - 2) for X = x * 2^sh, |x| <= mx.
__device__ __forceinline__ int planes_shift(float mx) {
  int e = 0;
  frexpf(mx, &e);  // mx < 2^e
  return mx > 0.f ? kXBits - 2 - e : 0;
}

// One warp: its lane's channel value v of word wd as X = round(v * 2^sh) into bit-planes with ballots; lane j writes
// plane j's word at planes[b_index(wd, j)]; returns the lane's X. 2^sh in two exact factors (sh may exceed 127 for
// tiny bf16 inputs).
__device__ __forceinline__ int transpose_word(float v, int wd, int sh, uint32_t* planes) {
  const int lane = threadIdx.x & 31;
  const int X = __float2int_rn(v * ldexpf(1.f, sh / 2) * ldexpf(1.f, sh - sh / 2));
  uint32_t mine = 0;
#pragma unroll
  for (int j = 0; j < kXBits; ++j) {
    const uint32_t b = __ballot_sync(~0u, (X >> j) & 1);
    if (lane == j) mine = b;
  }
  if (lane < kXBits) planes[b_index(wd, lane)] = mine;
  return X;
}

// x's planes for the GEMV: every block finds max |x| over all of in itself (kNorm: first the sum of h^2, then x), then
// each warp transposes one 32-channel word; the fixed-point sum per block goes to meta. kNorm: the block writes h for
// its own words. x (and b, gamma) 16-byte aligned. early (DECDEC_BMMA_PLANES_EARLY, on unless 0): the GEMV after it
// may launch before this kernel's own wait, so its blocks take the SMs the previous kernel frees and stream their
// first weights meanwhile (session 22: the four ops chained, 47.9 -> 46.2 us per Llama-3-8B layer).
template <typename T, bool kNorm = false>
__global__ void __launch_bounds__(32 * kPlaneWarps) ap3_xplanes_kernel(const T* __restrict__ x, int in,
                                                                       uint32_t* __restrict__ xb, XMeta* meta,
                                                                       AddNorm an = AddNorm{}, int early = 0) {
  __shared__ float fred[kPlaneWarps];
  __shared__ double dred[kPlaneWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (early) pdl_launch_dependents();  // the GEMV's part before its wait reads only weights
  if constexpr (kNorm)  // gamma is a weight: into L1 before the wait (x and b are the kernels' before)
    for (int i = 8 * threadIdx.x; i < in; i += 8 * blockDim.x)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(static_cast<const T*>(an.gamma) + i));
  pdl_wait();  // x is the previous kernel's; so is xb (the previous token's GEMV reads it)
  if (!early) pdl_launch_dependents();
  XSource<T, kNorm> src{x, static_cast<const T*>(an.b), static_cast<const T*>(an.gamma), 0.f};
  auto fmax_ = [](float u, float v) { return fmaxf(u, v); };
  if constexpr (kNorm) {
    float ss = 0.f;
    for (int i = 8 * threadIdx.x; i < in; i += 8 * blockDim.x) {  // in % 512 == 0
      float a[8], bb[8];
      load8f(x + i, a);
      load8f(src.b + i, bb);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float h = src.h_of(a[e], bb[e]);
        ss = fmaf(h, h, ss);
      }
    }
    src.r = rsqrtf(block_reduce(ss, fred, [](float u, float v) { return u + v; }) / (float)in + an.eps);
  }
  float m = 0.f;
  for (int i = 8 * threadIdx.x; i < in; i += 8 * blockDim.x) {
    float f[8];
    src.get8(i, f);
#pragma unroll
    for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(f[e]));
  }
  const int sh = planes_shift(block_reduce(m, fred, fmax_));
  const int wd = blockIdx.x * kPlaneWarps + warp;
  double s = 0.0;
  if (wd < in / 32) {
    const int i = 32 * wd + lane;
    s = (double)transpose_word(src.get(i), wd, sh, xb);
    if constexpr (kNorm) static_cast<T*>(an.h_out)[i] = from_f<T>(src.h_of(to_f(x[i]), to_f(src.b[i])));
  }
  const double t = block_reduce(s, dred, [](double u, double v) { return u + v; });
  if (threadIdx.x == 0) {
    meta->psum[blockIdx.x] = t;
    if (blockIdx.x == 0) {
      meta->sh = sh;
      meta->blocks = gridDim.x;
    }
  }
}

__device__ __forceinline__ void bmma16(int (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
__device__ __forceinline__ uint32_t u4_at(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ uint4 and4(const uint4& a, const uint4& b) {
  return make_uint4(a.x & b.x, a.y & b.y, a.z & b.z, a.w & b.w);
}

// KP > 1 splits K: item (group, kp) covers steps [kp, kp + 1) * steps / KP of the group and writes its fp32 rows to
// slot kp of y32 [KP][out]; the last item of a group (cnt) sums the slots in slot order (the same result every run,
// whichever item finishes last), writes y and clears cnt (zero on entry, zero on exit).
// kGlu: the rows are in GLU pair order (formats.glu_pair_order: rows 2 i, 2 i + 1 = gate_i, up_i, as every
// ap_gemv_addnorm_glu takes them); y [out / 2] gets T(silu(gate) * up) of the T-rounded pair.
template <typename T, int kStages = kBmmaStages, bool kGlu = false>
__global__ void __launch_bounds__(32 * kBmmaMaxWarps, 1)
    ap3_bmma_kernel(const uint4* __restrict__ qw, const T* __restrict__ lut, const uint32_t* __restrict__ xb,
                    const XMeta* __restrict__ meta, T* __restrict__ y, float* __restrict__ y32, int* __restrict__ cnt,
                    int in, int out, int KP) {
  extern __shared__ __align__(16) uint4 smem[];
  const int W = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int xs_u4 = in * kXBits / 128, steps = in >> 9, groups = out >> 4, sp = steps / KP, n_items = groups * KP;
  uint4* xs = smem;
  uint4* ring = smem + xs_u4 + warp * (kStages * kStepU4);
  const uint32_t ring_s = (uint32_t)__cvta_generic_to_shared(ring);
  const int NW = gridDim.x * W, gw = blockIdx.x * W + warp;
  const int my_steps = (gw < n_items ? (n_items - 1 - gw) / NW + 1 : 0) * sp;
  // item it: row group it / KP, steps from (it % KP) * sp
  auto item_base = [&](int it) { return qw + ((size_t)(it / KP) * steps + (it % KP) * sp) * kStepU4 + lane; };

  // the issue side runs kStages - 1 steps ahead of the compute side; a warp's items are gw, gw + NW, ...
  int is_left = my_steps, is_step = 0, is_it = gw;
  const uint4* is_p = my_steps > 0 ? item_base(gw) : qw;
  auto issue = [&](int s) {
    if (is_left > 0) {
      const uint32_t dst = ring_s + (uint32_t)((s & (kStages - 1)) * kStepU4 + lane) * 16u;
#pragma unroll
      for (int j = 0; j < 6; ++j) cp_async16(dst + (uint32_t)(j * 32) * 16u, is_p + j * 32);
      --is_left;
      if (++is_step == sp) {
        is_step = 0;
        is_it += NW;
        if (is_left > 0) is_p = item_base(is_it);
      } else {
        is_p += kStepU4;
      }
    }
    cp_commit();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);  // weights never depend on the kernel before
  pdl_wait();  // x's planes (and y) belong to the kernel before
  gemv_trigger_dependents();
  // every load of the planes kernel's results goes out before the barrier: x's planes into shared memory, the shift,
  // and the per-block fixed-point sums, one per lane (summed after it; integers, so exact in fp64 in any order)
  for (int i = threadIdx.x; i < xs_u4; i += blockDim.x) xs[i] = __ldg(reinterpret_cast<const uint4*>(xb) + i);
  const int sh = __ldg(&meta->sh), n_blocks = __ldg(&meta->blocks);
  double ps[(kMaxPlaneBlocks + 31) / 32];
#pragma unroll
  for (int k = 0; k < (kMaxPlaneBlocks + 31) / 32; ++k)
    ps[k] = lane + 32 * k < kMaxPlaneBlocks ? __ldg(&meta->psum[lane + 32 * k]) : 0.0;
  __syncthreads();
  double xsum = 0.0;  // the fixed-point sum of x, in every lane
#pragma unroll
  for (int k = 0; k < (kMaxPlaneBlocks + 31) / 32; ++k)
    if (lane + 32 * k < n_blocks) xsum += ps[k];
  for (int o = 16; o; o >>= 1) xsum += __shfl_xor_sync(~0u, xsum, o);

  int acc[7][kNB][4];
  auto zero_acc = [&]() {
#pragma unroll
    for (int mask = 0; mask < 7; ++mask)
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mask][nb][c] = 0;
  };
  zero_acc();
  uint4 lv[2] = {};  // the group's two LUT rows of this lane, loaded at its first step
  int c_step = 0, c_it = gw, group = gw / KP, kp = gw % KP, kb = kp * sp;
  for (int s = 0; s < my_steps; ++s) {
    issue(s + kStages - 1);
    cp_wait<kStages - 1>();
    if (c_step == 0) {
#pragma unroll
      for (int R = 0; R < 2; ++R)
        lv[R] = __ldg(reinterpret_cast<const uint4*>(lut + (size_t)(group * 16 + g + 8 * R) * 8));
    }
    const uint4* src = ring + (s & (kStages - 1)) * kStepU4 + lane;
    uint4 bq[kNB];
#pragma unroll
    for (int q = 0; q < kNB; ++q) bq[q] = xs[(kb * kNB + q) * 32 + lane];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 a[7];  // A operands of the masks {0}, {1}, {2}, {01}, {02}, {12}, {012}
#pragma unroll
      for (int p = 0; p < 3; ++p) a[p] = src[(h * 3 + p) * 32];
      a[3] = and4(a[0], a[1]);
      a[4] = and4(a[0], a[2]);
      a[5] = and4(a[1], a[2]);
      a[6] = and4(a[3], a[2]);
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        const int f0 = h * 2 * kNB + nb * 2;
        const uint32_t b0 = u4_at(bq[f0 >> 2], f0 & 3), b1 = u4_at(bq[(f0 + 1) >> 2], (f0 + 1) & 3);
#pragma unroll
        for (int mask = 0; mask < 7; ++mask) bmma16(acc[mask][nb], a[mask], b0, b1);
      }
    }
    ++kb;
    if (++c_step == sp) {  // the item's rows group * 16 + g (accumulators c0, c1) and + 8 (c2, c3) are complete
      double yr[2];
#pragma unroll
      for (int R = 0; R < 2; ++R) {
        const T* lr = reinterpret_cast<const T*>(&lv[R]);
        float l[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) l[i] = to_f(lr[i]);
        const float aT[7] = {l[1] - l[0],
                             l[2] - l[0],
                             l[4] - l[0],
                             (l[3] - l[1]) - (l[2] - l[0]),
                             (l[5] - l[1]) - (l[4] - l[0]),
                             (l[6] - l[2]) - (l[4] - l[0]),
                             ((l[7] - l[3]) - (l[5] - l[1])) - ((l[6] - l[2]) - (l[4] - l[0]))};
        // the lane's planes j = 8 nb + 2 t + e: pairs (e = 0, 1) and plane blocks 0, 1 combined in int32
        // (popcounts <= in < 2^15, so |lo| < 2^26); the top plane (23 = 8 * 2 + 2 * 3 + 1) weighs -2^23
        const double s_lo = (double)(1u << (2 * t)), s_hi = s_lo * 65536.0;
        const int sgn_top = t == 3 ? -2 : 2;
        double v = 0.0;
#pragma unroll
        for (int mask = 0; mask < 7; ++mask) {
          const int lo = acc[mask][0][2 * R] + 2 * acc[mask][0][2 * R + 1] +
                         256 * (acc[mask][1][2 * R] + 2 * acc[mask][1][2 * R + 1]);
          const int hi = acc[mask][2][2 * R] + sgn_top * acc[mask][2][2 * R + 1];
          v = fma((double)aT[mask], fma((double)hi, s_hi, (double)lo * s_lo), v);
        }
        if (t == 0 && kp == 0) v = fma((double)l[0], xsum, v);
        v += __shfl_xor_sync(~0u, v, 1);
        v += __shfl_xor_sync(~0u, v, 2);
        yr[R] = ldexp(v, -sh);
      }
      zero_acc();
      if (KP == 1) {
        if constexpr (kGlu) {  // the pair (gate_i, up_i) = rows (2 i, 2 i + 1): lane g (even) and lane g + 1
          const double up0 = __shfl_down_sync(~0u, yr[0], 4), up1 = __shfl_down_sync(~0u, yr[1], 4);
          if (t == 0 && (g & 1) == 0) {
            y[group * 8 + g / 2] = glu_act<T>((float)yr[0], (float)up0);
            y[group * 8 + 4 + g / 2] = glu_act<T>((float)yr[1], (float)up1);
          }
        } else if (t == 0) {
          y[group * 16 + g] = from_f<T>((float)yr[0]);
          y[group * 16 + g + 8] = from_f<T>((float)yr[1]);
        }
      } else {
        if (t == 0) {  // this item's slot of the group's rows
          y32[(size_t)kp * out + group * 16 + g] = (float)yr[0];
          y32[(size_t)kp * out + group * 16 + g + 8] = (float)yr[1];
        }
        __threadfence();
        __syncwarp();
        int last = 0;
        if (lane == 0) last = atomicAdd(cnt + group, 1) == KP - 1;
        last = __shfl_sync(~0u, last, 0);
        if (last) {  // every item of the group has written its slot: sum them in slot order (deterministic)
          __threadfence();
          float v = 0.f;
          if (lane < 16)
            for (int k = 0; k < KP; ++k) v += __ldcg(y32 + (size_t)k * out + group * 16 + lane);
          if constexpr (kGlu) {  // lane j < 16 holds row 16 group + j: pairs (j, j + 1), j even
            const float up = __shfl_down_sync(~0u, v, 1);
            if (lane < 16 && (lane & 1) == 0) y[group * 8 + lane / 2] = glu_act<T>(v, up);
          } else {
            if (lane < 16) y[group * 16 + lane] = from_f<T>(v);
          }
          if (lane == 0) cnt[group] = 0;
        }
      }
      c_step = 0;
      c_it += NW;
      group = c_it / KP;
      kp = c_it % KP;
      kb = kp * sp;
    }
  }
  cp_wait<0>();
}

// Warps per block: the count in 7..10 whose items-per-warp is closest above to a whole number (every warp then runs
// the same number of items), ties to more warps (H200, scripts/bmma_gemv_ab.cu: 7 at 4096x28672, 10 at 5120x35840).
int bmma_warps(int items, int sms) {
  int best = kBmmaMaxWarps;
  double best_eff = -1.0;
  for (int w = kBmmaMaxWarps; w >= 7; --w) {
    const double per = (double)items / ((double)sms * w), eff = per / std::ceil(per);
    if (eff > best_eff + 1e-9) best_eff = eff, best = w;
  }
  return best;
}

// K split: 1 where the row groups fill 7 warps per SM, else the first of 2, 4, 7 that divides the steps and does
// (the A/B's best: 14336x4096 and 4096x4096 4, 17920x5120 7), else the largest that divides them.
int bmma_kp(int in, int out, int sms) {
  const int groups = out / 16, steps = in / 512;
  if (groups >= 7 * sms) return 1;
  int kp = 1;
  for (int d : {2, 4, 7}) {
    if (steps % d) continue;
    kp = d;
    if (groups * d >= 7 * sms) break;
  }
  return kp;
}

size_t planes_bytes(int in) { return ((size_t)in * kXBits / 8 + 255) / 256 * 256; }
size_t meta_end(int in) { return (planes_bytes(in) + sizeof(XMeta) + 255) / 256 * 256; }

template <typename T>
cudaError_t launch_bmma(const T* x, const uint4* qw, const T* lut, T* y, int M, int in, int out, void* scratch,
                        int* counters, cudaStream_t stream, const AddNorm* norm = nullptr, bool glu = false) {
  uint32_t* xb = static_cast<uint32_t*>(scratch);
  XMeta* meta = reinterpret_cast<XMeta*>(static_cast<char*>(scratch) + planes_bytes(in));
  float* y32 = reinterpret_cast<float*>(static_cast<char*>(scratch) + meta_end(in));  // [kBmmaMaxKP][out] slots
  const int sms = device_sms(), groups = out / 16, plane_blocks = in / 32 / kPlaneWarps, kp = bmma_kp(in, out, sms);
  const int warps = bmma_warps(groups * kp, sms), grid = std::min(sms, (groups * kp + warps - 1) / warps);
  const size_t smem = (size_t)in * kXBits / 8 + (size_t)warps * kBmmaStages * kStepU4 * 16;
  auto kernel = glu ? ap3_bmma_kernel<T, kBmmaStages, true> : ap3_bmma_kernel<T, kBmmaStages, false>;
  auto planes = norm ? ap3_xplanes_kernel<T, true> : ap3_xplanes_kernel<T, false>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  static const bool early = env_knob_on("DECDEC_BMMA_PLANES_EARLY");  // read once per process, not per launch
  for (int m = 0; m < M; ++m) {
    AddNorm an;
    if (norm) {  // token m's rows of b and h
      an = *norm;
      an.b = static_cast<const T*>(norm->b) + (size_t)m * in;
      an.h_out = static_cast<T*>(norm->h_out) + (size_t)m * in;
    }
    err = launch_kernel(planes, dim3(plane_blocks), dim3(32 * kPlaneWarps), 0, stream, true, x + (size_t)m * in, in,
                        xb, meta, an, (int)early);
    if (err != cudaSuccess) return err;
    err = launch_kernel(kernel, dim3(grid), dim3(32 * warps), smem, stream, true, qw, lut,
                        static_cast<const uint32_t*>(xb), static_cast<const XMeta*>(meta),
                        y + (size_t)m * (glu ? out / 2 : out), y32, counters, in, out, kp);
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

}  // namespace

bool ap3_bmma_supported(DType dt, int in, int out) {
  (void)dt;
  return in > 0 && out > 0 && in % 512 == 0 && out % 16 == 0 && in <= kMaxIn;
}

size_t ap3_bmma_scratch_bytes(int in, int out) { return meta_end(in) + (size_t)kBmmaMaxKP * out * 4; }

cudaError_t ap3_bmma_gemv_addnorm(DType dt, const void* a, const AddNorm& an, const uint32_t* qweight, const void* lut,
                                  void* y, int M, int in, int out, bool glu, void* scratch, int* counters,
                                  cudaStream_t stream) {
  if (!ap3_bmma_supported(dt, in, out)) return cudaErrorInvalidValue;
  const uint4* qw = reinterpret_cast<const uint4*>(qweight);
  if (dt == DType::F16)
    return launch_bmma(static_cast<const __half*>(a), qw, static_cast<const __half*>(lut), static_cast<__half*>(y), M,
                       in, out, scratch, counters, stream, &an, glu);
  return launch_bmma(static_cast<const __nv_bfloat16*>(a), qw, static_cast<const __nv_bfloat16*>(lut),
                     static_cast<__nv_bfloat16*>(y), M, in, out, scratch, counters, stream, &an, glu);
}

cudaError_t ap3_bmma_gemv(DType dt, const void* x, const uint32_t* qweight, const void* lut, void* y, int M, int in,
                          int out, void* scratch, int* counters, cudaStream_t stream) {
  if (!ap3_bmma_supported(dt, in, out)) return cudaErrorInvalidValue;
  const uint4* qw = reinterpret_cast<const uint4*>(qweight);
  if (dt == DType::F16)
    return launch_bmma(static_cast<const __half*>(x), qw, static_cast<const __half*>(lut), static_cast<__half*>(y), M,
                       in, out, scratch, counters, stream);
  return launch_bmma(static_cast<const __nv_bfloat16*>(x), qw, static_cast<const __nv_bfloat16*>(lut),
                     static_cast<__nv_bfloat16*>(y), M, in, out, scratch, counters, stream);
}

}  // namespace decdec
