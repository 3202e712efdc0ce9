// Where the fused op's time goes inside a CUDA graph, as a decode step runs it: a producer kernel writes x (as the
// RMSNorm before a projection does), then DEC (parts mode, side stream) || the 3-bit GEMV (main stream), then the
// consumer kernel that reads both. %globaltimer stamps: producer end, every DEC block's unit start / selection done /
// fetch done / partial stored / arrival done, consumer start; medians over the graph's iterations (x permuted per
// iteration, so the selected rows change and the L2 does not keep them). Modes: fused (DEC || GEMV), DEC alone
// (same fork / join, no GEMV), GEMV alone, and chain (ap_gemv_dec_chain: DEC first, the GEMV as its programmatic
// dependent writing the final output; "arrive" is then DEC's publish of its partial); and inside the selection: until
// the warps' histograms are shared, the offsets scanned, the list written, and the final barrier.
// With -DDECDEC_GEMV_PROBE (both files) every mode also prints where the GEMV's blocks ran: how many share an SM, and
// their start / x staged / loop done / end stamps (the last graph iteration).
// TL_PRODUCER=busy: the producer is a decode step's instead -- it holds every SM (two blocks each, shared memory full,
// as a GEMV's two blocks fill the register file), triggers its dependents as it starts (as the GEMVs and the decode
// attention do), works TL_BUSY_NS ns (default 6000, with a ragged tail of 0-700 ns over blocks), then writes x; times
// are then after its last block's end. Chain DEC then waits at its PDL wait during the producer's tail, as in a
// step (with the one-block producer the wait has passed when DEC starts; docs/PERF.md, Kernels, session 15).
// Pure CUDA (no torch), GPU machine:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc [-DDECDEC_GEMV_PROBE] scripts/dec_timeline.cu \
//     csrc/ap_gemv.cu -o /tmp/tl && [TL_PRODUCER=busy] /tmp/tl [INxOUT, e.g. 4096x4096 or Phi-3's 5120x7680]
#include <cstdint>
#include <cstdlib>
constexpr int kTlIters = 48;  // iterations captured per graph
constexpr int kTlBlocks = 160;
__device__ int g_tl_iter;
__device__ unsigned long long g_tl_dec[kTlIters][kTlBlocks][5];
__device__ unsigned long long g_tl_sel[kTlIters][kTlBlocks][3];  // inside the selection (DEC_SPROBE 0-2)
__device__ unsigned long long g_tl_prod[kTlIters], g_tl_cons[kTlIters];
__device__ __forceinline__ unsigned long long tl_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// stamps of the block's first unit (phase 0) and of its last (phases 1-4)
#define DEC_PROBE(i)                                                                                      \
  if (threadIdx.x == 0 && m == 0 && blockIdx.x < kTlBlocks && ((i) != 0 || u == (int)blockIdx.x))          \
    g_tl_dec[*((volatile int*)&g_tl_iter) % kTlIters][blockIdx.x][i] = tl_now();
#define DEC_SPROBE(i)                                                                                     \
  if (threadIdx.x == 0 && blockIdx.x < kTlBlocks) g_tl_sel[*((volatile int*)&g_tl_iter) % kTlIters][blockIdx.x][i] = tl_now();
#include "../csrc/dec.cu"
#include "graph_timer.cuh"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

using namespace decdec;

__global__ void tl_producer(int it, const __half* __restrict__ src, __half* __restrict__ x, int in) {
  for (int i = threadIdx.x; i < in; i += blockDim.x) x[i] = src[(i + 977 * it) % in];
  __syncthreads();
  if (threadIdx.x == 0) {
    g_tl_iter = it;
    __threadfence();
    g_tl_prod[it % kTlIters] = tl_now();
  }
}
// TL_PRODUCER=busy (above): dynamic shared memory kTlBusySmem per block keeps anything else off its SM until it ends.
constexpr int kTlBusySmem = 113 * 1024;  // 2 x (113 + 1 reserved) KB = the 228 KB of an H100 / H200 SM
__global__ void __launch_bounds__(256) tl_busy_producer(int it, const __half* __restrict__ src, __half* __restrict__ x,
                                                        int in, unsigned ns) {
  extern __shared__ char tl_pad[];
  pdl_launch_dependents();
  const unsigned long long stop = tl_now() + ns + (blockIdx.x % 8) * 100;
  while (tl_now() < stop) {
  }
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < in; i += gridDim.x * blockDim.x) x[i] = src[(i + 977 * it) % in];
  if (threadIdx.x == 0) tl_pad[0] = 0;  // the shared memory is this kernel's
  __syncthreads();
  if (threadIdx.x == 0) {
    if (blockIdx.x == 0) g_tl_iter = it;
    __threadfence();
    atomicMax(&g_tl_prod[it % kTlIters], tl_now());  // the last block's end (stamps only grow over iterations)
  }
}
__global__ void tl_consumer(int it, const float* __restrict__ acc) {
  if (threadIdx.x == 0) g_tl_cons[it % kTlIters] = tl_now();
  (void)acc;
}

static double median(std::vector<double> v) {
  if (v.empty()) return -1;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

#ifdef DECDEC_GEMV_PROBE
namespace decdec {
void* gemv_probe_ptr();  // csrc/ap_gemv.cu built with -DDECDEC_GEMV_PROBE: [1024][SM, start, x staged, loop done, end,
                         // DEC seen complete (chain mode only)]
}
// The GEMV's blocks of the graph's last iteration: how many share an SM, and when they start and end (us after the
// producer's end): a block that starts late or ends last shows where the GEMV's time goes.
static void print_gemv_blocks(int grid, unsigned long long prod) {
  static unsigned long long h[1024][6];
  CK(cudaMemcpy(h, gemv_probe_ptr(), sizeof h, cudaMemcpyDeviceToHost));
  std::vector<int> per_sm(256, 0);
  std::vector<double> st, xs, lp, en, ds;
  int worst = 0;
  int n = 0;
  for (int b = 0; b < std::min(grid, 1024); ++b) {
    if (h[b][1] < prod || h[b][4] < h[b][1]) continue;  // not a block of this launch (an earlier mode's stamps)
    ++n;
    per_sm[h[b][0] % 256]++;
    st.push_back(((double)h[b][1] - prod) / 1e3);
    xs.push_back(((double)h[b][2] - prod) / 1e3);
    lp.push_back(((double)h[b][3] - prod) / 1e3);
    en.push_back(((double)h[b][4] - prod) / 1e3);
    if (h[b][5] >= h[b][1] && h[b][5] <= h[b][4]) ds.push_back(((double)h[b][5] - prod) / 1e3);  // this launch's
    if (h[b][4] > h[worst][4] || h[worst][1] < prod) worst = b;
  }
  int maxb = 0, shared = 0;
  for (int c : per_sm) { maxb = std::max(maxb, c); shared += c > 1 ? c : 0; }
  auto mx = [](std::vector<double> v) { return v.empty() ? -1.0 : *std::max_element(v.begin(), v.end()); };
  const int w = worst;
  auto us = [&](unsigned long long v) { return ((double)v - prod) / 1e3; };
  printf("    gemv blocks %d: max per SM %d, blocks sharing an SM %d | start p50 %.2f max %.2f | x staged p50 %.2f max "
         "%.2f | loop done p50 %.2f max %.2f | end p50 %.2f max %.2f | last block %d on SM %llu: %.2f %.2f %.2f %.2f "
         "(%d GEMV blocks on its SM)\n", n, maxb, shared, median(st), mx(st), median(xs), mx(xs), median(lp), mx(lp),
         median(en), mx(en), w, h[w][0], us(h[w][1]), us(h[w][2]), us(h[w][3]), us(h[w][4]), per_sm[h[w][0] % 256]);
  if (!ds.empty())  // chain mode: when each block saw DEC complete (after its loop), i.e. what its combine waited for
    printf("    gemv blocks saw DEC complete: p50 %.2f max %.2f (%zu blocks); end - DEC seen is the combine's loads and writes\n",
           median(ds), mx(ds), ds.size());
}
#endif

int main(int argc, char** argv) {
  const int shapes[][2] = {{4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096}};
  printf("times in us after the producer's end, medians over %d graph iterations (first 8 dropped)\n", kTlIters);
  printf("%-11s %3s %4s %-6s | %7s | %6s %6s %6s %6s %6s | %7s %7s | %7s | select: %5s %5s %5s %5s\n", "shape", "k",
         "n_tb", "mode", "graph/it", "dec0", "select", "fetch", "store", "arrive", "dec_end", "dec_p50", "consumer", "hist",
         "scan", "list", "bar");
  const bool busy = getenv("TL_PRODUCER") && strcmp(getenv("TL_PRODUCER"), "busy") == 0;
  const unsigned busy_ns = getenv("TL_BUSY_NS") ? (unsigned)atoi(getenv("TL_BUSY_NS")) : 6000u;
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  if (busy) {
    CK(cudaFuncSetAttribute(tl_busy_producer, cudaFuncAttributeMaxDynamicSharedMemorySize, kTlBusySmem));
    printf("producer: busy, %d blocks (2 per SM), %u ns + a 0-700 ns tail, triggers at its start\n", 2 * sms, busy_ns);
  }
  std::vector<std::pair<int, int>> todo;  // the Llama-3-8B shapes, or the one INxOUT given (e.g. Phi-3's 5120x7680)
  int a_in = 0, a_out = 0;
  if (argc > 1) {
    if (sscanf(argv[1], "%dx%d", &a_in, &a_out) != 2 || a_in % 256 != 0 || a_out % 32 != 0) {
      fprintf(stderr, "usage: %s [INxOUT], IN a multiple of 256, OUT of 32 (got %s)\n", argv[0], argv[1]);
      return 2;
    }
    todo.push_back({a_in, a_out});
  } else {
    for (auto& sh : shapes) todo.push_back({sh[0], sh[1]});
  }
  for (auto& sh : todo) {
    const int in = sh.first, out = sh.second;
    char name[32];
    snprintf(name, sizeof name, "%dx%d", in, out);
    const int words = in / 32;
    const size_t qwords = (size_t)out * words * 3;
    const int copies = std::max(2, (int)((240ull << 20) / (qwords * 4)) + 1);
    std::vector<uint32_t> hq(qwords);
    uint32_t s = 12345;
    for (auto& w : hq) w = (s = s * 1664525u + 1013904223u);
    std::vector<__half> hl(out * 8), hx(in);
    for (int i = 0; i < out * 8; ++i) hl[i] = __float2half(((i * 37) % 17 - 8) / 64.f);
    for (int i = 0; i < in; ++i) hx[i] = __float2half(((i * 7919) % 2001 - 1000) / 300.f);
    std::vector<uint32_t*> qw(copies);
    std::vector<__half*> lut(copies);
    for (int c = 0; c < copies; ++c) {
      CK(cudaMalloc(&qw[c], qwords * 4));
      CK(cudaMemcpy(qw[c], hq.data(), qwords * 4, cudaMemcpyHostToDevice));
      CK(cudaMalloc(&lut[c], out * 16));
      CK(cudaMemcpy(lut[c], hl.data(), out * 16, cudaMemcpyHostToDevice));
    }
    __half *src, *x, *y, *scales;
    float *bounds, *acc, *scratch;
    int* dcount;
    CK(cudaMalloc(&src, in * 2));
    CK(cudaMemcpy(src, hx.data(), in * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&x, in * 2));
    CK(cudaMalloc(&y, out * 2));
    CK(cudaMalloc(&scales, out * 2));
    CK(cudaMemset(scales, 0, out * 2));
    CK(cudaMalloc(&bounds, 8));
    const float hb[2] = {3.3f, 2.0f};
    CK(cudaMemcpy(bounds, hb, 8, cudaMemcpyHostToDevice));
    const int parts = dec_parts(in);
    CK(cudaMalloc(&acc, sizeof(float) * (size_t)(1 + parts) * out));
    CK(cudaMalloc(&scratch, sizeof(float) * chain_scratch_floats(in, out, 1)));  // >= parts * out
    CK(cudaMalloc(&dcount, 1 << 20));
    CK(cudaMemset(dcount, 0, 1 << 20));
    uint32_t *qr_host, *qr;
    CK(cudaHostAlloc(&qr_host, (size_t)in * out / 2, cudaHostAllocMapped));
    for (size_t i = 0; i < (size_t)in * out / 8; ++i) qr_host[i] = (s = s * 1664525u + 1013904223u);
    CK(cudaHostGetDevicePointer((void**)&qr, qr_host, 0));
    cudaStream_t side;
    CK(cudaStreamCreateWithPriority(&side, cudaStreamNonBlocking, -5));
    cudaEvent_t fork, join;
    CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));

    for (int k : {1, 4, 16}) {
      for (int n_tb : {16, 32, 66, 132}) {
        for (int mode = 0; mode < 4; ++mode) {  // fused, DEC alone, GEMV alone, chain
          if (mode == 2 && (k != 1 || n_tb != 16)) continue;
          const bool with_dec = mode != 2, with_gemv = mode != 1;
          const bool chain = mode == 3;
          Fused f;
          f.gpart = acc;
          f.dec_slice = dec_slice_size(in, out, n_tb);
          f.dec_parts = parts;
          f.n_tokens = 1;
          f.reserve_blocks = mode == 2 ? 0 : n_tb;
          if (parts > kMaxConsumerParts) {
            f.dpart = scratch;
            f.dsum = acc + out;
            f.dec_counters = dcount;
          } else {
            f.dpart = acc + out;
          }
          const bool packed = true;
          auto step = [&](cudaStream_t st, int i) {
            if (busy) tl_busy_producer<<<2 * sms, 256, kTlBusySmem, st>>>(i, src, x, in, busy_ns);
            else tl_producer<<<1, 256, 0, st>>>(i, src, x, in);
            if (chain) {  // counters: their own zeroed words, past the DEC slice counters
              CK(ap_gemv_dec_chain(x, qw[i % copies], lut[i % copies], qr, scales, bounds, y, scratch, dcount + 65536,
                                   1, in, out, k, n_tb, st));
              tl_consumer<<<1, 32, 0, st>>>(i, acc);
              return;
            }
            if (with_dec) {
              CK(cudaEventRecord(fork, st));
              CK(cudaStreamWaitEvent(side, fork, 0));
              CK(dec(DType::F16, x, qr, nullptr, bounds, 1, in, out, k, n_tb, f, side));
            }
            if (with_gemv) CK(ap_gemv(DType::F16, x, qw[i % copies], lut[i % copies], nullptr, 1, in, out, 3, f, st, packed));
            if (with_dec) {
              CK(cudaEventRecord(join, side));
              CK(cudaStreamWaitEvent(st, join, 0));
            }
            tl_consumer<<<1, 32, 0, st>>>(i, acc);
          };
          const float per_it = graph_us(step);
          // graph_us ran 40 captured calls (i = 0..39) last: read their stamps
          static unsigned long long hd[kTlIters][kTlBlocks][5], hs[kTlIters][kTlBlocks][3], hp[kTlIters], hc[kTlIters];
          CK(cudaMemcpyFromSymbol(hd, g_tl_dec, sizeof hd));
          CK(cudaMemcpyFromSymbol(hs, g_tl_sel, sizeof hs));
          CK(cudaMemcpyFromSymbol(hp, g_tl_prod, sizeof hp));
          CK(cudaMemcpyFromSymbol(hc, g_tl_cons, sizeof hc));
          std::vector<double> d0, sel, fet, sto, arr, dend, dp50, cons, s1, s2, s3, s4;
          const int units = n_chunks(in) * slices_per_chunk(in, n_tb);
          // blocks whose first unit has a non-empty slice (the others never stamp phase 0)
          const int spc = slices_per_chunk(in, n_tb), slice = dec_slice_size(in, out, n_tb);
          int nb = 0;
          while (nb < std::min(n_tb, std::min(units, kTlBlocks)) && (nb % spc) * slice < out) ++nb;
          for (int it = 8; it < 40; ++it) {
            const double p = (double)hp[it];
            cons.push_back((hc[it] - p) / 1e3);
            if (mode == 2) continue;
            double first = 1e30, last = 0;
            std::vector<double> ends;
            for (int b = 0; b < nb; ++b) {
              const auto* t = hd[it][b];
              first = std::min(first, (t[0] - p) / 1e3);
              last = std::max(last, (t[4] - p) / 1e3);
              ends.push_back((t[4] - p) / 1e3);
              sel.push_back((t[1] - (double)t[0]) / 1e3);
              fet.push_back((t[2] - (double)t[1]) / 1e3);
              sto.push_back((t[3] - (double)t[2]) / 1e3);
              arr.push_back((t[4] - (double)t[3]) / 1e3);
              const auto* q = hs[it][b];
              s1.push_back((q[0] - (double)t[0]) / 1e3);
              s2.push_back((q[1] - (double)q[0]) / 1e3);
              s3.push_back((q[2] - (double)q[1]) / 1e3);
              s4.push_back((t[1] - (double)q[2]) / 1e3);
            }
            d0.push_back(first);
            dend.push_back(last);
            dp50.push_back(median(ends));
          }
#ifdef DECDEC_GEMV_PROBE
          const bool show_blocks = mode != 1;
#endif
          const char* mn[] = {"fused", "dec", "gemv", "chain"};
          if (mode == 2)
            printf("%-11s %3s %4s %-6s | %7.2f | %6s %6s %6s %6s %6s | %7s %7s | %7.2f\n", name, "-", "-", mn[mode],
                   per_it, "", "", "", "", "", "", "", median(cons));
          else
            printf("%-11s %3d %4d %-6s | %7.2f | %6.2f %6.2f %6.2f %6.2f %6.2f | %7.2f %7.2f | %7.2f | %13.2f %5.2f %5.2f "
                   "%5.2f\n", name, k, n_tb, mn[mode], per_it, median(d0), median(sel), median(fet), median(sto),
                   median(arr), median(dend), median(dp50), median(cons), median(s1), median(s2), median(s3), median(s4));
#ifdef DECDEC_GEMV_PROBE
          if (show_blocks) print_gemv_blocks(1024, hp[39]);
#endif
          fflush(stdout);
        }
      }
    }
    for (int c = 0; c < copies; ++c) {
      cudaFree(qw[c]);
      cudaFree(lut[c]);
    }
    cudaFree(src); cudaFree(x); cudaFree(y); cudaFree(scales); cudaFree(bounds); cudaFree(acc); cudaFree(scratch); cudaFree(dcount);
    cudaFreeHost(qr_host);
    cudaStreamDestroy(side);
  }
  return 0;
}
