// Decode attention: one query token per sequence against its KV cache, grouped-query, in one launch.
//
// y[b, h] = softmax_j(q[b, h] . K[b, g, j] * scale) V[b, g, j] over the cache rows j in [lo, pos]
// (lo = 0, or pos - window + 1 under a sliding window), g = h / rep (rep = H / Hkv query heads per KV
// head). `pos` is read on the device, so one recorded CUDA graph serves every decode step.
//
// Split over cache rows ("flash decoding"): block (s, g, b) takes rows [s * split, (s + 1) * split)
// of [lo, pos] for all rep query heads of KV head g, so each K/V row is read once for its rep heads.
// Its warps take batches of kAttnRows rows (all loads of a batch issued before any math: a row at a
// time left the kernel latency-bound, 34 us per call on an H200 for 88 rows), each warp with an online
// softmax (lane l holds dims l + 32 i);
// the block merges its warps in shared memory. When [lo, pos] spans one split that block writes y;
// otherwise every active block writes (acc[Dh], m, l) per head to `part`, and the last to arrive at
// the (b, g) counter merges the splits in split order (deterministic), writes y and resets the counter
// to zero (no memset, nothing spins). Blocks whose split holds no row of [lo, pos] exit at once.
//
// ROPE (decode_attention_rope): q, k and v come unrotated from the qkv projection's output row ([q | k | v], row
// stride `qs`), the kernel applies RoPE (rotate_half over the first R dims, the model's apply_rope: fp32 x * cos +
// rotate_half(x) * sin, rounded to T) to q, and the block whose split holds pos also to k: it writes k and v into the
// caches at row pos (the KV-cache update of the step) and attends to that row from its registers after the loop over
// the cached rows, so no block reads a row that this kernel writes. Every load of q, its rotate_half partners, cos /
// sin and the step's k / v row is issued before any is used (13.5 -> 9.8 us per call at L = 144, pos = 72 on an
// H200, against 8.7 for decode_attention; docs/PERF.md, Kernels, session 18).
#include "common.cuh"

namespace decdec {
namespace {

constexpr int kAttnWarps = 4;
constexpr int kAttnRows = 4;    // cache rows a warp loads at once (their loads are in flight together)
constexpr int kAttnBatch = kAttnWarps * kAttnRows;  // rows per block per batch; a split is a multiple of it
constexpr int kAttnMaxSplits = 64;  // the last block merges at most this many partials
constexpr int kAttnMaxRep = 8;  // query heads per KV head

// REP: query heads per KV head as a compile-time constant (1, 2, 3, 4, 8 at head_dim 64 or 128: every loop over
// the heads unrolls without a branch, so the score shuffles of all heads and rows interleave), or 0: H / Hkv at
// run time, loops to kAttnMaxRep with a guard (the score reductions then run head by head behind branches).
// RoPE of element d of a head (rotate_half over the first R dims; d >= R passes) from its value x and its partner's
// (element d + R / 2 or d - R / 2): fp32 x * cos + (-+partner) * sin with separate roundings (no FMA contraction),
// as the model's apply_rope computes it, rounded to T.
template <typename T>
__device__ __forceinline__ T rope_elem(T x, T partner, int d, const Rope& rp, float c, float s) {
  if (d >= rp.R) return x;
  const float pv = d < (rp.R >> 1) ? -to_f32(partner) : to_f32(partner);
  return from_f32<T>(__fadd_rn(__fmul_rn(to_f32(x), c), __fmul_rn(pv, s)));
}

template <typename T, int DPL, int REP, bool ROPE = false>
__global__ void __launch_bounds__(kAttnWarps * 32)
    decode_attention_kernel(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                            const int64_t* __restrict__ pos_ptr, T* __restrict__ y, float* __restrict__ part,
                            int* __restrict__ counters, int H, int Hkv, int L, int Dh, int window, float scale,
                            int split, int n_splits, Rope rp, bool early) {
  constexpr int NR = REP ? REP : kAttnMaxRep;  // query heads the loops cover
  __shared__ float s_acc[kAttnWarps][NR][DPL * 32];
  __shared__ float s_m[kAttnWarps][NR], s_l[kAttnWarps][NR];
  __shared__ int s_last;
  const int s = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int rep = REP ? REP : H / Hkv;
  pdl_wait();               // q, pos and the cache row come from the kernel before (launched as its dependent)
  pdl_launch_dependents();  // the next kernel (the o projection's GEMV) may start loading its weights now
  const int64_t p64 = pos_ptr[0];  // issued with the q loads below (measured the same per call as after them)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // q (ROPE: also its partners, cos / sin, and this step's k / v row, which only the block holding pos uses): every
  // load issued (clamped addresses, no branch) before any is used, and before pos is known
  T qraw[NR][DPL], qpar[NR][DPL], knew[DPL], kpar[DPL], vnew[DPL];
  float cs[DPL], sn[DPL];
  int par[DPL];  // ROPE: the index of element d's partner (clamped to d's own past R)
  if constexpr (ROPE) {
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i, dd = d < Dh ? d : 0, h = rp.R >> 1, dr = dd < rp.R ? dd : 0;
      par[i] = dd < h ? dd + h : (dd < rp.R ? dd - h : dd);
      cs[i] = rp.cos[dr];
      sn[i] = rp.sin[dr];
    }
  }
  const T* qb = ROPE ? q + (size_t)b * rp.qs + (size_t)g * rep * Dh : q + ((size_t)b * H + g * rep) * Dh;
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      const int rr = (REP || r < rep) ? r : 0, dd = d < Dh ? d : 0;
      qraw[r][i] = qb[(size_t)rr * Dh + dd];
      if constexpr (ROPE) qpar[r][i] = qb[(size_t)rr * Dh + par[i]];
    }
  if constexpr (ROPE) {
    const T* kq = q + (size_t)b * rp.qs + (size_t)H * Dh + (size_t)g * Dh;
    const T* vq = kq + (size_t)Hkv * Dh;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i, dd = d < Dh ? d : 0;
      knew[i] = kq[dd];
      kpar[i] = kq[par[i]];
      vnew[i] = vq[dd];
    }
  }
  float qr[NR][DPL];
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      if constexpr (ROPE) qraw[r][i] = rope_elem(qraw[r][i], qpar[r][i], d, rp, cs[i], sn[i]);
      qr[r][i] = ((REP || r < rep) && d < Dh) ? to_f32(qraw[r][i]) * scale : 0.f;
    }
  const int pos = p64 < 0 ? 0 : (p64 >= L ? L - 1 : (int)p64);  // clamped: never reads outside the cache
  const int lo = window > 0 ? max(0, pos - window + 1) : 0;
  const int first = lo / split, last = pos / split;
  if (s < first || s > last) return;
  const int n_active = last - first + 1;
  const int j0 = max(lo, s * split), j1 = min(pos, s * split + split - 1);  // inclusive
  float m[NR], l[NR], acc[NR][DPL];
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[r][i] = 0.f;
  }
  const size_t head = ((size_t)b * Hkv + g) * L * Dh;
  // ROPE: the block whose split holds pos attends to that row after its loop, from the registers, and warp 0 writes it
  // into the caches there (so no block reads a row this kernel writes, and the loop below is the plain kernel's)
  const bool has_pos = ROPE && s == last;
  const int jl = has_pos ? j1 - 1 : j1;  // the loop's last row (pos == j1 in the block that holds it)
  for (int jb = j0 + warp * kAttnRows; jb <= jl; jb += kAttnBatch) {
    T kr[kAttnRows][DPL], vr[kAttnRows][DPL];  // all loads of the batch first
#pragma unroll
    for (int t = 0; t < kAttnRows; ++t)
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int d = lane + 32 * i;
        const bool ok = jb + t <= jl && d < Dh;
        const size_t at = head + (size_t)(jb + t) * Dh + d;
        kr[t][i] = ok ? kc[at] : from_f32<T>(0.f);
        vr[t][i] = ok ? vc[at] : from_f32<T>(0.f);
      }
    float sc[kAttnRows][NR];
#pragma unroll
    for (int t = 0; t < kAttnRows; ++t)
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        float acc_s = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc_s = fmaf(qr[r][i], to_f32(kr[t][i]), acc_s);
        sc[t][r] = acc_s;
      }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int t = 0; t < kAttnRows; ++t)
#pragma unroll
        for (int r = 0; r < NR; ++r)
          if (REP || r < rep) sc[t][r] += __shfl_xor_sync(0xffffffffu, sc[t][r], off);
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      if (!REP && r >= rep) continue;
      float mx = m[r];
#pragma unroll
      for (int t = 0; t < kAttnRows; ++t)
        if (jb + t <= jl) mx = fmaxf(mx, sc[t][r]);
      const float c = __expf(m[r] - mx);
      l[r] *= c;
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[r][i] *= c;
#pragma unroll
      for (int t = 0; t < kAttnRows; ++t) {
        if (jb + t > jl) continue;
        const float p = __expf(sc[t][r] - mx);
        l[r] += p;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[r][i] = fmaf(p, to_f32(vr[t][i]), acc[r][i]);
      }
      m[r] = mx;
    }
  }
  if (ROPE && has_pos && warp == 0) {  // row pos: k rotated, both rows written, then attended (warp 0 may have seen
                                       // no row before it)
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      knew[i] = d < Dh ? rope_elem(knew[i], kpar[i], d, rp, cs[i], sn[i]) : from_f32<T>(0.f);
      vnew[i] = d < Dh ? vnew[i] : from_f32<T>(0.f);  // past Dh: zero, as the loop's loads
      if (d < Dh) {
        static_cast<T*>(rp.k_out)[head + (size_t)pos * Dh + d] = knew[i];
        static_cast<T*>(rp.v_out)[head + (size_t)pos * Dh + d] = vnew[i];
      }
    }
    float sp[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      float acc_s = 0.f;
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc_s = fmaf(qr[r][i], to_f32(knew[i]), acc_s);
      sp[r] = acc_s;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int r = 0; r < NR; ++r)
        if (REP || r < rep) sp[r] += __shfl_xor_sync(0xffffffffu, sp[r], off);
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      if (!REP && r >= rep) continue;
      const float mx = fmaxf(m[r], sp[r]), c = __expf(m[r] - mx), p = __expf(sp[r] - mx);
      l[r] = l[r] * c + p;
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[r][i] = fmaf(p, to_f32(vnew[i]), acc[r][i] * c);
      m[r] = mx;
    }
  }
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    if (!REP && r >= rep) continue;
#pragma unroll
    for (int i = 0; i < DPL; ++i) s_acc[warp][r][lane + 32 * i] = acc[r][i];
    if (lane == 0) {
      s_m[warp][r] = m[r];
      s_l[warp][r] = l[r];
    }
  }
  __syncthreads();

  // merge the warps: (r, d) per thread; warp 0 always saw a row, so mx is finite
  const size_t yrow = (size_t)b * H + (size_t)g * rep;
  float* my_part = part + (((size_t)b * Hkv + g) * n_splits + s) * rep * (Dh + 2);
  for (int idx = threadIdx.x; idx < rep * Dh; idx += blockDim.x) {
    const int r = idx / Dh, d = idx - r * Dh;
    float mx = s_m[0][r];
#pragma unroll
    for (int w = 1; w < kAttnWarps; ++w) mx = fmaxf(mx, s_m[w][r]);
    float num = 0.f, den = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      const float e = __expf(s_m[w][r] - mx);
      num = fmaf(s_acc[w][r][d], e, num);
      den = fmaf(s_l[w][r], e, den);
    }
    if (n_active == 1) {
      y[(yrow + r) * Dh + d] = from_f32<T>(num / den);
    } else {
      float* pr = my_part + (size_t)r * (Dh + 2);
      pr[d] = num;
      if (d == 0) {
        pr[Dh] = mx;
        pr[Dh + 1] = den;
      }
    }
  }
  if (n_active == 1) return;
  // Release / acquire as fused_arrive does it: the barrier orders the block's partial stores before thread
  // 0's acq_rel atomic (no fence in every thread); the last arrival's barrier after it makes the other
  // blocks' partials visible to all its threads.
  __syncthreads();
  int* counter = counters + (size_t)b * Hkv + g;
  if (threadIdx.x == 0) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
    s_last = old == n_active - 1;
  }
  __syncthreads();
  if (!s_last) return;
  // The last block merges the splits: every split's (m, l) into shared memory at once (one load per
  // thread), per-split weights exp(m - M) / den by one warp per head, then each output's acc of all
  // splits with independent loads (a loop of dependent L2 loads per output made v2 take 13 us). With `early` and at
  // most kPreSplits splits, the acc loads are issued together with the (m, l) loads, into registers, so the merge
  // waits for one L2 round trip instead of two; the sums are the same, in the same order.
  const float* gpart = part + ((size_t)b * Hkv + g) * n_splits * rep * (Dh + 2);
  const size_t stride = (size_t)rep * (Dh + 2);  // between splits
  __shared__ float s_sm[kAttnMaxSplits * kAttnMaxRep], s_sl[kAttnMaxSplits * kAttnMaxRep];
  constexpr int kPreSplits = 8, kPreOut = 4;
  // (the common layouts only: REP fixed; the generic ones have no registers to spare)
  const bool pre = REP != 0 && early && n_active <= kPreSplits && rep * Dh <= kPreOut * kAttnWarps * 32;
  float acc_pre[kPreOut][kPreSplits];
  if (REP != 0 && pre) {
#pragma unroll
    for (int k = 0; k < kPreOut; ++k) {
      const int idx = threadIdx.x + k * kAttnWarps * 32, r = idx / Dh, d = idx - r * Dh;
      const float* pa = gpart + (size_t)first * stride + (size_t)r * (Dh + 2) + d;
#pragma unroll
      for (int t = 0; t < kPreSplits; ++t)
        acc_pre[k][t] = (idx < rep * Dh && t < n_active) ? __ldcg(pa + t * stride) : 0.f;
    }
  }
  for (int i = threadIdx.x; i < n_active * rep; i += blockDim.x) {
    const float* pr = gpart + (size_t)(first + i / rep) * stride + (size_t)(i % rep) * (Dh + 2);
    s_sm[i] = __ldcg(pr + Dh);
    s_sl[i] = __ldcg(pr + Dh + 1);
  }
  __syncthreads();
  for (int r = warp; r < rep; r += kAttnWarps) {
    float mx = -INFINITY;
    for (int t = lane; t < n_active; t += 32) mx = fmaxf(mx, s_sm[t * rep + r]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float den = 0.f;
    for (int t = lane; t < n_active; t += 32) den = fmaf(__expf(s_sm[t * rep + r] - mx), s_sl[t * rep + r], den);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) den += __shfl_xor_sync(0xffffffffu, den, off);
    __syncwarp();
    for (int t = lane; t < n_active; t += 32) s_sm[t * rep + r] = __expf(s_sm[t * rep + r] - mx) / den;  // weight
  }
  __syncthreads();
  if (REP != 0 && pre) {
#pragma unroll
    for (int k = 0; k < kPreOut; ++k) {
      const int idx = threadIdx.x + k * kAttnWarps * 32, r = idx / Dh, d = idx - r * Dh;
      if (idx >= rep * Dh) continue;
      float o = 0.f;
#pragma unroll
      for (int t = 0; t < kPreSplits; ++t)
        if (t < n_active) o = fmaf(s_sm[t * rep + r], acc_pre[k][t], o);
      y[(yrow + r) * Dh + d] = from_f32<T>(o);
    }
  } else {
#pragma unroll 4
    for (int idx = threadIdx.x; idx < rep * Dh; idx += blockDim.x) {
      const int r = idx / Dh, d = idx - r * Dh;
      const float* pa = gpart + (size_t)first * stride + (size_t)r * (Dh + 2) + d;
      float o = 0.f;
#pragma unroll 8
      for (int t = 0; t < n_active; ++t) o = fmaf(s_sm[t * rep + r], __ldcg(pa + (size_t)t * stride), o);
      y[(yrow + r) * Dh + d] = from_f32<T>(o);
    }
  }
  if (threadIdx.x == 0) *counter = 0;
}

// The merge's acc loads beside its (m, l) loads (the kernel's `early`); DECDEC_ATTN_MERGE_EARLY=0 turns it off (A/B).
bool attn_merge_early() {
  static const bool on = env_knob_on("DECDEC_ATTN_MERGE_EARLY");
  return on;
}

template <typename T, int DPL, int REP, bool ROPE>
cudaError_t launch_attention(const void* q, const void* k_cache, const void* v_cache, const int64_t* pos, void* y,
                             float* part, int* counters, int B, int H, int Hkv, int L, int Dh, int window,
                             const Rope& rp, cudaStream_t stream) {
  const int split = decode_attention_split_rows(L), n_splits = ceil_div(L, split);
  const dim3 grid(n_splits, Hkv, B);
  // a programmatic dependent of the kernel before it (it waits for it first thing), so its launch overlaps
  // that kernel's tail; it lets the next kernel start early in turn (pdl_launch_dependents)
  return launch_gemv_kernel(decode_attention_kernel<T, DPL, REP, ROPE>, grid, dim3(kAttnWarps * 32), 0, stream,
                            static_cast<const T*>(q), static_cast<const T*>(k_cache),
                            static_cast<const T*>(v_cache), pos, static_cast<T*>(y), part, counters, H, Hkv, L, Dh,
                            window, 1.0f / sqrtf((float)Dh), split, n_splits, rp, attn_merge_early());
}

template <typename T, bool ROPE>
cudaError_t dispatch_attention(const void* q, const void* k_cache, const void* v_cache, const int64_t* pos, void* y,
                               float* part, int* counters, int B, int H, int Hkv, int L, int Dh, int window,
                               const Rope& rp, cudaStream_t stream) {
  const int dpl = ceil_div(Dh, 32), rep = H / Hkv;
#define DD_ATTN_REP(n, r)                                                                                   \
  if (dpl == n && rep == r)                                                                                 \
    return launch_attention<T, n, r, ROPE>(q, k_cache, v_cache, pos, y, part, counters, B, H, Hkv, L, Dh, window, \
                                           rp, stream);
  // the common layouts (head_dim 64 / 128; 1, 2, 3, 4 or 8 query heads per KV head) with REP fixed
  DD_ATTN_REP(2, 1) DD_ATTN_REP(2, 2) DD_ATTN_REP(2, 3) DD_ATTN_REP(2, 4) DD_ATTN_REP(2, 8)
  DD_ATTN_REP(4, 1) DD_ATTN_REP(4, 2) DD_ATTN_REP(4, 3) DD_ATTN_REP(4, 4) DD_ATTN_REP(4, 8)
#undef DD_ATTN_REP
  switch (dpl) {
#define DD_ATTN(n)                                                                                                 \
  case n:                                                                                                          \
    return launch_attention<T, n, 0, ROPE>(q, k_cache, v_cache, pos, y, part, counters, B, H, Hkv, L, Dh, window, \
                                           rp, stream);
    DD_ATTN(1) DD_ATTN(2) DD_ATTN(3) DD_ATTN(4) DD_ATTN(5) DD_ATTN(6) DD_ATTN(7) DD_ATTN(8)
#undef DD_ATTN
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool decode_attention_supported(int H, int Hkv, int Dh) {
  return H > 0 && Hkv > 0 && H % Hkv == 0 && H / Hkv <= kAttnMaxRep && Dh > 0 && Dh <= 256;
}

// Rows per block: kAttnBatch (16) while that gives <= kAttnMaxSplits blocks per head, else the multiple of
// kAttnBatch that does (L = 4096: 64 rows per block, each warp takes 4 batches).
int decode_attention_split_rows(int L) { return kAttnBatch * ceil_div(ceil_div(L, kAttnBatch), kAttnMaxSplits); }

int decode_attention_splits(int L) { return ceil_div(L, decode_attention_split_rows(L)); }

size_t decode_attention_part_floats(int B, int H, int Hkv, int L, int Dh) {
  return (size_t)B * Hkv * decode_attention_splits(L) * (H / Hkv) * (Dh + 2);
}

cudaError_t decode_attention(DType dt, const void* q, const void* k_cache, const void* v_cache, const int64_t* pos,
                             void* y, float* part, int* counters, int B, int H, int Hkv, int L, int Dh, int window,
                             cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (!decode_attention_supported(H, Hkv, Dh) || L <= 0) return cudaErrorInvalidValue;
  return dt == DType::F16 ? dispatch_attention<__half, false>(q, k_cache, v_cache, pos, y, part, counters, B, H, Hkv,
                                                             L, Dh, window, Rope{}, stream)
                          : dispatch_attention<__nv_bfloat16, false>(q, k_cache, v_cache, pos, y, part, counters, B,
                                                                     H, Hkv, L, Dh, window, Rope{}, stream);
}

cudaError_t decode_attention_rope(DType dt, const void* qkv, int64_t qkv_stride, const float* cos, const float* sin,
                                  int R, void* k_cache, void* v_cache, const int64_t* pos, void* y, float* part,
                                  int* counters, int B, int H, int Hkv, int L, int Dh, int window, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (!decode_attention_supported(H, Hkv, Dh) || L <= 0 || R < 0 || R > Dh || R % 2 != 0 ||
      qkv_stride < (int64_t)(H + 2 * Hkv) * Dh)
    return cudaErrorInvalidValue;
  const Rope rp{qkv_stride, cos, sin, R, k_cache, v_cache};
  if (dt == DType::F16)
    return dispatch_attention<__half, true>(qkv, k_cache, v_cache, pos, y, part, counters, B, H, Hkv, L, Dh, window,
                                            rp, stream);
  return dispatch_attention<__nv_bfloat16, true>(qkv, k_cache, v_cache, pos, y, part, counters, B, H, Hkv, L, Dh,
                                                 window, rp, stream);
}

}  // namespace decdec
