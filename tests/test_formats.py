"""Bit layouts of decdec.formats: round trips, hand-built words, exact BCQ conversion, errors."""

from __future__ import annotations

import pytest
import torch

from decdec import formats, reference


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _i32(word: int) -> int:
    """An unsigned 32-bit pattern as the int32 value torch stores."""
    return word - 2**32 if word >= 2**31 else word


# ---------------------------------------------------------------------------- ap 3-bit kernel layout
def test_kernel_layout_round_trip_and_nibbles():
    """Nibble n of W_k (k < 3) is the code of channel 4n + k; bit 3 of nibble n of W_q is bit q of channel 4n + 3."""
    codes = torch.randint(0, 8, (6, 256), generator=_gen(31))
    qw = formats.pack_bitplanes(codes, 3)
    pk = formats.pack_ap3_kernel(qw)
    assert pk.shape == (6, 1, 3, 8) and pk.dtype == torch.int32 and pk.is_contiguous()
    assert torch.equal(formats.unpack_ap3_kernel(pk), qw)
    w = pk.permute(0, 1, 3, 2).reshape(6, 8, 3).to(torch.int64) & 0xFFFFFFFF  # [out, words, W_q] as unsigned
    ch = torch.arange(32)
    n, k = ch // 4, ch % 4
    for q in range(3):
        direct = (w[..., q : q + 1] >> (4 * n[k == q])) & 7  # channels 4n + q
        assert torch.equal(direct, codes.view(6, 8, 32)[..., k == q])
    spare = sum(((w[..., q : q + 1] >> (4 * n[k == 3] + 3)) & 1) << q for q in range(3))
    assert torch.equal(spare, codes.view(6, 8, 32)[..., k == 3])


def test_kernel_layout_hand_built_word():
    codes = torch.zeros(1, 256, dtype=torch.int64)  # in = 256: one block of 8 groups
    codes[0, 1] = 5  # channel 4*0 + 1: nibble 0 of W1 = 5
    codes[0, 3] = 6  # channel 4*0 + 3: bits 1, 2 -> bit 3 of nibble 0 of W1 and W2
    codes[0, 30] = 7  # channel 4*7 + 2: nibble 7 of W2 = 7
    pk = formats.pack_ap3_kernel(formats.pack_bitplanes(codes, 3))  # [1, 1, 3, 8]: W_q of group 0 at [0, 0, q, 0]
    assert pk[0, 0, :, 0].tolist() == [0, _i32(0x5 | 0x8), _i32(0x7 << 28 | 0x8)]
    assert not pk[0, 0, :, 1:].any()


def test_kernel_layout_is_told_apart_from_bitplanes():
    assert formats.is_ap3_kernel_layout(torch.zeros(16, 4, 3, 8, dtype=torch.int32), torch.zeros(16, 8))
    assert not formats.is_ap3_kernel_layout(torch.zeros(3, 16, 32, dtype=torch.int32), torch.zeros(16, 8))
    assert not formats.is_ap3_kernel_layout(torch.zeros(3, 3, 24, dtype=torch.int32), torch.zeros(3, 8))
    assert not formats.is_ap3_kernel_layout(torch.zeros(16, 4, 3, 8, dtype=torch.int32), torch.zeros(16, 16))


def test_kernel_layout_errors():
    with pytest.raises(ValueError, match=r"3-bit bit-planes \[3, out, in/32\]"):
        formats.pack_ap3_kernel(torch.zeros(4, 8, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="in % 256 == 0, got in = 128"):
        formats.pack_ap3_kernel(torch.zeros(3, 8, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[out, in/256, 3, 8\]"):
        formats.unpack_ap3_kernel(torch.zeros(8, 4, 3, dtype=torch.int32))


def test_reference_dequant_reads_both_layouts():
    codes = torch.randint(0, 8, (12, 512), generator=_gen(32))
    lut = torch.randn(12, 8, generator=_gen(33)).half()
    qw = formats.pack_bitplanes(codes, 3)
    w = reference.ap_dequant(qw, lut)
    assert torch.equal(reference.ap_dequant(formats.pack_ap3_kernel(qw), lut), w)
    assert torch.equal(w, torch.gather(lut, 1, codes))


# ---------------------------------------------------------------------------- ap 3-bit binary-tensor-core layout
def test_bmma_layout_round_trip_and_operand_order():
    """Slot 3 h + p, lane 4 g + t, word i of step kb of row group G is plane p of row 16 G + g + 8 (i & 1), word
    16 kb + 4 t + 2 h + (i >> 1) (the MMA's A operand: csrc/ap_bmma.cu); unpack inverts pack."""
    codes = torch.randint(0, 8, (48, 1024), generator=_gen(41))
    qw = formats.pack_bitplanes(codes, 3)
    pk = formats.pack_ap3_bmma(qw)
    assert pk.shape == (3, 2, 6, 32, 4) and pk.dtype == torch.int32 and pk.is_contiguous()
    assert torch.equal(formats.unpack_ap3_bmma(pk), qw)
    for group in range(3):
        for kb in range(2):
            for slot in range(6):
                h, p = divmod(slot, 3)
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for i in range(4):
                        row, word = 16 * group + g + 8 * (i & 1), 16 * kb + 4 * t + 2 * h + (i >> 1)
                        assert pk[group, kb, slot, lane, i] == qw[p, row, word]


def test_bmma_layout_is_told_apart_and_errors():
    assert formats.is_ap3_bmma_layout(torch.zeros(2, 3, 6, 32, 4, dtype=torch.int32), torch.zeros(32, 8))
    assert not formats.is_ap3_bmma_layout(torch.zeros(2, 3, 6, 32, 4, dtype=torch.int32), torch.zeros(16, 8))
    assert not formats.is_ap3_bmma_layout(torch.zeros(16, 4, 3, 8, dtype=torch.int32), torch.zeros(16, 8))
    assert not formats.is_ap3_bmma_layout(torch.zeros(3, 32, 16, dtype=torch.int32), torch.zeros(32, 8))
    with pytest.raises(ValueError, match=r"3-bit bit-planes \[3, out, in/32\]"):
        formats.pack_ap3_bmma(torch.zeros(4, 16, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="out % 16 == 0 and in % 512 == 0, got out = 16, in = 256"):
        formats.pack_ap3_bmma(torch.zeros(3, 16, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="out % 16 == 0 and in % 512 == 0, got out = 8, in = 512"):
        formats.pack_ap3_bmma(torch.zeros(3, 8, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[out/16, in/512, 6, 32, 4\]"):
        formats.unpack_ap3_bmma(torch.zeros(2, 3, 6, 32, 2, dtype=torch.int32))


def test_reference_dequant_reads_the_bmma_layout():
    codes = torch.randint(0, 8, (32, 512), generator=_gen(42))
    lut = torch.randn(32, 8, generator=_gen(43)).half()
    qw = formats.pack_bitplanes(codes, 3)
    assert torch.equal(reference.ap_dequant(formats.pack_ap3_bmma(qw), lut), torch.gather(lut, 1, codes))


# ---------------------------------------------------------------------------- ap bit-planes
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bitplanes_round_trip(bits):
    codes = torch.randint(0, 2**bits, (24, 160), generator=_gen(bits))
    qweight = formats.pack_bitplanes(codes, bits)
    assert qweight.dtype == torch.int32
    assert qweight.shape == (bits, 24, 5)
    back = formats.unpack_bitplanes(qweight)
    assert back.dtype == torch.int64
    assert torch.equal(back, codes)


def test_bitplanes_hand_built_word():
    # bit j of word w of plane p is bit p of the code of channel 32*w + j
    codes = torch.zeros(3, 96, dtype=torch.int64)
    codes[1, 32 * 1 + 5] = 0b101  # planes 0 and 2
    codes[2, 32 * 2 + 31] = 0b010  # plane 1, the sign bit of the int32 word
    codes[0, 0] = 0b111
    q = formats.pack_bitplanes(codes, 3)
    expect = torch.zeros(3, 3, 3, dtype=torch.int32)
    expect[0, 1, 1] = 1 << 5
    expect[2, 1, 1] = 1 << 5
    expect[1, 2, 2] = _i32(1 << 31)
    expect[:, 0, 0] = 1
    assert torch.equal(q, expect)
    assert torch.equal(formats.unpack_bitplanes(expect), codes)


def test_bitplanes_all_ones_is_minus_one():
    codes = torch.full((2, 64), 15)
    assert torch.equal(formats.pack_bitplanes(codes, 4), torch.full((4, 2, 2), -1, dtype=torch.int32))


@pytest.mark.parametrize(
    "codes, bits",
    [
        (torch.full((2, 32), 8), 3),  # 8 needs 4 bits
        (torch.full((2, 32), -1), 3),
        (torch.zeros(64, dtype=torch.int64), 3),  # not [out, in]
        (torch.zeros(2, 40, dtype=torch.int64), 3),  # in not a multiple of 32
    ],
)
def test_pack_bitplanes_rejects(codes, bits):
    with pytest.raises(ValueError):
        formats.pack_bitplanes(codes, bits)


# ---------------------------------------------------------------------------- BCQ
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bcq_round_trip(bits):
    planes = torch.randint(0, 2, (bits, 16, 256), generator=_gen(10 + bits), dtype=torch.uint8)
    binary = formats.pack_bcq(planes)
    assert binary.dtype == torch.int32
    assert binary.shape == (256 // 32, bits, 16)
    assert torch.equal(formats.unpack_bcq(binary), planes)


def test_bcq_hand_built_word():
    planes = torch.zeros(3, 4, 128, dtype=torch.uint8)
    planes[1, 2, 32 * 3 + 7] = 1
    planes[0, 0, 31] = 1
    binary = formats.pack_bcq(planes)
    expect = torch.zeros(4, 3, 4, dtype=torch.int32)
    expect[3, 1, 2] = 1 << 7  # binary[w, p, r], bit j = channel 32w + j
    expect[0, 0, 0] = _i32(1 << 31)
    assert torch.equal(binary, expect)


def test_pack_bits_matches_integer_arithmetic():
    bits = torch.randint(0, 2, (5, 128), generator=_gen(3))
    words = formats._pack_bits_last(bits)
    for r in range(5):
        for w in range(4):
            v = sum(int(bits[r, 32 * w + j]) << j for j in range(32))
            assert int(words[r, w]) == _i32(v)


def test_pack_bcq_rejects_ragged_in():
    with pytest.raises(ValueError):
        formats.pack_bcq(torch.zeros(3, 4, 48, dtype=torch.uint8))


def _uniform(out, inp, group, bits, seed, dyadic=False):
    g = _gen(seed)
    q = torch.randint(0, 2**bits, (out, inp), generator=g)
    zero = torch.randint(0, 2**bits, (out, inp // group), generator=g).to(torch.float32)
    if dyadic:  # powers of two: every step of the conversion is exact in fp32
        scale = 2.0 ** torch.randint(-12, -2, (out, inp // group), generator=g).to(torch.float32)
    else:
        scale = torch.rand(out, inp // group, generator=g) * 0.05 + 1e-3
    dense = scale.repeat_interleave(group, 1) * (q.to(torch.float32) - zero.repeat_interleave(group, 1))
    return q, scale, zero, dense


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [64, 128])
def test_uniform_to_bcq_is_exact(bits, group):
    inp = 576 if group == 64 else 512
    q, scale, zero, dense = _uniform(40, inp, group, bits, seed=bits * group)
    binary, alpha, q_bias = formats.uniform_to_bcq(q, scale, zero, bits)
    n_groups = inp // group
    assert binary.shape == (inp // 32, bits, 40)
    assert alpha.shape == (n_groups, bits, 40) and alpha.dtype == torch.float32
    assert q_bias.shape == (n_groups, 40) and q_bias.dtype == torch.float32
    # the documented closed forms
    for p in range(bits):
        assert torch.equal(alpha[:, p, :], scale.t() * 2.0 ** (p - 1))
    assert torch.allclose(q_bias, scale.t() * ((2**bits - 1) / 2 - zero.t()), rtol=1e-6, atol=0)
    # the bit planes are the bits of q
    assert torch.equal(formats.unpack_bcq(binary).to(torch.int64), torch.stack([(q >> p) & 1 for p in range(bits)]))
    # W = sum_p alpha_p * (2 bit_p - 1) + q_bias reproduces scale * (q - zero) to fp32 rounding
    w = reference.lutgemm_dequant(binary, alpha, q_bias)
    tol = 4 * torch.finfo(torch.float32).eps * float(scale.max()) * 2**bits
    assert (w - dense).abs().max() <= tol


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [64, 128])
def test_uniform_to_bcq_bit_exact_for_dyadic_scales(bits, group):
    q, scale, zero, dense = _uniform(16, 256, group, bits, seed=7 + bits + group, dyadic=True)
    w = reference.lutgemm_dequant(*formats.uniform_to_bcq(q, scale, zero, bits))
    assert torch.equal(w, dense)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda q, s, z: (q + 8, s, z),  # q = 8..15 out of 3-bit range
        lambda q, s, z: (q - 1, s, z),  # -1
        lambda q, s, z: (q, s.repeat(1, 2)[:, :3], z.repeat(1, 2)[:, :3]),  # 3 groups do not divide in=256
        lambda q, s, z: (q, s, z[:-1]),  # zero shape differs from scale
        lambda q, s, z: (q, s[:-1], z[:-1]),  # out mismatch
        lambda q, s, z: (q[0], s, z),  # q not 2-D
        lambda q, s, z: (q, s.repeat(1, 8), z.repeat(1, 8)),  # group 16, not a multiple of 32
    ],
)
def test_uniform_to_bcq_rejects(mutate):
    q, scale, zero, _ = _uniform(8, 256, 128, 3, seed=1)
    q[0, 0] = 0  # so that q - 1 has a -1
    with pytest.raises(ValueError):
        formats.uniform_to_bcq(*mutate(q, scale, zero), 3)


# ---------------------------------------------------------------------------- residual nibbles
def test_residual_round_trip_with_extremes():
    levels = torch.randint(-7, 8, (64, 96), generator=_gen(5))
    levels[0, :] = -7
    levels[1, :] = 7
    levels[:, 0] = 7
    levels[:, 1] = -7
    q = formats.pack_residual(levels)
    assert q.dtype == torch.int32 and q.shape == (96, 8)
    assert torch.equal(formats.unpack_residual(q), levels)


def test_residual_all_extremes_words():
    assert torch.equal(formats.pack_residual(torch.full((16, 3), -7)), torch.full((3, 2), 0x11111111, dtype=torch.int32))
    assert torch.equal(formats.pack_residual(torch.full((16, 3), 7)), torch.full((3, 2), -1, dtype=torch.int32))
    assert torch.equal(formats.pack_residual(torch.zeros(8, 1)), torch.full((1, 1), _i32(0x88888888), dtype=torch.int32))


def test_residual_nibble_n_of_word_ic_is_row_8c_plus_n():
    levels = torch.zeros(16, 2, dtype=torch.int64)  # out=16 -> 2 words per input channel
    levels[8 * 1 + 3, 1] = 5  # word [1, 1], nibble 3 -> 13 = 0xD
    levels[8 * 0 + 7, 0] = -7  # word [0, 0], nibble 7 (bits 28..31) -> 1
    levels[8 * 1 + 0, 0] = 7  # word [0, 1], nibble 0 -> 15
    q = formats.pack_residual(levels)
    expect = torch.tensor(
        [[_i32(0x18888888), _i32(0x8888888F)], [_i32(0x88888888), _i32(0x8888D888)]], dtype=torch.int32
    )
    assert torch.equal(q, expect)
    assert torch.equal(formats.unpack_residual(expect), levels)


@pytest.mark.parametrize(
    "levels",
    [
        torch.zeros(12, 4, dtype=torch.int64),  # out % 8 != 0
        torch.full((8, 4), 8),
        torch.full((8, 4), -8),
        torch.zeros(8, dtype=torch.int64),  # not 2-D
    ],
)
def test_pack_residual_rejects(levels):
    with pytest.raises(ValueError):
        formats.pack_residual(levels)


def test_reference_scales_to_natural_hand_example():
    # out = 16: the scale of output 8c+n is stored at n*2 + c
    stored = torch.tensor([0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15], dtype=torch.float32)
    assert torch.equal(formats.reference_scales_to_natural(stored), torch.arange(16, dtype=torch.float32))


def test_reference_scales_to_natural_random_permutation():
    out = 96
    natural = torch.rand(out, generator=_gen(9))
    stored = torch.empty(out)
    for c in range(out // 8):
        for n in range(8):
            stored[n * (out // 8) + c] = natural[8 * c + n]
    assert torch.equal(formats.reference_scales_to_natural(stored), natural)


@pytest.mark.parametrize("bad", [torch.zeros(12), torch.zeros(2, 8)])
def test_reference_scales_to_natural_rejects(bad):
    with pytest.raises(ValueError):
        formats.reference_scales_to_natural(bad)
