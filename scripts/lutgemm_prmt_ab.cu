// lutgemm 3-bit fp16 GEMV, same run: the shipped kernel (LUT-GEMM tables of x in shared memory, 8 table
// lookups per plane word) against a variant that decodes the binary codes like the ap kernels: a row's
// 3 bits of a channel form a code v, and the group's 8 values LUT[v] = q_bias + sum_p alpha_p (2 bit_p(v) - 1)
// sit in a PRMT register LUT (ap3_decode8 from common.cuh), times x with HFMA2. Layout unchanged (binary
// [in/32, 3, out]): 16 lanes = 16 consecutive rows (64-byte coalesced loads), the block's 16 word streams
// (2 per warp) split in; every word's alpha / q_bias are loaded with its planes, a batch ahead. Checks the
// variant against the shipped kernel on random data, then times both from CUDA graphs (40 launches, median
// of 7 replays, weight copies rotating over >= 4x the L2). Pure CUDA, GPU machine:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc scripts/lutgemm_prmt_ab.cu -o /tmp/pab && /tmp/pab
// Prepared in session 5 without a GPU (compiled only). On this branch the variant is csrc/lutgemm_gemv.cu's
// lutgemm3_prmt_kernel (what lutgemm_gemv dispatches for 3-bit fp16); the old kernel is timed directly.
#include "../csrc/lutgemm_gemv.cu"
#include "graph_timer.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

using namespace decdec;
using namespace ab_fill;

int main() {
  const int shapes[][2] = {{4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096}, {5120, 35840}};
  constexpr int kMaxCopies = 64, kGroup = 128;
  int l2 = 0;
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  printf("%-12s %11s %9s %9s %11s\n", "in x out", "tables us", "prmt us", "prmt/tab", "max rel err");
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
    CK(allow_smem(lutgemm3_prmt_kernel, smem));
    // correctness: the variant against the shipped kernel (both fp16 out; the shipped one sums in fp32 tables)
    lutgemm_gemv_kernel<3, __half, true><<<grid, kThreads, 0>>>(x, bin[0], alpha[0], qb[0], y0, in, out, kGroup, ks,
                                                               Fused{});
    lutgemm3_prmt_kernel<<<pgrid, kPThreads, smem>>>(x, bin[0], alpha[0], qb[0], y1, in, out, kGroup, Fused{});
    CK(cudaDeviceSynchronize());
    std::vector<__half> h0(out), h1(out);
    CK(cudaMemcpy(h0.data(), y0, out * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h1.data(), y1, out * 2, cudaMemcpyDeviceToHost));
    double worst = 0, scale = 0;
    for (int i = 0; i < out; ++i) {
      scale = std::max(scale, (double)std::fabs(__half2float(h0[i])));
      worst = std::max(worst, (double)std::fabs(__half2float(h0[i]) - __half2float(h1[i])));
    }
    float t[2];
    t[0] = graph_us([&](cudaStream_t s, int i) {
      lutgemm_gemv_kernel<3, __half, true><<<grid, kThreads, 0, s>>>(x, bin[i % copies], alpha[i % copies],
                                                                     qb[i % copies], y0, in, out, kGroup, ks, Fused{});
    });
    t[1] = graph_us([&](cudaStream_t s, int i) {
      lutgemm3_prmt_kernel<<<pgrid, kPThreads, smem, s>>>(x, bin[i % copies], alpha[i % copies], qb[i % copies], y1,
                                                          in, out, kGroup, Fused{});
    });
    printf("%5dx%-6d %11.2f %9.2f %9.2f %11.2e\n", in, out, t[0], t[1], t[1] / t[0], worst / std::max(scale, 1e-30));
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
