// Launchers of the decdec CUDA kernels: plain C++ over raw device pointers and a cudaStream_t.
// No torch here, so every .cu compiles with nvcc alone (CI compiles them without a GPU);
// the torch binding (bindings.cpp) checks the tensors and calls these.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#if defined(__CUDACC__)
#define DECDEC_HD __host__ __device__
#else
#define DECDEC_HD
#endif

namespace decdec {

enum class DType : int { F16 = 0, BF16 = 1 };

// Combine protocol of the fused op (ap_gemv_dec / lutgemm_gemv_dec). The base GEMV and DEC run
// concurrently on two streams; each writes its fp32 partial ([M, out]) and then "arrives" at the
// tiles it covers (tile = the GEMV block's rows, per token) with an atomicAdd on a counter. The
// block that arrives last at a tile writes y = cast(gemv + dec) for it and resets the counter to 0.
// So no memset of y is needed, nothing spins (no deadlock whatever the residency), and y is
// rounded once, as in the reference. `counters` must be zero on entry; they are zero on exit.
struct Fused {
  float* gpart = nullptr;   // [M, out] base GEMV partial
  float* dpart = nullptr;   // [M, out] DEC partial
  int* counters = nullptr;  // [M, n_tiles]
  void* y = nullptr;        // [M, out] final output in x's dtype
  int tile_rows = 0;        // rows per GEMV block (a tile)
  int dec_slice = 0;        // outputs per DEC block (DEC block j owns [j*dec_slice, (j+1)*dec_slice))
  DECDEC_HD bool on() const { return gpart != nullptr; }
};

// ---- ap (bit-planes + per-row LUT). qweight [bits, out, in/32] int32, lut [out, 2^bits].
bool ap_bits_supported(int bits);
int ap_gemv_tile_rows(int bits, int in, int out);
cudaError_t ap_gemv(DType dt, const void* x, const uint32_t* qweight, const void* lut, void* y, int M, int in,
                    int out, int bits, const Fused& fused, cudaStream_t stream);
cudaError_t ap_dequant(DType dt, const uint32_t* qweight, const void* lut, void* w, int in, int out, int bits,
                       cudaStream_t stream);

// ---- lutgemm (binary coding). binary [in/32, bits, out], alpha [G, bits, out], q_bias [G, out].
bool lutgemm_bits_supported(int bits);
int lutgemm_gemv_tile_rows(int bits, int in, int out);
cudaError_t lutgemm_gemv(DType dt, const void* x, const uint32_t* binary, const void* alpha, const void* q_bias,
                         void* y, int M, int in, int out, int bits, int group, const Fused& fused,
                         cudaStream_t stream);
cudaError_t lutgemm_dequant(DType dt, const uint32_t* binary, const void* alpha, const void* q_bias, void* w,
                            int in, int out, int bits, int group, cudaStream_t stream);

// ---- DEC. q_residual [in, out/8] int32 (pinned host memory, read zero-copy), scales [out],
// bounds [2] fp32 on the device. Standalone: writes y [M, out] (every element). Fused: see Fused.
int dec_slice_size(int out, int n_tb);
size_t dec_smem_bytes(int in, int out, int k_chunk, int n_tb);
// Most DEC blocks that can be co-resident on the device (occupancy x SMs) for this shape.
cudaError_t dec_max_blocks(int device, int in, int out, int k_chunk, int n_tb, int* max_blocks);
cudaError_t dec(DType dt, const void* x, const uint32_t* q_residual, const void* scales, const float* bounds,
                void* y, int M, int in, int out, int k_chunk, int n_tb, const Fused& fused, cudaStream_t stream);
// Debug: the kernel's own selection, written as uint8 mask [M, in] (1 = selected).
cudaError_t dec_select_debug(DType dt, const void* x, const float* bounds, uint8_t* mask, int M, int in,
                             int k_chunk, cudaStream_t stream);

}  // namespace decdec
