// Same-run comparison of the ap 3-bit fp16 GEMV kernels on the projection shapes: the tensor-core
// kernel (dispatched for in % 512 == 0), the streaming HFMA2 kernel and the per-row PRMT kernel, and the
// dispatched kernel with programmatic dependent launch off / on,
// each timed from a CUDA graph of 40 back-to-back launches (median of 7 replays) with weight copies
// rotating over at least 4x the L2 (as scripts/bench_kernels.py), so the L2 does not hold them.
// Pure CUDA (no torch), GPU machine:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc scripts/gemv_ab.cu -o /tmp/ab && /tmp/ab
//   ncu --section WarpStateStats --section ComputeWorkloadAnalysis -k regex:ap3_gemv_mma -c 1 /tmp/ab 4096x28672
#include "../csrc/ap_gemv.cu"
#include "graph_timer.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

using namespace decdec;

int main(int argc, char** argv) {  // argv[1]: only this shape ("4096x28672"), e.g. under ncu
  const int shapes[][2] = {{4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096},
                           {5120, 7680}, {5120, 5120}, {5120, 35840}, {17920, 5120}};
  constexpr int kMaxCopies = 64;
  int l2 = 0;
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  printf("%-12s %10s %10s %10s %9s %9s\n", "in x out", "mma us", "stream us", "prmt us", "mma GB/s", "mma/best");
  for (auto& sh : shapes) {
    const int in = sh[0], out = sh[1];
    char name[32];
    snprintf(name, sizeof name, "%dx%d", in, out);
    if (argc > 1 && strcmp(argv[1], name) != 0) continue;
    const size_t qbytes = (size_t)3 * out * in / 8;
    std::vector<__half> hx(in);
    for (int i = 0; i < in; ++i) hx[i] = __float2half(((i * 7919) % 2001 - 1000) / 3000.f);
    const int kCopies = std::min(kMaxCopies, std::max(4, (int)((4.0 * l2 + qbytes - 1) / qbytes)));
    __half *x, *y, *lut[kMaxCopies];
    uint32_t* qw[kMaxCopies];
    CK(cudaMalloc(&x, in * 2));
    CK(cudaMemcpy(x, hx.data(), in * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&y, out * 2));
    for (int c = 0; c < kCopies; ++c) {
      CK(cudaMalloc(&qw[c], qbytes));
      CK(cudaMemset(qw[c], 0x5a + c, qbytes));
      CK(cudaMalloc(&lut[c], (size_t)out * 16));
      CK(cudaMemset(lut[c], 0x21, (size_t)out * 16));
    }
    const float t_mma = graph_us([&](cudaStream_t s, int i) {
      CK(launch_mma(x, qw[i % kCopies], lut[i % kCopies], y, 1, in, out, Fused{}, s));
    });
    // the tensor-core kernel at other block sizes (16-row groups per block)
    const int groups = ceil_div(out, 16), slots = 2 * device_sms();
    const int gpb_opts[3] = {ceil_div(groups, slots), max(1, groups / slots), ceil_div(groups, slots) + 1};
    float t_g[3];
    for (int o = 0; o < 3; ++o) {
      const int br = 16 * gpb_opts[o];
      const size_t smem = (size_t)in * 2 + (size_t)br * kMmaWarps * 4;
      CK(allow_smem(ap3_gemv_mma_kernel, smem));
      t_g[o] = graph_us([&](cudaStream_t s, int i) {
        ap3_gemv_mma_kernel<<<ceil_div(out, br), kMmaThreads, smem, s>>>(x, qw[i % kCopies], lut[i % kCopies], y, in,
                                                                         out, br, Fused{});
      });
    }
    float t_stream = -1.f;
    if (in % 128 == 0)
      t_stream = graph_us([&](cudaStream_t s, int i) {
        CK(launch_stream<kStreamRows>(x, qw[i % kCopies], lut[i % kCopies], y, 1, in, out, Fused{}, s));
      });
    const int ks = ks_log2_for(3, in, out);
    const dim3 grid(ceil_div(out, (kWarps >> ks) * 4), 1);
    const float t_prmt = graph_us([&](cudaStream_t s, int i) {
      ap3_gemv_prmt_kernel<4><<<grid, kThreads, 0, s>>>(x, qw[i % kCopies], lut[i % kCopies], y, in, out, ks, Fused{});
    });
    // programmatic dependent launch (launch_gemv_kernel): the dispatched kernel with it off and on
    float t_pdl[2];
    for (int on = 0; on < 2; ++on) {
      pdl_enabled() = on;
      t_pdl[on] = graph_us([&](cudaStream_t s, int i) {
        CK((launch_gemv<3, __half>(x, qw[i % kCopies], lut[i % kCopies], y, 1, in, out, Fused{}, s)));
      });
    }
    const float best_other = t_stream > 0 ? std::min(t_stream, t_prmt) : t_prmt;
    printf("%5dx%-6d %10.2f %10.2f %10.2f %9.0f %9.2f | mma at %d/%d/%d groups per block: %.2f / %.2f / %.2f us\n",
           in, out, t_mma, t_stream, t_prmt, qbytes / (t_mma * 1e3), t_mma / best_other, gpb_opts[0], gpb_opts[1],
           gpb_opts[2], t_g[0], t_g[1], t_g[2]);
    printf("%12s dispatched kernel, PDL off / on: %.2f / %.2f us\n", "", t_pdl[0], t_pdl[1]);
    cudaFree(x);
    cudaFree(y);
    for (int c = 0; c < kCopies; ++c) {
      cudaFree(qw[c]);
      cudaFree(lut[c]);
    }
  }
  return 0;
}
