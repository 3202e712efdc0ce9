// lutgemm 3-bit fp16 GEMV, same run: the shipped kernel (LUT-GEMM tables of x in shared memory, 8 table
// lookups per plane word) against a variant that decodes the binary codes like the ap kernels: a row's
// 3 bits of a channel form a code v, and the group's 8 values LUT[v] = q_bias + sum_p alpha_p (2 bit_p(v) - 1)
// sit in a PRMT register LUT (ap3_decode8 from common.cuh), times x with HFMA2. Layout unchanged (binary
// [in/32, 3, out]): 16 lanes = 16 consecutive rows (64-byte coalesced loads), the block's 16 word streams
// (2 per warp) split in; every word's alpha / q_bias are loaded with its planes, a batch ahead. Checks the
// variant against the shipped kernel on random data, then times both from CUDA graphs (40 launches, median
// of 7 replays, weight copies rotating over >= 4x the L2). Pure CUDA, GPU machine:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc scripts/lutgemm_prmt_ab.cu -o /tmp/pab && /tmp/pab
// Prepared in session 5 without a GPU (compiled only).
#include "../csrc/lutgemm_gemv.cu"
#include "graph_timer.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

using namespace decdec;

namespace prmt_ab {  // named: CUDA 13's kernel stubs cannot tell two anonymous namespaces apart (DESIGN.md §5)

constexpr int kPThreads = 256, kPWarps = kPThreads / 32;
constexpr int kPRows = 16;     // rows per block (a half-warp's lanes)
constexpr int kPStreams = 16;  // word streams per block (2 per warp)
constexpr int kPBatch = 4;     // words per lane whose loads are in flight together

// x for ap3_dot8: chunk 4w + K of word w holds the half2 pairs (x[32w + 8j + K], x[32w + 8j + K + 4]), j = 0..3
__device__ void stage_x_pairs(const __half* __restrict__ xm, int in, uint4* xs) {
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
  uint32_t p[kPBatch][3];   // the planes of kPBatch words of this lane's row
  __half a[kPBatch][4];     // each word's group: alpha_0..2, q_bias
};

template <int MINB>
__global__ void __launch_bounds__(kPThreads, MINB)
    lutgemm3_prmt_kernel(const __half* __restrict__ x, const uint32_t* __restrict__ binary,
                         const __half* __restrict__ alpha, const __half* __restrict__ q_bias, __half* __restrict__ y,
                         int in, int out, int group) {
  extern __shared__ __align__(16) uint4 xs[];  // in / 8 chunks
  __shared__ float red[kPWarps][kPRows];
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
      if (g != cur_g) {  // the group's 8 LUT values, in fp32 in the reference's order, rounded once
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
  if (threadIdx.x < kPRows) {
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kPWarps; ++k) sum += red[k][threadIdx.x];
    const int r = blockIdx.x * kPRows + (int)threadIdx.x;
    if (r < out) y[(size_t)m * out + r] = __float2half_rn(sum);
  }
}

}  // namespace prmt_ab

using namespace prmt_ab;
using namespace ab_fill;

int main() {
  const int shapes[][2] = {{4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096}, {5120, 35840}};
  constexpr int kMaxCopies = 64, kGroup = 128;
  int l2 = 0;
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  printf("%-12s %11s %13s %13s %9s %11s\n", "in x out", "shipped us", "prmt 2blk us", "prmt 3blk us", "best/shp",
         "max rel err");
  for (auto& sh : shapes) {
    const int in = sh[0], out = sh[1];
    const size_t nb = (size_t)in / 32 * 3 * out, na = (size_t)in / kGroup * 3 * out, nq = (size_t)in / kGroup * out;
    const size_t total = nb * 4 + (na + nq) * 2;
    const int copies = std::min(kMaxCopies, std::max(4, (int)((4.0 * l2 + total - 1) / total)));
    __half *x, *y0, *y1, *alpha[kMaxCopies], *qb[kMaxCopies];
    uint32_t* bin[kMaxCopies];
    CK(cudaMalloc(&x, in * 2));
    fill_half<<<64, 256>>>(x, in, 7, -1.f, 1.f);
    CK(cudaMalloc(&y0, out * 2));
    CK(cudaMalloc(&y1, out * 2));
    for (int c = 0; c < copies; ++c) {
      CK(cudaMalloc(&bin[c], nb * 4));
      fill_random<<<512, 256>>>(bin[c], nb, 11 + c);
      CK(cudaMalloc(&alpha[c], na * 2));
      fill_half<<<512, 256>>>(alpha[c], na, 13 + c, 0.005f, 0.05f);
      CK(cudaMalloc(&qb[c], nq * 2));
      fill_half<<<512, 256>>>(qb[c], nq, 17 + c, -0.01f, 0.01f);
    }
    CK(cudaDeviceSynchronize());
    const int ks = ks_log2_for(in, out);
    const dim3 grid(ceil_div(out, (kWarps >> ks) * 32), 1), pgrid(ceil_div(out, kPRows), 1);
    const size_t smem = (size_t)in * 2;
    CK(allow_smem(lutgemm3_prmt_kernel<2>, smem));
    CK(allow_smem(lutgemm3_prmt_kernel<3>, smem));
    // correctness: the variant against the shipped kernel (both fp16 out; the shipped one sums in fp32 tables)
    lutgemm_gemv_kernel<3, __half, true><<<grid, kThreads, 0>>>(x, bin[0], alpha[0], qb[0], y0, in, out, kGroup, ks,
                                                               Fused{});
    lutgemm3_prmt_kernel<2><<<pgrid, kPThreads, smem>>>(x, bin[0], alpha[0], qb[0], y1, in, out, kGroup);
    CK(cudaDeviceSynchronize());
    std::vector<__half> h0(out), h1(out);
    CK(cudaMemcpy(h0.data(), y0, out * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h1.data(), y1, out * 2, cudaMemcpyDeviceToHost));
    double worst = 0, scale = 0;
    for (int i = 0; i < out; ++i) {
      scale = std::max(scale, (double)std::fabs(__half2float(h0[i])));
      worst = std::max(worst, (double)std::fabs(__half2float(h0[i]) - __half2float(h1[i])));
    }
    float t[3];
    t[0] = graph_us([&](cudaStream_t s, int i) {
      lutgemm_gemv_kernel<3, __half, true><<<grid, kThreads, 0, s>>>(x, bin[i % copies], alpha[i % copies],
                                                                     qb[i % copies], y0, in, out, kGroup, ks, Fused{});
    });
    t[1] = graph_us([&](cudaStream_t s, int i) {
      lutgemm3_prmt_kernel<2><<<pgrid, kPThreads, smem, s>>>(x, bin[i % copies], alpha[i % copies], qb[i % copies],
                                                             y1, in, out, kGroup);
    });
    t[2] = graph_us([&](cudaStream_t s, int i) {
      lutgemm3_prmt_kernel<3><<<pgrid, kPThreads, smem, s>>>(x, bin[i % copies], alpha[i % copies], qb[i % copies],
                                                             y1, in, out, kGroup);
    });
    printf("%5dx%-6d %11.2f %13.2f %13.2f %9.2f %11.2e\n", in, out, t[0], t[1], t[2], std::min(t[1], t[2]) / t[0],
           worst / std::max(scale, 1e-30));
    cudaFree(x);
    cudaFree(y0);
    cudaFree(y1);
    for (int c = 0; c < copies; ++c) {
      cudaFree(bin[c]);
      cudaFree(alpha[c]);
      cudaFree(qb[c]);
    }
  }
  return 0;
}
