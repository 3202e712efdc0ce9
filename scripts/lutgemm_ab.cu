// Same-run comparison of the lutgemm 3-bit fp16 GEMV with the combine epilogue inlined (what ships)
// and as a call (fused_arrive_call: 54 instead of 72 registers), plain GEMV (no DEC) from a CUDA graph
// of 40 launches (median of 7 replays), weight copies rotating over >= 4x the L2. Pure CUDA, GPU machine:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc scripts/lutgemm_ab.cu -o /tmp/lab && /tmp/lab
#include "../csrc/lutgemm_gemv.cu"
#include "graph_timer.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

using namespace decdec;

int main() {
  const int shapes[][2] = {{4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096}, {5120, 35840}};
  constexpr int kMaxCopies = 64, kGroup = 128, kBits = 3;
  int l2 = 0;
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  printf("%-12s %12s %12s %8s\n", "in x out", "inlined us", "call us", "call/inl");
  for (auto& sh : shapes) {
    const int in = sh[0], out = sh[1];
    const size_t bbytes = (size_t)in / 32 * kBits * out * 4, abytes = (size_t)in / kGroup * kBits * out * 2,
                 qbytes = (size_t)in / kGroup * out * 2;
    const size_t total = bbytes + abytes + qbytes;
    const int copies = std::min(kMaxCopies, std::max(4, (int)((4.0 * l2 + total - 1) / total)));
    std::vector<__half> hx(in);
    for (int i = 0; i < in; ++i) hx[i] = __float2half(((i * 7919) % 2001 - 1000) / 3000.f);
    __half *x, *y, *alpha[kMaxCopies], *qb[kMaxCopies];
    uint32_t* bin[kMaxCopies];
    CK(cudaMalloc(&x, in * 2));
    CK(cudaMemcpy(x, hx.data(), in * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&y, out * 2));
    for (int c = 0; c < copies; ++c) {
      CK(cudaMalloc(&bin[c], bbytes));
      CK(cudaMemset(bin[c], 0x5a + c, bbytes));
      CK(cudaMalloc(&alpha[c], abytes));
      CK(cudaMemset(alpha[c], 0x11, abytes));
      CK(cudaMalloc(&qb[c], qbytes));
      CK(cudaMemset(qb[c], 0x12, qbytes));
    }
    const int ks = ks_log2_for(in, out);
    const dim3 grid(ceil_div(out, (kWarps >> ks) * 32), 1);
    float t[2];
    t[0] = graph_us([&](cudaStream_t s, int i) {
      lutgemm_gemv_kernel<kBits, __half, false><<<grid, kThreads, 0, s>>>(x, bin[i % copies], alpha[i % copies],
                                                                          qb[i % copies], y, in, out, kGroup, ks, Fused{});
    });
    t[1] = graph_us([&](cudaStream_t s, int i) {
      lutgemm_gemv_kernel<kBits, __half, true><<<grid, kThreads, 0, s>>>(x, bin[i % copies], alpha[i % copies],
                                                                         qb[i % copies], y, in, out, kGroup, ks, Fused{});
    });
    printf("%5dx%-6d %12.2f %12.2f %8.2f\n", in, out, t[0], t[1], t[1] / t[0]);
    cudaFree(x);
    cudaFree(y);
    for (int c = 0; c < copies; ++c) {
      cudaFree(bin[c]);
      cudaFree(alpha[c]);
      cudaFree(qb[c]);
    }
  }
  return 0;
}
