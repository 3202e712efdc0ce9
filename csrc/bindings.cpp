// Thin torch binding of the decdec CUDA kernels: checks every tensor (device, dtype, shape,
// contiguity, sizes) with messages that name the values, then calls the raw-pointer launchers of
// kernels.h on the current stream. Registers CUDA kernels for the schemas declared in
// decdec/ops.py, and owns the pinned (mapped) residual memory and the fused op's tile counters.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <mutex>
#include <string>
#include <unordered_map>

#include "kernels.h"

namespace {

// Error messages are built with std::string operations only: on the GPU image, formatting numbers
// through an ostream inside this extension crashed (std::basic_ostream::_M_insert<long> in _C.so),
// so TORCH_CHECK gets one ready-made string (c10 then does no stream formatting of ours).
inline void app(std::string& s, const char* v) { s += v; }
inline void app(std::string& s, const std::string& v) { s += v; }
template <typename I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
inline void app(std::string& s, I v) {
  s += std::to_string(v);
}
inline void app(std::string& s, at::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}
inline void app(std::string& s, const c10::Device& d) { s += d.str(); }
inline void app(std::string& s, at::ScalarType t) { s += c10::toString(t); }
inline void app(std::string& s, const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  s += buf;
}
template <typename... A>
std::string fmt(const A&... a) {
  std::string s;
  (app(s, a), ...);
  return s;
}
#define DD_CHECK(cond, ...) TORCH_CHECK(cond, fmt(__VA_ARGS__))

using decdec::DType;

void cuda_ok(cudaError_t e, const char* what) {
  DD_CHECK(e == cudaSuccess, "decdec: ", what, " failed: ", cudaGetErrorString(e), " (", static_cast<int>(e), ")");
}

DType dtype_of(const at::Tensor& x) {
  DD_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "decdec: x must be float16 or bfloat16, got ", x.scalar_type());
  return x.scalar_type() == at::kHalf ? DType::F16 : DType::BF16;
}

void check_tensor(const at::Tensor& t, const char* name, const at::Device& dev, at::ScalarType dt) {
  DD_CHECK(t.is_cuda(), "decdec: ", name, " must be a CUDA tensor, got device ", t.device());
  DD_CHECK(t.device() == dev, "decdec: ", name, " is on ", t.device(), " but x is on ", dev);
  DD_CHECK(t.scalar_type() == dt, "decdec: ", name, " must be ", dt, ", got ", t.scalar_type());
  DD_CHECK(t.is_contiguous(), "decdec: ", name, " must be contiguous, got shape ", t.sizes(), " strides ",
              t.strides());
  DD_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "decdec: ", name,
              " must be 16-byte aligned (a view with a storage offset?), got pointer ", t.data_ptr());
}

void check_x(const at::Tensor& x) {
  DD_CHECK(x.is_cuda(), "decdec: x must be a CUDA tensor, got device ", x.device());
  dtype_of(x);
  DD_CHECK(x.dim() == 2, "decdec: x must be [M, in], got shape ", x.sizes());
  DD_CHECK(x.is_contiguous(), "decdec: x must be contiguous, got strides ", x.strides());
  DD_CHECK(x.size(0) <= 65535, "decdec: at most 65535 tokens per call, got M=", x.size(0));
}

int i32(int64_t v, const char* what) {
  DD_CHECK(v >= 0 && v <= INT32_MAX, "decdec: ", what, " = ", v, " does not fit in int32");
  return static_cast<int>(v);
}

struct Ap {
  int bits, out, in;
  bool packed;        // 3-bit kernel layout [out, in/256, 3, 8]
  bool bmma = false;  // 3-bit binary-tensor-core layout [out/16, in/512, 6, 32, 4]
};
// The 3-bit binary-tensor-core layout [out/16, in/512, 6, 32, 4] (5-D; decdec/formats.py is_ap3_bmma_layout: the
// same rule). Only ap_gemv (ap3_bmma_gemv) and ap_dequant (through the bit-planes) read it.
bool is_ap3_bmma_layout(const at::Tensor& qweight, const at::Tensor& lut) {
  return qweight.dim() == 5 && qweight.size(2) == 6 && qweight.size(3) == 32 && qweight.size(4) == 4 &&
         lut.dim() == 2 && lut.size(0) == qweight.size(0) * 16 && lut.size(1) == 8;
}
// [out/16, in/512, 6, 32, 4] -> bit-planes [3, out, in/32] (decdec/formats.py unpack_ap3_bmma).
at::Tensor unpack_ap3_bmma(const at::Tensor& q) {
  const int64_t G = q.size(0), KB = q.size(1);
  return q.view({G, KB, 2, 3, 8, 4, 2, 2}).permute({3, 0, 7, 4, 1, 5, 2, 6}).reshape({3, G * 16, KB * 16}).contiguous();
}
// The 3-bit kernel layout [out, in/256, 3, 8] (4-D, unlike the bit-planes [b, out, in/32]; decdec/formats.py
// is_ap3_kernel_layout: the same rule).
bool is_ap3_kernel_layout(const at::Tensor& qweight, const at::Tensor& lut) {
  return qweight.dim() == 4 && qweight.size(2) == 3 && qweight.size(3) == 8 && lut.dim() == 2 &&
         lut.size(0) == qweight.size(0) && lut.size(1) == 8;
}
Ap check_ap(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& lut, bool allow_bmma = false) {
  check_x(x);
  if (is_ap3_bmma_layout(qweight, lut)) {
    DD_CHECK(allow_bmma, "decdec: qweight ", qweight.sizes(), " is in the binary-tensor-core layout [out/16, in/512, "
             "6, 32, 4] (decdec.formats.pack_ap3_bmma), which only ap_gemv, ap_gemv_addnorm(_glu) and ap_dequant read; "
             "pass the bit-plane layout (decdec.formats.unpack_ap3_bmma(qweight))");
    check_tensor(qweight, "qweight", x.device(), at::kInt);
    Ap s{3, i32(qweight.size(0) * 16, "out"), i32(qweight.size(1) * 512, "in"), false, true};
    DD_CHECK(x.size(1) == s.in, "decdec: x has ", x.size(1), " input channels, qweight expects ", s.in);
    check_tensor(lut, "lut", x.device(), x.scalar_type());
    DD_CHECK(decdec::ap3_bmma_supported(dtype_of(x), s.in, s.out), "decdec: the binary-tensor-core GEMV takes in <= "
             "20480 (in % 512 == 0, out % 16 == 0), got in=", s.in, ", out=", s.out, "; use the bit-plane layout");
    return s;
  }
  DD_CHECK(qweight.dim() == 3 || is_ap3_kernel_layout(qweight, lut), "decdec: qweight must be [b, out, in/32] (or "
           "[out, in/256, 3, 8], the 3-bit kernel layout, with lut [out, 8]), got shape ", qweight.sizes());
  check_tensor(qweight, "qweight", x.device(), at::kInt);
  if (is_ap3_kernel_layout(qweight, lut)) {
    Ap s{3, i32(qweight.size(0), "out"), i32(qweight.size(1) * 256, "in"), true};
    DD_CHECK(x.size(1) == s.in, "decdec: x has ", x.size(1), " input channels, qweight expects ", s.in);
    check_tensor(lut, "lut", x.device(), x.scalar_type());
    DD_CHECK(decdec::ap3_packed_supported(dtype_of(x), 3, s.in), "decdec: qweight ", qweight.sizes(), " is in the "
             "3-bit kernel layout, which only the fp16 tensor-core and streaming GEMVs read (decdec.ops."
             "ap3_kernel_layout(3, dtype, in) says where), got ", x.scalar_type(), " with in=", s.in,
             "; pass the bit-plane layout (decdec.formats.unpack_ap3_kernel(qweight))");
    return s;
  }
  Ap s{i32(qweight.size(0), "bits"), i32(qweight.size(1), "out"), i32(qweight.size(2) * 32, "in"), false};
  DD_CHECK(decdec::ap_bits_supported(s.bits), "decdec: ap kernels support 2..4 bits, got b=", s.bits);
  DD_CHECK(x.size(1) == s.in, "decdec: x has ", x.size(1), " input channels, qweight expects ", s.in);
  DD_CHECK(lut.dim() == 2 && lut.size(0) == s.out && lut.size(1) == (int64_t{1} << s.bits), "decdec: lut must be [",
              s.out, ", ", (1 << s.bits), "], got ", lut.sizes());
  check_tensor(lut, "lut", x.device(), x.scalar_type());
  return s;
}

struct Lg {
  int bits, out, in, group;
};
Lg check_lutgemm(const at::Tensor& x, const at::Tensor& binary, const at::Tensor& alpha, const at::Tensor& q_bias) {
  check_x(x);
  DD_CHECK(binary.dim() == 3, "decdec: binary must be [in/32, b, out], got shape ", binary.sizes());
  check_tensor(binary, "binary", x.device(), at::kInt);
  Lg s{i32(binary.size(1), "bits"), i32(binary.size(2), "out"), i32(binary.size(0) * 32, "in"), 0};
  DD_CHECK(decdec::lutgemm_bits_supported(s.bits), "decdec: lutgemm kernels support 1..8 bits, got b=", s.bits);
  DD_CHECK(x.size(1) == s.in, "decdec: x has ", x.size(1), " input channels, binary expects ", s.in);
  DD_CHECK(alpha.dim() == 3 && alpha.size(0) > 0, "decdec: alpha must be [n_groups, b, out], got ", alpha.sizes());
  const int64_t groups = alpha.size(0);
  DD_CHECK(s.in % groups == 0 && (s.in / groups) % 32 == 0, "decdec: lutgemm groups must split in=", s.in,
              " into multiples of 32 channels, got ", groups, " groups");
  s.group = static_cast<int>(s.in / groups);
  DD_CHECK(alpha.size(1) == s.bits && alpha.size(2) == s.out, "decdec: alpha must be [", groups, ", ", s.bits, ", ",
              s.out, "], got ", alpha.sizes());
  DD_CHECK(q_bias.dim() == 2 && q_bias.size(0) == groups && q_bias.size(1) == s.out, "decdec: q_bias must be [",
              groups, ", ", s.out, "], got ", q_bias.sizes());
  check_tensor(alpha, "alpha", x.device(), x.scalar_type());
  check_tensor(q_bias, "q_bias", x.device(), x.scalar_type());
  return s;
}

// The occupancy query costs microseconds; decoding asks the same few shapes again and again.
int cached_max_blocks(int dev, int in, int out, int k_chunk, int n_tb) {
  static std::mutex mu;
  static std::unordered_map<std::string, int> cache;
  const size_t smem = decdec::dec_smem_bytes(in, out, k_chunk, n_tb);
  const std::string key = std::to_string(dev) + "/" + std::to_string(out) + "/" + std::to_string(smem) + "/" +
                          std::to_string(decdec::dec_slice_size(in, out, n_tb)) + "/" + std::to_string(in);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int mb = 0;
  cuda_ok(decdec::dec_max_blocks(dev, in, out, k_chunk, n_tb, &mb), "DEC occupancy query");
  cache[key] = mb;
  return mb;
}

// scales: nullptr for the parts ops (they return unscaled partials)
void check_dec(const at::Tensor& x, const at::Tensor& q_residual, const at::Tensor* scales, const at::Tensor& bounds,
               int64_t k_chunk, int64_t n_tb, int out, int in) {
  DD_CHECK(out % 8 == 0, "decdec: DEC needs out % 8 == 0, got out=", out);
  DD_CHECK(q_residual.dim() == 2 && q_residual.size(0) == in && q_residual.size(1) == out / 8,
              "decdec: q_residual must be [", in, ", ", out / 8, "], got ", q_residual.sizes());
  DD_CHECK(q_residual.is_cuda(), "decdec: q_residual must be a CUDA tensor (pinned host memory from "
              "decdec.ops.place_residual, or device memory), got device ", q_residual.device());
  check_tensor(q_residual, "q_residual", x.device(), at::kInt);
  if (scales) {
    DD_CHECK(scales->dim() == 1 && scales->size(0) == out, "decdec: scales must be [", out, "], got ", scales->sizes());
    check_tensor(*scales, "scales", x.device(), x.scalar_type());
  }
  DD_CHECK(bounds.dim() == 1 && bounds.size(0) == 2, "decdec: bounds must be [2], got ", bounds.sizes());
  check_tensor(bounds, "bounds", x.device(), at::kFloat);
  DD_CHECK(k_chunk >= 0 && k_chunk <= 1024, "decdec: k_chunk must be in 0..1024, got ", k_chunk);
  DD_CHECK(n_tb >= 1, "decdec: n_tb must be >= 1, got ", n_tb);
  if (k_chunk == 0) return;
  const int max_blocks = cached_max_blocks(x.get_device(), in, out, (int)k_chunk, (int)std::min<int64_t>(n_tb, INT32_MAX));
  DD_CHECK(n_tb <= max_blocks, "decdec: n_tb=", n_tb, " exceeds the ", max_blocks,
              " DEC thread blocks that can be co-resident on this GPU for in=", in, ", out=", out,
              ", k_chunk=", k_chunk, " (shared memory ", decdec::dec_smem_bytes(in, out, (int)k_chunk, (int)n_tb),
              " bytes per block)");
}

// ---------------------------------------------------------------------------- fused-op tile counters
// One zero-initialised int32 buffer per device, reset to zero by the kernels themselves, so the
// fused op needs no memset. Fused ops on one device must not run concurrently on two streams
// (decoding runs the linears one after another on one stream).
std::mutex g_ws_mu;
std::unordered_map<int, std::pair<int*, size_t>> g_ws;

int* tile_counters(int device, size_t n, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(g_ws_mu);
  auto& w = g_ws[device];
  if (w.second >= n) return w.first;
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  cuda_ok(cudaStreamIsCapturing(stream, &st), "cudaStreamIsCapturing");
  DD_CHECK(st == cudaStreamCaptureStatusNone, "decdec: the fused op needs ", n,
              " tile counters but the workspace holds ", w.second,
              "; call it once outside CUDA-graph capture (a warm-up) with this shape first");
  if (w.first) {
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cuda_ok(cudaFree(w.first), "cudaFree(tile counters)");
    w = {nullptr, 0};
  }
  const size_t cap = std::max<size_t>(n, size_t{1} << 20);
  int* p = nullptr;
  cuda_ok(cudaMalloc(&p, cap * sizeof(int)), "cudaMalloc(tile counters)");
  cuda_ok(cudaMemset(p, 0, cap * sizeof(int)), "cudaMemset(tile counters)");
  cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  w = {p, cap};
  return p;
}

// Chain mode's counters (kernels.h `Fused::chain`): their own zeroed buffer, apart from the tile counters (a decode
// attention or fused op that runs just before a chain op, while its GEMV's blocks already wait, uses those), in
// kChainSlots slots used in turn. The GEMV of a chain op is scheduled during the op before it; with one slot per call
// in turn, it never sees the previous chain op's counters (that op's GEMV may still be combining when this GEMV's
// blocks start to wait). A slot is used again kChainSlots calls later, long after its op completed.
constexpr int kChainSlots = 8, kChainSlotInts = decdec::kChainGroups + decdec::kChainGroupCap;  // ints per call
std::unordered_map<int, std::pair<int*, unsigned>> g_chain;  // device -> (buffer, next slot)

// The next of `slots` slots of `slot_ints` zeroed ints in ring[device] (buffer, next slot), allocated on the first call
// (outside CUDA-graph capture: `who` names the caller in the error). The kernels leave a slot zero again.
int* zeroed_slot(std::unordered_map<int, std::pair<int*, unsigned>>& ring, int device, int slots, int slot_ints,
                 cudaStream_t stream, const char* who) {
  std::lock_guard<std::mutex> lock(g_ws_mu);
  auto& w = ring[device];
  if (!w.first) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    cuda_ok(cudaStreamIsCapturing(stream, &st), "cudaStreamIsCapturing");
    DD_CHECK(st == cudaStreamCaptureStatusNone, "decdec: the first ", who, " call on a device allocates its counters; "
             "call it once outside CUDA-graph capture (a warm-up) first");
    const size_t bytes = (size_t)slots * slot_ints * sizeof(int);
    cuda_ok(cudaMalloc(&w.first, bytes), "cudaMalloc(counters)");
    cuda_ok(cudaMemset(w.first, 0, bytes), "cudaMemset(counters)");
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  return w.first + (size_t)(w.second++ % slots) * slot_ints;
}

int* chain_counters(int device, int M, cudaStream_t stream) {
  DD_CHECK(M < decdec::kChainGroups - 1, "decdec: the _dec_chain ops serve up to ", decdec::kChainGroups - 2,
           " tokens per call, got M=", M, "; use the _dec_parts ops for more");
  return zeroed_slot(g_chain, device, kChainSlots, kChainSlotInts, stream, "_dec_chain");
}

struct ForkJoin {  // cached events of the side-stream fork/join, one pair per device and thread
  at::cuda::CUDAEvent fork{cudaEventDisableTiming}, join{cudaEventDisableTiming};
};
ForkJoin& fork_join(int device) {
  thread_local std::unordered_map<int, std::unique_ptr<ForkJoin>> ev;
  auto& p = ev[device];
  if (!p) p = std::make_unique<ForkJoin>();
  return *p;
}

// The binary-tensor-core GEMV's counters (kernels.h ap3_bmma_gemv: out / 16 zero ints, zero again on exit): one
// zeroed buffer per device in kBmmaSlots slots used in turn, as the chain counters (no memset per call).
constexpr int kBmmaSlots = 8, kBmmaSlotInts = 1 << 14;
std::unordered_map<int, std::pair<int*, unsigned>> g_bmma;  // device -> (buffer, next slot)

int* bmma_counters(int device, int out, cudaStream_t stream) {
  DD_CHECK(out / 16 <= kBmmaSlotInts, "decdec: the binary-tensor-core GEMV serves out <= ", 16 * kBmmaSlotInts,
           ", got out=", out, "; use the bit-plane layout");
  return zeroed_slot(g_bmma, device, kBmmaSlots, kBmmaSlotInts, stream, "binary-tensor-core GEMV");
}

// One call's scratch (kernels.h ap3_bmma_scratch_bytes; no initial value) and counters; the inputs it reads 16 bytes
// at a time must be 16-byte aligned.
struct BmmaWork {
  at::Tensor scratch;
  int* counters;
};
BmmaWork bmma_work(const Ap& s, const at::Tensor& x, std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* t : inputs)
    DD_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "decdec: the binary-tensor-core GEMV reads its "
             "inputs 16 bytes at a time; a tensor of shape ", t->sizes(), " starts at a pointer that is not 16-byte "
             "aligned (pass a fresh tensor, e.g. .clone())");
  const auto bytes = (int64_t)decdec::ap3_bmma_scratch_bytes(s.in, s.out);
  return {at::empty({bytes}, x.options().dtype(at::kByte)),
          bmma_counters(x.get_device(), s.out, at::cuda::getCurrentCUDAStream())};
}

// ---------------------------------------------------------------------------- ops
at::Tensor ap_gemv_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& lut) {
  const Ap s = check_ap(x, qweight, lut, /*allow_bmma=*/true);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({x.size(0), s.out}, x.options());
  if (s.bmma) {
    const BmmaWork w = bmma_work(s, x, {&x});
    cuda_ok(decdec::ap3_bmma_gemv(dtype_of(x), x.data_ptr(), reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
                                  lut.data_ptr(), y.data_ptr(), (int)x.size(0), s.in, s.out, w.scratch.data_ptr(),
                                  w.counters, at::cuda::getCurrentCUDAStream()),
            "ap3_bmma_gemv launch");
    return y;
  }
  cuda_ok(decdec::ap_gemv(dtype_of(x), x.data_ptr(), reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
                          lut.data_ptr(), y.data_ptr(), (int)x.size(0), s.in, s.out, s.bits, decdec::Fused{},
                          at::cuda::getCurrentCUDAStream(), s.packed),
          "ap_gemv launch");
  return y;
}

// The residual add and RMSNorm before a projection, inside its GEMV (kernels.h `AddNorm`): returns (y, h) with
// h = a + b and y = W (gamma * fp16(h * rsqrt(mean(h^2) + eps))).
Ap check_addnorm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& gamma, double eps,
                 const at::Tensor& qweight, const at::Tensor& lut) {
  const Ap s = check_ap(a, qweight, lut);
  DD_CHECK(a.scalar_type() == at::kHalf, "decdec: ap_gemv_addnorm runs fp16, got ", a.scalar_type());
  DD_CHECK(decdec::ap_addnorm_supported(decdec::DType::F16, s.bits, s.in), "decdec: ap_gemv_addnorm serves 3-bit "
           "weights on the tensor-core or streaming GEMV (in <= 8192 where decdec.ops.addnorm_supported), got b=", s.bits,
           ", in=", s.in, "; use ap_gemv after the norm");
  DD_CHECK(b.sizes() == a.sizes(), "decdec: b must be ", a.sizes(), " like a, got ", b.sizes());
  check_tensor(b, "b", a.device(), at::kHalf);
  DD_CHECK(gamma.dim() == 1 && gamma.size(0) == s.in, "decdec: gamma must be [", s.in, "], got ", gamma.sizes());
  check_tensor(gamma, "gamma", a.device(), at::kHalf);
  DD_CHECK(eps >= 0, "decdec: eps must be >= 0, got ", eps);
  return s;
}

decdec::AddNorm addnorm_args(const at::Tensor& b, const at::Tensor& gamma, double eps, const at::Tensor& h) {
  decdec::AddNorm an;
  an.b = b.data_ptr();
  an.gamma = gamma.data_ptr();
  an.h_out = h.data_ptr();
  an.eps = (float)eps;
  return an;
}

// ap_gemv_addnorm / ap_gemv_addnorm_glu on the binary-tensor-core layout (ap3_bmma_gemv_addnorm; glu: rows in GLU
// pair order); fp16 or bf16.
std::tuple<at::Tensor, at::Tensor> bmma_addnorm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& gamma,
                                                double eps, const at::Tensor& qweight, const at::Tensor& lut, bool glu) {
  const Ap s = check_ap(a, qweight, lut, /*allow_bmma=*/true);
  DD_CHECK(b.sizes() == a.sizes(), "decdec: b must be ", a.sizes(), " like a, got ", b.sizes());
  check_tensor(b, "b", a.device(), a.scalar_type());
  DD_CHECK(gamma.dim() == 1 && gamma.size(0) == s.in, "decdec: gamma must be [", s.in, "], got ", gamma.sizes());
  check_tensor(gamma, "gamma", a.device(), a.scalar_type());
  DD_CHECK(eps >= 0, "decdec: eps must be >= 0, got ", eps);
  c10::cuda::CUDAGuard guard(a.device());
  auto y = at::empty({a.size(0), glu ? s.out / 2 : s.out}, a.options());
  auto h = at::empty_like(a);
  const decdec::AddNorm an = addnorm_args(b, gamma, eps, h);
  const BmmaWork w = bmma_work(s, a, {&a, &b, &gamma});
  cuda_ok(decdec::ap3_bmma_gemv_addnorm(dtype_of(a), a.data_ptr(), an,
                                        reinterpret_cast<const uint32_t*>(qweight.data_ptr()), lut.data_ptr(),
                                        y.data_ptr(), (int)a.size(0), s.in, s.out, glu, w.scratch.data_ptr(),
                                        w.counters, at::cuda::getCurrentCUDAStream()),
          "ap3_bmma_gemv_addnorm launch");
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> ap_gemv_addnorm_cuda(const at::Tensor& a, const at::Tensor& b,
                                                        const at::Tensor& gamma, double eps, const at::Tensor& qweight,
                                                        const at::Tensor& lut) {
  if (is_ap3_bmma_layout(qweight, lut)) return bmma_addnorm(a, b, gamma, eps, qweight, lut, /*glu=*/false);
  const Ap s = check_addnorm(a, b, gamma, eps, qweight, lut);
  c10::cuda::CUDAGuard guard(a.device());
  auto y = at::empty({a.size(0), s.out}, a.options());
  auto h = at::empty_like(a);
  const decdec::AddNorm an = addnorm_args(b, gamma, eps, h);
  cuda_ok(decdec::ap_gemv_addnorm(a.data_ptr(), an, reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
                                  lut.data_ptr(), y.data_ptr(), (int)a.size(0), s.in, s.out,
                                  at::cuda::getCurrentCUDAStream(), s.packed),
          "ap_gemv_addnorm launch");
  return {y, h};
}

// SiLU x up in the add + norm GEMV's epilogue (kernels.h ap_gemv_addnorm_glu): (act [M, out / 2], h) for gate_up
// weights with interleaved (gate_i, up_i) rows.
std::tuple<at::Tensor, at::Tensor> ap_gemv_addnorm_glu_cuda(const at::Tensor& a, const at::Tensor& b,
                                                            const at::Tensor& gamma, double eps,
                                                            const at::Tensor& qweight, const at::Tensor& lut) {
  if (is_ap3_bmma_layout(qweight, lut)) return bmma_addnorm(a, b, gamma, eps, qweight, lut, /*glu=*/true);
  const Ap s = check_ap(a, qweight, lut);
  DD_CHECK(a.scalar_type() == at::kHalf, "decdec: ap_gemv_addnorm_glu runs fp16, got ", a.scalar_type());
  DD_CHECK(decdec::ap_glu_supported(decdec::DType::F16, s.bits, s.in), "decdec: ap_gemv_addnorm_glu serves 3-bit "
           "weights on the streaming GEMV (decdec.ops.glu_supported), got b=", s.bits, ", in=", s.in,
           "; use ap_gemv_addnorm, then silu(gate) * up");
  DD_CHECK(s.out % 2 == 0, "decdec: ap_gemv_addnorm_glu needs an even number of rows (gate, up pairs), got ", s.out);
  DD_CHECK(b.sizes() == a.sizes(), "decdec: b must be ", a.sizes(), " like a, got ", b.sizes());
  check_tensor(b, "b", a.device(), at::kHalf);
  DD_CHECK(gamma.dim() == 1 && gamma.size(0) == s.in, "decdec: gamma must be [", s.in, "], got ", gamma.sizes());
  check_tensor(gamma, "gamma", a.device(), at::kHalf);
  DD_CHECK(eps >= 0, "decdec: eps must be >= 0, got ", eps);
  c10::cuda::CUDAGuard guard(a.device());
  auto y = at::empty({a.size(0), s.out / 2}, a.options());
  auto h = at::empty_like(a);
  decdec::AddNorm an;
  an.b = b.data_ptr();
  an.gamma = gamma.data_ptr();
  an.h_out = h.data_ptr();
  an.eps = (float)eps;
  cuda_ok(decdec::ap_gemv_addnorm_glu(a.data_ptr(), an, reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
                                      lut.data_ptr(), y.data_ptr(), (int)a.size(0), s.in, s.out,
                                      at::cuda::getCurrentCUDAStream(), s.packed),
          "ap_gemv_addnorm_glu launch");
  return {y, h};
}

at::Tensor ap_dequant_cuda(const at::Tensor& qweight, const at::Tensor& lut) {
  DD_CHECK(lut.is_cuda(), "decdec: lut must be a CUDA tensor, got ", lut.device());
  if (is_ap3_bmma_layout(qweight, lut)) {  // prefill: dequantize from bit-planes, 256 row groups at a time (a
    // temporary copy of those only: the whole weight's would raise the step's peak memory by its size)
    const Ap s = check_ap(at::empty({1, qweight.size(1) * 512}, lut.options()), qweight, lut, /*allow_bmma=*/true);
    c10::cuda::CUDAGuard guard(lut.device());
    auto w = at::empty({s.out, s.in}, lut.options());
    const int64_t groups = qweight.size(0), chunk = 256;
    for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
      const int64_t gn = std::min(chunk, groups - g0);
      const at::Tensor planes = unpack_ap3_bmma(qweight.narrow(0, g0, gn));
      cuda_ok(decdec::ap_dequant(dtype_of(lut), reinterpret_cast<const uint32_t*>(planes.data_ptr()),
                                 static_cast<const char*>(lut.data_ptr()) + g0 * 16 * 8 * lut.element_size(),
                                 static_cast<char*>(w.data_ptr()) + g0 * 16 * s.in * w.element_size(), s.in,
                                 (int)(gn * 16), 3, at::cuda::getCurrentCUDAStream(), false),
              "ap_dequant launch");
    }
    return w;
  }
  const int64_t in = is_ap3_kernel_layout(qweight, lut) ? qweight.size(1) * 256 : qweight.dim() == 3 ? qweight.size(2) * 32 : 0;
  const Ap s = check_ap(at::empty({1, in}, lut.options()), qweight, lut);
  c10::cuda::CUDAGuard guard(lut.device());
  auto w = at::empty({s.out, s.in}, lut.options());
  cuda_ok(decdec::ap_dequant(dtype_of(lut), reinterpret_cast<const uint32_t*>(qweight.data_ptr()), lut.data_ptr(),
                             w.data_ptr(), s.in, s.out, s.bits, at::cuda::getCurrentCUDAStream(), s.packed),
          "ap_dequant launch");
  return w;
}

at::Tensor lutgemm_gemv_cuda(const at::Tensor& x, const at::Tensor& binary, const at::Tensor& alpha,
                             const at::Tensor& q_bias) {
  const Lg s = check_lutgemm(x, binary, alpha, q_bias);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({x.size(0), s.out}, x.options());
  cuda_ok(decdec::lutgemm_gemv(dtype_of(x), x.data_ptr(), reinterpret_cast<const uint32_t*>(binary.data_ptr()),
                               alpha.data_ptr(), q_bias.data_ptr(), y.data_ptr(), (int)x.size(0), s.in, s.out, s.bits,
                               s.group, decdec::Fused{}, at::cuda::getCurrentCUDAStream()),
          "lutgemm_gemv launch");
  return y;
}

at::Tensor lutgemm_dequant_cuda(const at::Tensor& binary, const at::Tensor& alpha, const at::Tensor& q_bias) {
  DD_CHECK(alpha.is_cuda(), "decdec: alpha must be a CUDA tensor, got ", alpha.device());
  const Lg s = check_lutgemm(at::empty({1, binary.dim() == 3 ? binary.size(0) * 32 : 0}, alpha.options()), binary,
                             alpha, q_bias);
  c10::cuda::CUDAGuard guard(alpha.device());
  auto w = at::empty({s.out, s.in}, alpha.options());
  cuda_ok(decdec::lutgemm_dequant(dtype_of(alpha), reinterpret_cast<const uint32_t*>(binary.data_ptr()),
                                  alpha.data_ptr(), q_bias.data_ptr(), w.data_ptr(), s.in, s.out, s.bits, s.group,
                                  at::cuda::getCurrentCUDAStream()),
          "lutgemm_dequant launch");
  return w;
}

at::Tensor dec_cuda(const at::Tensor& x, const at::Tensor& q_residual, const at::Tensor& scales,
                    const at::Tensor& bounds, int64_t k_chunk, int64_t n_tb) {
  check_x(x);
  DD_CHECK(scales.dim() == 1, "decdec: scales must be [out], got ", scales.sizes());
  const int out = i32(scales.size(0), "out"), in = i32(x.size(1), "in");
  check_dec(x, q_residual, &scales, bounds, k_chunk, n_tb, out, in);
  c10::cuda::CUDAGuard guard(x.device());
  const int M = (int)x.size(0);
  if (k_chunk == 0 || M == 0) return at::zeros({x.size(0), out}, x.options());
  auto y = at::empty({M, out}, x.options());
  const int parts = decdec::dec_parts(in), slice = decdec::dec_slice_size(in, out, (int)n_tb);
  auto part = at::empty({(int64_t)parts * M * out}, x.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  decdec::Fused f;
  f.dpart = part.data_ptr<float>();
  f.counters = tile_counters(x.get_device(), (size_t)M * ((out + slice - 1) / slice), stream.stream());
  f.y = y.data_ptr();
  f.tile_rows = slice;
  f.dec_slice = slice;
  f.dec_parts = parts;
  f.n_tokens = M;
  f.dec_scales = scales.data_ptr();
  cuda_ok(decdec::dec(dtype_of(x), x.data_ptr(), reinterpret_cast<const uint32_t*>(q_residual.data_ptr()),
                      scales.data_ptr(), bounds.data_ptr<float>(), M, in, out, (int)k_chunk, (int)n_tb, f,
                      stream.stream()),
          "dec launch");
  return y;
}

// DEC on a high-priority side stream, concurrently with the base GEMV on the current stream.
template <typename Gemv>
at::Tensor fused(const at::Tensor& x, const at::Tensor& q_residual, const at::Tensor& scales,
                 const at::Tensor& bounds, int64_t k_chunk, int64_t n_tb, int in, int out, int tile_rows,
                 Gemv&& gemv) {
  const int dev = x.get_device();
  const int M = (int)x.size(0);
  auto y = at::empty({M, out}, x.options());
  if (M == 0) return y;
  const int parts = decdec::dec_parts(in);
  auto part = at::empty({(int64_t)(1 + parts) * M * out}, x.options().dtype(at::kFloat));
  const int n_tiles = (out + tile_rows - 1) / tile_rows;
  auto main = at::cuda::getCurrentCUDAStream();
  decdec::Fused f;
  f.gpart = part.data_ptr<float>();
  f.dpart = f.gpart + (size_t)M * out;
  f.counters = tile_counters(dev, (size_t)M * n_tiles, main.stream());
  f.y = y.data_ptr();
  f.tile_rows = tile_rows;
  f.dec_slice = decdec::dec_slice_size(in, out, (int)n_tb);
  f.dec_parts = parts;
  f.n_tokens = M;
  f.reserve_blocks = (int)n_tb;
  f.dec_scales = scales.data_ptr();
  auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, dev);
  auto& ev = fork_join(dev);
  ev.fork.record(main);
  ev.fork.block(side);
  cuda_ok(decdec::dec(dtype_of(x), x.data_ptr(), reinterpret_cast<const uint32_t*>(q_residual.data_ptr()),
                      scales.data_ptr(), bounds.data_ptr<float>(), M, in, out, (int)k_chunk, (int)n_tb, f,
                      side.stream()),
          "dec launch (fused)");
  cuda_ok(gemv(f, main.stream()), "base GEMV launch (fused)");
  ev.join.record(side);
  ev.join.block(main);
  return y;
}

// Parts mode (kernels.h `Fused`): the same fork/join, but the GEMV writes its fp32 result to parts[0] and DEC its
// unscaled chunk partials to parts[1 + c] (P <= kMaxConsumerParts chunks) or their sum to parts[1] (more chunks:
// summed by DEC's last unit per slice); the GEMV runs no combine. parts [1 + P', M, out] fp32; the caller adds
// parts[0] + scales * parts[1:].sum(0) (decdec.reference.combine_dec_parts).
// norm: DEC beside the add + norm GEMV (x is then a; DEC forms rms_norm(a + b) itself).
template <typename Gemv>
at::Tensor fused_parts(const at::Tensor& x, const at::Tensor& q_residual, const at::Tensor& bounds, int64_t k_chunk,
                       int64_t n_tb, int in, int out, Gemv&& gemv, const decdec::AddNorm* norm = nullptr) {
  const int dev = x.get_device();
  const int M = (int)x.size(0);
  const int parts = decdec::dec_parts(in);
  const bool summed = parts > decdec::kMaxConsumerParts;
  auto acc = at::empty({1 + (summed ? 1 : parts), M, out}, x.options().dtype(at::kFloat));
  if (M == 0 || out == 0) return acc;
  auto main = at::cuda::getCurrentCUDAStream();
  decdec::Fused f;
  f.gpart = acc.data_ptr<float>();
  if (k_chunk == 0) {  // no DEC: the GEMV alone, zero DEC partials
    acc.narrow(0, 1, acc.size(0) - 1).zero_();
    cuda_ok(gemv(f, main.stream()), "base GEMV launch (parts)");
    return acc;
  }
  f.dec_slice = decdec::dec_slice_size(in, out, (int)n_tb);
  at::Tensor scratch;
  if (summed) {
    scratch = at::empty({(int64_t)parts * M * out}, x.options().dtype(at::kFloat));
    f.dpart = scratch.data_ptr<float>();
    f.dsum = f.gpart + (size_t)M * out;
    f.dec_counters = tile_counters(dev, (size_t)M * ((out + f.dec_slice - 1) / f.dec_slice), main.stream());
  } else {
    f.dpart = f.gpart + (size_t)M * out;
  }
  f.dec_parts = parts;
  f.n_tokens = M;
  f.reserve_blocks = (int)n_tb;
  decdec::Fused fd = f;  // DEC's view: the add + norm inputs when it forms x itself
  if (norm) fd.norm = *norm;
  auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, dev);
  auto& ev = fork_join(dev);
  ev.fork.record(main);
  ev.fork.block(side);
  cuda_ok(decdec::dec(dtype_of(x), x.data_ptr(), reinterpret_cast<const uint32_t*>(q_residual.data_ptr()), nullptr,
                      bounds.data_ptr<float>(), M, in, out, (int)k_chunk, (int)n_tb, fd, side.stream()),
          "dec launch (parts)");
  cuda_ok(gemv(f, main.stream()), "base GEMV launch (parts)");
  ev.join.record(side);
  ev.join.block(main);
  return acc;
}

at::Tensor ap_gemv_dec_parts_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& lut,
                                  const at::Tensor& q_residual, const at::Tensor& bounds, int64_t k_chunk,
                                  int64_t n_tb) {
  const Ap s = check_ap(x, qweight, lut);
  check_dec(x, q_residual, nullptr, bounds, k_chunk, n_tb, s.out, s.in);
  c10::cuda::CUDAGuard guard(x.device());
  return fused_parts(x, q_residual, bounds, k_chunk, n_tb, s.in, s.out, [&](const decdec::Fused& f, cudaStream_t st) {
    return decdec::ap_gemv(dtype_of(x), x.data_ptr(), reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
                           lut.data_ptr(), nullptr, (int)x.size(0), s.in, s.out, s.bits, f, st, s.packed);
  });
}

// The add + norm GEMV with DEC beside it (parts mode; DEC forms x = rms_norm(a + b) itself, bit-identical to the
// GEMV's): (parts, h) with parts as ap_gemv_dec_parts returns them for x = rms_norm(a + b), h = a + b.
std::tuple<at::Tensor, at::Tensor> ap_gemv_addnorm_dec_parts_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                  const at::Tensor& gamma, double eps,
                                                                  const at::Tensor& qweight, const at::Tensor& lut,
                                                                  const at::Tensor& q_residual, const at::Tensor& bounds,
                                                                  int64_t k_chunk, int64_t n_tb) {
  const Ap s = check_addnorm(a, b, gamma, eps, qweight, lut);
  check_dec(a, q_residual, nullptr, bounds, k_chunk, n_tb, s.out, s.in);
  c10::cuda::CUDAGuard guard(a.device());
  auto h = at::empty_like(a);
  const decdec::AddNorm an = addnorm_args(b, gamma, eps, h);
  auto parts = fused_parts(a, q_residual, bounds, k_chunk, n_tb, s.in, s.out,
                           [&](const decdec::Fused& f, cudaStream_t st) {
                             return decdec::ap_gemv_addnorm(a.data_ptr(), an,
                                                            reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
                                                            lut.data_ptr(), nullptr, (int)a.size(0), s.in, s.out, st,
                                                            s.packed, f);
                           },
                           &an);
  return {parts, h};
}

// Chain mode (kernels.h `Fused::chain`): DEC, then the GEMV as its programmatic dependent, in the current stream;
// the GEMV's blocks add DEC's sums and write the final output (no side stream, no combine left to the caller).
void check_chain(const Ap& s, const at::Tensor& x, const char* op) {
  DD_CHECK(x.scalar_type() == at::kHalf, "decdec: ", op, " runs fp16, got ", x.scalar_type());
  DD_CHECK(s.packed && decdec::ap_dec_chain_supported(decdec::DType::F16, s.bits, s.in), "decdec: ", op,
           " serves 3-bit weights in the kernel layout on the tensor-core or streaming GEMV "
           "(decdec.ops.dec_chain_supported), got b=", s.bits, ", in=", s.in, ", kernel layout: ", s.packed ? "yes" : "no",
           "; use the _dec_parts op");
}

at::Tensor run_chain(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& lut, const at::Tensor& q_residual,
                     const at::Tensor& scales, const at::Tensor& bounds, int64_t k_chunk, int64_t n_tb, const Ap& s,
                     at::Tensor y, const decdec::AddNorm* an, bool glu) {
  const int M = (int)x.size(0);
  if (M == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  DD_CHECK((int64_t)M * ((s.out + 15) / 16) <= decdec::kChainGroupCap, "decdec: the _dec_chain ops serve up to ",
           decdec::kChainGroupCap, " tokens x 16-row groups per call, got M=", M, ", out=", s.out,
           "; use the _dec_parts ops for more");
  auto dpart = at::empty({(int64_t)decdec::chain_scratch_floats(s.in, s.out, M)}, x.options().dtype(at::kFloat));
  int* chain = chain_counters(x.get_device(), M, stream.stream());
  cuda_ok(decdec::ap_gemv_dec_chain(x.data_ptr(), reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
                                    lut.data_ptr(), reinterpret_cast<const uint32_t*>(q_residual.data_ptr()),
                                    scales.data_ptr(), bounds.data_ptr<float>(), y.data_ptr(), dpart.data_ptr<float>(),
                                    chain, M, s.in, s.out, (int)k_chunk, (int)n_tb, stream.stream(), an, glu),
          "DEC + GEMV chain launch");
  return y;
}

at::Tensor ap_gemv_dec_chain_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& lut,
                                  const at::Tensor& q_residual, const at::Tensor& scales, const at::Tensor& bounds,
                                  int64_t k_chunk, int64_t n_tb) {
  const Ap s = check_ap(x, qweight, lut);
  check_dec(x, q_residual, &scales, bounds, k_chunk, n_tb, s.out, s.in);
  if (k_chunk == 0) return ap_gemv_cuda(x, qweight, lut);  // no DEC: bit-identical to ap_gemv
  check_chain(s, x, "ap_gemv_dec_chain");
  c10::cuda::CUDAGuard guard(x.device());
  return run_chain(x, qweight, lut, q_residual, scales, bounds, k_chunk, n_tb, s, at::empty({x.size(0), s.out}, x.options()),
                   nullptr, false);
}

std::tuple<at::Tensor, at::Tensor> ap_gemv_addnorm_dec_chain_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                  const at::Tensor& gamma, double eps,
                                                                  const at::Tensor& qweight, const at::Tensor& lut,
                                                                  const at::Tensor& q_residual, const at::Tensor& scales,
                                                                  const at::Tensor& bounds, int64_t k_chunk,
                                                                  int64_t n_tb) {
  const Ap s = check_addnorm(a, b, gamma, eps, qweight, lut);
  check_dec(a, q_residual, &scales, bounds, k_chunk, n_tb, s.out, s.in);
  if (k_chunk == 0) return ap_gemv_addnorm_cuda(a, b, gamma, eps, qweight, lut);
  check_chain(s, a, "ap_gemv_addnorm_dec_chain");
  c10::cuda::CUDAGuard guard(a.device());
  auto h = at::empty_like(a);
  const decdec::AddNorm an = addnorm_args(b, gamma, eps, h);
  auto y = run_chain(a, qweight, lut, q_residual, scales, bounds, k_chunk, n_tb, s,
                     at::empty({a.size(0), s.out}, a.options()), &an, false);
  return {y, h};
}

// gate_up rows in (gate_i, up_i) pairs (the GEMV's), q_residual and scales in the original order (DEC's).
std::tuple<at::Tensor, at::Tensor> ap_gemv_addnorm_glu_dec_chain_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                      const at::Tensor& gamma, double eps,
                                                                      const at::Tensor& qweight, const at::Tensor& lut,
                                                                      const at::Tensor& q_residual,
                                                                      const at::Tensor& scales, const at::Tensor& bounds,
                                                                      int64_t k_chunk, int64_t n_tb) {
  const Ap s = check_addnorm(a, b, gamma, eps, qweight, lut);
  check_dec(a, q_residual, &scales, bounds, k_chunk, n_tb, s.out, s.in);
  if (k_chunk == 0) return ap_gemv_addnorm_glu_cuda(a, b, gamma, eps, qweight, lut);
  check_chain(s, a, "ap_gemv_addnorm_glu_dec_chain");
  DD_CHECK(decdec::ap_glu_supported(decdec::DType::F16, s.bits, s.in), "decdec: ap_gemv_addnorm_glu_dec_chain serves "
           "3-bit weights on the streaming GEMV (decdec.ops.glu_supported), got b=", s.bits, ", in=", s.in);
  DD_CHECK(s.out % 2 == 0, "decdec: ap_gemv_addnorm_glu_dec_chain needs an even number of rows (gate, up pairs), got ",
           s.out);
  c10::cuda::CUDAGuard guard(a.device());
  auto h = at::empty_like(a);
  const decdec::AddNorm an = addnorm_args(b, gamma, eps, h);
  auto y = run_chain(a, qweight, lut, q_residual, scales, bounds, k_chunk, n_tb, s,
                     at::empty({a.size(0), s.out / 2}, a.options()), &an, true);
  return {y, h};
}

at::Tensor lutgemm_gemv_dec_parts_cuda(const at::Tensor& x, const at::Tensor& binary, const at::Tensor& alpha,
                                       const at::Tensor& q_bias, const at::Tensor& q_residual,
                                       const at::Tensor& bounds, int64_t k_chunk, int64_t n_tb) {
  const Lg s = check_lutgemm(x, binary, alpha, q_bias);
  check_dec(x, q_residual, nullptr, bounds, k_chunk, n_tb, s.out, s.in);
  c10::cuda::CUDAGuard guard(x.device());
  return fused_parts(x, q_residual, bounds, k_chunk, n_tb, s.in, s.out, [&](const decdec::Fused& f, cudaStream_t st) {
    return decdec::lutgemm_gemv(dtype_of(x), x.data_ptr(), reinterpret_cast<const uint32_t*>(binary.data_ptr()),
                                alpha.data_ptr(), q_bias.data_ptr(), nullptr, (int)x.size(0), s.in, s.out, s.bits,
                                s.group, f, st);
  });
}

at::Tensor ap_gemv_dec_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& lut,
                            const at::Tensor& q_residual, const at::Tensor& scales, const at::Tensor& bounds,
                            int64_t k_chunk, int64_t n_tb) {
  const Ap s = check_ap(x, qweight, lut);
  check_dec(x, q_residual, &scales, bounds, k_chunk, n_tb, s.out, s.in);
  if (k_chunk == 0) return ap_gemv_cuda(x, qweight, lut);  // no DEC: bit-identical to ap_gemv
  c10::cuda::CUDAGuard guard(x.device());
  return fused(x, q_residual, scales, bounds, k_chunk, n_tb, s.in, s.out,
               decdec::ap_gemv_tile_rows(dtype_of(x), s.bits, s.in, s.out, (int)n_tb), [&](const decdec::Fused& f, cudaStream_t st) {
                 return decdec::ap_gemv(dtype_of(x), x.data_ptr(),
                                        reinterpret_cast<const uint32_t*>(qweight.data_ptr()), lut.data_ptr(),
                                        nullptr, (int)x.size(0), s.in, s.out, s.bits, f, st, s.packed);
               });
}

at::Tensor lutgemm_gemv_dec_cuda(const at::Tensor& x, const at::Tensor& binary, const at::Tensor& alpha,
                                 const at::Tensor& q_bias, const at::Tensor& q_residual, const at::Tensor& scales,
                                 const at::Tensor& bounds, int64_t k_chunk, int64_t n_tb) {
  const Lg s = check_lutgemm(x, binary, alpha, q_bias);
  check_dec(x, q_residual, &scales, bounds, k_chunk, n_tb, s.out, s.in);
  if (k_chunk == 0) return lutgemm_gemv_cuda(x, binary, alpha, q_bias);
  c10::cuda::CUDAGuard guard(x.device());
  return fused(x, q_residual, scales, bounds, k_chunk, n_tb, s.in, s.out,
               decdec::lutgemm_gemv_tile_rows(dtype_of(x), s.bits, s.in, s.out), [&](const decdec::Fused& f, cudaStream_t st) {
                 return decdec::lutgemm_gemv(dtype_of(x), x.data_ptr(),
                                             reinterpret_cast<const uint32_t*>(binary.data_ptr()), alpha.data_ptr(),
                                             q_bias.data_ptr(), nullptr, (int)x.size(0), s.in, s.out, s.bits,
                                             s.group, f, st);
               });
}

// ---------------------------------------------------------------------------- decode attention
void check_attn_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  DD_CHECK(t.is_cuda(), "decdec: ", name, " must be a CUDA tensor, got device ", t.device());
  DD_CHECK(t.device() == q.device(), "decdec: ", name, " is on ", t.device(), " but q is on ", q.device());
  DD_CHECK(t.scalar_type() == q.scalar_type(), "decdec: ", name, " must be ", q.scalar_type(), " like q, got ",
           t.scalar_type());
  DD_CHECK(t.is_contiguous(), "decdec: ", name, " must be contiguous, got shape ", t.sizes(), " strides ", t.strides());
}

// Checks both decode-attention ops share once the head layout is known; `ref` (named `ref_name`) is the op's input
// that fixes the device.
void check_attn_args(const at::Tensor& ref, const char* ref_name, int H, int Hkv, int Dh, int L, const at::Tensor& pos,
                     int64_t window) {
  DD_CHECK(decdec::decode_attention_supported(H, Hkv, Dh), "decdec: decode_attention needs H % Hkv == 0, H / Hkv <= 8 and ",
           "head dim <= 256, got H=", H, ", Hkv=", Hkv, ", Dh=", Dh);
  DD_CHECK(L > 0, "decdec: empty KV cache");
  DD_CHECK(pos.is_cuda() && pos.device() == ref.device() && pos.scalar_type() == at::kLong && pos.numel() == 1,
           "decdec: pos must be one int64 on ", ref_name, "'s device, got ", pos.sizes(), " ", pos.scalar_type(), " on ",
           pos.device());
  DD_CHECK(window >= 0, "decdec: window must be >= 0 (0 = none), got ", window);
}

// The output [B, H * Dh] in `ref`'s dtype, the split partials and the merge counters of one decode-attention call
// (on the current stream of the device the caller's guard selected).
struct AttnScratch {
  at::Tensor y, part;
  int* counters;
  cudaStream_t stream;
  AttnScratch(const at::Tensor& ref, int B, int H, int Hkv, int L, int Dh)
      : y(at::empty({(int64_t)B, (int64_t)H * Dh}, ref.options())),
        part(at::empty({(int64_t)decdec::decode_attention_part_floats(B, H, Hkv, L, Dh)}, ref.options().dtype(at::kFloat))),
        stream(at::cuda::getCurrentCUDAStream().stream()) {
    counters = tile_counters(ref.get_device(), (size_t)B * Hkv, stream);
  }
};

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& pos, int64_t window) {
  DD_CHECK(q.is_cuda(), "decdec: q must be a CUDA tensor, got device ", q.device());
  const DType dt = dtype_of(q);
  DD_CHECK(q.dim() == 3, "decdec: q must be [B, H, Dh], got shape ", q.sizes());
  check_attn_tensor(q, "q", q);
  check_attn_tensor(k_cache, "k_cache", q);
  check_attn_tensor(v_cache, "v_cache", q);
  DD_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "decdec: k_cache and v_cache must be [B, Hkv, L, Dh] of one shape, got ",
           k_cache.sizes(), " and ", v_cache.sizes());
  const int B = i32(q.size(0), "B"), H = i32(q.size(1), "H"), Dh = i32(q.size(2), "Dh");
  const int Hkv = i32(k_cache.size(1), "Hkv"), L = i32(k_cache.size(2), "L");
  DD_CHECK(k_cache.size(0) >= B && k_cache.size(3) == Dh, "decdec: caches ", k_cache.sizes(), " do not fit q ", q.sizes(),
           " (need >= ", B, " sequences of head dim ", Dh, ")");
  check_attn_args(q, "q", H, Hkv, Dh, L, pos, window);
  c10::cuda::CUDAGuard guard(q.device());
  const AttnScratch sc(q, B, H, Hkv, L, Dh);
  cuda_ok(decdec::decode_attention(dt, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), pos.data_ptr<int64_t>(),
                                   sc.y.data_ptr(), sc.part.data_ptr<float>(), sc.counters, B, H, Hkv, L, Dh,
                                   (int)window, sc.stream),
          "decode_attention launch");
  return sc.y;
}

// decode_attention_rope: RoPE of q and k, the step's KV-cache write and the attention in one kernel (kernels.h `Rope`).
at::Tensor decode_attention_rope_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                      at::Tensor& kv, const at::Tensor& pos, int64_t n_heads, int64_t window) {
  DD_CHECK(qkv.is_cuda(), "decdec: qkv must be a CUDA tensor, got device ", qkv.device());
  const DType dt = dtype_of(qkv);
  DD_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "decdec: qkv must be [B, (H + 2 Hkv) Dh] with unit stride in its last ",
           "dim, got shape ", qkv.sizes(), " strides ", qkv.strides());
  check_attn_tensor(kv, "kv", qkv);
  DD_CHECK(kv.dim() == 5 && kv.size(0) == 2, "decdec: kv must be [2, B, Hkv, L, Dh] (K and V caches in one buffer), got ",
           kv.sizes());
  const int B = i32(qkv.size(0), "B"), H = i32(n_heads, "n_heads");
  const int Hkv = i32(kv.size(2), "Hkv"), L = i32(kv.size(3), "L"), Dh = i32(kv.size(4), "Dh");
  DD_CHECK(kv.size(1) >= B, "decdec: kv holds ", kv.size(1), " sequences, qkv has ", B);
  DD_CHECK(qkv.size(1) == (int64_t)(H + 2 * Hkv) * Dh, "decdec: qkv rows must hold (H + 2 Hkv) Dh = (", H, " + 2 x ",
           Hkv, ") x ", Dh, " values, got ", qkv.size(1));
  check_attn_args(qkv, "qkv", H, Hkv, Dh, L, pos, window);
  for (const auto* t : {&cos, &sin}) {
    DD_CHECK(t->is_cuda() && t->device() == qkv.device() && t->scalar_type() == at::kFloat && t->is_contiguous(),
             "decdec: cos and sin must be contiguous float32 on qkv's device, got ", t->scalar_type(), " on ",
             t->device());
  }
  const int64_t R = cos.size(-1);
  DD_CHECK(cos.numel() == R && sin.numel() == R && R % 2 == 0 && R <= Dh, "decdec: cos and sin must be this position's ",
           "[1, R] rows with R even and <= head dim ", Dh, ", got ", cos.sizes(), " and ", sin.sizes());
  c10::cuda::CUDAGuard guard(qkv.device());
  const AttnScratch sc(qkv, B, H, Hkv, L, Dh);
  auto kc = kv.select(0, 0), vc = kv.select(0, 1);
  cuda_ok(decdec::decode_attention_rope(dt, qkv.data_ptr(), qkv.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                        (int)R, kc.data_ptr(), vc.data_ptr(), pos.data_ptr<int64_t>(), sc.y.data_ptr(),
                                        sc.part.data_ptr<float>(), sc.counters, B, H, Hkv, L, Dh, (int)window,
                                        sc.stream),
          "decode_attention_rope launch");
  return sc.y;
}

// ---------------------------------------------------------------------------- python helpers
// Pinned, mapped host memory holding a copy of q_residual, exposed as a CUDA tensor (its UVA
// address): DEC reads it zero-copy over PCIe and no GPU memory is used. Freed by the deleter.
at::Tensor pin_residual(const at::Tensor& q_residual, int64_t device) {
  DD_CHECK(q_residual.device().is_cpu(), "decdec: pin_residual takes a CPU tensor, got ", q_residual.device());
  DD_CHECK(q_residual.scalar_type() == at::kInt, "decdec: q_residual must be int32, got ",
              q_residual.scalar_type());
  DD_CHECK(q_residual.dim() == 2, "decdec: q_residual must be [in, out/8], got ", q_residual.sizes());
  auto q = q_residual.contiguous();
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const size_t bytes = static_cast<size_t>(q.numel()) * sizeof(int32_t);
  void* host = nullptr;
  cuda_ok(cudaHostAlloc(&host, std::max<size_t>(bytes, 16), cudaHostAllocMapped | cudaHostAllocPortable),
          "cudaHostAlloc(mapped residual)");
  if (bytes) std::memcpy(host, q.data_ptr(), bytes);
  void* dptr = nullptr;
  const cudaError_t e = cudaHostGetDevicePointer(&dptr, host, 0);
  if (e != cudaSuccess) {
    cudaFreeHost(host);
    cuda_ok(e, "cudaHostGetDevicePointer");
  }
  auto opts = at::TensorOptions().dtype(at::kInt).device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
  return at::from_blob(dptr, q.sizes(), [host](void*) { cudaFreeHost(host); }, opts);
}

// The DEC kernel's own channel selection (bool [M, in]), for tests.
at::Tensor dec_select(const at::Tensor& x, const at::Tensor& bounds, int64_t k_chunk) {
  check_x(x);
  check_tensor(bounds, "bounds", x.device(), at::kFloat);
  DD_CHECK(bounds.numel() == 2, "decdec: bounds must be [2], got ", bounds.sizes());
  DD_CHECK(k_chunk >= 0 && k_chunk <= 1024, "decdec: k_chunk must be in 0..1024, got ", k_chunk);
  c10::cuda::CUDAGuard guard(x.device());
  auto mask = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kByte));
  cuda_ok(decdec::dec_select_debug(dtype_of(x), x.data_ptr(), bounds.data_ptr<float>(), mask.data_ptr<uint8_t>(),
                                   (int)x.size(0), (int)x.size(1), (int)k_chunk, at::cuda::getCurrentCUDAStream()),
          "dec_select launch");
  return mask.to(at::kBool);
}

int64_t dec_max_blocks(int64_t device, int64_t in, int64_t out, int64_t k_chunk, int64_t n_tb) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  int mb = 0;
  cuda_ok(decdec::dec_max_blocks((int)device, (int)in, (int)out, (int)k_chunk, (int)n_tb, &mb), "DEC occupancy query");
  return mb;
}

}  // namespace

TORCH_LIBRARY_IMPL(decdec, CUDA, m) {
  m.impl("ap_gemv", &ap_gemv_cuda);
  m.impl("ap_dequant", &ap_dequant_cuda);
  m.impl("lutgemm_gemv", &lutgemm_gemv_cuda);
  m.impl("lutgemm_dequant", &lutgemm_dequant_cuda);
  m.impl("dec", &dec_cuda);
  m.impl("ap_gemv_dec", &ap_gemv_dec_cuda);
  m.impl("lutgemm_gemv_dec", &lutgemm_gemv_dec_cuda);
  m.impl("ap_gemv_dec_parts", &ap_gemv_dec_parts_cuda);
  m.impl("ap_gemv_addnorm", &ap_gemv_addnorm_cuda);
  m.impl("ap_gemv_addnorm_glu", &ap_gemv_addnorm_glu_cuda);
  m.impl("ap_gemv_addnorm_dec_parts", &ap_gemv_addnorm_dec_parts_cuda);
  m.impl("lutgemm_gemv_dec_parts", &lutgemm_gemv_dec_parts_cuda);
  m.impl("ap_gemv_dec_chain", &ap_gemv_dec_chain_cuda);
  m.impl("ap_gemv_addnorm_dec_chain", &ap_gemv_addnorm_dec_chain_cuda);
  m.impl("ap_gemv_addnorm_glu_dec_chain", &ap_gemv_addnorm_glu_dec_chain_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("decode_attention_rope", &decode_attention_rope_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "decdec CUDA kernels (registered as torch.ops.decdec.* CUDA implementations) and helpers";
  m.def("pin_residual", &pin_residual, "copy a CPU q_residual into mapped pinned host memory; returns a CUDA tensor",
        py::arg("q_residual"), py::arg("device"));
  m.def("dec_select", &dec_select, "the DEC kernel's channel selection as bool [M, in] (debug/tests)", py::arg("x"),
        py::arg("bounds"), py::arg("k_chunk"));
  m.def("ap3_packed_supported", [](int bits, int in) { return decdec::ap3_packed_supported(decdec::DType::F16, bits, in); },
        "whether fp16 b-bit ap weights with `in` input channels run in the 3-bit kernel layout", py::arg("bits"),
        py::arg("in"));
  m.def("ap_addnorm_supported", [](int bits, int in) { return decdec::ap_addnorm_supported(decdec::DType::F16, bits, in); },
        "whether ap_gemv_addnorm serves b-bit fp16 weights with `in` input channels", py::arg("bits"), py::arg("in"));
  m.def("ap_glu_supported", [](int bits, int in) { return decdec::ap_glu_supported(decdec::DType::F16, bits, in); },
        "whether ap_gemv_addnorm_glu serves b-bit fp16 weights with `in` input channels", py::arg("bits"), py::arg("in"));
  m.def("ap_dec_chain_supported", [](int bits, int in) { return decdec::ap_dec_chain_supported(decdec::DType::F16, bits, in); },
        "whether the _dec_chain ops serve b-bit fp16 weights (kernel layout) with `in` input channels", py::arg("bits"),
        py::arg("in"));
  m.def("dec_max_blocks", &dec_max_blocks, "most co-resident DEC blocks (the n_tb limit)", py::arg("device"),
        py::arg("in_features"), py::arg("out_features"), py::arg("k_chunk"), py::arg("n_tb") = 1);
}
