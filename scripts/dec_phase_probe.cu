// Where DEC's time goes: %globaltimer stamps of one DEC unit (block 0, thread 0) at its phases
// (start, after selection, after the fetch, after the partial is stored, after the combine), plus
// the event-timed kernel, for a few shapes / k_chunk / n_tb. Pure CUDA (no torch), GPU machine:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc scripts/dec_phase_probe.cu -o /tmp/probe && /tmp/probe
#include <cstdint>
__device__ unsigned long long g_probe[8];
__device__ __forceinline__ unsigned long long probe_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
#define DEC_PROBE(i) \
  if (blockIdx.x == 0 && threadIdx.x == 0 && m == 0) g_probe[i] = probe_now();
#include "../csrc/dec.cu"

#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace decdec;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } } while (0)

int main() {
  const int shapes[][2] = {{4096, 4096}, {4096, 28672}, {14336, 4096}};
  for (auto& sh : shapes) {
    const int in = sh[0], out = sh[1];
    std::vector<__half> hx(in);
    for (int i = 0; i < in; ++i) hx[i] = __float2half(((i * 7919) % 2001 - 1000) / 300.f);
    __half *x, *scales, *y;
    float *bounds, *part;
    int* counters;
    uint32_t* qr_host;
    CK(cudaMalloc(&x, in * 2));
    CK(cudaMemcpy(x, hx.data(), in * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&scales, out * 2));
    CK(cudaMemset(scales, 0, out * 2));
    CK(cudaMalloc(&y, out * 2));
    CK(cudaMalloc(&bounds, 8));
    const float hb[2] = {3.3f, 2.0f};
    CK(cudaMemcpy(bounds, hb, 8, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&part, sizeof(float) * (size_t)dec_parts(in) * out));
    CK(cudaMalloc(&counters, 1 << 20));
    CK(cudaMemset(counters, 0, 1 << 20));
    CK(cudaHostAlloc(&qr_host, (size_t)in * out / 2, cudaHostAllocMapped));
    memset(qr_host, 0x88, (size_t)in * out / 2);
    uint32_t* qr;
    CK(cudaHostGetDevicePointer((void**)&qr, qr_host, 0));
    for (int k : {1, 8, 32}) {
      for (int n_tb : {4, 16, 64}) {
        Fused f;
        f.dpart = part;
        f.counters = counters;
        f.y = y;
        f.tile_rows = f.dec_slice = dec_slice_size(in, out, n_tb);
        f.dec_parts = dec_parts(in);
        f.n_tokens = 1;
        for (int w = 0; w < 5; ++w) CK(dec(DType::F16, x, qr, scales, bounds, 1, in, out, k, n_tb, f, 0));
        CK(cudaDeviceSynchronize());
        cudaEvent_t a, b;
        cudaEventCreate(&a);
        cudaEventCreate(&b);
        cudaEventRecord(a);
        for (int it = 0; it < 50; ++it) dec(DType::F16, x, qr, scales, bounds, 1, in, out, k, n_tb, f, 0);
        cudaEventRecord(b);
        CK(cudaEventSynchronize(b));
        float ms = 0.f;
        cudaEventElapsedTime(&ms, a, b);
        unsigned long long p[8];
        CK(cudaMemcpyFromSymbol(p, g_probe, sizeof p));
        printf("%5dx%-6d k=%-2d n_tb=%-3d: back-to-back %6.2f us/call; unit 0: select %5.2f, fetch %5.2f, store %5.2f, "
               "combine %5.2f us\n", in, out, k, n_tb, ms * 1e3 / 50, (p[1] - p[0]) / 1e3, (p[2] - p[1]) / 1e3,
               (p[3] - p[2]) / 1e3, (p[4] - p[3]) / 1e3);
      }
    }
    cudaFree(x); cudaFree(scales); cudaFree(y); cudaFree(bounds); cudaFree(part); cudaFree(counters);
    cudaFreeHost(qr_host);
  }
  return 0;
}
