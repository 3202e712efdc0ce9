// Experiment (not yet the shipped kernel): the 3-bit ap GEMV on the binary tensor cores, against the shipped GEMV on
// the same card in the same run. scripts/stream_envelope.cu measured that the shipped decode (PRMT LUT lookups, ~3.9
// instructions per weight) costs 20 us at 4096x28672 even when streamed perfectly, against 11.5 us for reading the
// bytes; this design issues ~0.2 instructions per weight, most of them on the tensor pipe.
//
// Math. The per-row LUT is a function of the code's three bits b0 b1 b2, so it is a multilinear polynomial in them:
// lut[c] = sum over T of a_T * prod_{p in T} b_p (T a subset of {0, 1, 2}; a_T the Moebius transform of the 8
// entries). Hence y_r = a_{} * sum(x) + sum over the 7 non-empty T of a_T(r) * M_T(r), M_T(r) = sum_i x_i m_T(r, i),
// where m_T is the AND of the bit-planes in T (4 LOP3 per 32 weights). x is held as 24-bit fixed point X = x * 2^sh
// (|X| < 2^22, sh from the token's max |x|: every x within 2^-11 of the max is exact, smaller ones round at 2^-22 of
// it) and split into its 24 two's-complement bit-planes P_j; then M_T = 2^-sh * sum_j w_j popc(m_T & P_j), w_j = 2^j
// (w_23 = -2^23): integer dot products of bit vectors, which mma.m16n8k256.b1.and.popc computes for 16 rows x 8
// x-planes x 256 channels per instruction (native on H200: 24.5 cycles latency, one per 6 cycles per SM
// sub-partition, the f16 MMA's rate). The popcount sums are exact int32, combined with w_j and a_T once per row in
// fp64; the error against the exact fp64 LUT dot product is the fp16 output rounding (checked below, exit 1 if not).
//
// Work (csrc/ap_bmma.cu, included: this tool has no kernel of its own). A warp item is 16 rows x (in / KP) channels in
// steps of 512: per step each lane streams 6 x 16 bytes through its own cp.async ring (no registers in flight), forms
// the 7 masks and issues 2 halves x 3 x-plane blocks x 7 masks = 42 BMMA into 84 int32 accumulators; the weights are
// re-laid once (pack_bmma = formats.pack_ap3_bmma) so that a step is 3 KB contiguous per warp and each 16-byte piece
// is an MMA A operand as loaded. x's planes come from ap3_xplanes_kernel; KP > 1 splits K (partial rows in fp32
// slots, summed in slot order by the last item of a row group). The tool times the op's own plan (ap3_bmma_gemv: planes kernel + GEMV, its
// K split and warps) and sweeps the GEMV alone over ring depth, warps, blocks per SM and K split. (Session 20's numbers
// in docs/PERF.md came from this tool's earlier self-contained copy, which also had a bit-plane-layout variant: slower
// everywhere.)
// Graph-timed (graph_timer.cuh), weights rotating over >= 4x the L2. Shapes: Llama-3-8B and Phi-3-medium, or argv[2] alone.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc scripts/bmma_gemv_ab.cu csrc/dec.cu -o /tmp/bg && /tmp/bg [table.md|-] [INxOUT]
//   ncu --section WarpStateStats --section SchedulerStats -k regex:ap3_bmma -c 2 /tmp/bg - 4096x28672 4,7,1,1
#include "../csrc/ap_gemv.cu"
#include "../csrc/ap_bmma.cu"
#include "ap3_layout.cuh"
#include "graph_timer.cuh"

#include <array>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

using namespace decdec;

namespace bmma_ab {  // named: see graph_timer.cuh

// bit-planes [3][out][in/32] -> the layout of decdec/formats.py pack_ap3_bmma: per (row group, step, half h, plane p)
// and lane (g, t) the A quad of mask {p}: rows g, g + 8 of word 4t + 2h, then rows g, g + 8 of word 4t + 2h + 1.
std::vector<uint32_t> pack_bmma(const std::vector<uint32_t>& planes, int in, int out) {
  const int words = in / 32, steps = in / 512;
  std::vector<uint32_t> pk(planes.size());
  for (int group = 0; group < out / 16; ++group)
    for (int kb = 0; kb < steps; ++kb)
      for (int h = 0; h < 2; ++h)
        for (int p = 0; p < 3; ++p)
          for (int lane = 0; lane < 32; ++lane) {
            const size_t dst = ((((size_t)group * steps + kb) * 6 + h * 3 + p) * 32 + lane) * 4;
            for (int i = 0; i < 4; ++i) {
              const int row = group * 16 + lane / 4 + 8 * (i & 1), wd = kb * 16 + 4 * (lane % 4) + 2 * h + (i >> 1);
              pk[dst + i] = planes[(size_t)p * out * words + (size_t)row * words + wd];
            }
          }
  return pk;
}

struct Cfg {
  float us = 1e30f;
  int stages = 0, warps = 0, bps = 0, kp = 0;
};

}  // namespace bmma_ab

int main(int argc, char** argv) {
  using namespace bmma_ab;
  std::vector<std::array<int, 2>> shapes = {{4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096},
                                            {5120, 7680}, {5120, 5120}, {5120, 35840}, {17920, 5120}};
  int sms = 0, l2 = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  int optin = 0;
  CK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
  auto allow_max = [&](auto k) {  // all the dynamic shared memory a block may have beside the kernel's static arrays
    cudaFuncAttributes fa{};
    CK(cudaFuncGetAttributes(&fa, k));
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, optin - (int)fa.sharedSizeBytes));
  };
  allow_max(ap3_bmma_kernel<__half, 4>);
  allow_max(ap3_bmma_kernel<__half, 8>);
  cudaFuncAttributes fa;
  CK(cudaFuncGetAttributes(&fa, ap3_bmma_kernel<__half, 4>));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::string md, chain_md;
  char line[1024];
  snprintf(line, sizeof line,
           "%s, %d SMs; BMMA GEMV (csrc/ap_bmma.cu) %d registers. Errors: max |y - y_ref| / max |y_ref| (y_ref: the "
           "LUT dot product in fp64 on the host). op: ap3_bmma_gemv's own plan, planes kernel included (KP, warps); "
           "best: the GEMV alone over the sweep (stages, warps x blocks/SM, KP).\n\n"
           "| shape | shipped (kernel layout) | shipped err | xplanes | op | best GEMV | BMMA err | "
           "best / shipped | GB/s best |\n|---|---|---|---|---|---|---|---|---|\n",
           prop.name, sms, fa.numRegs);
  md += line;
  printf("%s", md.c_str());
  std::mt19937 rng(4321);
  bool mismatch = false;
  int only[4] = {0, 0, 0, 0};  // argv[3] "stages,warps,blocks_per_sm,KP": that configuration alone (e.g. under ncu)
  const bool single = argc > 3 && sscanf(argv[3], "%d,%d,%d,%d", &only[0], &only[1], &only[2], &only[3]) == 4;
  for (auto& sh : shapes) {
    const int in = sh[0], out = sh[1], words = in / 32;
    if (!ap3_bmma_supported(DType::F16, in, out)) continue;
    if (argc > 2 && std::string(argv[2]) != std::to_string(in) + "x" + std::to_string(out)) continue;
    const size_t nw = (size_t)3 * out * words, qbytes = nw * 4;
    std::vector<uint32_t> planes(nw);
    for (auto& w : planes) w = rng();
    std::vector<__half> hl((size_t)out * 8), hx(in);
    std::vector<float> fl((size_t)out * 8), fx(in);
    for (size_t i = 0; i < hl.size(); ++i) {
      hl[i] = __float2half(((int)(rng() % 2001) - 1000) / 1000.f);
      fl[i] = __half2float(hl[i]);
    }
    for (int i = 0; i < in; ++i) {
      float v = ((int)(rng() % 2001) - 1000) / 1000.f;
      if (rng() % 97 == 0) v *= 40.f;  // outlier channels, as RMSNorm'd activations have
      hx[i] = __float2half(v);
      fx[i] = __half2float(hx[i]);
    }
    std::vector<double> yref(out);  // host reference (fp64)
    double ymax = 0.0;
    for (int r = 0; r < out; ++r) {
      double s = 0.0;
      for (int wd = 0; wd < words; ++wd) {
        const uint32_t p0 = planes[(size_t)r * words + wd], p1 = planes[(size_t)out * words + (size_t)r * words + wd],
                       p2 = planes[2 * (size_t)out * words + (size_t)r * words + wd];
        for (int j = 0; j < 32; ++j) {
          const int c = ((p0 >> j) & 1) | (((p1 >> j) & 1) << 1) | (((p2 >> j) & 1) << 2);
          s += (double)fl[(size_t)r * 8 + c] * fx[32 * wd + j];
        }
      }
      yref[r] = s;
      ymax = std::max(ymax, std::fabs(s));
    }
    const std::vector<uint32_t> pk = pack_bmma(planes, in, out), kl = pack_kernel_layout(planes, out, words);
    const int copies = std::max(4, (int)((4.0 * l2 + qbytes - 1) / qbytes));
    uint32_t *qp, *qk;
    __half *lut, *x, *y;
    void* scratch;
    CK(cudaMalloc(&qp, qbytes * copies));
    CK(cudaMalloc(&qk, qbytes * copies));
    CK(cudaMalloc(&lut, (size_t)out * 16 * copies));
    for (int c = 0; c < copies; ++c) {
      CK(cudaMemcpy(qp + c * nw, pk.data(), qbytes, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(qk + c * nw, kl.data(), qbytes, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(lut + (size_t)c * out * 8, hl.data(), (size_t)out * 16, cudaMemcpyHostToDevice));
    }
    CK(cudaMalloc(&x, in * 2));
    CK(cudaMemcpy(x, hx.data(), in * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&y, out * 2));
    const size_t sbytes = ap3_bmma_scratch_bytes(in, out);
    CK(cudaMalloc(&scratch, sbytes));
    int* cnt;  // the K split's counters: zero on entry, left at zero
    CK(cudaMalloc(&cnt, out / 16 * sizeof(int)));
    CK(cudaMemset(cnt, 0, out / 16 * sizeof(int)));
    uint32_t* xb = static_cast<uint32_t*>(scratch);
    XMeta* meta = reinterpret_cast<XMeta*>(static_cast<char*>(scratch) + planes_bytes(in));
    float* y32 = reinterpret_cast<float*>(static_cast<char*>(scratch) + meta_end(in));
    const int plane_blocks = words / kPlaneWarps;
    ap3_xplanes_kernel<__half><<<plane_blocks, 32 * kPlaneWarps>>>(x, in, xb, meta, AddNorm{}, 0);
    CK(cudaDeviceSynchronize());

    auto err_of = [&]() {
      std::vector<__half> hy(out);
      CK(cudaMemcpy(hy.data(), y, out * 2, cudaMemcpyDeviceToHost));
      double e = 0.0;
      for (int r = 0; r < out; ++r) e = std::max(e, std::fabs((double)__half2float(hy[r]) - yref[r]));
      return e / ymax;
    };
    CK((launch_gemv<3, __half>(x, qk, lut, y, 1, in, out, Fused{}, 0, true)));
    CK(cudaDeviceSynchronize());
    const double err_shipped = err_of();
    const float t_shipped = graph_us([&](cudaStream_t s, int i) {
      const int c = i % copies;
      CK((launch_gemv<3, __half>(x, qk + c * nw, lut + (size_t)c * out * 8, y, 1, in, out, Fused{}, s, true)));
    });
    const float t_xplanes = graph_us([&](cudaStream_t s, int) {
      CK(launch_kernel(ap3_xplanes_kernel<__half>, dim3(plane_blocks), dim3(32 * kPlaneWarps), 0, s, true, x, in, xb,
                       meta, AddNorm{}, 0));
    });
    // the op's own plan (planes kernel + GEMV), as torch.ops.decdec.ap_gemv runs it
    CK(ap3_bmma_gemv(DType::F16, x, qp, lut, y, 1, in, out, scratch, cnt, 0));
    CK(cudaDeviceSynchronize());
    double err_bmma = err_of();
    const float t_op = graph_us([&](cudaStream_t s, int i) {
      const int c = i % copies;
      CK(ap3_bmma_gemv(DType::F16, x, qp + c * nw, lut + (size_t)c * out * 8, y, 1, in, out, scratch, cnt, s));
    });
    const int op_kp = bmma_kp(in, out, sms), op_warps = bmma_warps(out / 16 * op_kp, sms);
    auto launch = [&](int stages, int warps, int bps, int kp, int c, cudaStream_t s) {
      const size_t smem = (size_t)in * kXBits / 8 + (size_t)warps * stages * kStepU4 * 16;
      const int items = out / 16 * kp, grid = std::min(sms * bps, (items + warps - 1) / warps);
      auto k = stages == 8 ? ap3_bmma_kernel<__half, 8> : ap3_bmma_kernel<__half, 4>;
      if (s == 0) allow_max(k);  // the op's allow_smem may have set less (the direct launch precedes each capture)
      CK(launch_kernel(k, dim3(grid), dim3(warps * 32), smem, s, true, reinterpret_cast<const uint4*>(qp + c * nw),
                       static_cast<const __half*>(lut + (size_t)c * out * 8), static_cast<const uint32_t*>(xb),
                       static_cast<const XMeta*>(meta), y, y32, cnt, in, out, kp));
    };
    Cfg best;
    for (int stages : {4, 8})
      for (const auto& wb : std::vector<std::array<int, 2>>{{4, 1}, {4, 2}, {5, 2}, {6, 1}, {7, 1}, {8, 1}, {9, 1},
                                                            {10, 1}})
        for (int kp : {1, 2, 4, 7}) {
          const int warps = wb[0], bps = wb[1];
          if (single && (stages != only[0] || warps != only[1] || bps != only[2] || kp != only[3])) continue;
          if ((in / 512) % kp) continue;
          if (bps * ((size_t)in * kXBits / 8 + (size_t)warps * stages * kStepU4 * 16) > (size_t)optin - 256) continue;
          CK(cudaMemset(y, 0, out * 2));
          launch(stages, warps, bps, kp, 0, 0);
          CK(cudaDeviceSynchronize());
          err_bmma = std::max(err_bmma, err_of());
          const float us = graph_us([&](cudaStream_t s, int i) { launch(stages, warps, bps, kp, i % copies, s); });
          if (us < best.us) best = {us, stages, warps, bps, kp};
        }
    // In a chain: an in x in producer GEMV (kernel layout, like the o projection before gate_up) writes x, then the
    // shipped GEMV, the op (planes kernel + GEMV), or the GEMV alone on the planes already there (timing only: the
    // planes are stale). op - alone = what the planes kernel costs between a producer and the GEMV: the most that
    // planes formed by the producer itself could save, before that producer's own extra work.
    {
      const size_t nw_o = (size_t)3 * in * words;
      std::vector<uint32_t> planes_o(nw_o);
      for (auto& w : planes_o) w = rng();
      const std::vector<uint32_t> kl_o = pack_kernel_layout(planes_o, in, words);
      const int copies_o = std::max(4, (int)((4.0 * l2 + nw_o * 4 - 1) / (nw_o * 4)));
      uint32_t* qo;
      __half *luto, *xo;
      CK(cudaMalloc(&qo, nw_o * 4 * copies_o));
      CK(cudaMalloc(&luto, (size_t)in * 16 * copies_o));
      CK(cudaMalloc(&xo, in * 2));
      CK(cudaMemcpy(xo, hx.data(), in * 2, cudaMemcpyHostToDevice));
      std::vector<__half> hlo((size_t)in * 8);
      for (auto& v : hlo) v = __float2half(((int)(rng() % 2001) - 1000) / 64000.f);  // keeps x in fp16 range
      for (int c = 0; c < copies_o; ++c) {
        CK(cudaMemcpy(qo + c * nw_o, kl_o.data(), nw_o * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(luto + (size_t)c * in * 8, hlo.data(), (size_t)in * 16, cudaMemcpyHostToDevice));
      }
      auto producer = [&](cudaStream_t s, int i) {
        const int c = i % copies_o;
        CK((launch_gemv<3, __half>(xo, qo + c * nw_o, luto + (size_t)c * in * 8, x, 1, in, in, Fused{}, s, true)));
      };
      const float c_prod = graph_us(producer);
      const float c_shipped = graph_us([&](cudaStream_t s, int i) {
        producer(s, i);
        const int c = i % copies;
        CK((launch_gemv<3, __half>(x, qk + c * nw, lut + (size_t)c * out * 8, y, 1, in, out, Fused{}, s, true)));
      });
      const float c_op = graph_us([&](cudaStream_t s, int i) {
        producer(s, i);
        const int c = i % copies;
        CK(ap3_bmma_gemv(DType::F16, x, qp + c * nw, lut + (size_t)c * out * 8, y, 1, in, out, scratch, cnt, s));
      });
      const float c_alone = graph_us([&](cudaStream_t s, int i) {
        producer(s, i);
        launch(4, op_warps, 1, op_kp, i % copies, s);
      });
      snprintf(line, sizeof line, "| %dx%d then %dx%d | %.2f us | %.2f us | %.2f us | %.2f us | %.2f us |\n", in, in,
               in, out, c_prod, c_shipped, c_op, c_alone, c_op - c_alone);
      chain_md += line;
      cudaFree(qo);
      cudaFree(luto);
      cudaFree(xo);
    }
    const double gbs = (qbytes + out * 16.0) / (best.us * 1e3);
    snprintf(line, sizeof line,
             "| %dx%d | %.2f us | %.1e | %.2f us | %.2f us (KP %d, %d warps) | %.2f us (%d, %dx%d, KP %d) | "
             "%.1e | %.2f | %.0f |\n",
             in, out, t_shipped, err_shipped, t_xplanes, t_op, op_kp, op_warps, best.us, best.stages, best.warps,
             best.bps, best.kp, err_bmma, best.us / t_shipped, gbs);
    printf("%s", line);
    md += line;
    if (err_bmma > 2e-3 || !(err_bmma == err_bmma)) {
      printf("MISMATCH: the BMMA GEMV is off the fp64 reference by %.2e of max |y| at %dx%d\n", err_bmma, in, out);
      mismatch = true;
    }
    cudaFree(qp);
    cudaFree(qk);
    cudaFree(lut);
    cudaFree(x);
    cudaFree(y);
    cudaFree(scratch);
    cudaFree(cnt);
  }
  md += "\nIn a chain (graph-timed, per pair): an in x in producer GEMV in the kernel layout writes x, then the "
        "consumer; GEMV alone: the bmma GEMV with the op's plan on planes already formed (stale: timing only).\n\n"
        "| producer then consumer | producer alone | then shipped | then op (planes + GEMV) | then GEMV alone | "
        "op - alone |\n|---|---|---|---|---|---|\n" + chain_md;
  printf("%s", md.substr(md.find("\nIn a chain")).c_str());
  if (argc > 1 && std::string(argv[1]) != "-") {
    const std::string tmp = std::string(argv[1]) + ".tmp";
    FILE* f = fopen(tmp.c_str(), "w");
    if (!f || fputs(md.c_str(), f) < 0 || fclose(f) != 0 || rename(tmp.c_str(), argv[1]) != 0) {
      printf("could not write %s\n", argv[1]);
      return 1;
    }
  }
  return mismatch ? 1 : 0;
}
