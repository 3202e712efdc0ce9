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

// Prologue of a decode GEMV that absorbs the residual add and RMSNorm before it (ap_gemv_addnorm): the kernel
// reads a and b (x of the kernel call is a), forms h = a + b (fp16), x = gamma * fp16(h * rsqrt(mean(h^2) + eps))
// exactly as the model's RMSNorm does, multiplies x, and block 0 writes h (the residual stream) to h_out.
struct AddNorm {
  const void* b = nullptr;      // [M, in]
  const void* gamma = nullptr;  // [in]
  void* h_out = nullptr;        // [M, in]
  float eps = 0.f;
};

// Combine protocol of the fused op (ap_gemv_dec / lutgemm_gemv_dec) and of standalone DEC. The base
// GEMV and DEC run concurrently on two streams. DEC is split into units (1024-channel chunk c x
// output slice s); each unit writes its fp32 partial of chunk c for its slice, the GEMV writes its
// fp32 partial; then each "arrives" at the tiles it covers (tile = the GEMV block's rows, per token)
// with an atomicAdd on a counter. The one that arrives last at a tile writes
// y = cast(gemv + scale * sum over chunks of dec) there, summing in a fixed order (deterministic), and resets
// the counter to 0. So no memset is needed, nothing spins (no deadlock whatever the residency), and
// y is rounded once, as in the reference. `counters` must be zero on entry; they are zero on exit.
// Standalone DEC uses the same protocol with gpart == nullptr and tiles = its slices.
// Parts mode (ap_gemv_dec_parts / lutgemm_gemv_dec_parts): counters == nullptr. The GEMV writes its fp32
// result to gpart and nothing else; DEC writes its chunk partials to dpart. With at most kMaxConsumerParts
// chunks that is all (dsum == nullptr): the caller reads them. With more (in > 4096), the last chunk unit to
// finish an output slice also sums the slice's partials in chunk order into dsum (fp32, unscaled; dec_counters,
// zero on entry and exit), so the caller reads one DEC vector. The caller adds gpart + scale * sum(DEC), which a
// compiled decode step fuses into the next pointwise kernel: the GEMV pays no combine at all.
constexpr int kMaxConsumerParts = 4;  // parts mode: DEC partials left to the caller unsummed (H200, docs/PERF.md s7)

struct Fused {
  float* gpart = nullptr;   // [M, out] base GEMV partial (nullptr: DEC alone)
  float* dpart = nullptr;   // [dec_parts][M][out] DEC partials, one per 1024-channel chunk
  int* counters = nullptr;  // [M, n_tiles]
  void* y = nullptr;        // [M, out] final output in x's dtype
  int tile_rows = 0;        // rows per tile (GEMV block)
  int dec_slice = 0;        // outputs per DEC unit (slice s owns [s*dec_slice, (s+1)*dec_slice))
  int dec_parts = 0;        // number of DEC partials (chunks)
  int n_tokens = 0;         // M
  const void* dec_scales = nullptr;  // [out] residual scales (x's dtype): y = gemv + scale * sum(dec)
  int reserve_blocks = 0;   // SM slots the concurrent DEC blocks take (the GEMV grid leaves them)
  float* dsum = nullptr;        // parts mode: [M, out] sum of the DEC partials (unscaled)
  int* dec_counters = nullptr;  // parts mode: [M, ceil(out / dec_slice)] arrivals per DEC slice
  // DEC beside the add + norm GEMV (ap_gemv_addnorm_dec_parts): x of the DEC launch is a, and DEC forms
  // x = rms_norm(a + b) itself, as the GEMV does (norm.gamma != nullptr; fp16; h_out is the GEMV's to write).
  AddNorm norm;
  // Chain mode (ap_gemv_dec_chain, ap_gemv_addnorm_dec_chain, ap_gemv_addnorm_glu_dec_chain): one stream, no fork /
  // join. DEC is launched first, as a programmatic dependent of the kernel before it, and triggers its own dependents
  // at once; the GEMV follows as DEC's programmatic dependent, so it is scheduled while DEC runs, on the slots DEC
  // leaves (reserve_blocks), and does not wait for DEC's grid. Instead: DEC's block 0 adds 1 to chain[0] once the
  // kernel before DEC has completed (x is readable), and the GEMV's blocks wait for that before they read x; each DEC
  // unit stores its chunk partial (dpart) and adds 1 to chain[1 + m]; each GEMV block keeps its rows' fp32 sums in
  // shared memory, waits until chain[1 + m] == chain_units, and writes y = cast(gemv + scale * sum over chunks) itself
  // (the GLU variant: silu(g) * u of the combined pair). So the output is final when the GEMV ends, and the kernels
  // before and after keep their programmatic overlap and their fusions. Nothing waits on a block that is not
  // resident: the GEMV launches only after every DEC block has started. The last of the GEMV's blocks to pass each
  // counter resets it: chain is zero on entry and exit.
  // The tensor-core GEMV with equal shares splits a group over two blocks, which meet at
  // chain[kChainGroups + m * groups + group] and leave their fp32 row sums in gsplit [M][groups][2][16].
  int* chain = nullptr;  // [1 + M], then from kChainGroups [M * groups]
  float* gsplit = nullptr;
  int chain_units = 0;   // DEC units per token: dec_parts x non-empty slices
  DECDEC_HD bool on() const { return counters != nullptr; }            // the combine protocol runs
  DECDEC_HD bool concurrent() const { return chain == nullptr && (gpart != nullptr || dpart != nullptr); }  // GEMV beside DEC (fork / join)
};

// Fused::chain: the token counters [1 + M] (M < kChainGroups - 1), then the split-group counters (M * groups <= cap).
constexpr int kChainGroups = 4096, kChainGroupCap = 61440;
// Floats of the chain ops' fp32 scratch (`dpart`): DEC's chunk partials [dec_parts(in)][M][out], then the tensor-core
// GEMV's split groups [M][ceil(out / 16)][2][16].
size_t chain_scratch_floats(int in, int out, int M);

// Whether ap_gemv_addnorm serves this (3-bit fp16 on the streaming kernel, in <= 8192).
bool ap_addnorm_supported(DType dt, int bits, int in);
cudaError_t ap_gemv_addnorm(const void* a, const AddNorm& an, const uint32_t* qweight, const void* lut, void* y, int M,
                            int in, int out, cudaStream_t stream, bool packed = false, const Fused& fused = Fused{});

// The add + norm GEMV with SiLU x up in its epilogue (gate_up with rows interleaved (gate_i, up_i): decdec.formats
// interleave_rows / QuantLinear.use_glu_layout): y [M, out / 2] = fp16(silu(g) * u) of the fp16-rounded row pairs.
// Where ap_glu_supported: 3-bit fp16 on the streaming GEMV (in <= 8192; Llama-3's 4096 and 8192).
bool ap_glu_supported(DType dt, int bits, int in);
// Chain mode (kernels.h `Fused::chain`): DEC, then the GEMV as its programmatic dependent, one final output. Where
// ap_dec_chain_supported: 3-bit fp16 on the tensor-core or streaming GEMV (kernel layout) of a device with
// programmatic dependent launch (sm_90). `n_tb` DEC blocks; `chain` kChainGroups + kChainGroupCap zeroed ints (left
// zero); `dpart` chain_scratch_floats(in, out, M) floats of scratch. norm: the add + norm GEMV (DEC forms x
// itself); glu: its GLU epilogue (y [M, out / 2]).
bool ap_dec_chain_supported(DType dt, int bits, int in);
cudaError_t ap_gemv_dec_chain(const void* x, const uint32_t* qweight, const void* lut, const uint32_t* q_residual,
                              const void* scales, const float* bounds, void* y, float* dpart, int* chain, int M, int in,
                              int out, int k_chunk, int n_tb, cudaStream_t stream, const AddNorm* norm = nullptr,
                              bool glu = false);
cudaError_t ap_gemv_addnorm_glu(const void* a, const AddNorm& an, const uint32_t* qweight, const void* lut, void* y,
                                int M, int in, int out, cudaStream_t stream, bool packed = false);

// ---- ap (bit-planes + per-row LUT). qweight [bits, out, in/32] int32, lut [out, 2^bits]; `packed`: 3-bit qweight
// in the kernel layout [out, in/256, 3, 8] (common.cuh, decdec/formats.py pack_ap3_kernel), for fp16 where
// ap3_packed_supported (the tensor-core and streaming GEMVs' shapes).
bool ap_bits_supported(int bits);
bool ap3_packed_supported(DType dt, int bits, int in);
// Rows per GEMV block (= fused tile) when `reserve_blocks` DEC blocks run beside it.
int ap_gemv_tile_rows(DType dt, int bits, int in, int out, int reserve_blocks);
cudaError_t ap_gemv(DType dt, const void* x, const uint32_t* qweight, const void* lut, void* y, int M, int in,
                    int out, int bits, const Fused& fused, cudaStream_t stream, bool packed = false);
cudaError_t ap_dequant(DType dt, const uint32_t* qweight, const void* lut, void* w, int in, int out, int bits,
                       cudaStream_t stream, bool packed = false);

// ap 3-bit GEMV on the binary tensor cores (ap_bmma.cu), qweight in decdec/formats.py pack_ap3_bmma's layout
// [out/16, in/512, 6, 32, 4]; fp16 or bf16; M tokens one after another; x (a, b, gamma) 16-byte aligned. scratch:
// ap3_bmma_scratch_bytes(in, out) bytes of device memory (x's bit-planes and their shift, the K split's fp32 rows), no
// initial value, used by one call at a time (stream order); counters: out / 16 ints, zero on entry and on exit.
bool ap3_bmma_supported(DType dt, int in, int out);
size_t ap3_bmma_scratch_bytes(int in, int out);
cudaError_t ap3_bmma_gemv(DType dt, const void* x, const uint32_t* qweight, const void* lut, void* y, int M, int in,
                          int out, void* scratch, int* counters, cudaStream_t stream);
// The same with the residual add and RMSNorm before it (ap_gemv_addnorm: y = W rms_norm(a + b), h = a + b into
// an.h_out) and, glu, SiLU x up after it (ap_gemv_addnorm_glu: rows in GLU pair order, y [M, out / 2]). fp16 or bf16 (a, b, gamma, lut, y all of it).
cudaError_t ap3_bmma_gemv_addnorm(DType dt, const void* a, const AddNorm& an, const uint32_t* qweight, const void* lut,
                                  void* y, int M, int in, int out, bool glu, void* scratch, int* counters,
                                  cudaStream_t stream);

// ---- lutgemm (binary coding). binary [in/32, bits, out], alpha [G, bits, out], q_bias [G, out].
bool lutgemm_bits_supported(int bits);
int lutgemm_gemv_tile_rows(DType dt, int bits, int in, int out);
cudaError_t lutgemm_gemv(DType dt, const void* x, const uint32_t* binary, const void* alpha, const void* q_bias,
                         void* y, int M, int in, int out, int bits, int group, const Fused& fused,
                         cudaStream_t stream);
cudaError_t lutgemm_dequant(DType dt, const uint32_t* binary, const void* alpha, const void* q_bias, void* w,
                            int in, int out, int bits, int group, cudaStream_t stream);

// ---- DEC. q_residual [in, out/8] int32 (pinned host memory, read zero-copy), scales [out],
// bounds [2] fp32 on the device. n_tb blocks work on units (chunk c, output slice s): slices per
// chunk = max(1, n_tb / n_chunks). Always runs the combine protocol of `Fused` (standalone:
// gpart == nullptr, tile_rows == dec_slice); dpart needs dec_parts(in) * M * out floats.
int dec_parts(int in);
int dec_slice_size(int in, int out, int n_tb);
size_t dec_smem_bytes(int in, int out, int k_chunk, int n_tb);
// Most DEC blocks that can be co-resident on the device (occupancy x SMs) for this shape.
cudaError_t dec_max_blocks(int device, int in, int out, int k_chunk, int n_tb, int* max_blocks);
cudaError_t dec(DType dt, const void* x, const uint32_t* q_residual, const void* scales, const float* bounds, int M,
                int in, int out, int k_chunk, int n_tb, const Fused& fused, cudaStream_t stream);
// Debug: the kernel's own selection, written as uint8 mask [M, in] (1 = selected).
cudaError_t dec_select_debug(DType dt, const void* x, const float* bounds, uint8_t* mask, int M, int in,
                             int k_chunk, cudaStream_t stream);

// ---- Decode attention (attention.cu): q [B, H, Dh] (RoPE applied), caches [>= B, Hkv, L, Dh], pos [1] int64
// on the device (the query's position; rows [lo, pos] attend, lo = pos - window + 1 if window > 0 else 0;
// pos outside [0, L) is clamped), y [B, H * Dh]. part: decode_attention_part_floats(...) floats of scratch;
// counters: B * Hkv ints, zero on entry and on exit (the Fused protocol's counters serve).
bool decode_attention_supported(int H, int Hkv, int Dh);  // H % Hkv == 0, H / Hkv <= 8, Dh <= 256
int decode_attention_split_rows(int L);  // cache rows per block
int decode_attention_splits(int L);
size_t decode_attention_part_floats(int B, int H, int Hkv, int L, int Dh);
// RoPE inside the decode attention (decode_attention_rope): q, k, v unrotated in one row [q | k | v] per sequence (the
// qkv projection's output, row stride qs elements), this position's cos / sin [R] (fp32; rotate_half over the first R
// dims, R even, R <= Dh). The kernel rotates q and k as the model's apply_rope does and writes k, v into the caches at
// row pos (the step's KV-cache update) -- one kernel instead of RoPE + cache-write kernels before the attention.
struct Rope {
  int64_t qs = 0;
  const float* cos = nullptr;
  const float* sin = nullptr;
  int R = 0;
  void* k_out = nullptr;  // the caches, written at row pos (the same buffers the kernel reads other rows from)
  void* v_out = nullptr;
};
cudaError_t decode_attention_rope(DType dt, const void* qkv, int64_t qkv_stride, const float* cos, const float* sin,
                                  int R, void* k_cache, void* v_cache, const int64_t* pos, void* y, float* part,
                                  int* counters, int B, int H, int Hkv, int L, int Dh, int window, cudaStream_t stream);
cudaError_t decode_attention(DType dt, const void* q, const void* k_cache, const void* v_cache, const int64_t* pos,
                             void* y, float* part, int* counters, int B, int H, int Hkv, int L, int Dh, int window,
                             cudaStream_t stream);

}  // namespace decdec
