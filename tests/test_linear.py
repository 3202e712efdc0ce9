"""QuantLinear per backend against dense math on the unpacked weights, and its DEC state."""

from __future__ import annotations

import pytest
import torch

from decdec import formats, reference
from decdec.linear import QuantLinear

IN, OUT = 2048 + 256, 48  # two full 1024-channel chunks and a ragged one


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_linear(backend: str, bits: int = 3, inp: int = IN, out: int = OUT, group: int = 128, seed: int = 0):
    """A QuantLinear with random packed weights and the dense W_q [out, in] fp64 they encode."""
    g = _gen(seed)
    lin = QuantLinear(backend, inp, out, bits=bits, group_size=group, dtype=torch.float32)
    if backend == "ap":
        codes = torch.randint(0, 2**bits, (out, inp), generator=g)
        lut = torch.randn(out, 2**bits, generator=g).sort(dim=1).values
        lin.qweight = formats.pack_bitplanes(codes, bits)
        lin.lut = lut
        dense = lut.double().gather(1, codes)
    elif backend == "lutgemm":
        planes = torch.randint(0, 2, (bits, out, inp), generator=g, dtype=torch.uint8)
        alpha = torch.rand(inp // group, bits, out, generator=g) * 0.1
        q_bias = torch.randn(inp // group, out, generator=g) * 0.01
        lin.binary, lin.alpha, lin.q_bias = formats.pack_bcq(planes), alpha, q_bias
        a = alpha.double().permute(1, 2, 0).repeat_interleave(group, dim=2)  # [b, out, in]
        dense = ((planes.double() * 2 - 1) * a).sum(0) + q_bias.double().t().repeat_interleave(group, dim=1)
    else:
        dense = torch.randn(out, inp, generator=g).double()
        lin.weight = dense.float()
    return lin, dense


def attach_random_dec(lin: QuantLinear, seed: int = 1):
    """Attach a random residual; returns (levels [out, in], scales [out], thresholds [in])."""
    g = _gen(seed)
    levels = torch.randint(-7, 8, (lin.out_features, lin.in_features), generator=g)
    scales = torch.rand(lin.out_features, generator=g) * 0.01
    thr = torch.rand(lin.in_features, generator=g).sort(descending=True).values * 3
    lin.attach_dec(formats.pack_residual(levels), scales, thr, torch.device("cpu"))
    return levels, scales, thr


@pytest.mark.parametrize("backend,bits", [("ap", 3), ("ap", 4), ("lutgemm", 3), ("lutgemm", 4), ("fp16", 16)])
def test_one_token_equals_dense_gemv(backend, bits):
    lin, dense = make_linear(backend, bits)
    x = torch.randn(1, 1, IN, generator=_gen(5))
    y = lin(x)
    assert y.shape == (1, 1, OUT) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ dense.t(), rtol=1e-4, atol=1e-4)
    if backend == "ap":
        assert torch.equal(y.view(1, OUT), reference.ap_gemv(x.view(1, IN), lin.qweight, lin.lut))
    elif backend == "lutgemm":
        assert torch.equal(y.view(1, OUT), reference.lutgemm_gemv(x.view(1, IN), lin.binary, lin.alpha, lin.q_bias))


@pytest.mark.parametrize("backend", ["ap", "lutgemm"])
def test_prefill_is_dequant_matmul_without_dec(backend):
    lin, dense = make_linear(backend)
    torch.testing.assert_close(lin.dequantize().double(), dense, rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 5, IN, generator=_gen(6))
    base = lin(x)
    torch.testing.assert_close(base.double(), x.double() @ dense.t(), rtol=1e-4, atol=1e-4)
    attach_random_dec(lin)
    lin.set_dec(1024, 4)
    assert torch.equal(lin(x), base)  # prefill never runs DEC (DESIGN.md §1)


@pytest.mark.parametrize("backend", ["ap", "lutgemm"])
def test_dec_k_chunk_zero_is_bit_identical_and_full_adds_whole_residual(backend):
    lin, dense = make_linear(backend)
    x = torch.randn(1, IN, generator=_gen(7))
    base = lin(x)
    levels, scales, _ = attach_random_dec(lin)
    lin.set_dec(0, 8)
    assert torch.equal(lin(x), base)
    lin.set_dec(1024, 8)  # every channel selected: W_q + R
    full = x.double() @ (dense + levels.double() * scales.double().unsqueeze(1)).t()
    torch.testing.assert_close(lin(x).double(), full, rtol=1e-4, atol=1e-4)
    lin.set_dec(16, 8)  # a partial selection changes the output, but less than the full residual
    part = lin(x)
    assert not torch.equal(part, base)
    assert (part.double() - base.double()).abs().sum() < (full - base.double()).abs().sum() * 1.5


def test_set_dec_validates():
    lin, _ = make_linear("ap", inp=64, out=16)
    with pytest.raises(ValueError, match="no residual attached"):
        lin.set_dec(8, 1)
    lin.set_dec(0, 1)  # off without a residual is fine
    assert lin.k_chunk == 0
    attach_random_dec(lin)
    for k in (-1, 1025):
        with pytest.raises(ValueError, match=r"0\.\.1024"):
            lin.set_dec(k, 1)
    with pytest.raises(ValueError, match="n_tb must be >= 1"):
        lin.set_dec(8, 0)
    lin.set_dec(1024, 1)
    assert lin.k_chunk == 1024 and "k_chunk=1024" in repr(lin)


def test_attach_dec_validates():
    lin, _ = make_linear("lutgemm", inp=128, out=16)
    cpu = torch.device("cpu")
    q = formats.pack_residual(torch.zeros(16, 128, dtype=torch.int64))
    s, t = torch.ones(16), torch.ones(128)
    with pytest.raises(ValueError, match=r"q_residual must be \[128, 2\] int32"):
        lin.attach_dec(q.t().contiguous(), s, t, cpu)
    with pytest.raises(ValueError, match="int32"):
        lin.attach_dec(q.to(torch.int64), s, t, cpu)
    with pytest.raises(ValueError, match="scales must have 16"):
        lin.attach_dec(q, torch.ones(8), t, cpu)
    with pytest.raises(ValueError, match="thresholds 128"):
        lin.attach_dec(q, s, torch.ones(64), cpu)
    assert lin.dec is None  # nothing attached by a failed call
    dense, _ = make_linear("fp16", inp=128, out=16)
    with pytest.raises(ValueError, match="dec=off"):
        dense.attach_dec(q, s, t, cpu)


def test_constructor_validates():
    with pytest.raises(ValueError, match="in_features % 32"):
        QuantLinear("ap", 48, 16)
    with pytest.raises(ValueError, match="group_size=128 must divide in_features=192"):
        QuantLinear("lutgemm", 192, 16)
    with pytest.raises(ValueError, match="choose ap, lutgemm or fp16"):
        QuantLinear("int8", 64, 16)


def test_dec_bounds_follow_thresholds():
    lin, _ = make_linear("ap")
    _, _, thr = attach_random_dec(lin)
    for k in (1, 8, 64, 1024):
        lin.set_dec(k, 2)
        kt = k * IN // 1024
        assert torch.equal(lin.dec.bounds, torch.stack([thr[0], thr[kt - 1]]))
        assert lin.dec.k_chunk == k and lin.dec.n_tb == 2
    lin.set_dec(0, 1)
    assert lin.dec.bounds[0] == thr[0]


def test_dec_state_dtypes_and_not_a_buffer():
    lin, _ = make_linear("ap", inp=64, out=16)
    lin.lut = lin.lut.to(torch.bfloat16)
    attach_random_dec(lin)
    d = lin.dec
    assert d.scales.dtype == torch.bfloat16 and d.thresholds.dtype == torch.float32 and d.bounds.dtype == torch.float32
    # the residual lives outside the module's state: .to(device) / state_dict never carry it
    assert not any("residual" in k for k in lin.state_dict())


def test_kernel_layout_only_where_the_cuda_kernels_read_it():
    """use_kernel_layout leaves CPU weights (and non-3-bit, non-fp16 ones) in bit-planes; a linear whose weights are
    in the kernel layout computes the same (the ops read both)."""
    lin, dense = make_linear("ap", 3, inp=4096, out=16)
    assert not lin.use_kernel_layout()  # CPU
    assert lin.qweight.shape == (3, 16, 128)  # still bit-planes
    x = torch.randn(1, 4096, generator=_gen(9))
    y = lin(x)
    lin.qweight = formats.pack_ap3_kernel(lin.qweight)
    assert torch.equal(lin(x), y)
    assert torch.equal(lin.dequantize(), reference.ap_dequant(formats.unpack_ap3_kernel(lin.qweight), lin.lut))


def test_glu_layout_keeps_every_output_in_the_original_order():
    """use_glu_layout (forced on the CPU) pairs the gate_up rows (gate_i, up_i) for the GEMV's GLU epilogue; prefill,
    decode (DEC off and on), the add + norm entry, dequantize and SiLU x up all give the unpaired linear's bits."""
    from decdec.model import RMSNorm

    order = formats.glu_pair_order(6)
    assert order.tolist() == [0, 3, 1, 4, 2, 5]
    y = torch.arange(12.0).view(2, 6)
    assert torch.equal(formats.glu_unpair(y[:, order]), y)
    with pytest.raises(ValueError, match="even number of rows"):
        formats.glu_pair_order(5)

    plain, _ = make_linear("ap", inp=1024, out=64, seed=7)
    paired, _ = make_linear("ap", inp=1024, out=64, seed=7)
    for lin in (plain, paired):
        attach_random_dec(lin, seed=8)
    assert paired.use_glu_layout(force=True) and paired.glu_pairs and not plain.use_glu_layout()
    assert not paired.use_glu_layout(force=True)  # once
    assert not torch.equal(paired.lut, plain.lut)
    assert torch.equal(paired.dequantize(), plain.dequantize())
    x1, x5 = torch.randn(1, 1, 1024, generator=_gen(9)), torch.randn(1, 5, 1024, generator=_gen(10))
    for k in (0, 16):
        for lin in (plain, paired):
            lin.set_dec(k, 4)
        assert torch.equal(paired(x1), plain(x1)), k
        assert torch.equal(paired(x5), plain(x5)), k
    norm = RMSNorm(1024, 1e-5)
    a, b = torch.randn(1, 1, 1024, generator=_gen(11)), torch.randn(1, 1, 1024, generator=_gen(12))
    for lin in (plain, paired):
        lin.set_dec(0, 4)
    act, h = paired.forward_addnorm_glu(a, b, norm)
    gate, up = plain(norm(a + b)).chunk(2, dim=-1)
    assert torch.equal(h, a + b) and torch.equal(act, torch.nn.functional.silu(gate) * up)
    act2, _ = paired.forward_addnorm_glu(a, b, norm, fuse=False)
    assert torch.equal(act2, act)



def test_decode_layout_follows_dec(monkeypatch):
    """set_dec places the weights (place_decode_layout): where ops.bmma_preferred says so, DEC off holds them in the
    binary-tensor-core layout and DEC on takes them back out (on the CPU use_kernel_layout keeps bit-planes); decode
    (DEC off and on), prefill, dequantize and the GLU entry give the bits of the linear that never moved."""
    from decdec import ops
    from decdec.model import RMSNorm

    norm = RMSNorm(1024, 1e-5)
    x1, x5 = torch.randn(1, 1, 1024, generator=_gen(9)), torch.randn(1, 5, 1024, generator=_gen(10))
    a, b = torch.randn(1, 1, 1024, generator=_gen(11)), torch.randn(1, 1, 1024, generator=_gen(12))
    lins = []
    for _ in range(2):
        lin, _ = make_linear("ap", inp=1024, out=64, seed=7)
        attach_random_dec(lin, seed=8)
        assert lin.use_glu_layout(force=True)
        lins.append(lin)
    fixed, moving = lins

    def outputs(lin):
        return [lin(x1), lin(x5), lin.dequantize(), *lin.forward_addnorm_glu(a, b, norm)]

    want = {}
    for k in (0, 16):
        fixed.set_dec(k, 4)
        assert fixed.qweight.dim() == 3  # on the CPU bmma_preferred is False: bit-planes stay
        want[k] = outputs(fixed)
    monkeypatch.setattr(ops, "bmma_preferred", lambda *args: True)
    for k in (0, 16, 0):
        moving.set_dec(k, 4)
        assert formats.is_ap3_bmma_layout(moving.qweight, moving.lut) == (k == 0), k
        for got, ref in zip(outputs(moving), want[k]):
            assert torch.equal(got, ref), k
    assert not moving.place_decode_layout()  # already where it belongs
