// DEC: dynamic error compensation (DESIGN.md §2). One kernel of n_tb blocks working on units
// (1024-channel chunk c, output slice s); slices per chunk S = max(1, n_tb / n_chunks). A unit
//  1. selects the channels of its chunk only: the 32 bucket floors from bounds [a, b] with the
//     reference's exact fp32 expressions (__fadd_rn/__fmul_rn/__fdiv_rn: no FMA contraction; formed
//     once per block, before the PDL wait in chain mode, so during the producer's tail), 4
//     channels per thread, the chunk's bucket histogram, the overflow bucket, and one block-wide
//     scan that places exactly floor(k_chunk * L / 1024) channels, bucket by bucket from bucket 0,
//     lowest channel indices first inside the overflow bucket (the reference's choice), so the
//     selection is deterministic and identical to reference.select_channels. Units never wait for
//     each other (no grid sync, no hang), and no block selects more than its own chunk;
//  2. fetches only the selected rows of q_residual from pinned host memory (zero-copy over PCIe),
//     restricted to its slice of the output columns: 16-byte loads, consecutive threads on
//     consecutive 16 bytes of a row, kUnroll independent loads per thread in flight;
//  3. accumulates x_j * (nibble - 8) in fp32 and writes chunk c's fp32 partial for its slice, then
//     takes part in the combine (kernels.h `Fused`): the last arrival at a tile computes
//     gemv + scale * (sum of the chunk partials in a fixed order), so the output is deterministic
//     and the scales are read off DEC's critical path.
// With Fused::norm (beside the add + norm GEMV), x is formed here from the residual add and RMSNorm (dec_rms /
// norm_x4), bit-identical to the GEMV's stage_x_addnorm.
#include "common.cuh"

// Phase timestamps for scripts/dec_phase_probe.cu and dec_timeline.cu (they define these before including this file);
// nothing in a normal build.
#ifndef DEC_PROBE
#define DEC_PROBE(i)
#endif
#ifndef DEC_SPROBE  // inside the selection: histograms shared, offsets scanned, list written (scripts/dec_timeline.cu)
#define DEC_SPROBE(i)
#endif

namespace decdec {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 1024;
constexpr int kUnroll = 4;

__host__ __device__ inline int n_chunks(int in) { return (in + kChunk - 1) / kChunk; }
__host__ __device__ inline int chunk_quota(int k_chunk, int in, int c) {
  return k_chunk * min(kChunk, in - c * kChunk) / kChunk;
}
__host__ __device__ inline int slices_per_chunk(int in, int n_tb) { return max(1, n_tb / n_chunks(in)); }

struct DecSmem {
  int hist_w[kWarps][32];  // per warp: its channels in buckets 0..31 (bucket 32, below every floor, is not counted)
  float red[kWarps];       // Fused::norm: per-warp sums of squares
  int flags[kThreads];
  int list[kChunk];     // selected channels of the chunk, in channel order
  float listx[kChunk];  // their x values
};

// Vector width (in 32-bit words) of the residual loads and the accumulator slice per block.
__host__ __device__ inline int dec_vec_words(int out, int slice) {
  return ((out / 8) % 4 == 0 && slice % 32 == 0) ? 4 : 1;
}
// Per-thread partial sums for the in-block reduction (only when several row groups share a
// column vector): [thread][VW*8 + 1 pad], summed in a fixed order, so DEC is deterministic.
__host__ __device__ inline int dec_accs_floats(int out, int slice) {
  const int vw = dec_vec_words(out, slice);
  const int V = (slice / 8) / vw;
  return V <= kThreads / 2 ? kThreads * (vw * 8 + 1) : 0;
}

// The 32 bucket floors from bounds [a, b], floor i in lane i of the calling warp, with the reference's exact fp32
// expressions (reference.bucket_floors; no FMA contraction), and whether they are non-increasing.
__device__ __forceinline__ float warp_floor(float a, float b, int lane, bool& mono) {
  float f;
  if (lane < 15) f = __fadd_rn(a, __fdiv_rn(__fmul_rn(__fsub_rn(b, a), (float)lane), 15.0f));
  else if (lane == 15) f = b;  // exactly b, as reference.bucket_floors (the formula can miss b by an ulp)
  else f = __fdiv_rn(__fmul_rn(b, (float)(31 - lane)), 16.0f);
  const float nxt = __shfl_down_sync(0xffffffffu, f, 1);
  mono = __ballot_sync(0xffffffffu, lane == 31 || f >= nxt) == 0xffffffffu;
  return f;
}

// Buckets (number of floors above |x|) of the lane's 4 channels; fl: the warp's floors (warp_floor). Every lane of
// the warp calls it (shuffles).
__device__ __forceinline__ void buckets4(float fl, bool mono, const float (&ax)[4], int (&b)[4]) {
  if (mono) {  // non-increasing floors: {i : floor_i > ax} is a prefix; 4 independent binary searches
    int pos[4] = {0, 0, 0, 0};
#pragma unroll
    for (int step = 16; step > 0; step >>= 1)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (__shfl_sync(0xffffffffu, fl, pos[j] + step - 1) > ax[j]) pos[j] += step;
    const float f31 = __shfl_sync(0xffffffffu, fl, 31);
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = pos[j] == 31 && f31 > ax[j] ? 32 : pos[j];
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) b[j] = 0;
  for (int i = 0; i < 32; ++i) {
    const float f = __shfl_sync(0xffffffffu, fl, i);
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] += f > ax[j];
  }
}

// Fused::norm: r = rsqrt(mean(h^2) + eps) of h = a + b (token m), with the GEMV's own order of operations
// (ap_gemv.cu stage_x_addnorm with 256 threads: per-thread fmaf over 4 chunks of 8, warp xor tree, warps in order),
// so the x that DEC selects from is bit-identical to the one the GEMV multiplies.
static_assert(kThreads == 256, "dec_rms follows stage_x_addnorm's 256-thread summation order");
__device__ float dec_rms(const __half* __restrict__ am, const AddNorm& an, int m, int in, DecSmem& S) {
  const __half* bm = static_cast<const __half*>(an.b) + (size_t)m * in;
  const int n16 = in >> 3;
  float ss = 0.f;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int j = u * kThreads + (int)threadIdx.x;
    if (j < n16) {
      const uint4 av = *reinterpret_cast<const uint4*>(am + (size_t)j * 8);
      const uint4 bv = *reinterpret_cast<const uint4*>(bm + (size_t)j * 8);
      const __half2* a2 = reinterpret_cast<const __half2*>(&av);
      const __half2* b2 = reinterpret_cast<const __half2*>(&bv);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __half22float2(__hadd2(a2[e], b2[e]));
        ss = fmaf(f.x, f.x, fmaf(f.y, f.y, ss));
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if ((threadIdx.x & 31) == 0) S.red[threadIdx.x >> 5] = ss;
  __syncthreads();
  float tot = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) tot += S.red[w];
  __syncthreads();  // S.red is read by every thread before the next token overwrites it
  return rsqrtf(tot / (float)in + an.eps);
}

// Four fp16 values at element i of p (8-byte aligned).
__device__ __forceinline__ uint2 ld_half4(const void* p, size_t i) {
  return *reinterpret_cast<const uint2*>(static_cast<const __half*>(p) + i);
}

// x[i .. i+3] = gamma * fp16(fp16(a + b) * r) of token m (i % 4 == 0, in % 8 == 0: 8-byte loads), as the GEMV forms it;
// gv: gamma[i .. i+3], loaded by the caller (a weight: before the PDL wait where it can).
__device__ __forceinline__ void norm_x4(const __half* __restrict__ am, const AddNorm& an, int m, int in, int i, float r,
                                        uint2 gv, float (&xv)[4]) {
  const uint2 av = ld_half4(am, i), bv = ld_half4(an.b, (size_t)m * in + i);
  const __half* a = reinterpret_cast<const __half*>(&av);
  const __half* b = reinterpret_cast<const __half*>(&bv);
  const __half* g = reinterpret_cast<const __half*>(&gv);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const __half t = __float2half_rn(__half2float(__hadd(a[j], b[j])) * r);
    xv[j] = __half2float(__float2half_rn(__half2float(t) * __half2float(g[j])));
  }
}

// Channel selection of chunk c of token xm into S.list / S.listx [0 .. quota), quota > 0, in channel order: every
// channel of the buckets before the overflow bucket o, then the lowest-index channels of bucket o (the reference's
// choice). Thread t owns channels 4t .. 4t+3 of the chunk. On DEC's critical path, so two block barriers only:
//  1. every warp computes the floors itself (lane i: floor i), the buckets of its 128 channels (binary searches over
//     shuffled floors) and its 32-bucket histogram (bit-sliced ballots) into S.hist_w[warp]; barrier;
//  2. every warp reads all warps' histograms: the chunk's totals give o and how many of it to take, the earlier
//     warps' counts give this warp's offset, a packed scan of (channels before o, channels in o) its lanes'; each
//     thread writes its selected channels; barrier.
// fl / mono: the warp's floors (warp_floor; they depend on the weights alone, so the kernel forms them before its PDL
// wait: in a decode step that is during the producer's tail, which ends with an early trigger). NORM (Fused::norm,
// fp16): xm is a, and x is formed with the token's r (dec_rms); gpre holds gamma of this thread's 4 channels of chunk
// c_pre (loaded before the wait), another chunk loads its own.
template <typename T, bool NORM = false>
__device__ void select_chunk(const T* __restrict__ xm, int in, int c, int quota, float fl, bool mono, DecSmem& S,
                             const AddNorm& an = AddNorm{}, int m = 0, float r = 0.f, uint2 gpre = {},
                             int c_pre = -1) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int base = c * kChunk, L = min(kChunk, in - base);
  const int i0 = 4 * (int)threadIdx.x;
  float xv[4];
  if constexpr (NORM) {  // in % 128 == 0 (ap_addnorm_supported): every chunk holds whole groups of 4
    if (i0 < L) {
      const int i = base + i0;
      norm_x4(xm, an, m, in, i, r, c == c_pre ? gpre : ld_half4(an.gamma, i), xv);
    } else {
      xv[0] = xv[1] = xv[2] = xv[3] = 0.f;
    }
  } else if ((in & 3) == 0 && i0 + 4 <= L) {  // 8-byte aligned: 4 values in one load
    const uint2 r = *reinterpret_cast<const uint2*>(xm + base + i0);
    const T* h = reinterpret_cast<const T*>(&r);
#pragma unroll
    for (int j = 0; j < 4; ++j) xv[j] = to_f32(h[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) xv[j] = i0 + j < L ? to_f32(xm[base + i0 + j]) : 0.f;
  }
  float ax[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) ax[j] = fabsf(xv[j]);
  int b[4];
  buckets4(fl, mono, ax, b);
#pragma unroll
  for (int j = 0; j < 4; ++j) b[j] = i0 + j < L ? b[j] : 33;  // past the chunk: in no bucket
  {  // warp histogram by bit-sliced ballots: lane l counts the warp's channels in bucket l (< 32)
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
    S.hist_w[warp][lane] = cnt;
  }
  __syncthreads();
  DEC_SPROBE(0);
  // lane = bucket: the chunk's count, and the count in the warps before this one
  int tot = 0, prev = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int v = S.hist_w[w][lane];
    tot += v;
    prev += w < warp ? v : 0;
  }
  int cum = tot;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, cum, off);
    if (lane >= off) cum += v;
  }
  const unsigned reach = __ballot_sync(0xffffffffu, cum >= quota);
  const int o = reach ? __ffs(reach) - 1 : 32;  // bucket 32 holds the rest: quota <= L
  const int before = __shfl_sync(0xffffffffu, cum, o > 0 ? min(o - 1, 31) : 0);
  const int need = quota - (o > 0 ? before : 0);
  // the earlier warps' channels in buckets below o and in bucket o (no channel is in bucket 32: floor 31 is 0)
  int lt_prev = lane < o ? prev : 0;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) lt_prev += __shfl_xor_sync(0xffffffffu, lt_prev, off);
  const int eq_prev = __shfl_sync(0xffffffffu, prev, o < 32 ? o : 0) * (o < 32);
  // this warp's lanes: exclusive scan of (channels below o, channels in o), packed
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
  const int ex = inc - packed;
  DEC_SPROBE(1);
  int eq_before = eq_prev + (ex >> 16);
  int pos = lt_prev + (ex & 0xFFFF) + min(eq_before, need);
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
  DEC_SPROBE(2);
  __syncthreads();
}

// Parts mode (kernels.h `Fused`): called by every thread of a unit after it stored chunk c's partial for output
// slice s of token m. The last of the slice's dec_parts units sums the partials in chunk order into dsum
// (deterministic). Release / acquire as in fused_arrive: a block barrier, one acq_rel atomic, a block barrier.
__device__ void dec_sum_arrive(const Fused& f, int m, int s, int o_lo, int o_hi, int out, int* s_flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    int* c = f.dec_counters + (size_t)m * ceil_div(out, f.dec_slice) + s;
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(old) : "l"(c) : "memory");
    const bool last = old == f.dec_parts - 1;
    if (last) *c = 0;  // every unit of the slice has arrived: reset for the next call
    *s_flag = last;
  }
  __syncthreads();
  if (!*s_flag) return;
  constexpr int kP = 4;  // partials whose loads are in flight together
  const size_t pstride = (size_t)f.n_tokens * out;
  for (int col = o_lo + (int)threadIdx.x; col < o_hi; col += kThreads) {
    const float* p = f.dpart + (size_t)m * out + col;
    float sum = 0.f;
    for (int p0 = 0; p0 < f.dec_parts; p0 += kP) {
      float t[kP];
#pragma unroll
      for (int q = 0; q < kP; ++q) t[q] = p0 + q < f.dec_parts ? __ldcg(p + (size_t)(p0 + q) * pstride) : 0.f;
#pragma unroll
      for (int q = 0; q < kP; ++q) sum += t[q];
    }
    f.dsum[(size_t)m * out + col] = sum;
  }
}

// Chain mode (kernels.h `Fused::chain`): called by every thread of a unit after it stored chunk c's partial for its
// slice of token m. A block barrier orders the block's stores before one release add (the GEMV's blocks acquire it).
__device__ __forceinline__ void dec_chain_arrive(const Fused& f, int m) {
  __syncthreads();
  if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(f.chain + 1 + m) : "memory");
}

template <typename T, int VW, bool NORM = false>
__global__ void __launch_bounds__(kThreads)
    dec_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qr, const float* __restrict__ bounds, int M, int in, int out, int k_chunk, int spc, int slice, Fused f) {
  extern __shared__ __align__(16) float accs[];  // [kThreads][VW*8 + 1] when several row groups share a vector
  __shared__ DecSmem S;
  const int nc = n_chunks(in), units = nc * spc;
  const bool use_accs = dec_accs_floats(out, slice) > 0;
  const int ow = out / 8;  // words per residual row
  // chain mode: the GEMV (this kernel's programmatic dependent) may launch now; x belongs to the kernel before
  if (f.chain) pdl_launch_dependents();
  // Weights only, so before the PDL wait (chain mode: while the kernel before drains; after the trigger, which a
  // global load here would delay): the bucket floors, and with NORM gamma of this thread's channels in the block's
  // first unit's chunk.
  bool mono = true;
  const float fl = k_chunk > 0 ? warp_floor(bounds[0], bounds[1], threadIdx.x & 31, mono) : 0.f;
  const int c_pre = (int)blockIdx.x < units ? (int)blockIdx.x / spc : -1;
  uint2 gpre = {};
  if constexpr (NORM) {
    if (c_pre >= 0 && 4 * (int)threadIdx.x < min(kChunk, in - c_pre * kChunk))
      gpre = ld_half4(f.norm.gamma, (size_t)c_pre * kChunk + 4 * threadIdx.x);
  }
  if (f.chain) {
    pdl_wait();
    if (blockIdx.x == 0 && threadIdx.x == 0)  // x is complete: the GEMV's blocks may stage it
      asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(f.chain) : "memory");
  }
  for (int m = 0; m < M; ++m) {
    const T* xm = x + (size_t)m * in;
    float r = 0.f;
    if constexpr (NORM) {
      if ((int)blockIdx.x < units) r = dec_rms(xm, f.norm, m, in, S);
    }
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
      const int c = u / spc, s = u % spc;
      const int o_lo = s * slice;
      if (o_lo >= out) continue;  // block-uniform: this slice is empty
      const int o_hi = min(out, o_lo + slice);
      const int quota = chunk_quota(k_chunk, in, c);
      DEC_PROBE(0);
      if (quota > 0) select_chunk<T, NORM>(xm, in, c, quota, fl, mono, S, f.norm, m, r, gpre, c_pre);
      DEC_PROBE(1);
      float* dst = f.dpart + ((size_t)c * M + m) * out;
      const int V = ((o_hi - o_lo) / 8) / VW;  // vectors per row in this slice
      const int VB = max(1, min(V, kThreads));
      const int G = use_accs ? kThreads / VB : 1;
      const int g = threadIdx.x / VB, vl = threadIdx.x % VB;
      if (g < G) {
        // this thread's (vector, row batch) sequence, double-buffered: the next batch's kUnroll
        // 16-byte zero-copy loads are in flight while the current one is accumulated
        const int nv = vl < V ? (V - vl + VB - 1) / VB : 0;
        const int nb = g < quota ? (quota - g + G * kUnroll - 1) / (G * kUnroll) : 0;
        if (nb == 0) {  // no rows (quota 0): this partial is zero
          for (int v = vl; v < V; v += VB) {
#pragma unroll
            for (int i = 0; i < VW * 8; ++i) {
              if (use_accs) accs[(g * VB + vl) * (VW * 8 + 1) + i] = 0.f;
              else dst[o_lo + v * VW * 8 + i] = 0.f;
            }
          }
        } else {
          struct Batch {
            uint32_t w[kUnroll][VW];
            float x[kUnroll];
          };
          auto load = [&](Batch& bt, int it) {
            const int vi = it / nb, bi = it - vi * nb;
            const uint32_t* colp = qr + o_lo / 8 + (vl + vi * VB) * VW;
#pragma unroll
            for (int q = 0; q < kUnroll; ++q) {
              const int sidx = g + bi * G * kUnroll + q * G;
              if (sidx < quota) {
                const uint32_t* p = colp + (size_t)S.list[sidx] * ow;
                bt.x[q] = S.listx[sidx];
                if constexpr (VW == 4) {
                  uint4 t;
                  asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                               : "=r"(t.x), "=r"(t.y), "=r"(t.z), "=r"(t.w) : "l"(p));
                  bt.w[q][0] = t.x; bt.w[q][1] = t.y; bt.w[q][2] = t.z; bt.w[q][3] = t.w;
                } else {
                  uint32_t t;
                  asm volatile("ld.global.L1::no_allocate.u32 %0, [%1];" : "=r"(t) : "l"(p));
                  bt.w[q][0] = t;
                }
              } else {
                bt.x[q] = 0.f;
#pragma unroll
                for (int i = 0; i < VW; ++i) bt.w[q][i] = 0x88888888u;  // nibbles 8 -> level 0
              }
            }
          };
          float acc[VW * 8];
#pragma unroll
          for (int i = 0; i < VW * 8; ++i) acc[i] = 0.f;
          auto consume = [&](const Batch& bt, int it) {
#pragma unroll
            for (int q = 0; q < kUnroll; ++q)
#pragma unroll
              for (int i = 0; i < VW; ++i)
#pragma unroll
                for (int n = 0; n < 8; ++n) {
                  // exact (nibble - 8) as float: 2^23 + nibble, minus 2^23 + 8
                  const float lv = __int_as_float(0x4B000000 | ((bt.w[q][i] >> (4 * n)) & 0xFu)) - 8388616.0f;
                  acc[i * 8 + n] = fmaf(lv, bt.x[q], acc[i * 8 + n]);
                }
            const int vi = it / nb;
            if (it - vi * nb == nb - 1) {  // the vector's last batch: store it
              const int v = vl + vi * VB;
              if (use_accs) {  // here V <= 128, so v == vl: one vector per thread
#pragma unroll
                for (int i = 0; i < VW * 8; ++i) accs[(g * VB + vl) * (VW * 8 + 1) + i] = acc[i];
              } else {
                const int c0 = o_lo + v * VW * 8;
#pragma unroll
                for (int i = 0; i < VW * 8; ++i) dst[c0 + i] = acc[i];
              }
#pragma unroll
              for (int i = 0; i < VW * 8; ++i) acc[i] = 0.f;
            }
          };
          const int total = nv * nb;
          Batch b0, b1;
          load(b0, 0);
          ping_pong(total, b0, b1, load, consume);
        }
      }
      DEC_PROBE(2);
      if (use_accs) {
        __syncthreads();
        for (int i = threadIdx.x; i < o_hi - o_lo; i += kThreads) {
          const int col = o_lo + i, v = i / (VW * 8), e = i % (VW * 8);
          float sum = 0.f;
          for (int gg = 0; gg < G; ++gg) sum += accs[(gg * VB + v) * (VW * 8 + 1) + e];
          dst[col] = sum;
        }
      }
      DEC_PROBE(3);
      if (f.chain) dec_chain_arrive(f, m);
      else if (f.dsum) dec_sum_arrive(f, m, s, o_lo, o_hi, out, S.flags);
      else if (f.on()) fused_arrive<T>(f, m, o_lo / f.tile_rows, (o_hi - 1) / f.tile_rows + 1, out, S.flags);
      DEC_PROBE(4);
      __syncthreads();  // S.list / accs reused by the next unit
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dec_select_kernel(const T* __restrict__ x, const float* __restrict__ bounds, uint8_t* __restrict__ mask, int M,
                      int in, int k_chunk) {
  __shared__ DecSmem S;
  bool mono = true;
  const float fl = k_chunk > 0 ? warp_floor(bounds[0], bounds[1], threadIdx.x & 31, mono) : 0.f;
  for (int m = 0; m < M; ++m) {
    for (int i = threadIdx.x; i < in; i += kThreads) mask[(size_t)m * in + i] = 0;
    __syncthreads();
    for (int c = 0; c < n_chunks(in); ++c) {
      const int quota = chunk_quota(k_chunk, in, c);
      if (quota == 0) continue;
      select_chunk(x + (size_t)m * in, in, c, quota, fl, mono, S);
      for (int i = threadIdx.x; i < quota; i += kThreads) mask[(size_t)m * in + S.list[i]] = 1;
      __syncthreads();
    }
  }
}

template <typename T>
cudaError_t launch_dec(const void* x, const uint32_t* qr, const void* scales, const float* bounds, int M, int in,
                       int out, int k_chunk, int n_tb, const Fused& f, cudaStream_t stream) {
  const int spc = slices_per_chunk(in, n_tb);
  const int slice = dec_slice_size(in, out, n_tb);
  const size_t smem = dec_smem_bytes(in, out, k_chunk, n_tb);
  Fused fs = f;
  fs.dec_scales = scales;
  auto go = [&](auto kernel) -> cudaError_t {
    const cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    // chain mode: a programmatic dependent of the kernel before it (it waits for that kernel itself)
    return launch_kernel(kernel, dim3(n_tb), dim3(kThreads), smem, stream, fs.chain != nullptr,
                         static_cast<const T*>(x), qr, bounds, M, in, out, k_chunk, spc, slice, fs);
  };
  if (fs.norm.gamma) {  // beside the add + norm GEMV: fp16, the shapes ap_addnorm_supported serves
    if constexpr (std::is_same_v<T, __half>) {
      if (in % 128 != 0 || in > 4 * kThreads * 8) return cudaErrorInvalidValue;
      return dec_vec_words(out, slice) == 4 ? go(dec_kernel<T, 4, true>) : go(dec_kernel<T, 1, true>);
    }
    return cudaErrorInvalidValue;
  }
  return dec_vec_words(out, slice) == 4 ? go(dec_kernel<T, 4>) : go(dec_kernel<T, 1>);
}

template <typename T>
cudaError_t max_blocks_t(int device, int in, int out, int k_chunk, int n_tb, int* max_blocks) {
  const int slice = dec_slice_size(in, out, n_tb);
  const size_t smem = dec_smem_bytes(in, out, k_chunk, n_tb);
  int per_sm = 0, sms = 0;
  cudaError_t err;
  // allow_smem only ever raises the kernel's dynamic shared-memory limit (lowering it here would
  // make a later launch with a larger slice fail with "invalid argument")
  if (dec_vec_words(out, slice) == 4) {
    err = allow_smem(dec_kernel<T, 4>, smem);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, dec_kernel<T, 4>, kThreads, smem);
  } else {
    err = allow_smem(dec_kernel<T, 1>, smem);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, dec_kernel<T, 1>, kThreads, smem);
  }
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  *max_blocks = per_sm * sms;
  return cudaSuccess;
}

}  // namespace

int dec_parts(int in) { return n_chunks(in); }

int dec_slice_size(int in, int out, int n_tb) {
  // multiple of 32 columns (16-byte loads) when possible, else of 8 (one residual word)
  const int unit = (out % 32 == 0) ? 32 : 8;
  return ceil_div(ceil_div(out, slices_per_chunk(in, n_tb)), unit) * unit;
}

size_t dec_smem_bytes(int in, int out, int k_chunk, int n_tb) {
  (void)k_chunk;
  return (size_t)dec_accs_floats(out, dec_slice_size(in, out, n_tb)) * 4;
}

cudaError_t dec_max_blocks(int device, int in, int out, int k_chunk, int n_tb, int* max_blocks) {
  return max_blocks_t<__half>(device, in, out, k_chunk, n_tb, max_blocks);
}

cudaError_t dec(DType dt, const void* x, const uint32_t* q_residual, const void* scales, const float* bounds, int M,
                int in, int out, int k_chunk, int n_tb, const Fused& fused, cudaStream_t stream) {
  if (M == 0 || out == 0) return cudaSuccess;
  return dt == DType::F16
             ? launch_dec<__half>(x, q_residual, scales, bounds, M, in, out, k_chunk, n_tb, fused, stream)
             : launch_dec<__nv_bfloat16>(x, q_residual, scales, bounds, M, in, out, k_chunk, n_tb, fused, stream);
}

cudaError_t dec_select_debug(DType dt, const void* x, const float* bounds, uint8_t* mask, int M, int in, int k_chunk,
                             cudaStream_t stream) {
  if (M == 0 || in == 0) return cudaSuccess;
  if (dt == DType::F16)
    dec_select_kernel<__half><<<1, kThreads, 0, stream>>>(static_cast<const __half*>(x), bounds, mask, M, in, k_chunk);
  else
    dec_select_kernel<__nv_bfloat16><<<1, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), bounds, mask,
                                                                 M, in, k_chunk);
  return cudaGetLastError();
}

}  // namespace decdec
