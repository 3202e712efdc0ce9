"""The ``torch.ops.decdec`` custom ops: schema + fake kernel + CPU kernel (= ``decdec.reference``).

CUDA kernels live in ``csrc/`` and register themselves for the same schemas through
``TORCH_LIBRARY_IMPL(decdec, CUDA, m)`` when the compiled extension ``decdec._C`` is imported
(``load_cuda_kernels``). The schemas stay here so that ``torch.compile`` sees the ops on any
machine, with or without the extension.

Shapes (``M`` tokens, ``b`` bits): ``x [M, in]``; ap ``qweight [b, out, in/32] int32`` (or, 3-bit fp16 on CUDA where
``ap3_kernel_layout`` says, the kernel layout ``[out, in/256, 3, 8]`` of ``formats.pack_ap3_kernel``; or, for
``ap_gemv``, ``ap_gemv_addnorm(_glu)`` and ``ap_dequant`` (no DEC op), the binary-tensor-core layout
``[out/16, in/512, 6, 32, 4]`` of ``formats.pack_ap3_bmma``: 3-bit, fp16 / bf16, in <= 20480, read by
``csrc/ap_bmma.cu``; QuantLinear uses it where ``bmma_preferred``),
``lut [out, 2**b]``; lutgemm ``binary [in/32, b, out] int32``, ``alpha [n_groups, b, out]``,
``q_bias [n_groups, out]`` (group = in / n_groups, 128 by default); DEC ``q_residual [in, out/8] int32``, ``scales [out]``,
``bounds [2] fp32`` (``a, b`` of DESIGN.md §2). Every GEMV returns ``[M, out]`` in ``x.dtype``.
``n_tb`` is the DEC kernel's thread-block count; the CPU kernels accept and ignore it.
``{ap,lutgemm}_gemv_dec_parts`` run the same two kernels concurrently but return ``[1 + P', M, out] fp32`` (the
GEMV, then DEC's unscaled sums: one per 1024-channel chunk up to 4 chunks, else their sum; ``reference.dec_parts_rows``)
and leave the combine to the caller (``reference.combine_dec_parts``), which a compiled decode step fuses into the
next pointwise kernel.
``decode_attention``: ``q [B, H, Dh]``, ``k_cache``/``v_cache [>= B, Hkv, L, Dh]``, ``pos [1] int64`` (read
on the device, so a recorded graph serves every step), ``window`` (0 = none) -> ``[B, H * Dh]``.
``decode_attention_rope(qkv, cos, sin, kv, pos, n_heads, window)``: the same after RoPE and the KV-cache write, in one
kernel: ``qkv [B, (H + 2 Hkv) Dh]`` unrotated (the qkv projection's output), ``cos``/``sin [1, R]`` float32 (this
position's rows), ``kv [2, >= B, Hkv, L, Dh]`` (K and V caches, written at row ``pos``: mutated in place).
``ap_gemv_addnorm(a, b, gamma, eps, qweight, lut) -> (y, h)``: the residual add and RMSNorm before a projection,
inside its GEMV (h = a + b, y = W rms_norm(h)); the CUDA kernel serves where ``addnorm_supported`` says.
``ap_gemv_addnorm_glu(a, b, gamma, eps, qweight, lut) -> (act, h)``: the same GEMV on gate_up weights whose rows are in
GLU pair order (``formats.glu_pair_order``), with SiLU x up in its epilogue: act [M, out / 2] (``glu_supported``).
``ap_gemv_addnorm_dec_parts(a, b, gamma, eps, qweight, lut, q_residual, bounds, k_chunk, n_tb) -> (parts, h)``: the same
GEMV with DEC beside it, as ``ap_gemv_dec_parts`` for x = rms_norm(a + b) (DEC forms that x itself on the GPU).
"""

from __future__ import annotations

import importlib
import os

import torch

from decdec import formats, reference

_lib = torch.library.Library("decdec", "DEF")  # noqa: the library object must outlive the module

_SCHEMAS = {
    "ap_gemv": "ap_gemv(Tensor x, Tensor qweight, Tensor lut) -> Tensor",
    "ap_dequant": "ap_dequant(Tensor qweight, Tensor lut) -> Tensor",
    "lutgemm_gemv": "lutgemm_gemv(Tensor x, Tensor binary, Tensor alpha, Tensor q_bias) -> Tensor",
    "lutgemm_dequant": "lutgemm_dequant(Tensor binary, Tensor alpha, Tensor q_bias) -> Tensor",
    "dec": "dec(Tensor x, Tensor q_residual, Tensor scales, Tensor bounds, int k_chunk, int n_tb) -> Tensor",
    "ap_gemv_dec": (
        "ap_gemv_dec(Tensor x, Tensor qweight, Tensor lut, Tensor q_residual, Tensor scales,"
        " Tensor bounds, int k_chunk, int n_tb) -> Tensor"
    ),
    "lutgemm_gemv_dec": (
        "lutgemm_gemv_dec(Tensor x, Tensor binary, Tensor alpha, Tensor q_bias, Tensor q_residual,"
        " Tensor scales, Tensor bounds, int k_chunk, int n_tb) -> Tensor"
    ),
    "ap_gemv_dec_parts": (
        "ap_gemv_dec_parts(Tensor x, Tensor qweight, Tensor lut, Tensor q_residual, Tensor bounds, int k_chunk,"
        " int n_tb) -> Tensor"
    ),
    "lutgemm_gemv_dec_parts": (
        "lutgemm_gemv_dec_parts(Tensor x, Tensor binary, Tensor alpha, Tensor q_bias, Tensor q_residual,"
        " Tensor bounds, int k_chunk, int n_tb) -> Tensor"
    ),
    "ap_gemv_addnorm": (
        "ap_gemv_addnorm(Tensor a, Tensor b, Tensor gamma, float eps, Tensor qweight, Tensor lut) -> (Tensor, Tensor)"
    ),
    "ap_gemv_addnorm_glu": (
        "ap_gemv_addnorm_glu(Tensor a, Tensor b, Tensor gamma, float eps, Tensor qweight, Tensor lut) -> (Tensor, Tensor)"
    ),
    "ap_gemv_addnorm_dec_parts": (
        "ap_gemv_addnorm_dec_parts(Tensor a, Tensor b, Tensor gamma, float eps, Tensor qweight, Tensor lut,"
        " Tensor q_residual, Tensor bounds, int k_chunk, int n_tb) -> (Tensor, Tensor)"
    ),
    "ap_gemv_dec_chain": (
        "ap_gemv_dec_chain(Tensor x, Tensor qweight, Tensor lut, Tensor q_residual, Tensor scales,"
        " Tensor bounds, int k_chunk, int n_tb) -> Tensor"
    ),
    "ap_gemv_addnorm_dec_chain": (
        "ap_gemv_addnorm_dec_chain(Tensor a, Tensor b, Tensor gamma, float eps, Tensor qweight, Tensor lut,"
        " Tensor q_residual, Tensor scales, Tensor bounds, int k_chunk, int n_tb) -> (Tensor, Tensor)"
    ),
    "ap_gemv_addnorm_glu_dec_chain": (
        "ap_gemv_addnorm_glu_dec_chain(Tensor a, Tensor b, Tensor gamma, float eps, Tensor qweight, Tensor lut,"
        " Tensor q_residual, Tensor scales, Tensor bounds, int k_chunk, int n_tb) -> (Tensor, Tensor)"
    ),
    "decode_attention": "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, int window) -> Tensor",
    "decode_attention_rope": (
        "decode_attention_rope(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) kv, Tensor pos, int n_heads, int window)"
        " -> Tensor"
    ),
}
for _schema in _SCHEMAS.values():
    _lib.define(_schema)


# ---------------------------------------------------------------------------- shape checks
def _check_x(x: torch.Tensor, in_features: int) -> None:
    torch._check(x.dim() == 2, lambda: f"x must be [M, in], got shape {tuple(x.shape)}")
    torch._check(x.shape[1] == in_features, lambda: f"x has {x.shape[1]} input channels, weights expect {in_features}")


def _ap_shape(qweight: torch.Tensor, lut: torch.Tensor, allow_bmma: bool = False) -> tuple[int, int]:
    if formats.is_ap3_bmma_layout(qweight, lut):  # [out/16, in/512, 6, 32, 4]
        torch._check(allow_bmma, lambda: f"qweight {tuple(qweight.shape)} is in the binary-tensor-core layout "
                     "(formats.pack_ap3_bmma), which only ap_gemv, ap_gemv_addnorm(_glu) and ap_dequant read; pass the "
                     "bit-plane layout (formats.unpack_ap3_bmma(qweight))")
        torch._check(qweight.dtype == torch.int32, lambda: f"qweight must be int32, got {qweight.dtype}")
        return qweight.shape[0] * 16, qweight.shape[1] * 512
    if formats.is_ap3_kernel_layout(qweight, lut):  # [out, in/256, 3, 8]
        torch._check(qweight.dtype == torch.int32, lambda: f"qweight must be int32, got {qweight.dtype}")
        return qweight.shape[0], qweight.shape[1] * 256
    torch._check(
        qweight.dim() == 3 and qweight.dtype == torch.int32,
        lambda: f"qweight must be [b, out, in/32] int32, got {tuple(qweight.shape)} {qweight.dtype}",
    )
    bits, out, words = qweight.shape
    torch._check(lut.shape == (out, 2**bits), lambda: f"lut must be [{out}, {2 ** bits}], got {tuple(lut.shape)}")
    return out, words * 32


def _lutgemm_shape(binary: torch.Tensor, alpha: torch.Tensor, q_bias: torch.Tensor) -> tuple[int, int]:
    torch._check(
        binary.dim() == 3 and binary.dtype == torch.int32,
        lambda: f"binary must be [in/32, b, out] int32, got {tuple(binary.shape)} {binary.dtype}",
    )
    words, bits, out = binary.shape
    in_features = words * 32
    groups = alpha.shape[0]
    torch._check(
        groups > 0 and in_features % groups == 0 and (in_features // groups) % 32 == 0,
        lambda: f"lutgemm groups must split in={in_features} into multiples of 32 channels, got {groups} groups",
    )
    torch._check(alpha.shape == (groups, bits, out), lambda: f"alpha must be [{groups}, {bits}, {out}], got {tuple(alpha.shape)}")
    torch._check(q_bias.shape == (groups, out), lambda: f"q_bias must be [{groups}, {out}], got {tuple(q_bias.shape)}")
    return out, in_features


def _check_dec(q_residual, scales, bounds, k_chunk, n_tb, out, in_features) -> None:
    """scales: None for the parts ops (they return unscaled sums)."""
    torch._check(out % 8 == 0, lambda: f"DEC needs out % 8 == 0 (8 nibbles per residual word), got out={out}")
    torch._check(
        q_residual.shape == (in_features, out // 8) and q_residual.dtype == torch.int32,
        lambda: f"q_residual must be [{in_features}, {out // 8}] int32, got {tuple(q_residual.shape)} {q_residual.dtype}",
    )
    if scales is not None:
        torch._check(scales.shape == (out,), lambda: f"scales must be [{out}], got {tuple(scales.shape)}")
    torch._check(bounds.shape == (2,), lambda: f"bounds must be [2], got {tuple(bounds.shape)}")
    torch._check(0 <= k_chunk <= 1024, lambda: f"k_chunk must be in 0..1024, got {k_chunk}")
    torch._check(n_tb >= 1, lambda: f"n_tb must be >= 1, got {n_tb}")


def _empty_out(x: torch.Tensor, out: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out))


def _check_attention(q, k_cache, v_cache, pos, window) -> None:
    torch._check(q.dim() == 3, lambda: f"q must be [B, H, Dh], got {tuple(q.shape)}")
    torch._check(
        k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
        lambda: f"k_cache and v_cache must be [B, Hkv, L, Dh] of one shape, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}",
    )
    torch._check(
        k_cache.shape[0] >= q.shape[0] and k_cache.shape[3] == q.shape[2],
        lambda: f"caches {tuple(k_cache.shape)} do not fit q {tuple(q.shape)}",
    )
    torch._check(q.shape[1] % k_cache.shape[1] == 0, lambda: f"{q.shape[1]} query heads do not group over {k_cache.shape[1]} KV heads")
    torch._check(pos.numel() == 1 and pos.dtype == torch.int64, lambda: f"pos must be one int64, got {tuple(pos.shape)} {pos.dtype}")
    torch._check(window >= 0, lambda: f"window must be >= 0 (0 = none), got {window}")


def _check_attention_rope(qkv, cos, sin, kv, pos, n_heads, window) -> None:
    torch._check(kv.dim() == 5 and kv.shape[0] == 2, lambda: f"kv must be [2, B, Hkv, L, Dh], got {tuple(kv.shape)}")
    torch._check(qkv.dim() == 2, lambda: f"qkv must be [B, (H + 2 Hkv) Dh], got {tuple(qkv.shape)}")
    hkv, dh = kv.shape[2], kv.shape[4]
    torch._check(n_heads >= 1 and n_heads % hkv == 0, lambda: f"{n_heads} query heads do not group over {hkv} KV heads")
    torch._check(
        qkv.shape[1] == (n_heads + 2 * hkv) * dh,
        lambda: f"qkv rows hold {qkv.shape[1]} values, (H + 2 Hkv) Dh = ({n_heads} + 2 x {hkv}) x {dh} expected",
    )
    torch._check(kv.shape[1] >= qkv.shape[0], lambda: f"kv holds {kv.shape[1]} sequences, qkv has {qkv.shape[0]}")
    torch._check(kv.dtype == qkv.dtype, lambda: f"kv must be {qkv.dtype} like qkv, got {kv.dtype}")
    r = cos.shape[-1]
    torch._check(
        cos.numel() == r and sin.numel() == r and r % 2 == 0 and r <= dh and cos.dtype == sin.dtype == torch.float32,
        lambda: f"cos / sin must be this position's float32 [1, R] rows, R even <= {dh}, got {tuple(cos.shape)} {cos.dtype}",
    )
    torch._check(pos.numel() == 1 and pos.dtype == torch.int64, lambda: f"pos must be one int64, got {tuple(pos.shape)} {pos.dtype}")
    torch._check(window >= 0, lambda: f"window must be >= 0 (0 = none), got {window}")


# ---------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("decdec::decode_attention_rope")
def _(qkv, cos, sin, kv, pos, n_heads, window):
    _check_attention_rope(qkv, cos, sin, kv, pos, n_heads, window)
    return qkv.new_empty((qkv.shape[0], n_heads * kv.shape[4]))


@torch.library.register_fake("decdec::decode_attention")
def _(q, k_cache, v_cache, pos, window):
    _check_attention(q, k_cache, v_cache, pos, window)
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))


@torch.library.register_fake("decdec::ap_gemv")
def _(x, qweight, lut):
    out, n = _ap_shape(qweight, lut, allow_bmma=True)
    _check_x(x, n)
    return _empty_out(x, out)


@torch.library.register_fake("decdec::ap_dequant")
def _(qweight, lut):
    out, n = _ap_shape(qweight, lut, allow_bmma=True)
    return lut.new_empty((out, n))


@torch.library.register_fake("decdec::lutgemm_gemv")
def _(x, binary, alpha, q_bias):
    out, n = _lutgemm_shape(binary, alpha, q_bias)
    _check_x(x, n)
    return _empty_out(x, out)


@torch.library.register_fake("decdec::lutgemm_dequant")
def _(binary, alpha, q_bias):
    out, n = _lutgemm_shape(binary, alpha, q_bias)
    return alpha.new_empty((out, n))


@torch.library.register_fake("decdec::dec")
def _(x, q_residual, scales, bounds, k_chunk, n_tb):
    out = scales.shape[0]
    _check_x(x, q_residual.shape[0])
    _check_dec(q_residual, scales, bounds, k_chunk, n_tb, out, x.shape[1])
    return _empty_out(x, out)


@torch.library.register_fake("decdec::ap_gemv_dec_chain")  # the same op as ap_gemv_dec, scheduled differently
@torch.library.register_fake("decdec::ap_gemv_dec")
def _fake_ap_gemv_dec(x, qweight, lut, q_residual, scales, bounds, k_chunk, n_tb):
    out, n = _ap_shape(qweight, lut)
    _check_x(x, n)
    _check_dec(q_residual, scales, bounds, k_chunk, n_tb, out, n)
    return _empty_out(x, out)


@torch.library.register_fake("decdec::lutgemm_gemv_dec")
def _(x, binary, alpha, q_bias, q_residual, scales, bounds, k_chunk, n_tb):
    out, n = _lutgemm_shape(binary, alpha, q_bias)
    _check_x(x, n)
    _check_dec(q_residual, scales, bounds, k_chunk, n_tb, out, n)
    return _empty_out(x, out)


@torch.library.register_fake("decdec::ap_gemv_dec_parts")
def _(x, qweight, lut, q_residual, bounds, k_chunk, n_tb):
    out, n = _ap_shape(qweight, lut)
    _check_x(x, n)
    _check_dec(q_residual, None, bounds, k_chunk, n_tb, out, n)
    return x.new_empty((1 + reference.dec_parts_rows(n), x.shape[0], out), dtype=torch.float32)


@torch.library.register_fake("decdec::lutgemm_gemv_dec_parts")
def _(x, binary, alpha, q_bias, q_residual, bounds, k_chunk, n_tb):
    out, n = _lutgemm_shape(binary, alpha, q_bias)
    _check_x(x, n)
    _check_dec(q_residual, None, bounds, k_chunk, n_tb, out, n)
    return x.new_empty((1 + reference.dec_parts_rows(n), x.shape[0], out), dtype=torch.float32)


def _check_addnorm(a, b, gamma, eps, qweight, lut, allow_bmma: bool = False) -> tuple[int, int]:
    out, n = _ap_shape(qweight, lut, allow_bmma)
    _check_x(a, n)
    torch._check(b.shape == a.shape, lambda: f"b must be {tuple(a.shape)} like a, got {tuple(b.shape)}")
    torch._check(gamma.shape == (n,), lambda: f"gamma must be [{n}], got {tuple(gamma.shape)}")
    torch._check(eps >= 0, lambda: f"eps must be >= 0, got {eps}")
    return out, n


@torch.library.register_fake("decdec::ap_gemv_addnorm")
def _(a, b, gamma, eps, qweight, lut):
    out, _ = _check_addnorm(a, b, gamma, eps, qweight, lut, allow_bmma=True)
    return _empty_out(a, out), torch.empty_like(a)


@torch.library.register_fake("decdec::ap_gemv_addnorm_glu")
def _(a, b, gamma, eps, qweight, lut):
    out, _ = _check_addnorm(a, b, gamma, eps, qweight, lut, allow_bmma=True)
    torch._check(out % 2 == 0, lambda: f"ap_gemv_addnorm_glu needs an even number of rows (gate, up pairs), got {out}")
    return a.new_empty((a.shape[0], out // 2)), torch.empty_like(a)


def glu_supported(bits: int, in_features: int) -> bool:
    """Where ``ap_gemv_addnorm_glu``'s CUDA kernel serves (csrc ``ap_glu_supported``; checked against it on the GPU):
    the add + norm GEMV's shapes on the streaming GEMV (Llama-3: in 4096 / 8192). ``DECDEC_GLU=0`` turns the GLU
    layout off (same-machine A/B)."""
    if os.environ.get("DECDEC_GLU", "1") == "0":
        return False
    return addnorm_supported(bits, in_features) and _ap3_fp16_gemv(in_features) == "stream"


@torch.library.register_fake("decdec::ap_gemv_addnorm_dec_parts")
def _(a, b, gamma, eps, qweight, lut, q_residual, bounds, k_chunk, n_tb):
    out, n = _check_addnorm(a, b, gamma, eps, qweight, lut)
    _check_dec(q_residual, None, bounds, k_chunk, n_tb, out, n)
    return a.new_empty((1 + reference.dec_parts_rows(n), a.shape[0], out), dtype=torch.float32), torch.empty_like(a)


@torch.library.register_fake("decdec::ap_gemv_addnorm_dec_chain")
def _(a, b, gamma, eps, qweight, lut, q_residual, scales, bounds, k_chunk, n_tb):
    out, n = _check_addnorm(a, b, gamma, eps, qweight, lut)
    _check_dec(q_residual, scales, bounds, k_chunk, n_tb, out, n)
    return _empty_out(a, out), torch.empty_like(a)


@torch.library.register_fake("decdec::ap_gemv_addnorm_glu_dec_chain")
def _(a, b, gamma, eps, qweight, lut, q_residual, scales, bounds, k_chunk, n_tb):
    out, n = _check_addnorm(a, b, gamma, eps, qweight, lut)
    _check_dec(q_residual, scales, bounds, k_chunk, n_tb, out, n)
    torch._check(out % 2 == 0, lambda: f"ap_gemv_addnorm_glu_dec_chain needs an even number of rows, got {out}")
    return a.new_empty((a.shape[0], out // 2)), torch.empty_like(a)


def dec_chain_supported(bits: int, in_features: int, device: torch.device | None = None) -> bool:
    """Where the ``*_dec_chain`` ops' CUDA kernels serve (csrc ``ap_dec_chain_supported``; checked against it on the
    GPU): 3-bit fp16 weights in the kernel layout (``ap3_kernel_layout``). Chain mode runs DEC, then the GEMV as its
    programmatic dependent, in one stream, and the GEMV writes the final output (csrc/kernels.h ``Fused::chain``);
    elsewhere DEC runs beside the GEMV on a side stream and returns parts for the caller's combine. With ``device``:
    also whether chain mode pays there -- it needs programmatic dependent launch (compute capability >= 9, and not
    ``DECDEC_PDL=0``); without it DEC and the GEMV would run one after the other.
    ``DECDEC_DEC_CHAIN=0`` keeps the parts ops (same-machine A/B)."""
    if os.environ.get("DECDEC_DEC_CHAIN", "1") == "0":
        return False
    if device is not None and (os.environ.get("DECDEC_PDL", "1") == "0" or not has_pdl(device)):
        return False
    return ap3_kernel_layout(bits, torch.float16, in_features)


_PDL: dict[int, bool] = {}


@torch.compiler.assume_constant_result  # a property of the device: a compiled step treats it as a constant
def has_pdl(device: torch.device) -> bool:
    """Compute capability >= 9 (programmatic dependent launch), cached per CUDA device; False off CUDA."""
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL:
        _PDL[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL[idx]


def addnorm_supported(bits: int, in_features: int) -> bool:
    """Where ``ap_gemv_addnorm``'s CUDA kernel serves (csrc ``ap_addnorm_supported``; checked against it on the
    GPU): 3-bit weights on the tensor-core or streaming GEMV (``_ap3_fp16_gemv``) with in <= 8192. Pure
    arithmetic, so a compiled step evaluates it once.
    ``DECDEC_ADDNORM=0`` turns the fused kernel off (same-machine A/B, like ``DECDEC_PDL=0``)."""
    if os.environ.get("DECDEC_ADDNORM", "1") == "0":
        return False
    return bits == 3 and in_features <= 8192 and _ap3_fp16_gemv(in_features) is not None


def _ap3_fp16_gemv(in_features: int) -> str | None:
    """Which fast 3-bit fp16 GEMV csrc dispatches for this width (ap_gemv.cu use_mma_kernel / use_stream_kernel):
    the tensor-core kernel for in % 512 == 0 unless in / 128 is a multiple of 32, else the streaming kernel where its
    lanes stay busy (in % 128 == 0, 5 g4 >= 4 * 32 * ceil(g4 / 32) with g4 = in / 128), else neither."""
    if in_features % 128:
        return None
    g4 = in_features // 128
    if in_features % 512 == 0 and g4 % 32 != 0:
        return "mma"
    return "stream" if 5 * g4 >= 4 * 32 * (-(-g4 // 32)) else None


def ap3_kernel_layout(bits: int, dtype: torch.dtype, in_features: int) -> bool:
    """Whether fp16 ap weights of this shape run on CUDA in the 3-bit kernel layout (``formats.pack_ap3_kernel``;
    csrc ``ap3_packed_supported``, checked against it on the GPU): 3 bits on the tensor-core or streaming GEMV,
    in % 256 == 0.
    ``DECDEC_KERNEL_LAYOUT=0`` keeps the bit-plane layout (same-machine A/B)."""
    if os.environ.get("DECDEC_KERNEL_LAYOUT", "1") == "0":
        return False
    return bits == 3 and dtype == torch.float16 and in_features % 256 == 0 and _ap3_fp16_gemv(in_features) is not None


def ap3_bmma_supported(in_features: int, out_features: int) -> bool:
    """Shapes whose 3-bit weights the binary-tensor-core GEMV (``formats.pack_ap3_bmma``, csrc ``ap3_bmma_supported``)
    serves, fp16 or bf16: in % 512 == 0, out % 16 == 0, in <= 20480."""
    return in_features > 0 and out_features > 0 and in_features % 512 == 0 and out_features % 16 == 0 \
        and in_features <= 20480


_SMS: dict[int, int] = {}


def bmma_preferred(bits: int, dtype: torch.dtype, in_features: int, out_features: int, device: torch.device) -> bool:
    """Whether a decode GEMV of this shape runs faster on the binary tensor cores (QuantLinear then holds its weights
    in ``formats.pack_ap3_bmma``'s layout while DEC is off for it): 3-bit fp16 / bf16 on CUDA, a supported shape, and
    at least 7 row groups of 16 per SM, where the GEMV needs no K split. Measured (H200, docs/PERF.md session 21, ops
    from CUDA graphs with the planes kernel): 4096x28672 16.8 vs 21.3 us, 5120x35840 26.2 vs 31.7, gate_up with its
    add + norm and GLU 20.0 vs 25.1 us; every shape that needs the K split was slower (o, qkv, down).
    ``DECDEC_BMMA=0`` keeps the kernel layout, ``DECDEC_BMMA=all`` takes the bmma layout for every supported shape
    (same-machine A/B; any other value is an error)."""
    mode = os.environ.get("DECDEC_BMMA", "1")
    if mode not in ("0", "1", "all"):
        raise ValueError(f"DECDEC_BMMA={mode!r}: use 1 (the rule, default), 0 (never) or all (every supported shape)")
    if mode == "0" or device.type != "cuda":
        return False
    if bits != 3 or dtype not in (torch.float16, torch.bfloat16) or not ap3_bmma_supported(in_features, out_features):
        return False
    if mode == "all":
        return True
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return out_features // 16 >= 7 * _SMS[idx]


# ---------------------------------------------------------------------------- CPU kernels = reference
@torch.library.impl(_lib, "ap_gemv", "CPU")
def _(x, qweight, lut):
    out, n = _ap_shape(qweight, lut, allow_bmma=True)
    _check_x(x, n)
    return reference.ap_gemv(x, qweight, lut)


@torch.library.impl(_lib, "ap_dequant", "CPU")
def _(qweight, lut):
    _ap_shape(qweight, lut, allow_bmma=True)
    return reference.ap_dequant_kept(qweight, lut)


@torch.library.impl(_lib, "lutgemm_gemv", "CPU")
def _(x, binary, alpha, q_bias):
    out, n = _lutgemm_shape(binary, alpha, q_bias)
    _check_x(x, n)
    return reference.lutgemm_gemv(x, binary, alpha, q_bias)


@torch.library.impl(_lib, "lutgemm_dequant", "CPU")
def _(binary, alpha, q_bias):
    _lutgemm_shape(binary, alpha, q_bias)
    return reference.lutgemm_dequant_kept(binary, alpha, q_bias)


@torch.library.impl(_lib, "dec", "CPU")
def _(x, q_residual, scales, bounds, k_chunk, n_tb):
    _check_x(x, q_residual.shape[0])
    _check_dec(q_residual, scales, bounds, k_chunk, n_tb, scales.shape[0], x.shape[1])
    return reference.dec(x, q_residual, scales, bounds, k_chunk)


@torch.library.impl(_lib, "ap_gemv_dec_chain", "CPU")  # the same op as ap_gemv_dec, scheduled differently on CUDA
@torch.library.impl(_lib, "ap_gemv_dec", "CPU")
def _cpu_ap_gemv_dec(x, qweight, lut, q_residual, scales, bounds, k_chunk, n_tb):
    out, n = _ap_shape(qweight, lut)
    _check_x(x, n)
    _check_dec(q_residual, scales, bounds, k_chunk, n_tb, out, n)
    return reference.ap_gemv_dec(x, qweight, lut, q_residual, scales, bounds, k_chunk)


@torch.library.impl(_lib, "lutgemm_gemv_dec", "CPU")
def _(x, binary, alpha, q_bias, q_residual, scales, bounds, k_chunk, n_tb):
    out, n = _lutgemm_shape(binary, alpha, q_bias)
    _check_x(x, n)
    _check_dec(q_residual, scales, bounds, k_chunk, n_tb, out, n)
    return reference.lutgemm_gemv_dec(x, binary, alpha, q_bias, q_residual, scales, bounds, k_chunk)


@torch.library.impl(_lib, "ap_gemv_dec_parts", "CPU")
def _(x, qweight, lut, q_residual, bounds, k_chunk, n_tb):
    out, n = _ap_shape(qweight, lut)
    _check_x(x, n)
    _check_dec(q_residual, None, bounds, k_chunk, n_tb, out, n)
    return reference.ap_gemv_dec_parts(x, qweight, lut, q_residual, bounds, k_chunk)


@torch.library.impl(_lib, "lutgemm_gemv_dec_parts", "CPU")
def _(x, binary, alpha, q_bias, q_residual, bounds, k_chunk, n_tb):
    out, n = _lutgemm_shape(binary, alpha, q_bias)
    _check_x(x, n)
    _check_dec(q_residual, None, bounds, k_chunk, n_tb, out, n)
    return reference.lutgemm_gemv_dec_parts(x, binary, alpha, q_bias, q_residual, bounds, k_chunk)


@torch.library.impl(_lib, "ap_gemv_addnorm", "CPU")
def _(a, b, gamma, eps, qweight, lut):
    _check_addnorm(a, b, gamma, eps, qweight, lut, allow_bmma=True)
    return reference.ap_gemv_addnorm(a, b, gamma, eps, qweight, lut)


@torch.library.impl(_lib, "ap_gemv_addnorm_glu", "CPU")
def _(a, b, gamma, eps, qweight, lut):
    out, _ = _check_addnorm(a, b, gamma, eps, qweight, lut, allow_bmma=True)
    torch._check(out % 2 == 0, lambda: f"ap_gemv_addnorm_glu needs an even number of rows (gate, up pairs), got {out}")
    return reference.ap_gemv_addnorm_glu(a, b, gamma, eps, qweight, lut)


@torch.library.impl(_lib, "ap_gemv_addnorm_dec_parts", "CPU")
def _(a, b, gamma, eps, qweight, lut, q_residual, bounds, k_chunk, n_tb):
    out, n = _check_addnorm(a, b, gamma, eps, qweight, lut)
    _check_dec(q_residual, None, bounds, k_chunk, n_tb, out, n)
    return reference.ap_gemv_addnorm_dec_parts(a, b, gamma, eps, qweight, lut, q_residual, bounds, k_chunk)


@torch.library.impl(_lib, "ap_gemv_addnorm_dec_chain", "CPU")
def _(a, b, gamma, eps, qweight, lut, q_residual, scales, bounds, k_chunk, n_tb):
    out, n = _check_addnorm(a, b, gamma, eps, qweight, lut)
    _check_dec(q_residual, scales, bounds, k_chunk, n_tb, out, n)
    return reference.ap_gemv_addnorm_dec(a, b, gamma, eps, qweight, lut, q_residual, scales, bounds, k_chunk)


@torch.library.impl(_lib, "ap_gemv_addnorm_glu_dec_chain", "CPU")
def _(a, b, gamma, eps, qweight, lut, q_residual, scales, bounds, k_chunk, n_tb):
    out, n = _check_addnorm(a, b, gamma, eps, qweight, lut)
    _check_dec(q_residual, scales, bounds, k_chunk, n_tb, out, n)
    torch._check(out % 2 == 0, lambda: f"ap_gemv_addnorm_glu_dec_chain needs an even number of rows, got {out}")
    return reference.ap_gemv_addnorm_glu_dec(a, b, gamma, eps, qweight, lut, q_residual, scales, bounds, k_chunk)


@torch.library.impl(_lib, "decode_attention", "CPU")
def _(q, k_cache, v_cache, pos, window):
    _check_attention(q, k_cache, v_cache, pos, window)
    return reference.decode_attention(q, k_cache, v_cache, pos, window)


@torch.library.impl(_lib, "decode_attention_rope", "CPU")
def _(qkv, cos, sin, kv, pos, n_heads, window):
    _check_attention_rope(qkv, cos, sin, kv, pos, n_heads, window)
    return reference.decode_attention_rope(qkv, cos, sin, kv, pos, n_heads, window)


# ---------------------------------------------------------------------------- CUDA extension
class KernelsUnavailable(RuntimeError):
    pass


_CUDA_HINT = (
    "build the CUDA kernels first: on a machine with nvcc and a CUDA build of torch run "
    "`pip install -e . --no-build-isolation` (arch from TORCH_CUDA_ARCH_LIST or the visible GPU), "
    "or `python scripts/build_kernels.py` for a JIT build"
)


def load_cuda_kernels() -> str:
    """Import the compiled extension (registers the CUDA kernels). Returns its file path.

    Raises ``KernelsUnavailable`` with the build command when it cannot be loaded.
    """
    try:
        mod = importlib.import_module("decdec._C")
    except ImportError as e:
        raise KernelsUnavailable(f"decdec CUDA kernels are not built ({e}); {_CUDA_HINT}") from e
    return getattr(mod, "__file__", "decdec._C")


def kernel_path(device: torch.device) -> str:
    """Human-readable name of the kernels that run on ``device`` (recorded in env.yaml)."""
    if device.type == "cpu":
        return "cpu-reference (decdec.reference via torch.ops.decdec CPU kernels)"
    return f"cuda ({load_cuda_kernels()})"


def place_residual(q_residual: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Put a ``q_residual [in, out/8] int32`` where DEC reads it from on ``device``.

    CPU: the tensor itself. CUDA: pinned, mapped host memory exposed as a CUDA tensor, so the DEC
    kernel reads selected rows over PCIe (zero-copy) and no GPU memory is used. That memory is
    allocated and freed by ``decdec._C`` alone (freed when the returned tensor dies).
    """
    if device.type == "cpu":
        return q_residual
    if device.type != "cuda":
        raise ValueError(f"place_residual: unsupported device {device}")
    load_cuda_kernels()
    from decdec import _C  # noqa: PLC0415 (the extension is optional)

    index = device.index if device.index is not None else torch.cuda.current_device()
    host = q_residual.detach().to(device="cpu", dtype=torch.int32).contiguous()
    return _C.pin_residual(host, index)
