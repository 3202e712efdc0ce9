// lutgemm (binary-coding quantization) GEMV and dequantize.
//
// binary [in/32, b, out] int32 (bit j of word [w, p, r] = bit_p(r, 32w+j)), alpha [G, b, out],
// q_bias [G, out], group = in / G: W[r, i] = sum_p alpha[g,p,r] * (2*bit_p - 1) + q_bias[g,r].
//
// GEMV design: lane = output row (the layout is contiguous along out, so a warp's load of one
// (word, plane) is 128 coalesced bytes), warps of a block split K. Per 1024-channel tile the block
// builds, in shared memory, the LUT-GEMM table of x: for every 4 channels all 16 signed sums
// T[v] = sum_j (bit_j(v) ? x_j : -x_j) (fp32). A plane word of a row then costs 8 table lookups
// (one per nibble) instead of 32 multiply-adds; all lanes read the same 16-entry table, so the
// lookups are bank-conflict-free. The nibble -> address step is 1 PRMT per lookup: the nibbles are
// pre-scaled to bytes (4*nibble plus the table's offset inside its 256-byte half), PRMT drops that
// byte into a 256-byte aligned base. Per word: y += sum_p alpha_p * S_p + q_bias * sum(x over the word).
#include <type_traits>

#include "common.cuh"

namespace decdec {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileWords = 32;  // 1024 channels per table tile (16 KB of fp32 tables)
static_assert(kTileWords * 8 == kThreads, "one 4-channel table per thread");

// kCallCombine: the combine epilogue as a call instead of inlined (fewer registers; see launch_gemv).
template <int BITS, typename T, bool kCallCombine = false>
__global__ void __launch_bounds__(kThreads, 3)
    lutgemm_gemv_kernel(const T* __restrict__ x, const uint32_t* __restrict__ binary, const T* __restrict__ alpha,
                        const T* __restrict__ q_bias, T* __restrict__ y, int in, int out, int group, int ks_log2,
                        Fused fused) {
  __shared__ __align__(512) float tab[kTileWords * 8 * 16];
  __shared__ float xsum[kTileWords];
  __shared__ float red[kWarps][32];
  __shared__ int flags[kThreads];

  const int KS = 1 << ks_log2;
  const int RB = (kWarps >> ks_log2) * 32;
  const int words = in >> 5;
  const int wpg = group >> 5;  // words per group
  const int m = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rg = warp >> ks_log2, ks = warp & (KS - 1);
  const int row0 = blockIdx.x * RB;
  const int row = row0 + rg * 32 + lane;
  const bool row_ok = row < out;
  const int rowc = row_ok ? row : 0;
  const T* xm = x + (size_t)m * in;
  const uint32_t tab_base = (uint32_t)__cvta_generic_to_shared(tab);

  float acc = 0.f;
  int cur_g = -1;
  float a[BITS], qb = 0.f;
  // NB words (x BITS planes) per batch and lane, the next batch in flight while this one is used.
  // H200, 2026-11-27, 4096x28672 3-bit: NB = 4 58 us; NB = 1 47 us with the old combine epilogue,
  // 59 us once the batched combine (fused_arrive) was inlined here (72 registers): see docs/PERF.md.
  constexpr int NB = 1;
  uint32_t cur[NB][BITS], nxt[NB][BITS];
  auto load = [&](uint32_t (&dst)[NB][BITS], int w0, int tw0_, int tw_) {
#pragma unroll
    for (int b = 0; b < NB; ++b)
      if (w0 + b * KS < tw_)
#pragma unroll
        for (int q = 0; q < BITS; ++q)
          dst[b][q] = ldg_stream(binary + ((size_t)(tw0_ + w0 + b * KS) * BITS + q) * out + rowc);
  };

  pdl_wait();  // x (and y) belong to the previous kernel
  gemv_trigger_dependents();
  for (int tw0 = 0; tw0 < words; tw0 += kTileWords) {
    const int tw = min(kTileWords, words - tw0);
    int wl = ks;
    load(cur, wl, tw0, tw);  // in flight while the tables are built
    __syncthreads();
    {
      // one 4-channel group per thread: 8-byte load of x, its 16 signed sums, and the word sums
      // (8 consecutive threads = one word) by shuffles: deterministic, no extra barrier
      const int g4 = threadIdx.x;  // kTileWords * 8 == kThreads
      float xsum_g = 0.f;
      if (g4 < tw * 8) {
        const uint2 raw = *reinterpret_cast<const uint2*>(xm + (size_t)tw0 * 32 + g4 * 4);
        const T* h = reinterpret_cast<const T*>(&raw);
        const float x0 = to_f32(h[0]), x1 = to_f32(h[1]), x2 = to_f32(h[2]), x3 = to_f32(h[3]);
        const float lo[4] = {-x0 - x1, x0 - x1, -x0 + x1, x0 + x1};
        const float hi[4] = {-x2 - x3, x2 - x3, -x2 + x3, x2 + x3};
        float4* dst = reinterpret_cast<float4*>(tab + g4 * 16);
#pragma unroll
        for (int q = 0; q < 4; ++q) dst[q] = make_float4(lo[0] + hi[q], lo[1] + hi[q], lo[2] + hi[q], lo[3] + hi[q]);
        xsum_g = (x0 + x1) + (x2 + x3);
      }
      xsum_g += __shfl_xor_sync(0xffffffffu, xsum_g, 1);
      xsum_g += __shfl_xor_sync(0xffffffffu, xsum_g, 2);
      xsum_g += __shfl_xor_sync(0xffffffffu, xsum_g, 4);
      if ((g4 & 7) == 0 && g4 < tw * 8) xsum[g4 >> 3] = xsum_g;
    }
    __syncthreads();
    while (wl < tw) {
      const int wl_n = wl + NB * KS;
      load(nxt, wl_n, tw0, tw);
#pragma unroll
      for (int bb = 0; bb < NB; ++bb) {
        const int w = wl + bb * KS;
        if (w >= tw) break;  // warp-uniform
        const int g = (tw0 + w) / wpg;
        if (g != cur_g) {  // warp-uniform
          cur_g = g;
#pragma unroll
          for (int q = 0; q < BITS; ++q) a[q] = to_f32(alpha[((size_t)g * BITS + q) * out + rowc]);
          qb = to_f32(q_bias[(size_t)g * out + rowc]);
        }
        const uint32_t base0 = tab_base + w * 512, base1 = base0 + 256;
#pragma unroll
        for (int q = 0; q < BITS; ++q) {
          const uint32_t bw = cur[bb][q];
          const uint32_t lo = ((bw << 2) & 0x3C3C3C3Cu) | 0x80008000u;  // nibbles 0,2,4,6
          const uint32_t hi = ((bw >> 2) & 0x3C3C3C3Cu) | 0xC040C040u;  // nibbles 1,3,5,7
          float s0 = lds_f32(__byte_perm(lo, base0, 0x7650));
          float s1 = lds_f32(__byte_perm(hi, base0, 0x7650));
          s0 += lds_f32(__byte_perm(lo, base0, 0x7651));
          s1 += lds_f32(__byte_perm(hi, base0, 0x7651));
          s0 += lds_f32(__byte_perm(lo, base1, 0x7652));
          s1 += lds_f32(__byte_perm(hi, base1, 0x7652));
          s0 += lds_f32(__byte_perm(lo, base1, 0x7653));
          s1 += lds_f32(__byte_perm(hi, base1, 0x7653));
          acc = fmaf(a[q], s0 + s1, acc);
        }
        acc = fmaf(qb, xsum[w], acc);
      }
#pragma unroll
      for (int bb = 0; bb < NB; ++bb)
#pragma unroll
        for (int q = 0; q < BITS; ++q) cur[bb][q] = nxt[bb][q];
      wl = wl_n;
    }
  }

  red[warp][lane] = acc;
  __syncthreads();
  float* gpart = fused.gpart ? fused.gpart + (size_t)m * out : nullptr;
  for (int i = threadIdx.x; i < RB; i += kThreads) {
    const int r = row0 + i;
    if (r >= out) continue;
    const int g = i >> 5, l = i & 31;
    float s = 0.f;
    for (int k = 0; k < KS; ++k) s += red[g * KS + k][l];
    if (gpart) gpart[r] = s;
    else y[(size_t)m * out + r] = from_f32<T>(s);
  }
  if (fused.on()) {
    if constexpr (kCallCombine) fused_arrive_call<T, 2>(fused, m, blockIdx.x, blockIdx.x + 1, out, flags);
    else fused_arrive<T, 2>(fused, m, blockIdx.x, blockIdx.x + 1, out, flags);
  }
}

// 3-bit fp16 GEMV decoded like ap (the dispatched lutgemm kernel for bits = 3, fp16): a row's 3 bits of a
// channel form a code v, and its group's 8 values LUT[v] = q_bias + sum_p alpha_p (2 bit_p(v) - 1) (fp32, the
// reference's order, rounded once to fp16) sit in a PRMT register LUT; ap3_decode8 (common.cuh) turns a word
// into 32 fp16 weights, HFMA2 multiplies them with x staged in shared memory as the decode pairs them.
// 16 lanes = 16 consecutive rows (64-byte coalesced plane loads), the block's 16 word streams (2 per warp)
// split in; every word's alpha / q_bias come with its planes, a batch of kPBatch words ahead.
constexpr int kPThreads = 256, kPWarps = kPThreads / 32;
constexpr int kPRows = 16;     // rows per block (a half-warp's lanes) = the fused op's tile
constexpr int kPStreams = 16;  // word streams per block
constexpr int kPBatch = 4;     // words per lane whose loads are in flight together

// x for ap3_dot8: chunk 4w + K of word w holds the half2 pairs (x[32w + 8j + K], x[32w + 8j + K + 4]), j = 0..3
__device__ __forceinline__ void stage_x_pairs(const __half* __restrict__ xm, int in, uint4* xs) {
  __half* xh = reinterpret_cast<__half*>(xs);
  for (int j = threadIdx.x; j < (in >> 3); j += blockDim.x) {  // channels 8j .. 8j + 7 = 32w + 8q + e
    const uint4 v = *reinterpret_cast<const uint4*>(xm + (size_t)j * 8);
    const __half* h = reinterpret_cast<const __half*>(&v);
    const int w = j >> 2, q = j & 3;
#pragma unroll
    for (int e = 0; e < 8; ++e) xh[(4 * w + (e & 3)) * 8 + 2 * q + (e >> 2)] = h[e];
  }
}

struct PBatch {
  uint32_t p[kPBatch][3];  // the planes of kPBatch words of this lane's row
  __half a[kPBatch][4];    // each word's group: alpha_0..2, q_bias
};

__global__ void __launch_bounds__(kPThreads, 3)
    lutgemm3_prmt_kernel(const __half* __restrict__ x, const uint32_t* __restrict__ binary,
                         const __half* __restrict__ alpha, const __half* __restrict__ q_bias, __half* __restrict__ y,
                         int in, int out, int group, Fused fused) {
  extern __shared__ __align__(16) uint4 xs[];  // in / 8 chunks
  __shared__ float red[kPWarps][kPRows];
  __shared__ int flags[kPThreads];
  const int words = in >> 5, wpg = group >> 5;
  const int m = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, half = lane >> 4, hl = lane & 15;
  const int row = blockIdx.x * kPRows + hl;
  const int rowc = row < out ? row : out - 1;
  const int W = ceil_div(words, kPStreams);
  const int w_lo = min(words, (warp * 2 + half) * W), w_hi = min(words, w_lo + W);

  auto load = [&](PBatch& d, int w0) {
#pragma unroll
    for (int u = 0; u < kPBatch; ++u) {
      const int w = min(w0 + u, words - 1), g = w / wpg;
#pragma unroll
      for (int q = 0; q < 3; ++q) {
        d.p[u][q] = ldg_stream(binary + ((size_t)w * 3 + q) * out + rowc);
        d.a[u][q] = __ldg(alpha + ((size_t)g * 3 + q) * out + rowc);
      }
      d.a[u][3] = __ldg(q_bias + (size_t)g * out + rowc);
    }
  };
  PBatch cur, nxt;
  if (w_lo < w_hi) load(cur, w_lo);
  pdl_wait();  // the first weights are in flight; x (and y) belong to the previous kernel
  gemv_trigger_dependents();
  stage_x_pairs(x + (size_t)m * in, in, xs);
  __syncthreads();

  const uint32_t xs_base = (uint32_t)__cvta_generic_to_shared(xs);
  float acc = 0.f;
  int cur_g = -1;
  uint32_t lt0 = 0, lt1 = 0, lt2 = 0, lt3 = 0;
  for (int w0 = w_lo; w0 < w_hi; w0 += kPBatch) {
    if (w0 + kPBatch < w_hi) load(nxt, w0 + kPBatch);
#pragma unroll
    for (int u = 0; u < kPBatch; ++u) {
      const int w = w0 + u;
      if (w >= w_hi) break;
      const int g = w / wpg;
      if (g != cur_g) {
        cur_g = g;
        const float a0 = __half2float(cur.a[u][0]), a1 = __half2float(cur.a[u][1]), a2 = __half2float(cur.a[u][2]);
        const float qb = __half2float(cur.a[u][3]);
        __align__(16) __half l[8];
#pragma unroll
        for (int v = 0; v < 8; ++v)
          l[v] = __float2half_rn((((v & 1) ? a0 : -a0) + ((v & 2) ? a1 : -a1) + ((v & 4) ? a2 : -a2)) + qb);
        lut_tables(*reinterpret_cast<const uint4*>(l), lt0, lt1, lt2, lt3);
      }
      const uint32_t A = cur.p[u][0], B = __funnelshift_l(cur.p[u][1], cur.p[u][1], 1),
                     C = __funnelshift_l(cur.p[u][2], cur.p[u][2], 2);
      const uint32_t xa = xs_base + 64u * (uint32_t)w;
      uint4 xv[4];
#pragma unroll
      for (int k = 0; k < 4; ++k)
        asm("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
            : "=r"(xv[k].x), "=r"(xv[k].y), "=r"(xv[k].z), "=r"(xv[k].w) : "r"(xa + 16u * k));
      __half2 h0 = __float2half2_rn(0.f), h1 = h0, h2 = h0, h3 = h0;
      ap3_dot8<0>(A, B, C, lt0, lt1, lt2, lt3, xv[0], h0, h1);
      ap3_dot8<1>(A, B, C, lt0, lt1, lt2, lt3, xv[1], h0, h1);
      ap3_dot8<2>(A, B, C, lt0, lt1, lt2, lt3, xv[2], h2, h3);
      ap3_dot8<3>(A, B, C, lt0, lt1, lt2, lt3, xv[3], h2, h3);
      const float2 f0 = __half22float2(h0), f1 = __half22float2(h1), f2 = __half22float2(h2), f3 = __half22float2(h3);
      acc += ((f0.x + f0.y) + (f1.x + f1.y)) + ((f2.x + f2.y) + (f3.x + f3.y));
    }
    cur = nxt;
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 16);  // the warp's two word streams of the same row
  if (half == 0) red[warp][hl] = acc;
  __syncthreads();
  float* gpart = fused.gpart ? fused.gpart + (size_t)m * out : nullptr;
  if (threadIdx.x < kPRows) {
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kPWarps; ++k) sum += red[k][threadIdx.x];  // fixed order: deterministic
    const int r = blockIdx.x * kPRows + (int)threadIdx.x;
    if (r < out) {
      if (gpart) gpart[r] = sum;
      else y[(size_t)m * out + r] = __float2half_rn(sum);
    }
  }
  if (fused.on()) fused_arrive_call<__half, 2>(fused, m, blockIdx.x, blockIdx.x + 1, out, flags);
}

template <int BITS, typename T>
__global__ void __launch_bounds__(256)
    lutgemm_dequant_kernel(const uint32_t* __restrict__ binary, const T* __restrict__ alpha,
                           const T* __restrict__ q_bias, T* __restrict__ w, int in, int out, int group) {
  const int words = in >> 5;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)out * words) return;
  const int wd = (int)(i / out), r = (int)(i % out);  // consecutive threads: consecutive rows
  const int g = wd * 32 / group;
  float a[BITS], asum = 0.f;
  uint32_t p[BITS];
#pragma unroll
  for (int q = 0; q < BITS; ++q) {
    a[q] = to_f32(alpha[((size_t)g * BITS + q) * out + r]);
    p[q] = __ldg(binary + ((size_t)wd * BITS + q) * out + r);
    asum += a[q];
  }
  const float qb = to_f32(q_bias[(size_t)g * out + r]);
  T* dst = w + (size_t)r * in + (size_t)wd * 32;
#pragma unroll
  for (int j0 = 0; j0 < 32; j0 += 8) {
    __align__(16) T o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float v = 0.f;  // sum_p alpha_p * (2 bit - 1): same order as the reference
#pragma unroll
      for (int q = 0; q < BITS; ++q) v += ((p[q] >> (j0 + j)) & 1u) ? a[q] : -a[q];
      o[j] = from_f32<T>(v + qb);
    }
    if ((in & 7) == 0) *reinterpret_cast<uint4*>(dst + j0) = *reinterpret_cast<const uint4*>(o);
    else for (int j = 0; j < 8; ++j) dst[j0 + j] = o[j];
  }
  (void)asum;
}

int ks_log2_for(int in, int out) {
  const int words_per_tile = min(in >> 5, kTileWords);
  int sms = 132, dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  int ks = 0;
  while (ks < 3 && (1 << (ks + 1)) <= words_per_tile && ceil_div(out, (kWarps >> ks) * 32) < 3 * sms) ++ks;
  return ks;
}

bool use_prmt_kernel(int bits, bool f16) { return bits == 3 && f16; }

template <int BITS, typename T>
cudaError_t launch_gemv(const void* x, const uint32_t* binary, const void* alpha, const void* q_bias, void* y, int M,
                        int in, int out, int group, const Fused& fused, cudaStream_t stream) {
  if constexpr (BITS == 3 && std::is_same_v<T, __half>) {
    const size_t smem = (size_t)in * sizeof(__half);
    cudaError_t err = allow_smem(lutgemm3_prmt_kernel, smem);
    if (err != cudaSuccess) return err;
    return launch_gemv_kernel(lutgemm3_prmt_kernel, dim3(ceil_div(out, kPRows), M), dim3(kPThreads), smem, stream,
                              static_cast<const __half*>(x), binary, static_cast<const __half*>(alpha),
                              static_cast<const __half*>(q_bias), static_cast<__half*>(y), in, out, group, fused);
  }
  const int ks = ks_log2_for(in, out);
  const int RB = (kWarps >> ks) * 32;
  const dim3 grid(ceil_div(out, RB), M);
  // More blocks than three per SM (the inlined combine's 72 registers allow three): the combine as a
  // call (54 registers, four per SM) keeps the grid in one wave. H200, scripts/lutgemm_ab.cu, 3-bit:
  // 4096x28672 (448 blocks) 57.1 -> 46.2 us; the one-wave shapes are within +-5 % either way.
  const auto* xt = static_cast<const T*>(x);
  const auto* at = static_cast<const T*>(alpha);
  const auto* bt = static_cast<const T*>(q_bias);
  auto* yt = static_cast<T*>(y);
  return (int)grid.x > 3 * device_sms()
             ? launch_gemv_kernel(lutgemm_gemv_kernel<BITS, T, true>, grid, dim3(kThreads), 0, stream, xt, binary, at,
                                  bt, yt, in, out, group, ks, fused)
             : launch_gemv_kernel(lutgemm_gemv_kernel<BITS, T>, grid, dim3(kThreads), 0, stream, xt, binary, at, bt, yt,
                                  in, out, group, ks, fused);
}

template <int BITS, typename T>
cudaError_t launch_dequant(const uint32_t* binary, const void* alpha, const void* q_bias, void* w, int in, int out,
                           int group, cudaStream_t stream) {
  const long long n = (long long)out * (in >> 5);
  if (n == 0) return cudaSuccess;
  lutgemm_dequant_kernel<BITS, T><<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(
      binary, static_cast<const T*>(alpha), static_cast<const T*>(q_bias), static_cast<T*>(w), in, out, group);
  return cudaGetLastError();
}

#define DECDEC_BITS_CASES(F, T, ...) \
  switch (bits) {                    \
    case 1: return F<1, T>(__VA_ARGS__); \
    case 2: return F<2, T>(__VA_ARGS__); \
    case 3: return F<3, T>(__VA_ARGS__); \
    case 4: return F<4, T>(__VA_ARGS__); \
    case 5: return F<5, T>(__VA_ARGS__); \
    case 6: return F<6, T>(__VA_ARGS__); \
    case 7: return F<7, T>(__VA_ARGS__); \
    case 8: return F<8, T>(__VA_ARGS__); \
    default: return cudaErrorInvalidValue; \
  }

template <typename T>
cudaError_t gemv_dispatch(int bits, const void* x, const uint32_t* b, const void* a, const void* qb, void* y, int M,
                          int in, int out, int group, const Fused& f, cudaStream_t s) {
  DECDEC_BITS_CASES(launch_gemv, T, x, b, a, qb, y, M, in, out, group, f, s)
}

template <typename T>
cudaError_t dequant_dispatch(int bits, const uint32_t* b, const void* a, const void* qb, void* w, int in, int out,
                             int group, cudaStream_t s) {
  DECDEC_BITS_CASES(launch_dequant, T, b, a, qb, w, in, out, group, s)
}

}  // namespace

bool lutgemm_bits_supported(int bits) { return bits >= 1 && bits <= 8; }

int lutgemm_gemv_tile_rows(DType dt, int bits, int in, int out) {
  if (use_prmt_kernel(bits, dt == DType::F16)) return kPRows;
  return (kWarps >> ks_log2_for(in, out)) * 32;
}

cudaError_t lutgemm_gemv(DType dt, const void* x, const uint32_t* binary, const void* alpha, const void* q_bias,
                         void* y, int M, int in, int out, int bits, int group, const Fused& fused,
                         cudaStream_t stream) {
  if (M == 0 || out == 0) return cudaSuccess;
  return dt == DType::F16
             ? gemv_dispatch<__half>(bits, x, binary, alpha, q_bias, y, M, in, out, group, fused, stream)
             : gemv_dispatch<__nv_bfloat16>(bits, x, binary, alpha, q_bias, y, M, in, out, group, fused, stream);
}

cudaError_t lutgemm_dequant(DType dt, const uint32_t* binary, const void* alpha, const void* q_bias, void* w,
                            int in, int out, int bits, int group, cudaStream_t stream) {
  return dt == DType::F16
             ? dequant_dispatch<__half>(bits, binary, alpha, q_bias, w, in, out, group, stream)
             : dequant_dispatch<__nv_bfloat16>(bits, binary, alpha, q_bias, w, in, out, group, stream);
}

}  // namespace decdec
