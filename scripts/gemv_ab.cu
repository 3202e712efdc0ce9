// Same-run comparison of the ap 3-bit fp16 GEMV's two weight layouts on the projection shapes: the bit-plane layout
// [3, out, in/32] (the checkpoint format) and the 3-bit kernel layout [out, in/32, 3] (csrc/common.cuh,
// decdec/formats.py pack_ap3_kernel), on the tensor-core kernel, the streaming kernel and the dispatched one, each
// timed from a CUDA graph of 40 back-to-back launches (median of 7 replays) with weight copies rotating over at
// least 4x the L2 (as scripts/bench_kernels.py), so the L2 does not hold them. Also checks that both layouts give
// bit-identical outputs on random weights (same products, same order); the ceilings (HBM copy, pinned memcpy) are
// scripts/bench_kernels.py's. Pure CUDA (no torch), GPU machine:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc scripts/gemv_ab.cu csrc/dec.cu -o /tmp/ab && /tmp/ab
//   ncu --section WarpStateStats --section ComputeWorkloadAnalysis -k regex:ap3_gemv -c 2 /tmp/ab 4096x28672
#include "../csrc/ap_gemv.cu"
#include "ap3_layout.cuh"
#include "graph_timer.cuh"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

using namespace decdec;

int main(int argc, char** argv) {  // argv[1]: only this shape ("4096x28672", any in % 512 == 0), e.g. under ncu
  std::vector<std::array<int, 2>> shapes = {{4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096},
                                            {5120, 7680}, {5120, 5120}, {5120, 35840}, {17920, 5120}};
  int a_in = 0, a_out = 0;  // any INxOUT (in % 512 == 0), e.g. Llama-3-70B's 8192x57344
  if (argc > 1 && sscanf(argv[1], "%dx%d", &a_in, &a_out) == 2 && a_in > 0 && a_out > 0 && a_in % 512 == 0)
    shapes = {{a_in, a_out}};
  constexpr int kMaxCopies = 64;
  int l2 = 0;
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  printf("%-12s %9s %9s %9s %9s %9s %9s %7s %7s %s\n", "in x out", "mma bp", "mma kl", "strm bp", "strm kl", "disp bp",
         "disp kl", "kl/bp", "GB/s kl", "outputs");
  std::mt19937 rng(1234);
  for (auto& sh : shapes) {
    const int in = sh[0], out = sh[1], words = in / 32;
    char name[32];
    snprintf(name, sizeof name, "%dx%d", in, out);
    if (argc > 1 && strcmp(argv[1], name) != 0) continue;
    const size_t nw = (size_t)3 * out * words, qbytes = nw * 4;
    std::vector<__half> hx(in), hl((size_t)out * 8);
    for (int i = 0; i < in; ++i) hx[i] = __float2half(((i * 7919) % 2001 - 1000) / 3000.f);
    for (auto& v : hl) v = __float2half(((int)(rng() % 2001) - 1000) / 700.f);
    std::vector<uint32_t> planes(nw);
    for (auto& w : planes) w = rng();
    const std::vector<uint32_t> packed = pack_kernel_layout(planes, out, words);
    const int kCopies = std::min(kMaxCopies, std::max(4, (int)((4.0 * l2 + qbytes - 1) / qbytes)));
    __half *x, *y, *lut[kMaxCopies];
    uint32_t *qb[kMaxCopies], *qk[kMaxCopies];
    CK(cudaMalloc(&x, in * 2));
    CK(cudaMemcpy(x, hx.data(), in * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&y, out * 2));
    for (int c = 0; c < kCopies; ++c) {
      CK(cudaMalloc(&qb[c], qbytes));
      CK(cudaMalloc(&qk[c], qbytes));
      CK(cudaMemcpy(qb[c], planes.data(), qbytes, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(qk[c], packed.data(), qbytes, cudaMemcpyHostToDevice));
      CK(cudaMalloc(&lut[c], (size_t)out * 16));
      CK(cudaMemcpy(lut[c], hl.data(), (size_t)out * 16, cudaMemcpyHostToDevice));
    }
    // same outputs from both layouts (dispatched kernel)
    std::vector<__half> yb(out), yk(out);
    CK((launch_gemv<3, __half>(x, qb[0], lut[0], y, 1, in, out, Fused{}, 0, false)));
    CK(cudaMemcpy(yb.data(), y, out * 2, cudaMemcpyDeviceToHost));
    CK((launch_gemv<3, __half>(x, qk[0], lut[0], y, 1, in, out, Fused{}, 0, true)));
    CK(cudaMemcpy(yk.data(), y, out * 2, cudaMemcpyDeviceToHost));
    int diff = 0;
    for (int i = 0; i < out; ++i) diff += memcmp(&yb[i], &yk[i], 2) != 0;

    const bool mma_ok = in % 512 == 0, stream_ok = in % 128 == 0;
    auto t_mma = [&](bool pk) {
      if (!mma_ok) return -1.f;
      return graph_us([&](cudaStream_t s, int i) {
        CK((pk ? launch_mma<true>(x, qk[i % kCopies], lut[i % kCopies], y, 1, in, out, Fused{}, s)
               : launch_mma<false>(x, qb[i % kCopies], lut[i % kCopies], y, 1, in, out, Fused{}, s)));
      });
    };
    auto t_stream = [&](bool pk) {
      if (!stream_ok) return -1.f;
      return graph_us([&](cudaStream_t s, int i) {
        CK((pk ? launch_stream<kStreamRows, false, true>(x, qk[i % kCopies], lut[i % kCopies], y, 1, in, out, Fused{}, s)
               : launch_stream<kStreamRows>(x, qb[i % kCopies], lut[i % kCopies], y, 1, in, out, Fused{}, s)));
      });
    };
    auto t_disp = [&](bool pk) {
      return graph_us([&](cudaStream_t s, int i) {
        CK((launch_gemv<3, __half>(x, pk ? qk[i % kCopies] : qb[i % kCopies], lut[i % kCopies], y, 1, in, out,
                                   Fused{}, s, pk)));
      });
    };
    const float mb = t_mma(false), mk = t_mma(true), sb = t_stream(false), sk = t_stream(true);
    const float db = t_disp(false), dk = t_disp(true);
    printf("%5dx%-6d %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f %7.3f %7.0f %s\n", in, out, mb, mk, sb, sk, db, dk, dk / db,
           (qbytes + out * 16.f) / (dk * 1e3f), diff ? "DIFFER" : "identical");
    if (diff) printf("  %d of %d outputs differ between the layouts\n", diff, out);
    cudaFree(x);
    cudaFree(y);
    for (int c = 0; c < kCopies; ++c) {
      cudaFree(qb[c]);
      cudaFree(qk[c]);
      cudaFree(lut[c]);
    }
  }
  return 0;
}
