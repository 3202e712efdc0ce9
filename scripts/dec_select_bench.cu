// Micro-benchmark of the DEC selection (single TU including csrc/dec.cu), graph-timed on the GPU:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc scripts/dec_select_bench.cu -o /tmp/b && /tmp/b
#include "../csrc/dec.cu"
#include <cstdio>
#include <vector>
using namespace decdec;
__global__ void k_empty(int* o) { if (threadIdx.x == 999) *o = 1; }
__global__ void k_floors(const float* b, int* o) {
  __shared__ float f[32]; __shared__ int mono;
  compute_floors(b, f, &mono); __syncthreads(); if (threadIdx.x == 0) *o = mono + (int)f[3];
}
__global__ void k_xload(const __half* x, int in, int* o) {
  float s = 0.f;
  for (int i = threadIdx.x; i < in; i += blockDim.x) s += __half2float(x[i]);
  if (s == 12345.f) *o = 1;
}
template <int PH>
__global__ void k_sel(const __half* x, const float* b, int in, int k_chunk, int* o) {
  extern __shared__ __align__(16) int sm[];
  const DecLayout L = dec_layout(in, k_total(k_chunk, in), 0);
  float* floors = reinterpret_cast<float*>(sm + L.floors);
  __shared__ int mono;
  select_token(x, in, k_chunk, b, floors, &mono, L, sm, sm + L.list);
  __syncthreads();
  if (threadIdx.x == 0) *o = sm[L.list];
}
int main() {
  const int in = 4096, k = 8;
  std::vector<__half> hx(in);
  for (int i = 0; i < in; ++i) hx[i] = __float2half((float)((i * 7919) % 1000) / 300.f - 1.5f);
  __half* x; float* b; int* o;
  cudaMalloc(&x, in * 2); cudaMalloc(&b, 8); cudaMalloc(&o, 4);
  cudaMemcpy(x, hx.data(), in * 2, cudaMemcpyHostToDevice);
  float hb[2] = {1.8f, 1.4f}; cudaMemcpy(b, hb, 8, cudaMemcpyHostToDevice);
  const size_t smem = (size_t)dec_layout(in, k_total(k, in), 0).total * 4;
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  auto timeit = [&](const char* name, auto launch) {
    for (int i = 0; i < 10; ++i) launch();
    cudaDeviceSynchronize();
    cudaGraph_t g; cudaGraphExec_t ge; cudaStream_t s; cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
    for (int i = 0; i < 50; ++i) launch(s);
    cudaStreamEndCapture(s, &g); cudaGraphInstantiate(&ge, g, 0);
    cudaGraphLaunch(ge, s); cudaStreamSynchronize(s);
    cudaEventRecord(e0, s); for (int r = 0; r < 4; ++r) cudaGraphLaunch(ge, s); cudaEventRecord(e1, s);
    cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1);
    printf("%-28s %8.2f us/launch  (%s)\n", name, ms * 1000 / 200, cudaGetErrorString(cudaGetLastError()));
  };
  timeit("empty 1x256", [&](cudaStream_t s = 0) { k_empty<<<1, 256, 0, s>>>(o); });
  timeit("floors", [&](cudaStream_t s = 0) { k_floors<<<1, 256, 0, s>>>(b, o); });
  timeit("x load 4096", [&](cudaStream_t s = 0) { k_xload<<<1, 256, 0, s>>>(x, in, o); });
  timeit("select (full)", [&](cudaStream_t s = 0) { k_sel<0><<<1, 256, smem, s>>>(x, b, in, k, o); });
  timeit("select k=1", [&](cudaStream_t s = 0) { k_sel<0><<<1, 256, smem, s>>>(x, b, in, 1, o); });
  timeit("select in=17920", [&](cudaStream_t s = 0) { k_sel<0><<<1, 256, smem * 5, s>>>(x, b, 4096, k, o); });
  return 0;
}
