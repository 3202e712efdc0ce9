"""torch.ops.decdec: opcheck, CPU kernels == reference, error messages, fake shapes, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import decdec.ops  # noqa: F401  registers torch.ops.decdec
from decdec import formats, ops, reference

OPS = torch.ops.decdec
IN, OUT, BITS, GROUP, M = 1152, 64, 3, 64, 2  # in = one full and one ragged 1024-chunk


def _inputs(dtype=torch.float32, m=M, seed=0):
    """Realistic small inputs for every op, weights in ``dtype`` where the format has floats."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**BITS, (OUT, IN), generator=g)
    planes = torch.randint(0, 2, (BITS, OUT, IN), generator=g, dtype=torch.uint8)
    levels = torch.randint(-7, 8, (OUT, IN), generator=g)
    x = torch.randn(m, IN, generator=g) * torch.exp(torch.randn(IN, generator=g))
    calib = torch.randn(16, IN, generator=g) * torch.exp(torch.randn(IN, generator=g))
    thresholds = calib.abs().sort(1, descending=True).values.max(0).values
    return dict(
        x=x.to(dtype),
        qweight=formats.pack_bitplanes(codes, BITS),
        lut=torch.randn(OUT, 2**BITS, generator=g).to(dtype),
        binary=formats.pack_bcq(planes),
        alpha=(torch.rand(IN // GROUP, BITS, OUT, generator=g) * 0.1).to(dtype),
        q_bias=(torch.randn(IN // GROUP, OUT, generator=g) * 0.05).to(dtype),
        q_residual=formats.pack_residual(levels),
        scales=(torch.rand(OUT, generator=g) * 0.01).to(dtype),
        bounds=reference.bounds_from_thresholds(thresholds, 16),
    )


def _args(name, d, k_chunk=16, n_tb=4):
    """Positional arguments of op ``name`` from an ``_inputs`` dict."""
    return {
        "ap_gemv": (d["x"], d["qweight"], d["lut"]),
        "ap_dequant": (d["qweight"], d["lut"]),
        "lutgemm_gemv": (d["x"], d["binary"], d["alpha"], d["q_bias"]),
        "lutgemm_dequant": (d["binary"], d["alpha"], d["q_bias"]),
        "dec": (d["x"], d["q_residual"], d["scales"], d["bounds"], k_chunk, n_tb),
        "ap_gemv_dec": (d["x"], d["qweight"], d["lut"], d["q_residual"], d["scales"], d["bounds"], k_chunk, n_tb),
        "lutgemm_gemv_dec": (
            d["x"], d["binary"], d["alpha"], d["q_bias"], d["q_residual"], d["scales"], d["bounds"], k_chunk, n_tb
        ),
        "ap_gemv_dec_parts": (d["x"], d["qweight"], d["lut"], d["q_residual"], d["bounds"], k_chunk, n_tb),
        "ap_gemv_dec_chain": (d["x"], d["qweight"], d["lut"], d["q_residual"], d["scales"], d["bounds"], k_chunk, n_tb),
        "lutgemm_gemv_dec_parts": (
            d["x"], d["binary"], d["alpha"], d["q_bias"], d["q_residual"], d["bounds"], k_chunk, n_tb
        ),
    }[name]


PARTS_OPS = ["ap_gemv_dec_parts", "lutgemm_gemv_dec_parts"]
ALL_OPS = ["ap_gemv", "ap_dequant", "lutgemm_gemv", "lutgemm_dequant", "dec", "ap_gemv_dec", "lutgemm_gemv_dec",
           "ap_gemv_dec_chain"] + PARTS_OPS
N_CHUNKS = 2  # IN = 1152: one full and one ragged 1024-channel chunk
EXPECTED_SHAPE = {"ap_dequant": (OUT, IN), "lutgemm_dequant": (OUT, IN)}


def _expected_shape(name, m=M):
    return (1 + N_CHUNKS, m, OUT) if name in PARTS_OPS else EXPECTED_SHAPE.get(name, (m, OUT))


def _reference(name, args):
    if name == "ap_gemv_dec_chain":  # the fused op's semantics; only the CUDA schedule differs
        return reference.ap_gemv_dec(*args[:-1])
    if name in ("dec", "ap_gemv_dec", "lutgemm_gemv_dec", *PARTS_OPS):
        return getattr(reference, name)(*args[:-1])  # the reference has no n_tb
    return getattr(reference, name)(*args)


def test_every_schema_is_registered():
    for name in ALL_OPS:
        assert hasattr(OPS, name), name
        assert str(getattr(OPS, name).default._schema).startswith(f"decdec::{name}(")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_OPS)
def test_opcheck(name, dtype):
    d = _inputs(dtype)
    test_utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if dtype == torch.bfloat16:  # the dynamic-shape AOT check is dtype-independent; keep the suite fast
        test_utils = ("test_schema", "test_faketensor")
    result = torch.library.opcheck(getattr(OPS, name).default, _args(name, d), test_utils=test_utils)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_k_chunk_zero_and_full():
    d = _inputs(seed=1)
    for k in (0, 1024):
        result = torch.library.opcheck(OPS.ap_gemv_dec.default, _args("ap_gemv_dec", d, k_chunk=k))
        assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ALL_OPS)
def test_ops_equal_reference(name, dtype):
    d = _inputs(dtype, seed=2)
    args = _args(name, d)
    got = getattr(OPS, name)(*args)
    want = _reference(name, args)
    assert got.dtype == want.dtype
    assert got.shape == _expected_shape(name)
    assert torch.equal(got, want)


def test_n_tb_is_ignored_on_cpu():
    d = _inputs(seed=3)
    a = OPS.lutgemm_gemv_dec(*_args("lutgemm_gemv_dec", d, n_tb=1))
    b = OPS.lutgemm_gemv_dec(*_args("lutgemm_gemv_dec", d, n_tb=132))
    assert torch.equal(a, b)


def test_fused_ops_k_chunk_zero_bit_identical_to_base():
    d = _inputs(torch.bfloat16, seed=4)
    assert torch.equal(OPS.ap_gemv_dec(*_args("ap_gemv_dec", d, k_chunk=0)), OPS.ap_gemv(*_args("ap_gemv", d)))
    assert torch.equal(
        OPS.lutgemm_gemv_dec(*_args("lutgemm_gemv_dec", d, k_chunk=0)), OPS.lutgemm_gemv(*_args("lutgemm_gemv", d))
    )


def test_fused_op_is_base_plus_dec():
    d = _inputs(seed=5)
    y = OPS.ap_gemv_dec(*_args("ap_gemv_dec", d, k_chunk=64))
    parts = OPS.ap_gemv(*_args("ap_gemv", d)) + OPS.dec(*_args("dec", d, k_chunk=64))
    torch.testing.assert_close(y, parts, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, OPS.ap_gemv(*_args("ap_gemv", d)))  # DEC did something


@pytest.mark.parametrize("backend", ["ap", "lutgemm"])
@pytest.mark.parametrize("k_chunk", [0, 1, 64, 1024])
def test_parts_combine_to_the_fused_op(backend, k_chunk):
    """parts[0] = the GEMV in fp32, parts[1 + c] = chunk c's unscaled DEC sum: combined, the fused op's value."""
    d = _inputs(seed=8)
    parts = getattr(OPS, f"{backend}_gemv_dec_parts")(*_args(f"{backend}_gemv_dec_parts", d, k_chunk=k_chunk))
    y = getattr(OPS, f"{backend}_gemv_dec")(*_args(f"{backend}_gemv_dec", d, k_chunk=k_chunk))
    torch.testing.assert_close(reference.combine_dec_parts(parts, d["scales"], y.dtype), y, rtol=1e-5, atol=1e-5)
    dec = OPS.dec(*_args("dec", d, k_chunk=k_chunk))
    torch.testing.assert_close(parts[1:].sum(0) * d["scales"], dec, rtol=1e-5, atol=1e-6)
    mask = reference.select_channels(d["x"], d["bounds"], k_chunk) if k_chunk else None
    for c in range(N_CHUNKS):  # each row holds only its chunk's selected channels
        if mask is None:
            assert not parts[1 + c].any()
            continue
        mc = torch.zeros_like(mask)
        mc[:, c * 1024:(c + 1) * 1024] = mask[:, c * 1024:(c + 1) * 1024]
        want = reference.dec_residual_masked(d["x"], mc, d["q_residual"], torch.ones(OUT))
        torch.testing.assert_close(parts[1 + c], want, rtol=1e-4, atol=1e-4 * want.abs().max().item() + 1e-6)


def test_parts_beyond_four_chunks_are_summed():
    """in > 4096: one DEC row, the chunk sums added in chunk order (the kernel's last unit per slice does it)."""
    g = torch.Generator().manual_seed(9)
    n, out = 5 * 1024 + 64, 32
    x = torch.randn(2, n, generator=g)
    qweight = formats.pack_bitplanes(torch.randint(0, 8, (out, n), generator=g), 3)
    lut = torch.randn(out, 8, generator=g)
    q_residual = formats.pack_residual(torch.randint(-7, 8, (out, n), generator=g))
    scales = torch.rand(out, generator=g) * 0.01
    bounds = reference.bounds_from_thresholds(x.abs().amax(0).sort(descending=True).values, 64)
    assert reference.dec_parts_rows(n) == 1 and reference.dec_parts_rows(4096) == 4
    parts = OPS.ap_gemv_dec_parts(x, qweight, lut, q_residual, bounds, 64, 8)
    assert parts.shape == (2, 2, out)
    chunks = reference.dec_chunk_parts(x, q_residual, bounds, 64)
    assert chunks.shape == (6, 2, out) and chunks[5].abs().sum() > 0  # the ragged chunk selects 64 * 64 // 1024 = 4
    torch.testing.assert_close(parts[1], chunks.sum(0))
    y = OPS.ap_gemv_dec(x, qweight, lut, q_residual, scales, bounds, 64, 8)
    torch.testing.assert_close(reference.combine_dec_parts(parts, scales, y.dtype), y, rtol=1e-5, atol=1e-5)
    with FakeTensorMode() as mode:
        fake = OPS.ap_gemv_dec_parts(*(mode.from_tensor(t) for t in (x, qweight, lut, q_residual, bounds)), 64, 8)
    assert fake.shape == (2, 2, out)


def test_addnorm_op_is_add_then_rmsnorm_then_gemv():
    d = _inputs(torch.float16, seed=10)
    b = torch.randn(M, IN, generator=torch.Generator().manual_seed(11)).half()
    gamma = (torch.rand(IN, generator=torch.Generator().manual_seed(12)) + 0.5).half()
    y, h = OPS.ap_gemv_addnorm(d["x"], b, gamma, 1e-5, d["qweight"], d["lut"])
    assert torch.equal(h, d["x"] + b)
    xn = reference.rms_norm(d["x"] + b, gamma, 1e-5)
    assert torch.equal(y, OPS.ap_gemv(xn, d["qweight"], d["lut"]))
    result = torch.library.opcheck(OPS.ap_gemv_addnorm.default, (d["x"], b, gamma, 1e-5, d["qweight"], d["lut"]),
                                   test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result
    with FakeTensorMode() as mode:
        fy, fh = OPS.ap_gemv_addnorm(*(mode.from_tensor(t) for t in (d["x"], b, gamma)), 1e-5,
                                     mode.from_tensor(d["qweight"]), mode.from_tensor(d["lut"]))
    assert fy.shape == (M, OUT) and fh.shape == (M, IN)
    with pytest.raises(RuntimeError, match="gamma must be"):
        OPS.ap_gemv_addnorm(d["x"], b, gamma[:10], 1e-5, d["qweight"], d["lut"])


def test_addnorm_glu_op_is_silu_times_up_of_the_paired_rows():
    """ap_gemv_addnorm_glu on gate_up rows in pair order = fp16(silu(g) * u) of the fp16 GEMV outputs in fp32, h =
    a + b; fake shapes, opcheck, and an odd row count is an error."""
    d = _inputs(torch.float16, seed=16)
    b = torch.randn(M, IN, generator=torch.Generator().manual_seed(17)).half()
    gamma = (torch.rand(IN, generator=torch.Generator().manual_seed(18)) + 0.5).half()
    act, h = OPS.ap_gemv_addnorm_glu(d["x"], b, gamma, 1e-5, d["qweight"], d["lut"])
    y, h2 = OPS.ap_gemv_addnorm(d["x"], b, gamma, 1e-5, d["qweight"], d["lut"])
    assert torch.equal(h, h2) and act.shape == (M, OUT // 2)
    want = (torch.nn.functional.silu(y[:, 0::2].float()) * y[:, 1::2].float()).half()
    assert torch.equal(act, want)
    args = (d["x"], b, gamma, 1e-5, d["qweight"], d["lut"])
    result = torch.library.opcheck(OPS.ap_gemv_addnorm_glu.default, args, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result
    with FakeTensorMode() as mode:
        fa, fh = OPS.ap_gemv_addnorm_glu(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))
    assert fa.shape == (M, OUT // 2) and fh.shape == (M, IN)


@pytest.mark.parametrize("n,ok", [(4096, True), (8192, True), (14336, False), (5120, False), (2048, False),
                                  (1152, False)])
def test_glu_supported_rule(n, ok, monkeypatch):
    """The GLU epilogue serves where the add + norm GEMV runs on the streaming kernel (its CUDA twin is checked on the
    GPU); DECDEC_GLU=0 turns it off."""
    assert decdec.ops.glu_supported(3, n) is ok
    assert not decdec.ops.glu_supported(4, n)
    monkeypatch.setenv("DECDEC_GLU", "0")
    assert not decdec.ops.glu_supported(3, n)


def test_addnorm_dec_parts_op_is_add_then_rmsnorm_then_parts():
    """ap_gemv_addnorm_dec_parts = ap_gemv_dec_parts on rms_norm(a + b) (DEC selects from the normalised x), h = a + b;
    schema, fake and errors like its siblings."""
    d = _inputs(torch.float16, seed=13)
    b = torch.randn(M, IN, generator=torch.Generator().manual_seed(14)).half()
    gamma = (torch.rand(IN, generator=torch.Generator().manual_seed(15)) + 0.5).half()
    args = (d["x"], b, gamma, 1e-5, d["qweight"], d["lut"], d["q_residual"], d["bounds"], 16, 4)
    parts, h = OPS.ap_gemv_addnorm_dec_parts(*args)
    xn = reference.rms_norm(d["x"] + b, gamma, 1e-5)
    assert torch.equal(h, d["x"] + b)
    assert torch.equal(parts, OPS.ap_gemv_dec_parts(xn, d["qweight"], d["lut"], d["q_residual"], d["bounds"], 16, 4))
    assert parts.shape == (1 + N_CHUNKS, M, OUT) and parts[1:].abs().sum() > 0
    result = torch.library.opcheck(OPS.ap_gemv_addnorm_dec_parts.default, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result
    with FakeTensorMode() as mode:
        fp, fh = OPS.ap_gemv_addnorm_dec_parts(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))
    assert fp.shape == (1 + N_CHUNKS, M, OUT) and fp.dtype == torch.float32 and fh.shape == (M, IN)
    with pytest.raises(RuntimeError, match="k_chunk must be in"):
        OPS.ap_gemv_addnorm_dec_parts(*args[:8], 2000, 4)


def test_addnorm_dec_chain_ops_are_add_then_rmsnorm_then_the_fused_op():
    """ap_gemv_addnorm_dec_chain = ap_gemv_dec on rms_norm(a + b), h = a + b; the GLU variant (rows in pair order, DEC's
    residual and scales in the original order) = silu(gate) * up of the combined rows in the original order; fakes,
    opcheck, k_chunk = 0 is the op without DEC."""
    d = _inputs(torch.float16, seed=21)
    b = torch.randn(M, IN, generator=torch.Generator().manual_seed(22)).half()
    gamma = (torch.rand(IN, generator=torch.Generator().manual_seed(23)) + 0.5).half()
    args = (d["x"], b, gamma, 1e-5, d["qweight"], d["lut"], d["q_residual"], d["scales"], d["bounds"], 16, 4)
    y, h = OPS.ap_gemv_addnorm_dec_chain(*args)
    xn = reference.rms_norm(d["x"] + b, gamma, 1e-5)
    assert torch.equal(h, d["x"] + b)
    fused = OPS.ap_gemv_dec(xn, d["qweight"], d["lut"], d["q_residual"], d["scales"], d["bounds"], 16, 4)
    assert torch.equal(y, fused) and not torch.equal(y, OPS.ap_gemv(xn, d["qweight"], d["lut"]))
    act, h2 = OPS.ap_gemv_addnorm_glu_dec_chain(*args)
    assert torch.equal(h2, h) and act.shape == (M, OUT // 2)
    w = reference.ap_dequant(d["qweight"], d["lut"].float())  # rows in pair order: (gate_i, up_i)
    y_orig = (formats.glu_unpair(xn.float() @ w.t())
              + reference.dec_residual(xn, d["q_residual"], d["scales"], d["bounds"], 16)).half()
    g, u = y_orig.chunk(2, dim=-1)
    assert torch.equal(act, (torch.nn.functional.silu(g.float()) * u.float()).half())
    no_dec = args[:9] + (0, 4)
    assert torch.equal(OPS.ap_gemv_addnorm_glu_dec_chain(*no_dec)[0],
                       OPS.ap_gemv_addnorm_glu(d["x"], b, gamma, 1e-5, d["qweight"], d["lut"])[0])
    for op, shape in ((OPS.ap_gemv_addnorm_dec_chain, (M, OUT)), (OPS.ap_gemv_addnorm_glu_dec_chain, (M, OUT // 2))):
        result = torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))
        assert all(v == "SUCCESS" for v in result.values()), result
        with FakeTensorMode() as mode:
            fy, fh = op(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))
        assert fy.shape == shape and fh.shape == (M, IN)
        with pytest.raises(RuntimeError, match="k_chunk must be in"):
            op(*args[:9], 2000, 4)


@pytest.mark.parametrize("n,ok", [(4096, True), (14336, True), (5120, True), (1152, False), (4160, False)])
def test_dec_chain_supported_rule(n, ok, monkeypatch):
    """Chain mode serves 3-bit fp16 weights in the kernel layout (its CUDA twin is checked on the GPU);
    DECDEC_DEC_CHAIN=0 turns it off."""
    assert decdec.ops.dec_chain_supported(3, n) is ok
    assert not decdec.ops.dec_chain_supported(4, n)
    monkeypatch.setenv("DECDEC_DEC_CHAIN", "0")
    assert not decdec.ops.dec_chain_supported(3, n)


@pytest.mark.parametrize("n,ok", [(4096, True), (8192, True), (14336, False), (5120, True), (2048, True),
                                  (1152, False), (576, False), (4160, False)])
def test_addnorm_supported_rule(n, ok):
    """The shapes the fused add + RMSNorm GEMV serves (its CUDA twin is checked on the GPU)."""
    assert decdec.ops.addnorm_supported(3, n) is ok
    assert not decdec.ops.addnorm_supported(4, n)


@pytest.mark.parametrize("n,ok", [(4096, True), (8192, True), (14336, True), (5120, True), (17920, True),
                                  (2048, True), (1152, False), (1280, False), (576, False), (384, False), (4160, False)])
def test_kernel_layout_rule(n, ok, monkeypatch):
    """Where fp16 3-bit weights run in the kernel layout: the tensor-core or streaming GEMV's widths (its CUDA twin
    is checked on the GPU); never bf16 or other bit widths; DECDEC_KERNEL_LAYOUT=0 turns it off."""
    assert decdec.ops.ap3_kernel_layout(3, torch.float16, n) is ok
    assert not decdec.ops.ap3_kernel_layout(3, torch.bfloat16, n)
    assert not decdec.ops.ap3_kernel_layout(4, torch.float16, n)
    monkeypatch.setenv("DECDEC_KERNEL_LAYOUT", "0")
    assert not decdec.ops.ap3_kernel_layout(3, torch.float16, n)


@pytest.mark.parametrize("pack", [formats.pack_ap3_kernel, formats.pack_ap3_bmma], ids=lambda f: f.__name__)
def test_ap_gemv_and_dequant_read_the_3bit_layouts(pack):
    """CPU kernels (= reference), fakes and opcheck take qweight in the kernels' 3-bit layouts (the PRMT GEMVs' and
    the binary-tensor-core GEMV's) with the bit-planes' results."""
    g = torch.Generator().manual_seed(40)
    codes = torch.randint(0, 8, (32, 1024), generator=g)
    qw = formats.pack_bitplanes(codes, 3)
    pk = pack(qw)
    lut = torch.randn(32, 8, generator=g).half()
    x = torch.randn(M, 1024, generator=g).half()
    assert torch.equal(OPS.ap_gemv(x, pk, lut), OPS.ap_gemv(x, qw, lut))
    assert torch.equal(OPS.ap_dequant(pk, lut), OPS.ap_dequant(qw, lut))
    torch.library.opcheck(OPS.ap_gemv.default, (x, pk, lut))
    torch.library.opcheck(OPS.ap_dequant.default, (pk, lut))
    with FakeTensorMode() as mode:
        assert OPS.ap_gemv(mode.from_tensor(x), mode.from_tensor(pk), mode.from_tensor(lut)).shape == (M, 32)
        assert OPS.ap_dequant(mode.from_tensor(pk), mode.from_tensor(lut)).shape == (32, 1024)


def test_addnorm_ops_read_the_bmma_layout():
    """ap_gemv_addnorm and ap_gemv_addnorm_glu (rows in GLU pair order) on the bmma layout give the bit-planes' results
    on the CPU, with fakes and opcheck."""
    g = torch.Generator().manual_seed(46)
    qw = formats.pack_bitplanes(torch.randint(0, 8, (32, 1024), generator=g), 3)
    lut = torch.randn(32, 8, generator=g).half()
    a, b = torch.randn(M, 1024, generator=g).half(), torch.randn(M, 1024, generator=g).half()
    gamma = (torch.rand(1024, generator=g) + 0.5).half()
    for op, pk in ((OPS.ap_gemv_addnorm, formats.pack_ap3_bmma(qw)),
                   (OPS.ap_gemv_addnorm_glu, formats.pack_ap3_bmma(qw))):
        y, h = op(a, b, gamma, 1e-5, pk, lut)
        y_ref, h_ref = op(a, b, gamma, 1e-5, qw, lut)
        assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
        torch.library.opcheck(op.default, (a, b, gamma, 1e-5, pk, lut))
        with FakeTensorMode() as mode:
            fy, _ = op(*(mode.from_tensor(t) for t in (a, b, gamma)), 1e-5, mode.from_tensor(pk), mode.from_tensor(lut))
            assert fy.shape == y.shape


def test_the_other_ap_ops_refuse_the_bmma_layout_by_name():
    g = torch.Generator().manual_seed(44)
    pk = formats.pack_ap3_bmma(formats.pack_bitplanes(torch.randint(0, 8, (32, 1024), generator=g), 3))
    lut = torch.randn(32, 8, generator=g).half()
    x = torch.randn(M, 1024, generator=g).half()
    qr = formats.pack_residual(torch.zeros(32, 1024, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"binary-tensor-core layout .*formats.unpack_ap3_bmma"):
        OPS.ap_gemv_dec(x, pk, lut, qr, torch.ones(32).half(), torch.tensor([1.0, 0.5]), 4, 8)
    with pytest.raises(RuntimeError, match=r"binary-tensor-core layout"):
        OPS.ap_gemv_addnorm_dec_parts(x, x, torch.ones(1024).half(), 1e-5, pk, lut, qr, torch.tensor([1.0, 0.5]), 4, 8)


# ---------------------------------------------------------------------------- fake tensors
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("name", ALL_OPS)
def test_fake_shapes(name, m):
    d = _inputs(torch.bfloat16, m=m, seed=6)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in d.items()}
        y = getattr(OPS, name)(*_args(name, fake))
    assert y.shape == _expected_shape(name, m)
    assert y.dtype == (torch.float32 if name in PARTS_OPS else torch.bfloat16)


def test_meta_tensors_give_shapes():
    d = {k: v.to("meta") for k, v in _inputs(seed=7).items()}
    y = OPS.lutgemm_gemv_dec(*_args("lutgemm_gemv_dec", d))
    assert y.device.type == "meta" and y.shape == (M, OUT)


# ---------------------------------------------------------------------------- errors
def _bad(**changes):
    d = _inputs(seed=8)
    d.update({k: (v(d) if callable(v) else v) for k, v in changes.items()})
    return d


ERROR_CASES = [
    ("ap_gemv", dict(x=lambda d: d["x"][:, :500]), "x has 500 input channels, weights expect 1152"),
    ("ap_gemv", dict(x=lambda d: d["x"][0]), r"x must be \[M, in\], got shape \(1152,\)"),
    ("ap_gemv", dict(lut=lambda d: d["lut"].repeat(1, 2)), r"lut must be \[64, 8\], got \(64, 16\)"),
    ("ap_gemv", dict(qweight=lambda d: d["qweight"].long()), r"qweight must be .* int32, got \(3, 64, 36\) torch.int64"),
    ("ap_dequant", dict(qweight=lambda d: d["qweight"][0]), r"qweight must be .*got \(64, 36\)"),
    ("lutgemm_gemv", dict(binary=lambda d: d["binary"].float()), r"binary must be .*got \(36, 3, 64\) torch.float32"),
    ("lutgemm_gemv", dict(alpha=lambda d: d["alpha"][:, :2]), r"alpha must be \[18, 3, 64\], got \(18, 2, 64\)"),
    ("lutgemm_gemv", dict(q_bias=lambda d: d["q_bias"][:, :32]), r"q_bias must be \[18, 64\], got \(18, 32\)"),
    ("lutgemm_dequant", dict(alpha=lambda d: d["alpha"][:5], q_bias=lambda d: d["q_bias"][:5]),
     "split in=1152 into multiples of 32 channels, got 5 groups"),
    ("lutgemm_gemv", dict(alpha=lambda d: d["alpha"][:1].repeat(72, 1, 1), q_bias=lambda d: d["q_bias"][:1].repeat(72, 1)),
     "got 72 groups"),  # group 16
    ("ap_gemv_dec", dict(q_residual=lambda d: d["q_residual"][:, :4]),
     r"q_residual must be \[1152, 8\] int32, got \(1152, 4\) torch.int32"),
    ("ap_gemv_dec", dict(q_residual=lambda d: d["q_residual"].long()), r"got \(1152, 8\) torch.int64"),
    ("lutgemm_gemv_dec", dict(scales=lambda d: d["scales"][:32]), r"scales must be \[64\], got \(32,\)"),
    ("ap_gemv_dec", dict(bounds=torch.ones(3)), r"bounds must be \[2\], got \(3,\)"),
    ("dec", dict(x=lambda d: d["x"][:, :1000]), "x has 1000 input channels, weights expect 1152"),
    ("dec", dict(q_residual=lambda d: d["q_residual"][:, :4]), r"q_residual must be \[1152, 8\]"),
]


@pytest.mark.parametrize("name, changes, message", ERROR_CASES)
def test_shape_and_dtype_errors_name_the_values(name, changes, message):
    d = _bad(**changes)
    with pytest.raises(RuntimeError, match=message):
        getattr(OPS, name)(*_args(name, d))
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
        getattr(OPS, name)(*_args(name, {k: mode.from_tensor(v) for k, v in d.items()}))


@pytest.mark.parametrize("name", ["dec", "ap_gemv_dec", "lutgemm_gemv_dec"])
@pytest.mark.parametrize(
    "k_chunk, n_tb, message",
    [(1025, 4, "k_chunk must be in 0..1024, got 1025"), (-1, 4, "got -1"), (8, 0, "n_tb must be >= 1, got 0")],
)
def test_int_argument_errors(name, k_chunk, n_tb, message):
    d = _inputs(seed=9)
    with pytest.raises(RuntimeError, match=message):
        getattr(OPS, name)(*_args(name, d, k_chunk=k_chunk, n_tb=n_tb))


def test_dec_rejects_out_not_multiple_of_8():
    g = torch.Generator().manual_seed(10)
    out = 12
    qweight = formats.pack_bitplanes(torch.randint(0, 8, (out, 64), generator=g), 3)
    lut = torch.randn(out, 8, generator=g)
    q_residual = torch.zeros(64, 1, dtype=torch.int32)  # out // 8 == 1 would pass a shape-only check
    with pytest.raises(RuntimeError, match="out % 8 == 0.*got out=12"):
        OPS.ap_gemv_dec(torch.randn(1, 64), qweight, lut, q_residual, torch.ones(out), torch.tensor([2.0, 1.0]), 8, 1)


# ---------------------------------------------------------------------------- torch.compile
def _decode_step(ops_args):
    def step(x):
        # x: [M, in]; a little surrounding math so the op sits inside a real graph
        y = OPS.ap_gemv_dec(x * 0.5, *ops_args["ap"])
        z = OPS.lutgemm_gemv_dec(x, *ops_args["lutgemm"])
        return torch.nn.functional.silu(y) * z + OPS.dec(x, *ops_args["dec"])

    return step


def _compile_args(dtype):
    d = _inputs(dtype, seed=11)
    rest = (d["q_residual"], d["scales"], d["bounds"], 32, 8)
    return d["x"], {
        "ap": (d["qweight"], d["lut"], *rest),
        "lutgemm": (d["binary"], d["alpha"], d["q_bias"], *rest),
        "dec": rest,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_aot_eager_fullgraph_matches_eager(dtype):
    torch._dynamo.reset()
    x, ops_args = _compile_args(dtype)
    step = _decode_step(ops_args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    want = step(x)
    assert torch.equal(compiled(x), want)
    x2 = torch.randn_like(x)
    assert torch.equal(compiled(x2), step(x2))


def test_compile_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, ops_args = _compile_args(torch.float32)
    step = _decode_step(ops_args)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), step(x), rtol=1e-5, atol=1e-5)


def test_dec_chain_needs_programmatic_launch_on_the_device(monkeypatch):
    """Given a device, chain mode also needs programmatic dependent launch there (compute capability >= 9, DECDEC_PDL
    not 0): without it DEC and the GEMV would run one after the other, and the parts ops serve instead."""
    import decdec.ops as ops

    assert not ops.dec_chain_supported(3, 4096, torch.device("cpu"))
    monkeypatch.setitem(ops._PDL, 0, True)
    assert ops.dec_chain_supported(3, 4096, torch.device("cuda", 0))
    monkeypatch.setenv("DECDEC_PDL", "0")
    assert not ops.dec_chain_supported(3, 4096, torch.device("cuda", 0))
    monkeypatch.setenv("DECDEC_PDL", "1")
    monkeypatch.setitem(ops._PDL, 0, False)  # e.g. an A100
    assert not ops.dec_chain_supported(3, 4096, torch.device("cuda", 0))


@pytest.mark.parametrize("n,out,ok", [(4096, 28672, True), (14336, 4096, True), (20480, 16, True), (512, 16, True),
                                      (20992, 16, False), (4096, 1000, False), (576, 960, False), (4608, 8, False)])
def test_bmma_shape_rule(n, out, ok):
    """The shapes the binary-tensor-core GEMV serves (its CUDA twin refuses the others by name, checked on the GPU)."""
    assert decdec.ops.ap3_bmma_supported(n, out) is ok


def test_bmma_preferred_rule(monkeypatch):
    """QuantLinear's layout rule: 3-bit fp16 / bf16 on CUDA, a supported shape, >= 7 row groups of 16 per SM (no K
    split); DECDEC_BMMA=0 turns it off, =all takes every supported shape, anything else is refused. No GPU needed: the SM count is the only device fact it reads."""
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setitem(ops._SMS, 0, 132)
    assert ops.bmma_preferred(3, torch.float16, 4096, 28672, cuda0)  # Llama-3-8B gate_up
    assert ops.bmma_preferred(3, torch.bfloat16, 5120, 35840, cuda0)  # Phi-3-medium gate_up
    assert ops.bmma_preferred(3, torch.float16, 512, 16 * 7 * 132, cuda0)
    assert not ops.bmma_preferred(3, torch.float16, 512, 16 * 7 * 132 - 16, cuda0)
    for n, out in ((4096, 6144), (4096, 4096), (14336, 4096), (17920, 5120), (28672, 16 * 7 * 132)):
        assert not ops.bmma_preferred(3, torch.float16, n, out, cuda0), (n, out)
    assert not ops.bmma_preferred(4, torch.float16, 4096, 28672, cuda0)
    assert not ops.bmma_preferred(3, torch.float32, 4096, 28672, cuda0)
    assert not ops.bmma_preferred(3, torch.float16, 4096, 28672, torch.device("cpu"))
    monkeypatch.setenv("DECDEC_BMMA", "0")
    assert not ops.bmma_preferred(3, torch.float16, 4096, 28672, cuda0)
    monkeypatch.setenv("DECDEC_BMMA", "all")  # every supported shape, still only 3-bit fp16 / bf16 on CUDA
    for n, out in ((4096, 6144), (4096, 4096), (14336, 4096), (17920, 5120), (4096, 28672)):
        assert ops.bmma_preferred(3, torch.float16, n, out, cuda0), (n, out)
    assert not ops.bmma_preferred(3, torch.float16, 4096, 4104, cuda0)  # out % 16 != 0: unsupported
    assert not ops.bmma_preferred(4, torch.float16, 4096, 4096, cuda0)
    assert not ops.bmma_preferred(3, torch.float16, 4096, 4096, torch.device("cpu"))
    monkeypatch.setenv("DECDEC_BMMA", "yes")
    with pytest.raises(ValueError, match="DECDEC_BMMA='yes'.*all"):
        ops.bmma_preferred(3, torch.float16, 4096, 4096, cuda0)
