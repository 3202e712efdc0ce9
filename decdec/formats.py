"""Bit layouts of our tensors: ap bit-planes, LUT-GEMM binary codes, residual nibbles.

Every layout here is shared by the pure-PyTorch reference (``decdec.reference``) and the CUDA
kernels in ``csrc/``; change one and you must change the other.

ap (any-precision, non-uniform)
    ``qweight [b, out, in/32] int32``: bit ``j`` of word ``qweight[p, r, w]`` is bit ``p`` of the
    code of weight ``(r, 32*w + j)``. ``lut [out, 2**b]``: ``W[r, i] = lut[r, code[r, i]]``.

lutgemm (binary-coding quantization, groups of ``group = in / n_groups`` channels along ``in``;
    128 by default, any multiple of 32 allowed -- SmolLM2's in=576 gets 64 by default)
    ``binary [in/32, b, out] int32``: bit ``j`` of word ``binary[w, p, r]`` is ``bit_p(r, 32*w + j)``;
    ``alpha [n_groups, b, out]``, ``q_bias [n_groups, out]``;
    ``W[r, i] = sum_p alpha[g, p, r] * (2 * bit_p - 1) + q_bias[g, r]`` with ``g = i // group``.

residual ("cheatsheet")
    ``q_residual [in, out/8] int32``: nibble ``n`` (bits ``4n..4n+3``) of word ``[i, c]`` holds
    ``q(E[8c + n, i]) + 8`` in 1..15; ``scales [out]``; ``E[r, i] ~= scales[r] * (nibble - 8)``.
    Row ``i`` is what one selected input channel costs to fetch: ``out / 2`` bytes.
"""

from __future__ import annotations

import sys

import torch

if sys.byteorder != "little":  # the unpackers reinterpret int32 words as bytes
    raise ImportError("decdec's bit layouts assume a little-endian host, as CUDA devices are")

BCQ_GROUP = 128
RESIDUAL_LEVELS = 7  # symmetric 4-bit: integer levels -7..7, stored +8


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret non-negative int64 values < 2**32 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_bits_last(bits: torch.Tensor) -> torch.Tensor:
    """bits [..., n*32] in {0,1} -> int32 [..., n]; element 32*w + j goes to bit j of word w."""
    *lead, n = bits.shape
    if n % 32:
        raise ValueError(f"bit count {n} is not a multiple of 32")
    shifts = torch.arange(32, dtype=torch.int64, device=bits.device)
    words = (bits.reshape(*lead, n // 32, 32).to(torch.int64) << shifts).sum(-1)
    return _to_int32(words)


def _unpack_bits_last(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] -> uint8 bits [..., n*32] (inverse of ``_pack_bits_last``).

    Works on the little-endian bytes of each word (byte k holds bits 8k..8k+7): uint8 shifts are
    4x less memory traffic than int32 ones, which keeps the CPU reference usable for decoding.
    """
    by = words.contiguous().view(torch.uint8).unsqueeze(-1)  # [..., 4n, 1]
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    return ((by >> shifts) & 1).reshape(*words.shape[:-1], words.shape[-1] * 32)


# ---------------------------------------------------------------------------- ap bit-planes
def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] integers in 0..2**bits-1 -> qweight [bits, out, in/32] int32."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes must lie in 0..{2**bits - 1}")
    planes = torch.stack([(c >> p) & 1 for p in range(bits)])  # [b, out, in]
    return _pack_bits_last(planes)


def unpack_bitplanes(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [b, out, in/32] int32 -> codes [out, in] int64."""
    codes = _unpack_bits_last(qweight[0])
    for p in range(1, qweight.shape[0]):
        codes |= _unpack_bits_last(qweight[p]) << p
    return codes.to(torch.int64)


# ---------------------------------------------------------------------------- ap 3-bit kernel layout
# The fp16 3-bit CUDA GEMVs read their weights in a layout of their own, made once when a model is placed on the GPU
# (QuantLinear.use_kernel_layout): qweight [out, in/256, 3, 8] int32. Each 32-channel group w has three words W0,
# W1, W2: nibble n of W_k (k < 3) holds the code of channel 32 w + 4 n + k in bits 0-2, and bit 3 of nibble n of W_q
# holds bit q of the code of channel 32 w + 4 n + 3. The nibbles are ready-made PRMT selectors (csrc/common.cuh), so
# decoding costs fewer integer instructions than from bit-planes. Per 8 groups (256 channels) the 8 W0 come first,
# then the 8 W1, then the 8 W2, so the GEMV's 16-byte loads stay sector-aligned. Same bytes as the bit-planes; the bit
# transform is its own inverse.
_NIB0 = 0x11111111  # bit 0 of every nibble
_NIB3 = -0x77777778  # 0x88888888 as int32: bit 3 of every nibble


def _swap_ap3_bits(words: torch.Tensor) -> torch.Tensor:
    """[3, ...] int32 -> [3, ...]: word q of the result takes bit q of each nibble-position k < 3 from word k and
    keeps its own bit 3 of every nibble; applying it twice gives the input back."""
    out = []
    for q in range(3):
        w = words[q] & _NIB3
        for b in range(3):
            w = w | (((words[b] >> q) & _NIB0) << b)
        out.append(w)
    return torch.stack(out)


def pack_ap3_kernel(qweight: torch.Tensor) -> torch.Tensor:
    """3-bit bit-plane qweight [3, out, in/32] int32 -> the kernel layout [out, in/256, 3, 8] (in % 256 == 0)."""
    if qweight.dim() != 3 or qweight.shape[0] != 3 or qweight.dtype != torch.int32:
        raise ValueError(f"pack_ap3_kernel takes 3-bit bit-planes [3, out, in/32] int32, got {tuple(qweight.shape)} "
                         f"{qweight.dtype}")
    _, out, words = qweight.shape
    if words % 8:
        raise ValueError(f"the 3-bit kernel layout needs in % 256 == 0, got in = {words * 32}")
    return _swap_ap3_bits(qweight).view(3, out, words // 8, 8).permute(1, 2, 0, 3).contiguous()


def unpack_ap3_kernel(packed: torch.Tensor) -> torch.Tensor:
    """The kernel layout [out, in/256, 3, 8] int32 -> 3-bit bit-planes [3, out, in/32] (inverse of pack_ap3_kernel)."""
    if packed.dim() != 4 or packed.shape[2:] != (3, 8) or packed.dtype != torch.int32:
        raise ValueError(f"unpack_ap3_kernel takes [out, in/256, 3, 8] int32, got {tuple(packed.shape)} {packed.dtype}")
    out, blocks = packed.shape[:2]
    return _swap_ap3_bits(packed.permute(2, 0, 1, 3).reshape(3, out, blocks * 8)).contiguous()


def is_ap3_kernel_layout(qweight: torch.Tensor, lut: torch.Tensor) -> bool:
    """Whether qweight (with its lut [out, 8]) is in the 3-bit kernel layout [out, in/256, 3, 8] -- 4-D, unlike the
    bit-planes [b, out, in/32]. Mirrors is_ap3_kernel_layout in csrc/bindings.cpp."""
    return (qweight.dim() == 4 and tuple(qweight.shape[2:]) == (3, 8) and lut.dim() == 2
            and lut.shape[0] == qweight.shape[0] and lut.shape[1] == 8)


# ---------------------------------------------------------------------------- ap 3-bit binary-tensor-core layout
# The 3-bit GEMV on the binary tensor cores (csrc/ap_bmma.cu) reads qweight [out/16, in/512, 6, 32, 4] int32: per
# 16-row group and 512-channel step, slot 3 h + p (half h, bit-plane p) holds for lane 4 g + t of a warp the four words
# of the MMA's A operand: rows g, g + 8 of word 4 t + 2 h, then rows g, g + 8 of word 4 t + 2 h + 1 (a word: 32
# channels of the step; row g: row 16 * group + g). A permutation of the bit-plane words (same bytes), so a step is 3 KB
# contiguous per warp and every 16-byte load is an MMA operand as it comes.
# axes of the bit-planes viewed as [plane, group, R, g, step, t, h, e] (row = 16 group + 8 R + g, word = 16 step + 4 t
# + 2 h + e) and their order in the packed layout [group, step, (h, plane), (g, t), (e, R)]
_BMMA_ORDER = (1, 4, 6, 0, 3, 5, 7, 2)
_BMMA_INVERSE = tuple(_BMMA_ORDER.index(i) for i in range(8))


def pack_ap3_bmma(qweight: torch.Tensor) -> torch.Tensor:
    """3-bit bit-plane qweight [3, out, in/32] int32 -> the binary-tensor-core layout [out/16, in/512, 6, 32, 4]
    (out % 16 == 0, in % 512 == 0). The rows keep their order (GLU pair order stays pair order)."""
    if qweight.dim() != 3 or qweight.shape[0] != 3 or qweight.dtype != torch.int32:
        raise ValueError(f"pack_ap3_bmma takes 3-bit bit-planes [3, out, in/32] int32, got {tuple(qweight.shape)} "
                         f"{qweight.dtype}")
    _, out, words = qweight.shape
    if out % 16 or words % 16:
        raise ValueError(f"the binary-tensor-core layout needs out % 16 == 0 and in % 512 == 0, got out = {out}, "
                         f"in = {words * 32}")
    v = qweight.reshape(3, out // 16, 2, 8, words // 16, 4, 2, 2)
    return v.permute(*_BMMA_ORDER).reshape(out // 16, words // 16, 6, 32, 4).contiguous()


def unpack_ap3_bmma(packed: torch.Tensor) -> torch.Tensor:
    """The binary-tensor-core layout [out/16, in/512, 6, 32, 4] int32 -> bit-planes [3, out, in/32] (inverse of
    pack_ap3_bmma)."""
    if packed.dim() != 5 or tuple(packed.shape[2:]) != (6, 32, 4) or packed.dtype != torch.int32:
        raise ValueError(f"unpack_ap3_bmma takes [out/16, in/512, 6, 32, 4] int32, got {tuple(packed.shape)} "
                         f"{packed.dtype}")
    groups, steps = packed.shape[:2]
    v = packed.reshape(groups, steps, 2, 3, 8, 4, 2, 2)
    return v.permute(*_BMMA_INVERSE).reshape(3, groups * 16, steps * 16).contiguous()


def is_ap3_bmma_layout(qweight: torch.Tensor, lut: torch.Tensor) -> bool:
    """Whether qweight (with its lut [out, 8]) is in the binary-tensor-core layout [out/16, in/512, 6, 32, 4] -- 5-D,
    unlike the other ap layouts. Mirrors is_ap3_bmma_layout in csrc/bindings.cpp."""
    return (qweight.dim() == 5 and tuple(qweight.shape[2:]) == (6, 32, 4) and lut.dim() == 2
            and lut.shape[0] == qweight.shape[0] * 16 and lut.shape[1] == 8)


# ---------------------------------------------------------------------------- lutgemm BCQ
def pack_bcq(bit_planes: torch.Tensor) -> torch.Tensor:
    """bit_planes [b, out, in] in {0,1} -> binary [in/32, b, out] int32."""
    words = _pack_bits_last(bit_planes)  # [b, out, in/32]
    return words.permute(2, 0, 1).contiguous()


def unpack_bcq(binary: torch.Tensor) -> torch.Tensor:
    """binary [in/32, b, out] int32 -> bit planes [b, out, in] uint8."""
    return _unpack_bits_last(binary.permute(1, 2, 0))


def uniform_to_bcq(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact conversion of group-wise asymmetric uniform quantization to binary coding.

    q [out, in] integer codes 0..2**b-1, scale/zero [out, n_groups]; ``W = scale * (q - zero)``.
    Returns (binary [in/32, b, out] int32, alpha [n_groups, b, out] fp32, q_bias [n_groups, out] fp32)
    with ``alpha_p = scale * 2**(p-1)`` and ``q_bias = scale * ((2**b - 1)/2 - zero)``.
    """
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [out, in], got shape {tuple(q.shape)}")
    out, inp = q.shape
    if (scale.dim() != 2 or scale.shape[0] != out or zero.shape != scale.shape
            or not scale.shape[1] or inp % scale.shape[1] or (inp // scale.shape[1]) % 32):
        raise ValueError(
            f"scale/zero must be [out={out}, n_groups], n_groups splitting in={inp} into multiples of 32, "
            f"got {tuple(scale.shape)} and {tuple(zero.shape)}"
        )
    qi = q.to(torch.int64)
    if qi.numel() and (int(qi.min()) < 0 or int(qi.max()) >= 2**bits):
        raise ValueError(f"q must lie in 0..{2**bits - 1}, got {int(qi.min())}..{int(qi.max())}")
    planes = torch.stack([(qi >> p) & 1 for p in range(bits)])  # [b, out, in]
    binary = pack_bcq(planes)
    s = scale.to(torch.float32).t()  # [in/128, out]
    z = zero.to(torch.float32).t()
    alpha = torch.stack([s * 2.0 ** (p - 1) for p in range(bits)], dim=1)  # [g, b, out]
    q_bias = s * ((2**bits - 1) / 2 - z)
    return binary, alpha.contiguous(), q_bias.contiguous()


# ---------------------------------------------------------------------------- residual nibbles
def pack_residual(levels: torch.Tensor) -> torch.Tensor:
    """levels [out, in] integers in -7..7 -> q_residual [in, out/8] int32."""
    out, inp = levels.shape
    if out % 8:
        raise ValueError(f"residual needs out % 8 == 0, got out={out}")
    lv = levels.to(torch.int64)
    if lv.numel() and (int(lv.min()) < -RESIDUAL_LEVELS or int(lv.max()) > RESIDUAL_LEVELS):
        raise ValueError("residual levels must lie in -7..7")
    nib = (lv + 8).t().reshape(inp, out // 8, 8)  # [in, c, n] = level of row 8c+n
    shifts = 4 * torch.arange(8, dtype=torch.int64, device=levels.device)
    return _to_int32((nib << shifts).sum(-1))


def unpack_residual(q_residual: torch.Tensor) -> torch.Tensor:
    """q_residual [in, out/8] int32 -> signed levels [out, in] int64 (nibble - 8)."""
    inp, c = q_residual.shape
    shifts = 4 * torch.arange(8, dtype=torch.int32, device=q_residual.device)
    nib = (q_residual.unsqueeze(-1) >> shifts) & 0xF  # [in, c, 8]
    return (nib.to(torch.int64) - 8).reshape(inp, c * 8).t()


def reference_scales_to_natural(reordered: torch.Tensor) -> torch.Tensor:
    """The original DecDEC tools store the scale of output ``8c+n`` at ``n*(out/8)+c``."""
    out = reordered.numel()
    if reordered.dim() != 1 or out % 8:
        raise ValueError(f"scales must be 1-D with out % 8 == 0, got shape {tuple(reordered.shape)}")
    return reordered.reshape(8, out // 8).t().reshape(out)


# ---------------------------------------------------------------------------- gate_up rows paired for the GLU epilogue
def glu_pair_order(out_features: int) -> torch.Tensor:
    """Row order of a gate_up weight whose rows are [gate_0..gate_{I-1}, up_0..up_{I-1}] (out = 2 I) re-laid as pairs
    (gate_i, up_i) = rows (2 i, 2 i + 1): new row j holds old row ``order[j]`` (QuantLinear.use_glu_layout; the
    streaming GEMV's GLU epilogue reads a warp item's two rows as one pair)."""
    if out_features % 2:
        raise ValueError(f"gate_up needs an even number of rows, got {out_features}")
    half = out_features // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def glu_unpair(y: torch.Tensor) -> torch.Tensor:
    """[..., 2 I] outputs in pair order (gate_0, up_0, gate_1, ...) -> [..., 2 I] in the original order (gates, then
    ups): the inverse of ``glu_pair_order`` on the last dimension."""
    return y.unflatten(-1, (y.shape[-1] // 2, 2)).transpose(-1, -2).flatten(-2)

