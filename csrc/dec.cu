// DEC: dynamic error compensation (DESIGN.md §2). One kernel, n_tb blocks; every block
//  1. computes the 32 bucket floors from bounds [a, b] with the reference's exact fp32 expressions
//     (__fadd_rn/__fmul_rn/__fdiv_rn: no FMA contraction),
//  2. selects, per 1024-channel chunk (one warp per chunk), exactly floor(k_chunk * L / 1024)
//     channels, bucket by bucket from bucket 0 (largest |x|); inside the overflow bucket the lowest
//     channel indices win (ballot ranks), which is the reference's choice, so the selection is
//     deterministic and identical to reference.select_channels. Every block computes the same list
//     (x is tiny and L2-resident), so blocks never wait for each other: no grid sync, no hang;
//  3. fetches only the selected rows of q_residual from pinned host memory (zero-copy over PCIe),
//     restricted to its own slice of the output columns: 16-byte loads, consecutive threads on
//     consecutive 16 bytes of a row, U independent loads per thread in flight;
//  4. accumulates x_j * (nibble - 8) in fp32, scales per output column and writes its slice
//     (standalone), or its fp32 partial + the fused combine (see kernels.h `Fused`).
#include <map>
#include <mutex>
#include <utility>

#include "common.cuh"

namespace decdec {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 1024;
constexpr int kHist = 34;  // 33 buckets (0..32) + pad
constexpr int kUnroll = 4;

__host__ __device__ inline int k_total(int k_chunk, int in) {
  return k_chunk * (in / kChunk) + k_chunk * (in % kChunk) / kChunk;
}

struct DecLayout {  // dynamic shared memory, in 4-byte units
  int floors, hist, o, need, go, gl, po, ps, bkt, flags, list, accs, total;
};
__host__ __device__ inline DecLayout dec_layout(int in, int ktot, int accs_floats) {
  const int nc = (in + kChunk - 1) / kChunk, ng = (in + 31) / 32;
  DecLayout l;
  l.floors = 0;
  l.hist = 32;                  // [nc][kHist] bucket counts per chunk
  l.o = l.hist + nc * kHist;    // [nc] overflow bucket (-1: quota 0)
  l.need = l.o + nc;            // [nc] channels taken from the overflow bucket
  l.go = l.need + nc;           // [ng] per 32-channel group: #channels in the overflow bucket
  l.gl = l.go + ng;             //      #channels in higher buckets
  l.po = l.gl + ng;             //      exclusive prefix of go inside the chunk
  l.ps = l.po + ng;             //      exclusive prefix of selected channels inside the chunk
  l.bkt = l.ps + ng;            // [in] bucket per channel (bytes)
  l.flags = l.bkt + (in + 3) / 4;
  l.list = l.flags + kThreads;
  l.accs = l.list + ((ktot + 3) & ~3);
  l.total = l.accs + accs_floats;
  return l;
}

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

// Selection of token m into list[0 .. k_total): chunk c's channels at list[c*k_chunk ...], in
// channel order. On DEC's critical path, so it avoids long dependent chains:
//  1. every thread: the buckets of 16 channels (independent binary searches), stored as bytes,
//     then the per-chunk bucket counts (warp-aggregated shared atomics); one barrier;
//  2. a warp per chunk, lane = 32-channel group: overflow bucket o and how many of it to take,
//     per-group counts with byte-SIMD compares, prefix scans across lanes, then each lane emits
//     its group's selected channels (lowest indices first inside bucket o, as the reference).
template <typename T>
__device__ void select_token(const T* __restrict__ xm, int in, int k_chunk, const float* __restrict__ bounds,
                             float* floors, int* mono_s, const DecLayout& Ly, int* sm, int* list) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nc = ceil_div(in, kChunk);
  int* hist = sm + Ly.hist;
  uint8_t* bkt = reinterpret_cast<uint8_t*>(sm + Ly.bkt);

  constexpr int PER = 16;
  for (int base = 0; base < in; base += kThreads * PER) {
    float ax[PER];
#pragma unroll
    for (int u = 0; u < PER; ++u) {  // all loads first
      const int i = base + u * kThreads + (int)threadIdx.x;
      ax[u] = i < in ? fabsf(to_f32(xm[i])) : 0.f;
    }
    if (base == 0) {  // floors (one more global load) while the x loads are in flight
      compute_floors(bounds, floors, mono_s);
      for (int i = threadIdx.x; i < nc * kHist; i += kThreads) hist[i] = 0;
      for (int i = in + (int)threadIdx.x; i < ceil_div(in, 32) * 32; i += kThreads) bkt[i] = 255;  // ragged tail
      __syncthreads();
    }
    const bool mono = *mono_s != 0;
    int bk[PER];
#pragma unroll
    for (int u = 0; u < PER; ++u) bk[u] = bucket_of(floors, mono, ax[u]);  // independent searches
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int g0 = base + u * kThreads + warp * 32;
      if (g0 >= in) break;  // warp-uniform
      const int i = g0 + lane;
      const int b = i < in ? bk[u] : 33;
      if (i < in) bkt[i] = (uint8_t)b;
      const unsigned peers = __match_any_sync(0xffffffffu, b);
      if (b < 33 && lane == __ffs(peers) - 1) atomicAdd(hist + (i >> 10) * kHist + b, __popc(peers));
    }
  }
  __syncthreads();
  for (int c = warp; c < nc; c += kWarps) {
    const int L = min(kChunk, in - c * kChunk), quota = k_chunk * L / kChunk;
    if (quota == 0) continue;  // warp-uniform
    int cum = hist[c * kHist + lane];
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, cum, off);
      if (lane >= off) cum += v;
    }
    const unsigned reach = __ballot_sync(0xffffffffu, cum >= quota);
    const int o = reach ? __ffs(reach) - 1 : 32;  // bucket 32 (if any) holds the rest: quota <= L
    const int before = __shfl_sync(0xffffffffu, cum, o > 0 ? min(o - 1, 31) : 0);
    const int need = quota - (o > 0 ? before : 0);
    // lane = group g of the chunk: its 32 bucket bytes (255 beyond `in`)
    const int g = c * 32 + lane;
    const bool gv = g * 32 < in;
    uint32_t wb[8];
    if (gv) {
      const uint4 q0 = *reinterpret_cast<const uint4*>(bkt + g * 32);
      const uint4 q1 = *reinterpret_cast<const uint4*>(bkt + g * 32 + 16);
      wb[0] = q0.x; wb[1] = q0.y; wb[2] = q0.z; wb[3] = q0.w; wb[4] = q1.x; wb[5] = q1.y; wb[6] = q1.z; wb[7] = q1.w;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) wb[j] = 0xFFFFFFFFu;
    }
    const uint32_t o4 = 0x01010101u * (uint32_t)o;
    int n_eq = 0, n_lt = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      n_eq += __popc(__vcmpeq4(wb[j], o4)) >> 3;
      n_lt += __popc(__vcmpltu4(wb[j], o4)) >> 3;
    }
    int so = n_eq;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, so, off);
      if (lane >= off) so += v;
    }
    const int po = so - n_eq;                        // bucket-o channels in earlier groups
    const int take = max(0, min(need - po, n_eq));   // of this group's bucket-o channels
    const int n_sel = n_lt + take;
    int ss = n_sel;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, ss, off);
      if (lane >= off) ss += v;
    }
    int pos = c * k_chunk + ss - n_sel, taken = 0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int b = (wb[j >> 2] >> (8 * (j & 3))) & 0xFF;
      const bool is_o = b == o;
      const bool sel = b < o || (is_o && taken < take);
      taken += is_o;
      if (sel) list[pos++] = g * 32 + j;
    }
  }
}

template <typename T, int VW>
__global__ void __launch_bounds__(kThreads)
    dec_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qr, const T* __restrict__ scales,
               const float* __restrict__ bounds, T* __restrict__ y, int M, int in, int out, int k_chunk, int slice,
               Fused fused) {
  extern __shared__ __align__(16) int sm[];
  const int ktot = k_total(k_chunk, in);
  const int accs_n = dec_accs_floats(out, slice);
  const DecLayout L = dec_layout(in, ktot, accs_n);
  float* floors = reinterpret_cast<float*>(sm + L.floors);
  int* flags = sm + L.flags;
  int* list = sm + L.list;
  float* accs = reinterpret_cast<float*>(sm + L.accs);
  __shared__ int mono;

  const int o_lo = blockIdx.x * slice;
  if (o_lo >= out) return;  // no columns for this block (n_tb * slice > out); it takes no part
  const int o_hi = min(out, o_lo + slice);
  const int ow = out / 8;               // words per residual row
  const int w_lo = o_lo / 8;
  const int V = ((o_hi - o_lo) / 8) / VW;  // vectors per row in this slice
  const bool use_accs = accs_n > 0;  // several row groups per column vector, reduced in smem
  const int VB = max(1, min(V, kThreads));
  const int G = use_accs ? kThreads / VB : 1;
  const int g = threadIdx.x / VB, vl = threadIdx.x % VB;

  for (int m = 0; m < M; ++m) {
    const T* xm = x + (size_t)m * in;
    select_token(xm, in, k_chunk, bounds, floors, &mono, L, sm, list);
    __syncthreads();

    float* dst32 = fused.on() ? fused.dpart + (size_t)m * out : nullptr;
    T* dst = y + (size_t)m * out;
    if (g < G) {
      for (int v = vl; v < V; v += VB) {
        float acc[VW * 8];
#pragma unroll
        for (int i = 0; i < VW * 8; ++i) acc[i] = 0.f;
        const uint32_t* colp = qr + w_lo + v * VW;
        for (int s0 = g; s0 < ktot; s0 += G * kUnroll) {
          uint32_t wv[kUnroll][VW];
          float xv[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {  // all loads first: U x 16 bytes in flight
            const int s = s0 + u * G;
            if (s < ktot) {
              const int row = list[s];
              xv[u] = to_f32(xm[row]);
              const uint32_t* p = colp + (size_t)row * ow;
              if constexpr (VW == 4) {
                uint4 t;
                asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                             : "=r"(t.x), "=r"(t.y), "=r"(t.z), "=r"(t.w) : "l"(p));
                wv[u][0] = t.x; wv[u][1] = t.y; wv[u][2] = t.z; wv[u][3] = t.w;
              } else {
                uint32_t t;
                asm volatile("ld.global.L1::no_allocate.u32 %0, [%1];" : "=r"(t) : "l"(p));
                wv[u][0] = t;
              }
            } else {
              xv[u] = 0.f;
#pragma unroll
              for (int i = 0; i < VW; ++i) wv[u][i] = 0x88888888u;  // nibbles 8 -> level 0
            }
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int i = 0; i < VW; ++i)
#pragma unroll
              for (int n = 0; n < 8; ++n) {
                // exact (nibble - 8) as float: 2^23 + nibble, minus 2^23 + 8
                const float lv = __int_as_float(0x4B000000 | ((wv[u][i] >> (4 * n)) & 0xFu)) - 8388616.0f;
                acc[i * 8 + n] = fmaf(lv, xv[u], acc[i * 8 + n]);
              }
        }
        const int c0 = (v * VW) * 8;  // column offset inside the slice
        if (use_accs) {  // here V <= 128, so v == vl: one vector per thread
#pragma unroll
          for (int i = 0; i < VW * 8; ++i) accs[(g * VB + vl) * (VW * 8 + 1) + i] = acc[i];
        } else {
#pragma unroll
          for (int i = 0; i < VW * 8; ++i) {
            const int col = o_lo + c0 + i;
            const float d = acc[i] * to_f32(scales[col]);
            if (dst32) dst32[col] = d;
            else dst[col] = from_f32<T>(d);
          }
        }
      }
    }
    if (use_accs) {
      __syncthreads();
      for (int i = threadIdx.x; i < o_hi - o_lo; i += kThreads) {
        const int col = o_lo + i, v = i / (VW * 8), e = i % (VW * 8);
        float sum = 0.f;
        for (int gg = 0; gg < G; ++gg) sum += accs[(gg * VB + v) * (VW * 8 + 1) + e];
        const float d = sum * to_f32(scales[col]);
        if (dst32) dst32[col] = d;
        else dst[col] = from_f32<T>(d);
      }
    }
    if (fused.on()) {
      fused_arrive<T>(fused, m, o_lo / fused.tile_rows, (o_hi - 1) / fused.tile_rows + 1, out, flags);
    }
    __syncthreads();  // list / accs reused by the next token
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dec_select_kernel(const T* __restrict__ x, const float* __restrict__ bounds, uint8_t* __restrict__ mask, int M,
                      int in, int k_chunk) {
  extern __shared__ __align__(16) int sm[];
  const int ktot = k_total(k_chunk, in);
  const DecLayout L = dec_layout(in, ktot, 0);
  float* floors = reinterpret_cast<float*>(sm + L.floors);
  __shared__ int mono;
  for (int m = 0; m < M; ++m) {
    select_token(x + (size_t)m * in, in, k_chunk, bounds, floors, &mono, L, sm, sm + L.list);
    for (int i = threadIdx.x; i < in; i += kThreads) mask[(size_t)m * in + i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < ktot; i += kThreads) mask[(size_t)m * in + sm[L.list + i]] = 1;
    __syncthreads();
  }
}

// cudaFuncSetAttribute only when a kernel needs more dynamic shared memory than it was allowed
// before (per device); it is not free, and decoding launches these kernels thousands of times.
template <typename K>
cudaError_t allow_smem(K* kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, size_t> allowed;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mu);
  size_t& a = allowed[{dev, reinterpret_cast<const void*>(kernel)}];
  if (a >= smem) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err == cudaSuccess) a = smem;
  return err;
}

template <typename T>
cudaError_t launch_dec(const void* x, const uint32_t* qr, const void* scales, const float* bounds, void* y, int M,
                       int in, int out, int k_chunk, int n_tb, const Fused& fused, cudaStream_t stream) {
  const int slice = dec_slice_size(out, n_tb);
  const size_t smem = dec_smem_bytes(in, out, k_chunk, n_tb);
  const int vw = dec_vec_words(out, slice);
  cudaError_t err;
  if (vw == 4) {
    err = allow_smem(dec_kernel<T, 4>, smem);
    if (err != cudaSuccess) return err;
    dec_kernel<T, 4><<<n_tb, kThreads, smem, stream>>>(static_cast<const T*>(x), qr, static_cast<const T*>(scales),
                                                        bounds, static_cast<T*>(y), M, in, out, k_chunk, slice, fused);
  } else {
    err = allow_smem(dec_kernel<T, 1>, smem);
    if (err != cudaSuccess) return err;
    dec_kernel<T, 1><<<n_tb, kThreads, smem, stream>>>(static_cast<const T*>(x), qr, static_cast<const T*>(scales),
                                                        bounds, static_cast<T*>(y), M, in, out, k_chunk, slice, fused);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t max_blocks_t(int device, int in, int out, int k_chunk, int n_tb, int* max_blocks) {
  const int slice = dec_slice_size(out, n_tb);
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

int dec_slice_size(int out, int n_tb) {
  // multiple of 32 columns (16-byte loads) when possible, else of 8 (one residual word)
  const int unit = (out % 32 == 0) ? 32 : 8;
  return ceil_div(ceil_div(out, n_tb), unit) * unit;
}

size_t dec_smem_bytes(int in, int out, int k_chunk, int n_tb) {
  const int slice = dec_slice_size(out, n_tb);
  return (size_t)dec_layout(in, k_total(k_chunk, in), dec_accs_floats(out, slice)).total * 4;
}

cudaError_t dec_max_blocks(int device, int in, int out, int k_chunk, int n_tb, int* max_blocks) {
  return max_blocks_t<__half>(device, in, out, k_chunk, n_tb, max_blocks);
}

cudaError_t dec(DType dt, const void* x, const uint32_t* q_residual, const void* scales, const float* bounds,
                void* y, int M, int in, int out, int k_chunk, int n_tb, const Fused& fused, cudaStream_t stream) {
  if (M == 0 || out == 0) return cudaSuccess;
  return dt == DType::F16
             ? launch_dec<__half>(x, q_residual, scales, bounds, y, M, in, out, k_chunk, n_tb, fused, stream)
             : launch_dec<__nv_bfloat16>(x, q_residual, scales, bounds, y, M, in, out, k_chunk, n_tb, fused, stream);
}

cudaError_t dec_select_debug(DType dt, const void* x, const float* bounds, uint8_t* mask, int M, int in, int k_chunk,
                             cudaStream_t stream) {
  if (M == 0 || in == 0) return cudaSuccess;
  const size_t smem = (size_t)dec_layout(in, k_total(k_chunk, in), 0).total * 4;
  cudaError_t err;
  if (dt == DType::F16) {
    err = allow_smem(dec_select_kernel<__half>, smem);
    if (err != cudaSuccess) return err;
    dec_select_kernel<__half><<<1, kThreads, smem, stream>>>(static_cast<const __half*>(x), bounds, mask, M, in, k_chunk);
  } else {
    err = allow_smem(dec_select_kernel<__nv_bfloat16>, smem);
    if (err != cudaSuccess) return err;
    dec_select_kernel<__nv_bfloat16><<<1, kThreads, smem, stream>>>(static_cast<const __nv_bfloat16*>(x), bounds, mask,
                                                                    M, in, k_chunk);
  }
  return cudaGetLastError();
}

}  // namespace decdec
