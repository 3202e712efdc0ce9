// Device helpers shared by the kernel files (header-only, device functions only: each .cu keeps
// its own __global__ kernels and their launches, see DESIGN.md §5 on CUDA 13 template stubs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

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

// Combine (see kernels.h `Fused`). Called by every thread of a block after it stored its partial
// for the tiles [t0, t1) of token m. The last one to arrive at a tile writes y there. kRows: rows
// per thread whose loads are in flight together (kernels with few spare registers pass 2).
template <typename T, int kRows = 8>
__device__ void fused_arrive(const Fused& f, int m, int t0, int t1, int out, int* s_flags /* smem, blockDim ints */) {
  const int n_tiles = ceil_div(out, f.tile_rows);
  // Release/acquire as CUTLASS's and cooperative groups' grid barriers do it: a block barrier, then
  // one thread per tile does an acq_rel atomic (releasing the whole block's partial stores, which
  // the barrier ordered before it; acquiring the other arrivals' stores), then a block barrier
  // before anyone reads. No full fence in every thread (the probe measured the old way at ~3 us).
  __syncthreads();
  const float* g = f.gpart ? f.gpart + (size_t)m * out : nullptr;
  T* y = reinterpret_cast<T*>(f.y) + (size_t)m * out;
  for (int tb = t0; tb < t1; tb += blockDim.x) {  // batches of blockDim tiles
    const int t = tb + (int)threadIdx.x;
    if (t < t1) {
      const int lo = t * f.tile_rows, hi = min(out, lo + f.tile_rows);
      const int expected = (g ? 1 : 0) + f.dec_parts * n_overlap(lo, hi, f.dec_slice);
      int* c = f.counters + (size_t)m * n_tiles + t;
      int old;
      asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(old) : "l"(c) : "memory");
      const bool last = old == expected - 1;
      if (last) *c = 0;  // everyone else has arrived: reset for the next call (ordered by the kernel end)
      s_flags[threadIdx.x] = last;
    }
    __syncthreads();
    // the rows of this batch's tiles, flagged or not, spread over the threads; kRows rows' loads
    // (gemv, the chunk partials, the scale) are issued before any is used, so a block that
    // combines many tiles pays a few L2 round trips, not one per tile
    constexpr int kParts = 4;
    const int lo_b = tb * f.tile_rows, hi_b = min(out, min(t1, tb + (int)blockDim.x) * f.tile_rows);
    const T* scales = reinterpret_cast<const T*>(f.dec_scales);
    for (int r0 = lo_b + (int)threadIdx.x; r0 < hi_b; r0 += kRows * (int)blockDim.x) {
      float gv[kRows], dv[kRows], sv[kRows];
      bool on[kRows];
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int r = r0 + u * (int)blockDim.x;
        on[u] = r < hi_b && s_flags[(r - lo_b) / f.tile_rows];
        gv[u] = on[u] && g ? __ldcg(g + r) : 0.f;
        sv[u] = on[u] ? to_f32(scales[r]) : 0.f;
        dv[u] = 0.f;
      }
      for (int p0 = 0; p0 < f.dec_parts; p0 += kParts) {  // chunk partials, summed in chunk order
        float t[kRows][kParts];
#pragma unroll
        for (int u = 0; u < kRows; ++u)
#pragma unroll
          for (int q = 0; q < kParts; ++q)
            t[u][q] = on[u] && p0 + q < f.dec_parts
                          ? __ldcg(f.dpart + ((size_t)(p0 + q) * f.n_tokens + m) * out + r0 + u * (int)blockDim.x)
                          : 0.f;
#pragma unroll
        for (int u = 0; u < kRows; ++u)
#pragma unroll
          for (int q = 0; q < kParts; ++q) dv[u] += t[u][q];
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u)
        if (on[u]) y[r0 + u * (int)blockDim.x] = from_f32<T>(g ? fmaf(dv[u], sv[u], gv[u]) : dv[u] * sv[u]);
    }
    __syncthreads();  // s_flags reused by the next batch
  }
}

// fused_arrive as a real call (noinline): for kernels whose registers the inlined combine inflates
// (lutgemm 3-bit: 72 registers with it inlined, 54 with the call). Compared in scripts/lutgemm_ab.cu.
template <typename T, int kRows>
__device__ __noinline__ void fused_arrive_call(const Fused& f, int m, int t0, int t1, int out, int* s_flags) {
  fused_arrive<T, kRows>(f, m, t0, t1, out, s_flags);
}

// ---- 3-bit PRMT register-LUT decode (the ap GEMVs; any 3-bit code with an 8-entry fp16 LUT per row).
// l8: the 8 fp16 LUT entries of a row in order; the four tables feed ap3_decode8's PRMT lookups.
__device__ __forceinline__ void lut_tables(const uint4 l8, uint32_t& lo_a, uint32_t& hi_a, uint32_t& lo_b,
                                           uint32_t& hi_b) {
  lo_a = __byte_perm(l8.x, l8.y, 0x6420);
  hi_a = __byte_perm(l8.x, l8.y, 0x7531);
  lo_b = __byte_perm(l8.z, l8.w, 0x6420);
  hi_b = __byte_perm(l8.z, l8.w, 0x7531);
}

// (a & ~m) | (c & m) with m an immediate: one LOP3 (written out so that the compiler does not
// re-associate the bit mixing into more instructions, which it does from plain C++).
template <uint32_t M>
__device__ __forceinline__ uint32_t bitsel(uint32_t a, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xB8;" : "=r"(d) : "r"(a), "n"(M), "r"(c));
  return d;
}

// 8 weights (channels 4n + k of one word, n = 0..7) times the matching x chunk, into 2 half2 sums.
// A, B, C: the word's bit-planes, B rotated left by 1 and C by 2 (so bit 4n+k+q of plane q's
// rotated word is bit q of code(4n+k)). ALU: 2 LOP3 + SHF + LOP3 + 8 PRMT; the >> 16 is an IMAD.HI
// (FMA pipe), because the ALU pipe is this kernel's limit.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
template <uint32_t M>
__device__ __forceinline__ uint32_t and_imm(uint32_t a) {
  uint32_t d;
  asm("and.b32 %0, %1, %2;" : "=r"(d) : "r"(a), "n"(M));
  return d;
}

// The PRMT lookup of 8 selector nibbles (channels 4n + K, n = 0..7; bit 3 of each clear) into 4
// half2: w[0] = channels (K, 4+K), ..., w[3] = (24+K, 28+K).
__device__ __forceinline__ void ap3_lookup8(uint32_t u, uint32_t lo_a, uint32_t hi_a, uint32_t lo_b, uint32_t hi_b,
                                            uint32_t (&w)[4]) {
  const uint32_t u_hi = __umulhi(u, 0x10000u);
  const uint32_t LO0 = prmt(lo_a, lo_b, u), HI0 = prmt(hi_a, hi_b, u);
  const uint32_t LO1 = prmt(lo_a, lo_b, u_hi), HI1 = prmt(hi_a, hi_b, u_hi);
  w[0] = prmt(LO0, HI0, 0x5140);
  w[1] = prmt(LO0, HI0, 0x7362);
  w[2] = prmt(LO1, HI1, 0x5140);
  w[3] = prmt(LO1, HI1, 0x7362);
}

// Decode 8 weights (channels 4n + K of one word, n = 0..7) into 4 half2: w[0] = channels (K, 4+K),
// w[1] = (8+K, 12+K), w[2] = (16+K, 20+K), w[3] = (24+K, 28+K).
template <int K>
__device__ __forceinline__ void ap3_decode8(uint32_t A, uint32_t B, uint32_t C, uint32_t lo_a, uint32_t hi_a,
                                            uint32_t lo_b, uint32_t hi_b, uint32_t (&w)[4]) {
  constexpr uint32_t m1 = 0x11111111u << ((K + 1) & 3), m2 = 0x11111111u << ((K + 2) & 3);
  const uint32_t t = bitsel<m2>(bitsel<m1>(A, B), C);
  ap3_lookup8(and_imm<0x77777777u>(K ? __funnelshift_r(t, t, K) : t), lo_a, hi_a, lo_b, hi_b, w);
}

// ---- The 3-bit kernel layout (decdec/formats.py pack_ap3_kernel): qweight [out, in/256, 3, 8], the three words W0,
// W1, W2 of a 32-channel group hold selector nibbles: nibble n of W_k (k = 0, 1, 2) is the code of channel 4n + k in
// bits 0-2, and bit 3 of nibble n of W_q is bit q of the code of channel 4n + 3. Per 8 groups (256 channels) the 8
// W0, then the 8 W1, then the 8 W2: a lane's 16-byte load of 4 groups' W_q shares its 32-byte sector only with its
// neighbour lane's load of the same instruction, never with another instruction. So channels 4n + k, k < 3, need one
// AND (clear bit 3) before the PRMT lookup, and channels 4n + 3 three LOP3 (vs. the bit-plane layout's 2 LOP3, a
// funnel shift and an AND for every 8 weights, and two rotates per word). Same bytes as the bit-planes.
// Word offset of W0 of group w (w % 4 == 0 for a 16-byte load) of row r; W_q is 8 q words further.
__host__ __device__ __forceinline__ size_t kl_offset(int r, int words, int w) {
  return (size_t)r * words * 3 + (size_t)(w >> 3) * 24 + (w & 7);
}
__device__ __forceinline__ uint32_t shr_fma(uint32_t a, int k) { return __umulhi(a, 1u << (32 - k)); }  // a >> k, FMA pipe

template <int K>
__device__ __forceinline__ uint32_t ap3p_selector(uint32_t W0, uint32_t W1, uint32_t W2) {
  if constexpr (K == 0) return and_imm<0x77777777u>(W0);
  else if constexpr (K == 1) return and_imm<0x77777777u>(W1);
  else if constexpr (K == 2) return and_imm<0x77777777u>(W2);
  else {  // bit 3 of each nibble of W0, W1, W2 -> bits 0, 1, 2
    const uint32_t t = bitsel<0x11111111u>(shr_fma(W1, 2), shr_fma(W0, 3));
    return and_imm<0x77777777u>(bitsel<0x44444444u>(t, shr_fma(W2, 1)));
  }
}

// Decode 8 weights (channels 4n + K) from the words of one 32-channel group: the bit-plane layout (A, B, C = planes,
// B rotated left by 1 and C by 2) or, PACKED, the kernel layout (A, B, C = W0, W1, W2).
template <int K, bool PACKED>
__device__ __forceinline__ void ap3_decode8_any(uint32_t A, uint32_t B, uint32_t C, uint32_t lo_a, uint32_t hi_a,
                                                uint32_t lo_b, uint32_t hi_b, uint32_t (&w)[4]) {
  if constexpr (PACKED) ap3_lookup8(ap3p_selector<K>(A, B, C), lo_a, hi_a, lo_b, hi_b, w);
  else ap3_decode8<K>(A, B, C, lo_a, hi_a, lo_b, hi_b, w);
}

template <int K, bool PACKED = false>
__device__ __forceinline__ void ap3_dot8(uint32_t A, uint32_t B, uint32_t C, uint32_t lo_a, uint32_t hi_a,
                                         uint32_t lo_b, uint32_t hi_b, const uint4& xv, __half2& h0, __half2& h1) {
  uint32_t w[4];
  ap3_decode8_any<K, PACKED>(A, B, C, lo_a, hi_a, lo_b, hi_b, w);
  h0 = __hfma2(*reinterpret_cast<const __half2*>(&w[0]), *reinterpret_cast<const __half2*>(&xv.x), h0);
  h1 = __hfma2(*reinterpret_cast<const __half2*>(&w[1]), *reinterpret_cast<const __half2*>(&xv.y), h1);
  h0 = __hfma2(*reinterpret_cast<const __half2*>(&w[2]), *reinterpret_cast<const __half2*>(&xv.z), h0);
  h1 = __hfma2(*reinterpret_cast<const __half2*>(&w[3]), *reinterpret_cast<const __half2*>(&xv.w), h1);
}

// Items 0 .. n-1 through two buffers (no register copies): item i + 1's loads are in flight while item i is
// computed. The caller has issued load(a, 0) (the GEMVs do so before their PDL wait).
template <typename Buf, typename Load, typename Compute>
__device__ __forceinline__ void ping_pong(int n, Buf& a, Buf& b, Load&& load, Compute&& compute) {
  for (int i = 0; i < n; i += 2) {
    if (i + 1 < n) load(b, i + 1);
    compute(a, i);
    if (i + 1 >= n) break;
    if (i + 2 < n) load(a, i + 2);
    compute(b, i + 1);
  }
}

// ---- Programmatic dependent launch (sm_90). A GEMV launched with `launch_gemv_kernel` may start while
// the kernel before it in the stream is still finishing (in a decode step: the RMSNorm / SiLU kernel
// that produces x): it issues its first weight loads (weights and LUTs never depend on the previous
// kernel), then `pdl_wait()` blocks until that kernel has completed and its writes are visible. Every
// kernel launched this way calls pdl_wait() before it reads x or writes anything to global memory.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream, if launched as a programmatic dependent, start now: its blocks
// are scheduled and run up to their pdl_wait(), which still returns only when this kernel has completed
// and its writes are visible. A kernel calls it once all its own blocks are resident work.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The GEMVs trigger their dependents as soon as they have waited for their own predecessor: the trigger fires once
// every block of the GEMV has executed it (all are resident), so the next kernel's blocks only take the slots that
// the GEMV's finishing blocks free, and issue their weight loads during the GEMV's tail instead of after it.
// Build with -DDECDEC_GEMV_EARLY_TRIGGER=0 (DECDEC_NVCC_FLAGS for scripts/build_kernels.py) for the A/B.
#ifndef DECDEC_GEMV_EARLY_TRIGGER
#define DECDEC_GEMV_EARLY_TRIGGER 1
#endif
__device__ __forceinline__ void gemv_trigger_dependents() {
#if DECDEC_GEMV_EARLY_TRIGGER
  pdl_launch_dependents();
#endif
}

// An A/B knob that is on unless the environment variable starts with '0' (read by the caller once, into a static).
inline bool env_knob_on(const char* name) {
  const char* e = std::getenv(name);
  return !(e && e[0] == '0');
}

// On by default where the device supports it (compute capability >= 9); DECDEC_PDL=0 turns it off
// (same-process A/B: scripts set pdl_enabled() directly).
inline bool& pdl_enabled() {
  static bool on = env_knob_on("DECDEC_PDL");
  return on;
}
inline bool device_has_pdl() {
  static int cache[64] = {0};  // 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (cache[dev] == 0) {
    int major = 0;
    cache[dev] = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9 ? 2 : 1;
  }
  return cache[dev] == 2;
}

// A GEMV fused with DEC (a Fused argument that is on) is launched as an ordinary kernel: as a programmatic
// dependent it ran *after* the DEC kernel of its side stream instead of beside it (H200, scripts/fused_overlap.py:
// fused = GEMV + DEC, e.g. 4096x28672 k_chunk=4 n_tb=32 +68 % over the GEMV with PDL, +21 % without; session 3, before
// the reserved slots and the early trigger). -DDECDEC_FUSED_PDL=1 launches it as a programmatic dependent again (A/B).
#ifndef DECDEC_FUSED_PDL
#define DECDEC_FUSED_PDL 0
#endif
template <typename A>
bool is_fused_launch(const A& a) {
  if constexpr (std::is_same_v<std::decay_t<A>, Fused>) return !DECDEC_FUSED_PDL && a.concurrent();
  return false;
}

// Launch `kernel`, as a programmatic dependent of the kernel before it in the stream when `pdl` (and PDL is on and the
// device has it).
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                          Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl && pdl_enabled() && device_has_pdl() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

template <typename... KArgs, typename... Args>
cudaError_t launch_gemv_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               Args&&... args) {
  const bool fused = (false || ... || is_fused_launch(args));
  return launch_kernel(kernel, grid, block, smem, stream, !fused, std::forward<Args>(args)...);
}

// Multiprocessor count of the current device (cached per device).
inline int device_sms() {
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cache[dev] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) sms = 132;
    cache[dev] = sms;
  }
  return cache[dev];
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

}  // namespace decdec
