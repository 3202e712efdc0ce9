// Latency and throughput of mma.sync on this card for b1 (m16n8k256 .and.popc), s8 (m16n8k32) and f16 (m16n8k16,
// fp32 accumulators): one warp per SM with one dependent chain (latency), one warp with 8 independent chains, and 4-32
// warps per SM (the rate per SM sub-partition). Session 20 used it to check that Hopper runs the binary MMA natively
// before building scripts/bmma_gemv_ab.cu on it (H200: 24.5 cycles and one per 6.0 cycles per sub-partition for all
// three). Cycles from clock64 in block 0.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 scripts/mma_probe.cu -o /tmp/mma_probe && /tmp/mma_probe
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
namespace mma_probe {  // named: see graph_timer.cuh

template <int KIND, int C>
__global__ void probe(uint32_t seed, int iters, long long* cyc, int* out) {
  uint32_t a0 = seed ^ threadIdx.x, a1 = a0 * 3, a2 = a0 * 5, a3 = a0 * 7, b0 = a0 * 11, b1 = a0 * 13;
  int c[C][4] = {};
  float f[C][4] = {};
  __syncthreads();
  long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < C; ++j) {
      if (KIND == 0)
        asm("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+r"(c[j][0]), "+r"(c[j][1]), "+r"(c[j][2]), "+r"(c[j][3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
      else if (KIND == 1)
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+r"(c[j][0]), "+r"(c[j][1]), "+r"(c[j][2]), "+r"(c[j][3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
      else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(f[j][0]), "+f"(f[j][1]), "+f"(f[j][2]), "+f"(f[j][3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
  }
  long long t1 = clock64();
  int s = 0;
  for (int j = 0; j < C; ++j) for (int q = 0; q < 4; ++q) s += c[j][q] + (int)f[j][q];
  if (s == 123456789) out[0] = s;
  if (threadIdx.x == 0 && blockIdx.x == 0) cyc[0] = t1 - t0;
}
template <int KIND, int C>
void run(const char* name, int warps_per_sm, int sms, long long* cyc, int* out) {
  const int iters = 512;
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  probe<KIND, C><<<sms, 32 * warps_per_sm>>>(1, 16, cyc, out);
  cudaEventRecord(a);
  probe<KIND, C><<<sms, 32 * warps_per_sm>>>(1, iters, cyc, out);
  cudaEventRecord(b); cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  long long c; cudaMemcpy(&c, cyc, 8, cudaMemcpyDeviceToHost);
  const double per_warp = (double)c / (iters * C);
  const double mmas_per_sp = (double)warps_per_sm / 4 * iters * C;
  printf("%-5s warps/SM %2d chains %2d: %7.1f cycles per mma per warp (clock64), %6.2f cycles per mma per SP\n", name,
         warps_per_sm, C, per_warp, (double)c / mmas_per_sp);
}
}  // namespace mma_probe

int main() {
  using namespace mma_probe;
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  long long* cyc; int* out; cudaMalloc(&cyc, 8); cudaMalloc(&out, 4);
  run<0, 1>("b1", 1, sms, cyc, out); run<1, 1>("s8", 1, sms, cyc, out); run<2, 1>("f16", 1, sms, cyc, out);
  run<0, 8>("b1", 1, sms, cyc, out); run<1, 8>("s8", 1, sms, cyc, out); run<2, 8>("f16", 1, sms, cyc, out);
  run<0, 28>("b1", 4, sms, cyc, out); run<0, 28>("b1", 8, sms, cyc, out); run<0, 8>("b1", 16, sms, cyc, out);
  run<0, 8>("b1", 32, sms, cyc, out); run<2, 8>("f16", 32, sms, cyc, out); run<1, 8>("s8", 32, sms, cyc, out);
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
}
