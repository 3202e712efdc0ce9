"""CUDA kernels of decdec._C against the pure-PyTorch reference (decdec.reference).

Marked ``cuda``; skipped with a reason when there is no GPU or the extension is not built.
The reference runs on the GPU too (it is plain torch), in fp32, so big projection shapes stay fast.
Imports only torch / pytest / numpy and decdec.formats / reference / ops (the GPU image has no hydra).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from decdec import formats, ops, reference

pytestmark = pytest.mark.cuda


def _kernels_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        importlib.import_module("decdec._C")
    except ImportError as e:
        return f"decdec._C not built ({e}); run scripts/build_kernels.py or pip install -e ."
    return None


_REASON = _kernels_reason()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)

from decdec import _C  # noqa: E402

DEV = torch.device("cuda")
SMS = torch.cuda.get_device_properties(0).multi_processor_count
DTYPES = [torch.float16, torch.bfloat16]
# (in, out) projection shapes: Llama-3-8B, Phi-3-medium (17920 = 17.5 chunks: ragged), SmolLM2 (in=576)
LLAMA = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
PHI3 = [(5120, 7680), (5120, 5120), (5120, 35840), (17920, 5120)]
SMALL = [(576, 960), (576, 3072), (1536, 576), (2048 + 96, 264)]
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

torch.backends.cuda.matmul.allow_tf32 = False


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def close(y: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1.0) -> None:
    """y (kernel, x.dtype) vs ref (fp32 oracle): norm-wise and element-wise, scaled to the dtype."""
    eps = EPS[y.dtype] * rel
    y32, r32 = y.float(), ref.float()
    assert torch.isfinite(y32).all(), f"{what}: non-finite output"
    err = (y32 - r32).norm() / r32.norm().clamp_min(1e-30)
    assert err < eps, f"{what}: relative error {err:.3e} >= {eps:.1e}"
    worst = (y32 - r32).abs().max() / r32.abs().max().clamp_min(1e-30)
    assert worst < 4 * eps, f"{what}: worst element error {worst:.3e} of max |ref|"


# ---------------------------------------------------------------------------- data
def make_x(m: int, n: int, dtype, seed: int) -> torch.Tensor:
    x = torch.randn(m, n, generator=gen(seed), device=DEV)
    x *= torch.rand(m, n, generator=gen(seed + 1), device=DEV) * 3  # heavy-ish tail like activations
    return x.to(dtype)


def make_ap(n: int, out: int, bits: int, dtype, seed: int):
    codes = torch.randint(0, 2**bits, (out, n), generator=gen(seed), device=DEV)
    lut = (torch.randn(out, 2**bits, generator=gen(seed + 1), device=DEV) * 0.05).sort(dim=1).values.to(dtype)
    return formats.pack_bitplanes(codes, bits), lut


def group_for(n: int) -> int:
    """128 where it divides in; SmolLM2's in=576 uses 64; otherwise 32."""
    return next(g for g in (128, 64, 32) if n % g == 0)


def make_lutgemm(n: int, out: int, bits: int, dtype, seed: int, group: int = 128):
    planes = torch.randint(0, 2, (bits, out, n), generator=gen(seed), device=DEV)
    g = n // group
    alpha = (torch.rand(g, bits, out, generator=gen(seed + 1), device=DEV) * 0.03 + 1e-3).to(dtype)
    q_bias = (torch.randn(g, out, generator=gen(seed + 2), device=DEV) * 0.01).to(dtype)
    return formats.pack_bcq(planes), alpha, q_bias


def make_residual(n: int, out: int, dtype, seed: int, pinned: bool = True):
    levels = torch.randint(-7, 8, (out, n), generator=gen(seed), device=DEV)
    q = formats.pack_residual(levels)
    scales = (torch.rand(out, generator=gen(seed + 1), device=DEV) * 0.01 + 1e-4).to(dtype)
    return (ops.place_residual(q.cpu(), DEV) if pinned else q), scales, q


def make_bounds(x: torch.Tensor, k_chunk: int) -> torch.Tensor:
    # thresholds like the calibration: descending order statistics of |x| (of a perturbed token)
    t = (x.float().abs().amax(0) * 1.1).sort(descending=True).values
    return reference.bounds_from_thresholds(t, max(k_chunk, 1)).to(DEV)


# ---------------------------------------------------------------------------- base GEMVs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("shape", LLAMA + PHI3 + SMALL + [(1024, 1001), (28672, 8192)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_ap_gemv(shape, bits, dtype):
    n, out = shape
    seed = n * 7 + out + bits
    qw, lut = make_ap(n, out, bits, dtype, seed)
    for m in (1, 3) if out <= 8192 else (1,):
        x = make_x(m, n, dtype, seed + m)
        y = torch.ops.decdec.ap_gemv(x, qw, lut)
        assert y.shape == (m, out) and y.dtype == dtype
        ref = x.float() @ reference.ap_dequant(qw, lut.float()).t()
        close(y, ref, f"ap_gemv {shape} b={bits} M={m}")


def test_ap_gemv_2bit():
    qw, lut = make_ap(4096, 1024, 2, torch.float16, 5)
    x = make_x(1, 4096, torch.float16, 6)
    close(torch.ops.decdec.ap_gemv(x, qw, lut), x.float() @ reference.ap_dequant(qw, lut.float()).t(), "ap 2-bit")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("shape", LLAMA + PHI3 + SMALL, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lutgemm_gemv(shape, bits, dtype):
    n, out = shape
    group = group_for(n)  # SmolLM2: in=576 -> group 64
    seed = n * 3 + out + bits
    b, a, qb = make_lutgemm(n, out, bits, dtype, seed, group)
    for m in (1, 3) if out <= 8192 else (1,):
        x = make_x(m, n, dtype, seed + m)
        y = torch.ops.decdec.lutgemm_gemv(x, b, a, qb)
        ref = x.float() @ reference.lutgemm_dequant(b, a.float(), qb.float()).t()
        close(y, ref, f"lutgemm_gemv {shape} b={bits} M={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequant(dtype):
    for n, out, bits in [(4096, 1024, 3), (576, 960, 4), (2048, 512, 2)]:
        qw, lut = make_ap(n, out, bits, dtype, n + bits)
        w = torch.ops.decdec.ap_dequant(qw, lut)
        assert torch.equal(w, reference.ap_dequant(qw, lut)), "ap_dequant is a gather: must be exact"
        b, a, qb = make_lutgemm(n, out, min(bits, 4), dtype, n + 1, group_for(n))
        w = torch.ops.decdec.lutgemm_dequant(b, a, qb)
        ref = reference.lutgemm_dequant(b, a.float(), qb.float())
        close(w, ref, f"lutgemm_dequant {n}x{out}")


# ---------------------------------------------------------------------------- DEC selection
def check_selection_property(x: torch.Tensor, bounds: torch.Tensor, k_chunk: int, mask: torch.Tensor) -> None:
    """DESIGN.md §2: exact count per chunk; every channel of a strictly higher bucket is selected;
    nothing below the overflow bucket is selected."""
    m, n = x.shape
    bucket = reference.bucket_index(x, bounds)  # [m, n] (0 = largest)
    quotas = reference.chunk_quotas(k_chunk, n)
    for c, q in enumerate(quotas):
        sl = slice(c * 1024, min(n, (c + 1) * 1024))
        bk, mk = bucket[:, sl], mask[:, sl]
        assert (mk.sum(1) == q).all(), f"chunk {c}: selected {mk.sum(1).tolist()} != quota {q}"
        if q == 0:
            continue
        counts = torch.stack([(bk <= b).sum(1) for b in range(33)], 1)  # [m, 33] cumulative
        overflow = (counts < q).sum(1, keepdim=True)  # first bucket reaching the quota
        assert mk[bk < overflow].all(), f"chunk {c}: a channel of a higher bucket was skipped"
        assert not mk[bk > overflow].any(), f"chunk {c}: a channel below the overflow bucket was taken"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [576, 4096, 5120, 17920, 14336])
def test_dec_selection(n, dtype):
    for k_chunk in (1, 2, 4, 8, 32, 100, 512, 1024):
        for ties in (False, True):
            x = make_x(2, n, dtype, n + k_chunk)
            if ties:  # many equal |x|: the overflow bucket is crowded
                x = (x.float() * 2).round().div(2).to(dtype)
            bounds = make_bounds(x, k_chunk)
            mask = _C.dec_select(x, bounds, k_chunk)
            check_selection_property(x, bounds, k_chunk, mask)
            # lowest indices first inside the overflow bucket, like the reference: identical masks
            assert torch.equal(mask, reference.select_channels(x, bounds, k_chunk)), f"n={n} k={k_chunk} ties={ties}"


def test_dec_selection_odd_bounds():
    # a > b violated and NaN inputs: the kernel must still match bucket semantics exactly
    x = make_x(1, 4096, torch.float16, 1)
    x[0, 17] = float("nan")
    for bounds in (torch.tensor([0.5, 2.0]), torch.tensor([3.0, 0.0]), torch.tensor([0.0, 0.0])):
        bounds = bounds.to(DEV)
        mask = _C.dec_select(x, bounds, 16)
        check_selection_property(x, bounds, 16, mask)


# ---------------------------------------------------------------------------- DEC
def dec_from_mask(x, mask, q, scales):
    """DEC output for a given selection (so overflow-bucket ties cannot make a difference)."""
    levels = formats.unpack_residual(q).float()  # [out, in]
    return (x.float() * mask) @ (levels * scales.float()[:, None]).t()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LLAMA + PHI3 + SMALL, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dec(shape, dtype):
    n, out = shape
    qr, scales, q = make_residual(n, out, dtype, n + out)
    assert qr.is_cuda
    for k_chunk in (0, 1, 4, 8, 32, 1024):
        for n_tb in sorted({1, 7, 32, SMS}):
            m = 2 if n_tb == 7 else 1
            x = make_x(m, n, dtype, k_chunk + n_tb)
            bounds = make_bounds(x, k_chunk)
            y = torch.ops.decdec.dec(x, qr, scales, bounds, k_chunk, n_tb)
            if k_chunk == 0:
                assert torch.equal(y, torch.zeros_like(y))
                continue
            mask = _C.dec_select(x, bounds, k_chunk)
            check_selection_property(x, bounds, k_chunk, mask)
            close(y, dec_from_mask(x, mask, q, scales), f"dec {shape} k={k_chunk} n_tb={n_tb}")
            # the reference's own selection agrees within the tie tolerance
            ref = reference.dec_residual(x, q, scales, bounds, k_chunk)
            close(y, ref, f"dec vs reference.dec {shape} k={k_chunk}", rel=4.0)


def test_dec_device_residual_matches_pinned():
    n, out = 5120, 1024
    qr, scales, q = make_residual(n, out, torch.float16, 9)
    x = make_x(1, n, torch.float16, 10)
    bounds = make_bounds(x, 8)
    a = torch.ops.decdec.dec(x, qr, scales, bounds, 8, 16)
    b = torch.ops.decdec.dec(x, q, scales, bounds, 8, 16)  # residual in device memory also works
    close(a, b.float(), "pinned vs device residual", rel=0.5)


def test_n_tb_limit_is_an_error():
    n, out = 4096, 4096
    qr, scales, _ = make_residual(n, out, torch.float16, 3)
    x = make_x(1, n, torch.float16, 4)
    bounds = make_bounds(x, 4)
    limit = _C.dec_max_blocks(0, n, out, 4, SMS)
    assert limit >= SMS
    torch.ops.decdec.dec(x, qr, scales, bounds, 4, limit)  # at the limit: runs
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=f"n_tb={limit + 1} exceeds the {limit}"):
        torch.ops.decdec.dec(x, qr, scales, bounds, 4, limit + 1)


# ---------------------------------------------------------------------------- fused DEC || GEMV
def _fused_case(backend, n, out, bits, dtype, seed):
    x = make_x(1, n, dtype, seed)
    qr, scales, q = make_residual(n, out, dtype, seed + 1)
    if backend == "ap":
        qw, lut = make_ap(n, out, bits, dtype, seed + 2)
        base = (qw, lut)
        w = reference.ap_dequant(qw, lut.float())
        fused, plain = torch.ops.decdec.ap_gemv_dec, torch.ops.decdec.ap_gemv
    else:
        b, a, qb = make_lutgemm(n, out, bits, dtype, seed + 2, group_for(n))
        base = (b, a, qb)
        w = reference.lutgemm_dequant(b, a.float(), qb.float())
        fused, plain = torch.ops.decdec.lutgemm_gemv_dec, torch.ops.decdec.lutgemm_gemv
    return x, base, w, qr, scales, q, fused, plain


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["ap", "lutgemm"])
@pytest.mark.parametrize("shape", LLAMA + PHI3[2:] + SMALL[:2], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused(shape, backend, dtype):
    n, out = shape
    x, base, w, qr, scales, q, fused, plain = _fused_case(backend, n, out, 3, dtype, n + out)
    y0 = plain(x, *base)
    for k_chunk in (0, 1, 4, 32):
        for n_tb in sorted({1, 16, SMS}):
            bounds = make_bounds(x, k_chunk)
            prev = None
            for _ in range(2):  # twice: the tile counters must be back to zero after a call
                y = fused(x, *base, qr, scales, bounds, k_chunk, n_tb)
                if k_chunk == 0:
                    assert torch.equal(y, y0), "k_chunk=0 must be bit-identical to the base GEMV"
                    continue
                mask = _C.dec_select(x, bounds, k_chunk)
                ref = x.float() @ w.t() + dec_from_mask(x, mask, q, scales)
                close(y, ref, f"{backend}_gemv_dec {shape} k={k_chunk} n_tb={n_tb}")
                if prev is not None:  # fixed summation order: deterministic
                    assert torch.equal(y, prev), f"{backend}_gemv_dec {shape} k={k_chunk} n_tb={n_tb} not deterministic"
                prev = y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["ap", "lutgemm"])
@pytest.mark.parametrize("shape", LLAMA + PHI3[3:] + SMALL, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_parts(shape, backend, dtype):
    """GEMV || DEC without the GEMV's combine: parts[0] is the GEMV in fp32, then DEC's unscaled chunk sums (one row
    per chunk up to 4, else summed by the last unit of each slice); combined they equal the fused op's reference, and
    every call gives the same bits (the slice counters are back to zero)."""
    n, out = shape
    x, base, w, qr, scales, q, fused, plain = _fused_case(backend, n, out, 3, dtype, n + out + 5)
    op = torch.ops.decdec.ap_gemv_dec_parts if backend == "ap" else torch.ops.decdec.lutgemm_gemv_dec_parts
    gemv = x.float() @ w.t()
    res = (formats.unpack_residual(q).float() * scales.float()[:, None]).t()  # [in, out], scaled
    for k_chunk in (0, 4, 32):
        bounds = make_bounds(x, k_chunk)
        mask = _C.dec_select(x, bounds, k_chunk) if k_chunk else None
        for n_tb in sorted({1, 16, SMS}):
            prev = None
            for _ in range(2):
                parts = op(x, *base, qr, bounds, k_chunk, n_tb)
                rows = reference.dec_parts_rows(n)  # a row per chunk up to 4 chunks, else their sum
                assert parts.shape == (1 + rows, 1, out) and parts.dtype == torch.float32
                what = f"{backend}_gemv_dec_parts {shape} k={k_chunk} n_tb={n_tb}"
                close(parts[0].to(dtype), gemv, what + " gemv part")
                if k_chunk == 0:
                    assert not parts[1:].any(), what + ": the DEC rows must be zero"
                    continue
                dec = (x.float() * mask) @ res
                close((parts[1:].sum(0) * scales.float()).to(dtype), dec, what + " DEC sum", rel=2.0)
                if rows > 1 and prev is None:  # row c holds only chunk c's channels
                    for c in range(rows):
                        sl = slice(c * 1024, (c + 1) * 1024)
                        close((parts[1 + c] * scales.float()).to(dtype), (x.float() * mask)[:, sl] @ res[sl],
                              what + f" chunk {c}", rel=2.0)
                close(reference.combine_dec_parts(parts, scales, dtype), gemv + dec, what + " combined")
                if prev is not None:
                    assert torch.equal(parts, prev), what + " not deterministic"
                prev = parts


def test_fused_parts_multi_token():
    x, base, w, qr, scales, q, _, _ = _fused_case("ap", 4096, 1024, 3, torch.float16, 79)
    x = make_x(5, 4096, torch.float16, 80)
    bounds = make_bounds(x, 8)
    parts = torch.ops.decdec.ap_gemv_dec_parts(x, *base, qr, bounds, 8, 24)
    mask = _C.dec_select(x, bounds, 8)
    y = reference.combine_dec_parts(parts, scales, torch.float16)
    close(y, x.float() @ w.t() + dec_from_mask(x, mask, q, scales), "parts M=5")


def test_fused_multi_token():
    x, base, w, qr, scales, q, fused, _ = _fused_case("ap", 4096, 1024, 4, torch.float16, 77)
    x = make_x(5, 4096, torch.float16, 78)
    bounds = make_bounds(x, 8)
    y = fused(x, *base, qr, scales, bounds, 8, 24)
    mask = _C.dec_select(x, bounds, 8)
    close(y, x.float() @ w.t() + dec_from_mask(x, mask, q, scales), "fused M=5")


# ---------------------------------------------------------------------------- add + RMSNorm inside the GEMV
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("shape", [(4096, 6144), (4096, 28672), (8192, 1024), (5120, 7680), (2048, 512)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_ap_gemv_addnorm(shape, m):
    n, out = shape
    qw, lut = make_ap(n, out, 3, torch.float16, n + out + 7)
    a, b = make_x(m, n, torch.float16, 91), make_x(m, n, torch.float16, 92)
    gamma = (torch.rand(n, generator=gen(93), device=DEV) + 0.5).half()
    y, h = torch.ops.decdec.ap_gemv_addnorm(a, b, gamma, 1e-5, qw, lut)
    assert torch.equal(h, a + b), "h must be the fp16 sum a + b"
    x = reference.rms_norm(a + b, gamma, 1e-5)
    close(y, x.float() @ reference.ap_dequant(qw, lut.float()).t(), f"ap_gemv_addnorm {shape} M={m}", rel=2.0)
    y2, h2 = torch.ops.decdec.ap_gemv_addnorm(a, b, gamma, 1e-5, qw, lut)
    assert torch.equal(y, y2) and torch.equal(h, h2)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("shape", [(4096, 28672), (8192, 57344), (4096, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_ap_gemv_addnorm_glu(shape, m):
    """SiLU x up in the add + norm GEMV's epilogue, rows in GLU pair order: act = fp16(silu(g) * u) of the fp16 rows the
    plain add + norm GEMV returns (same kernel, same accumulation), h = a + b; both layouts; opcheck; the rule."""
    n, out = shape
    qw, lut = make_ap(n, out, 3, torch.float16, n + out + 29)
    a, b = make_x(m, n, torch.float16, 291), make_x(m, n, torch.float16, 292)
    gamma = (torch.rand(n, generator=gen(293), device=DEV) + 0.5).half()
    act, h = torch.ops.decdec.ap_gemv_addnorm_glu(a, b, gamma, 1e-5, qw, lut)
    y, h2 = torch.ops.decdec.ap_gemv_addnorm(a, b, gamma, 1e-5, qw, lut)
    assert act.shape == (m, out // 2) and torch.equal(h, a + b) and torch.equal(h, h2)
    want = torch.nn.functional.silu(y[:, 0::2].float()) * y[:, 1::2].float()
    close(act, want, f"ap_gemv_addnorm_glu {shape} M={m}", rel=1.0)
    pk = formats.pack_ap3_kernel(qw)
    assert torch.equal(torch.ops.decdec.ap_gemv_addnorm_glu(a, b, gamma, 1e-5, pk, lut)[0], act)
    torch.library.opcheck(torch.ops.decdec.ap_gemv_addnorm_glu.default, (a, b, gamma, 1e-5, qw, lut))
    for k in range(128, 16384 + 1, 128):
        assert ops.glu_supported(3, k) == _C.ap_glu_supported(3, k), k


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("shape", [(4096, 6144), (4096, 28672), (8192, 1024), (5120, 7680), (2048, 512)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_ap_gemv_addnorm_dec_parts(shape, m):
    """The add + norm GEMV with DEC beside it (DEC forms x = rms_norm(a + b) itself): h = a + b; the parts combined
    equal W x + DEC(x) on the reference's x; k_chunk = 0 leaves zero DEC rows; deterministic; opcheck."""
    n, out = shape
    qw, lut = make_ap(n, out, 3, torch.float16, n + out + 17)
    qr, scales, q = make_residual(n, out, torch.float16, n + 18)
    a, b = make_x(m, n, torch.float16, 191), make_x(m, n, torch.float16, 192)
    gamma = (torch.rand(n, generator=gen(193), device=DEV) + 0.5).half()
    x = reference.rms_norm(a + b, gamma, 1e-5)
    w = reference.ap_dequant(qw, lut.float())
    op = torch.ops.decdec.ap_gemv_addnorm_dec_parts
    p0, h0 = op(a, b, gamma, 1e-5, qw, lut, qr, make_bounds(x, 4), 0, 16)
    assert torch.equal(h0, a + b) and not p0[1:].any()
    close(p0[0].half(), x.float() @ w.t(), f"addnorm parts {shape} M={m} k=0", rel=2.0)
    for k_chunk in (4, 32):
        bounds = make_bounds(x, k_chunk)
        for n_tb in (8, SMS):
            parts, h = op(a, b, gamma, 1e-5, qw, lut, qr, bounds, k_chunk, n_tb)
            assert torch.equal(h, a + b)
            y = reference.combine_dec_parts(parts, scales, torch.float16)
            mask = _C.dec_select(x, bounds, k_chunk)
            close(y, x.float() @ w.t() + dec_from_mask(x, mask, q, scales),
                  f"ap_gemv_addnorm_dec_parts {shape} M={m} k={k_chunk} n_tb={n_tb}", rel=2.0)
            parts2, _ = op(a, b, gamma, 1e-5, qw, lut, qr, bounds, k_chunk, n_tb)
            assert torch.equal(parts, parts2)
    torch.library.opcheck(op.default, (a, b, gamma, 1e-5, qw, lut, qr, make_bounds(x, 8), 8, 16))


def test_addnorm_support_rule_matches_the_kernel():
    for n in range(128, 16384 + 1, 128):
        assert ops.addnorm_supported(3, n) == _C.ap_addnorm_supported(3, n), n
    assert not ops.addnorm_supported(4, 4096) and not _C.ap_addnorm_supported(4, 4096)


def test_ap_gemv_addnorm_errors_and_opcheck():
    qw, lut = make_ap(4096, 256, 3, torch.float16, 94)
    a, b = make_x(1, 4096, torch.float16, 95), make_x(1, 4096, torch.float16, 96)
    gamma = torch.ones(4096, device=DEV, dtype=torch.float16)
    torch.library.opcheck(torch.ops.decdec.ap_gemv_addnorm.default, (a, b, gamma, 1e-5, qw, lut))
    qw5, lut5 = make_ap(1152, 256, 3, torch.float16, 97)  # in = 1152: the per-row PRMT kernel
    with pytest.raises(RuntimeError, match="ap_gemv_addnorm serves 3-bit"):
        torch.ops.decdec.ap_gemv_addnorm(make_x(1, 1152, torch.float16, 98), make_x(1, 1152, torch.float16, 99),
                                         torch.ones(1152, device=DEV, dtype=torch.float16), 1e-5, qw5, lut5)
    with pytest.raises(RuntimeError, match="gamma must be"):
        torch.ops.decdec.ap_gemv_addnorm(a, b, gamma[:100], 1e-5, qw, lut)


# ---------------------------------------------------------------------------- chain mode: DEC, then the GEMV
CHAIN_SHAPES = LLAMA + [(5120, 7680), (17920, 5120), (8192, 1024), (4096, 520), (2048, 4000)]


def _chain_case(n, out, seed):
    qw, lut = make_ap(n, out, 3, torch.float16, seed)
    qr, scales, q = make_residual(n, out, torch.float16, seed + 1)
    return formats.pack_ap3_kernel(qw), lut, reference.ap_dequant(qw, lut.float()), qr, scales, q


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("shape", CHAIN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ap_gemv_dec_chain(shape, m):
    """DEC launched first, the GEMV as its programmatic dependent writing the final output (csrc/kernels.h
    Fused::chain): equal to W x + DEC(x) for the kernel's own selection, at every n_tb from 1 to the SM count, k_chunk
    from 1 to 1024 (a ragged last chunk in 17920), M = 1 and 2; the same bits on every call (the counters are back at
    zero, the chunk sums in a fixed order); k_chunk = 0 is ap_gemv itself."""
    n, out = shape
    pk, lut, w, qr, scales, q = _chain_case(n, out, n + out + 41)
    x = make_x(m, n, torch.float16, n + m + 42)
    op = torch.ops.decdec.ap_gemv_dec_chain
    assert torch.equal(op(x, pk, lut, qr, scales, make_bounds(x, 4), 0, 16), torch.ops.decdec.ap_gemv(x, pk, lut))
    for k_chunk in (1, 4, 32, 1024):
        bounds = make_bounds(x, k_chunk)
        mask = _C.dec_select(x, bounds, k_chunk)
        ref = x.float() @ w.t() + dec_from_mask(x, mask, q, scales)
        for n_tb in sorted({1, 16, 66, SMS}):
            y = op(x, pk, lut, qr, scales, bounds, k_chunk, n_tb)
            what = f"ap_gemv_dec_chain {shape} M={m} k={k_chunk} n_tb={n_tb}"
            close(y, ref, what, rel=2.0)
            assert torch.equal(y, op(x, pk, lut, qr, scales, bounds, k_chunk, n_tb)), what + " not deterministic"


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("shape", [(14336, 4096), (2048, 4000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dec_chain_tensor_core_shares(shape, m):
    """The chain-mode tensor-core GEMV spreads 256 / 250 row groups over the SM slots DEC leaves: where the fixed plan
    is one block per SM on >= 90 % of the SMs (here n_tb >= 16) in equal runs of (group, k-slice) items, a group
    split over two blocks meeting at a counter (ap3_gemv_mma_split_kernel); elsewhere (n_tb 1: two blocks per SM) and
    under DECDEC_MMA_CHAIN=fixed the fixed share, each group summed as ap_gemv sums it (bit for bit). With zero
    residual scales the chain op is the GEMV: equal to ap_gemv (to the last fp16 bit where a group's two parts are
    added), the same bits on every call (counters back at zero), n_tb 1..132 (in 2048: warps without k-slices)."""
    n, out = shape
    pk, lut, w, qr, scales, q = _chain_case(n, out, n + out + 45)
    x = make_x(m, n, torch.float16, n + m + 46)
    zero = torch.zeros_like(scales)
    base = torch.ops.decdec.ap_gemv(x, pk, lut)
    bounds = make_bounds(x, 8)
    mode = os.environ.get("DECDEC_MMA_CHAIN", "auto")
    for n_tb in sorted({1, 16, 33, SMS}):
        exact = mode == "fixed" or (mode != "split" and n_tb == 1)
        first = torch.ops.decdec.ap_gemv_dec_chain(x, pk, lut, qr, zero, bounds, 8, n_tb)
        what = f"{shape} M={m} n_tb={n_tb}"
        if exact:
            assert torch.equal(first, base), what + ": chain with zero scales != ap_gemv"
        else:
            torch.testing.assert_close(first, base, rtol=2e-3, atol=2e-3, msg=lambda e: f"{what}: {e}")
        for _ in range(2):
            assert torch.equal(torch.ops.decdec.ap_gemv_dec_chain(x, pk, lut, qr, zero, bounds, 8, n_tb), first), what


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("shape", [(4096, 6144), (4096, 28672), (8192, 1024), (5120, 7680)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_ap_gemv_addnorm_dec_chain(shape, m):
    """The add + norm GEMV in chain mode (DEC forms x = rms_norm(a + b) itself): h = a + b, y = W x + DEC(x)."""
    n, out = shape
    pk, lut, w, qr, scales, q = _chain_case(n, out, n + out + 43)
    a, b = make_x(m, n, torch.float16, 431), make_x(m, n, torch.float16, 432)
    gamma = (torch.rand(n, generator=gen(433), device=DEV) + 0.5).half()
    x = reference.rms_norm(a + b, gamma, 1e-5)
    op = torch.ops.decdec.ap_gemv_addnorm_dec_chain
    for k_chunk in (4, 32):
        bounds = make_bounds(x, k_chunk)
        mask = _C.dec_select(x, bounds, k_chunk)
        ref = x.float() @ w.t() + dec_from_mask(x, mask, q, scales)
        for n_tb in (8, SMS):
            y, h = op(a, b, gamma, 1e-5, pk, lut, qr, scales, bounds, k_chunk, n_tb)
            assert torch.equal(h, a + b)
            what = f"ap_gemv_addnorm_dec_chain {shape} M={m} k={k_chunk} n_tb={n_tb}"
            close(y, ref, what, rel=2.0)
            assert torch.equal(y, op(a, b, gamma, 1e-5, pk, lut, qr, scales, bounds, k_chunk, n_tb)[0]), what
    y0, h0 = op(a, b, gamma, 1e-5, pk, lut, qr, scales, make_bounds(x, 4), 0, 16)
    assert torch.equal(y0, torch.ops.decdec.ap_gemv_addnorm(a, b, gamma, 1e-5, pk, lut)[0])


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("shape", [(4096, 28672), (4096, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_ap_gemv_addnorm_glu_dec_chain(shape, m):
    """The GLU epilogue in chain mode: the GEMV's rows in (gate_i, up_i) pairs, DEC's residual and scales in the
    original order; act = silu(g) * u of the combined rows (reference.ap_gemv_addnorm_glu_dec)."""
    n, out = shape
    qw, lut = make_ap(n, out, 3, torch.float16, n + out + 47)  # rows taken as already in pair order
    pk = formats.pack_ap3_kernel(qw)
    qr, scales, q = make_residual(n, out, torch.float16, n + 48)
    a, b = make_x(m, n, torch.float16, 471), make_x(m, n, torch.float16, 472)
    gamma = (torch.rand(n, generator=gen(473), device=DEV) + 0.5).half()
    op = torch.ops.decdec.ap_gemv_addnorm_glu_dec_chain
    for k_chunk in (4, 32):
        bounds = make_bounds(reference.rms_norm(a + b, gamma, 1e-5), k_chunk)
        want, _ = reference.ap_gemv_addnorm_glu_dec(a, b, gamma, 1e-5, qw, lut, q, scales, bounds, k_chunk)
        for n_tb in (16, SMS):
            act, h = op(a, b, gamma, 1e-5, pk, lut, qr, scales, bounds, k_chunk, n_tb)
            assert act.shape == (m, out // 2) and torch.equal(h, a + b)
            what = f"ap_gemv_addnorm_glu_dec_chain {shape} M={m} k={k_chunk} n_tb={n_tb}"
            close(act, want, what, rel=2.0)
            assert torch.equal(act, op(a, b, gamma, 1e-5, pk, lut, qr, scales, bounds, k_chunk, n_tb)[0]), what
    act0, _ = op(a, b, gamma, 1e-5, pk, lut, qr, scales, make_bounds(a, 4), 0, 16)
    assert torch.equal(act0, torch.ops.decdec.ap_gemv_addnorm_glu(a, b, gamma, 1e-5, pk, lut)[0])


def test_dec_chain_in_a_cuda_graph_between_other_ops():
    """Chain ops captured in one CUDA graph with a parts op and standalone DEC between them (all share the per-device
    counters, which each must leave at zero): every replay gives the eager results."""
    p1, l1, _, r1, s1, _ = _chain_case(4096, 6144, 51)
    p2, l2, _, r2, s2, _ = _chain_case(14336, 4096, 52)
    x1, x2 = make_x(1, 4096, torch.float16, 53), make_x(1, 14336, torch.float16, 54)
    b1, b2 = make_bounds(x1, 4), make_bounds(x2, 8)

    def step():
        y1 = torch.ops.decdec.ap_gemv_dec_chain(x1, p1, l1, r1, s1, b1, 4, 16)
        parts = torch.ops.decdec.ap_gemv_dec_parts(x1, p1, l1, r1, b1, 4, 16)
        y2 = torch.ops.decdec.ap_gemv_dec_chain(x2, p2, l2, r2, s2, b2, 8, 66)
        d = torch.ops.decdec.dec(x2, r2, s2, b2, 8, 16)
        y3 = torch.ops.decdec.ap_gemv_dec_chain(x1, p1, l1, r1, s1, b1, 4, SMS)
        return y1, parts, y2, d, y3

    eager = step()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        for e, o in zip(eager, outs):
            assert torch.equal(e, o)
    assert torch.equal(eager[0], eager[4]), "n_tb changes only the schedule, not the chain's bits"


def test_dec_chain_errors_opcheck_and_rule():
    pk, lut, _, qr, scales, _ = _chain_case(4096, 1024, 61)
    qw, _ = make_ap(4096, 1024, 3, torch.float16, 61)
    x = make_x(1, 4096, torch.float16, 62)
    bounds = make_bounds(x, 8)
    op = torch.ops.decdec.ap_gemv_dec_chain
    torch.library.opcheck(op.default, (x, pk, lut, qr, scales, bounds, 8, 16))
    with pytest.raises(RuntimeError, match="kernel layout"):
        op(x, qw, lut, qr, scales, bounds, 8, 16)  # bit-planes: the _dec_parts ops serve them
    with pytest.raises(RuntimeError, match="n_tb"):
        op(x, pk, lut, qr, scales, bounds, 8, 100000)
    a, b = make_x(1, 4096, torch.float16, 63), make_x(1, 4096, torch.float16, 64)
    gamma = torch.ones(4096, device=DEV, dtype=torch.float16)
    torch.library.opcheck(torch.ops.decdec.ap_gemv_addnorm_dec_chain.default,
                          (a, b, gamma, 1e-5, pk, lut, qr, scales, bounds, 8, 16))
    torch.library.opcheck(torch.ops.decdec.ap_gemv_addnorm_glu_dec_chain.default,
                          (a, b, gamma, 1e-5, pk, lut, qr, scales, bounds, 8, 16))
    for n in range(128, 32768 + 1, 128):
        assert ops.dec_chain_supported(3, n) == _C.ap_dec_chain_supported(3, n), n


# ---------------------------------------------------------------------------- the binary-tensor-core GEMV
BMMA_SHAPES = LLAMA + PHI3 + [(512, 16), (1024, 48), (20480, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BMMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bmma_gemv_equals_the_reference(shape, dtype):
    """ap_gemv on the binary-tensor-core layout (csrc/ap_bmma.cu): the LUT dot product of 24-bit fixed-point x,
    exact but for one rounding to the dtype, so within the dtype's rounding of the fp32 reference; tokens one after
    another (M = 3); deterministic; ap_dequant from that layout is exact."""
    n, out = shape
    seed = n + 3 * out + (dtype == torch.bfloat16)
    qw, lut = make_ap(n, out, 3, dtype, seed)
    pk = formats.pack_ap3_bmma(qw)
    w = reference.ap_dequant(qw, lut.float())
    for m in (1, 3) if out <= 8192 else (1,):
        x = make_x(m, n, dtype, seed + m)
        y = torch.ops.decdec.ap_gemv(x, pk, lut)
        close(y, x.float() @ w.t(), f"bmma {shape} {dtype} M={m}")
        assert torch.equal(y, torch.ops.decdec.ap_gemv(x, pk, lut)), f"bmma {shape} M={m}: not deterministic"
    assert torch.equal(torch.ops.decdec.ap_dequant(pk, lut), reference.ap_dequant(qw, lut))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 6144), (4096, 28672), (14336, 4096), (17920, 5120), (1024, 48)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_bmma_addnorm_and_glu_equal_the_reference(shape, dtype):
    """ap_gemv_addnorm / ap_gemv_addnorm_glu on the binary-tensor-core layout (the add + RMSNorm and x's planes in the
    GEMV's prologue, SiLU x up in its epilogue): y within the dtype's rounding of W rms_norm(a + b), h = a + b exactly,
    act within rounding of silu(gate) * up of the rounded pair; M = 2; opcheck."""
    n, out = shape
    seed = 5 * n + out + (dtype == torch.bfloat16)
    qw, lut = make_ap(n, out, 3, dtype, seed)
    w = reference.ap_dequant(qw, lut.float())
    a, b = make_x(2, n, dtype, seed + 1), make_x(2, n, dtype, seed + 2)
    gamma = (torch.rand(n, generator=gen(seed + 3), device=DEV) + 0.5).to(dtype)
    y_full = reference.rms_norm(a + b, gamma, 1e-5).float() @ w.t()
    y, h = torch.ops.decdec.ap_gemv_addnorm(a, b, gamma, 1e-5, formats.pack_ap3_bmma(qw), lut)
    assert torch.equal(h, a + b)
    close(y, y_full, f"bmma addnorm {shape} {dtype}")
    act, h = torch.ops.decdec.ap_gemv_addnorm_glu(a, b, gamma, 1e-5, formats.pack_ap3_bmma(qw), lut)
    assert torch.equal(h, a + b) and act.shape == (2, out // 2)
    yr = y_full.to(dtype).float()
    close(act, torch.nn.functional.silu(yr[:, 0::2]) * yr[:, 1::2], f"bmma glu {shape} {dtype}", rel=2.0)
    if out <= 6144:
        torch.library.opcheck(torch.ops.decdec.ap_gemv_addnorm_glu.default,
                              (a, b, gamma, 1e-5, formats.pack_ap3_bmma(qw), lut))


def test_bmma_gemv_edge_inputs_graph_and_opcheck():
    """x = 0 gives 0; one huge channel among tiny ones and all-negative x stay within fp16 rounding of the reference;
    the op replays from a CUDA graph with new x; opcheck; the other ap ops, oversize shapes and a misaligned x are refused
    by name."""
    n, out = 4096, 256
    qw, lut = make_ap(n, out, 3, torch.float16, 77)
    pk = formats.pack_ap3_bmma(qw)
    w = reference.ap_dequant(qw, lut.float())
    zero = torch.zeros(1, n, device=DEV, dtype=torch.float16)
    assert not torch.ops.decdec.ap_gemv(zero, pk, lut).any()
    spike = make_x(1, n, torch.float16, 78) * 1e-3
    spike[0, 1234] = 30000.0
    close(torch.ops.decdec.ap_gemv(spike, pk, lut), spike.float() @ w.t(), "bmma spike")
    neg = -make_x(1, n, torch.float16, 79).abs()
    close(torch.ops.decdec.ap_gemv(neg, pk, lut), neg.float() @ w.t(), "bmma negative")
    torch.library.opcheck(torch.ops.decdec.ap_gemv.default, (neg, pk, lut))
    torch.library.opcheck(torch.ops.decdec.ap_dequant.default, (pk, lut))

    x = make_x(1, n, torch.float16, 80)
    torch.ops.decdec.ap_gemv(x, pk, lut)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.decdec.ap_gemv(x, pk, lut)
    for seed in (81, 82):
        x.copy_(make_x(1, n, torch.float16, seed))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, torch.ops.decdec.ap_gemv(x, pk, lut)), f"graph replay (x seed {seed})"

    qr, scales, _ = make_residual(n, out, torch.float16, 83)
    with pytest.raises(RuntimeError, match="binary-tensor-core layout"):
        torch.ops.decdec.ap_gemv_dec(x, pk, lut, qr, scales, make_bounds(x, 4), 4, 8)
    big_qw, big_lut = make_ap(20992, 16, 3, torch.float16, 84)
    with pytest.raises(RuntimeError, match="in <= 20480"):
        torch.ops.decdec.ap_gemv(make_x(1, 20992, torch.float16, 85), formats.pack_ap3_bmma(big_qw), big_lut)
    with pytest.raises(RuntimeError, match="lut"):
        torch.ops.decdec.ap_gemv(x, pk, lut.to(torch.bfloat16))
    shifted = torch.empty(n + 8, device=DEV, dtype=torch.float16)[8 - 4:8 - 4 + n].view(1, n)  # 8 bytes off
    shifted.copy_(x)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        torch.ops.decdec.ap_gemv(shifted, pk, lut)


def test_quantlinear_decode_layout_follows_dec():
    """QuantLinear holds a bmma-preferred shape (ops.bmma_preferred: >= 7 row groups per SM) in the binary-tensor-core
    layout while DEC is off, returns to the kernel layout when set_dec turns DEC on and back when it turns off; decode
    (M = 1), the add + norm and GLU ops (rows in GLU pair order) and prefill (M = 3) match the bit-plane reference in
    every layout, and bmma decode is the same bits each time it comes back."""
    from torch import nn

    from decdec.linear import QuantLinear

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, out = 512, 16 * 7 * sms
    assert ops.bmma_preferred(3, torch.float16, n, out, DEV)
    assert not ops.bmma_preferred(3, torch.float16, n, out - 16, DEV)
    qw, lut = make_ap(n, out, 3, torch.float16, 91)
    w = reference.ap_dequant(qw, lut.float())
    lin = QuantLinear("ap", n, out, bits=3, dtype=torch.float16).to(DEV)
    lin.qweight, lin.lut = qw.clone(), lut.clone()
    lin.use_glu_layout(force=True)
    lin.use_kernel_layout()
    qr, scales, q = make_residual(n, out, torch.float16, 92)
    lin.attach_dec(q.cpu(), scales, torch.linspace(4, 0.1, n), DEV)
    x, x3 = make_x(1, n, torch.float16, 93), make_x(3, n, torch.float16, 94)
    a, b = make_x(1, n, torch.float16, 95), make_x(1, n, torch.float16, 96)
    norm = nn.RMSNorm(n, eps=1e-5).to(DEV, torch.float16)
    y_norm = reference.rms_norm(a + b, norm.weight, 1e-5).float() @ w.t()
    first = None
    for k, layout in ((0, "bmma"), (4, "kernel"), (0, "bmma")):
        lin.set_dec(k, 8)
        is_bmma = formats.is_ap3_bmma_layout(lin.qweight, lin.lut)
        assert is_bmma == (layout == "bmma"), f"k_chunk={k}: layout {tuple(lin.qweight.shape)}"
        assert formats.is_ap3_kernel_layout(lin.qweight, lin.lut) == (layout == "kernel")
        if k == 0:
            y = lin(x)
            close(y, x.float() @ w.t(), f"decode k=0 ({layout})")
            first = y if first is None else first
            assert torch.equal(y, first), "bmma decode differs after the round trip through the kernel layout"
            act, h = lin.forward_addnorm_glu(a, b, norm)
            yr = y_norm.to(torch.float16).float()
            close(act, torch.nn.functional.silu(yr[:, :out // 2]) * yr[:, out // 2:], f"glu ({layout})", rel=2.0)
            assert torch.equal(h, a + b)
        close(lin(x3), x3.float() @ w.t(), f"prefill k={k} ({layout})")


# ---------------------------------------------------------------------------- the 3-bit kernel layout
KERNEL_LAYOUT_SHAPES = LLAMA + PHI3 + [(8192, 1024), (28672, 8192), (4096, 1001)]


@pytest.mark.parametrize("shape", KERNEL_LAYOUT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_layout_gemv_equals_bitplanes(shape):
    """The tensor-core and streaming GEMVs give the same bits from both layouts (same products, same order), and
    the reference; dequantize is exact."""
    n, out = shape
    assert ops.ap3_kernel_layout(3, torch.float16, n)
    qw, lut = make_ap(n, out, 3, torch.float16, n + out + 11)
    pk = formats.pack_ap3_kernel(qw)
    assert pk.shape == (out, n // 256, 3, 8)
    for m in (1, 3) if out <= 8192 else (1,):
        x = make_x(m, n, torch.float16, n + m)
        y = torch.ops.decdec.ap_gemv(x, pk, lut)
        assert torch.equal(y, torch.ops.decdec.ap_gemv(x, qw, lut)), f"{shape} M={m}: layouts differ"
        close(y, x.float() @ reference.ap_dequant(qw, lut.float()).t(), f"kernel layout {shape} M={m}")
    assert torch.equal(torch.ops.decdec.ap_dequant(pk, lut), reference.ap_dequant(qw, lut))


@pytest.mark.parametrize("shape", [(4096, 6144), (14336, 4096), (5120, 7680)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_layout_fused_and_addnorm(shape):
    n, out = shape
    x, (qw, lut), w, qr, scales, q, fused, _ = _fused_case("ap", n, out, 3, torch.float16, n + out + 13)
    pk = formats.pack_ap3_kernel(qw)
    for k_chunk in (0, 4):
        bounds = make_bounds(x, k_chunk)
        for n_tb in (16, SMS):
            a = torch.ops.decdec.ap_gemv_dec_parts(x, pk, lut, qr, bounds, k_chunk, n_tb)
            b = torch.ops.decdec.ap_gemv_dec_parts(x, qw, lut, qr, bounds, k_chunk, n_tb)
            assert torch.equal(a, b), f"parts {shape} k={k_chunk} n_tb={n_tb}"
            assert torch.equal(fused(x, pk, lut, qr, scales, bounds, k_chunk, n_tb),
                               fused(x, qw, lut, qr, scales, bounds, k_chunk, n_tb)), f"fused {shape} k={k_chunk}"
    if ops.addnorm_supported(3, n):
        a, b = make_x(1, n, torch.float16, 101), make_x(1, n, torch.float16, 102)
        gamma = (torch.rand(n, generator=gen(103), device=DEV) + 0.5).half()
        ya, ha = torch.ops.decdec.ap_gemv_addnorm(a, b, gamma, 1e-5, pk, lut)
        yb, hb = torch.ops.decdec.ap_gemv_addnorm(a, b, gamma, 1e-5, qw, lut)
        assert torch.equal(ya, yb) and torch.equal(ha, hb)


def test_kernel_layout_rule_matches_the_kernel_and_errors():
    for n in range(128, 16384 + 1, 128):
        assert ops.ap3_kernel_layout(3, torch.float16, n) == _C.ap3_packed_supported(3, n), n
    assert not _C.ap3_packed_supported(4, 4096) and not ops.ap3_kernel_layout(3, torch.bfloat16, 4096)
    qw, lut = make_ap(4096, 256, 3, torch.float16, 104)
    pk = formats.pack_ap3_kernel(qw)
    x = make_x(1, 4096, torch.float16, 105)
    torch.library.opcheck(torch.ops.decdec.ap_gemv.default, (x, pk, lut))
    torch.library.opcheck(torch.ops.decdec.ap_dequant.default, (pk, lut))
    with pytest.raises(RuntimeError, match="3-bit kernel layout"):
        torch.ops.decdec.ap_gemv(x.bfloat16(), pk, lut.bfloat16())
    qw3, lut3 = make_ap(1280, 64, 3, torch.float16, 106)  # in = 1280: the per-row PRMT kernel, bit-planes only
    assert not ops.ap3_kernel_layout(3, torch.float16, 1280)
    with pytest.raises(RuntimeError, match="unpack_ap3_kernel"):
        torch.ops.decdec.ap_gemv(make_x(1, 1280, torch.float16, 107), formats.pack_ap3_kernel(qw3), lut3)


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_values():
    qw, lut = make_ap(1024, 256, 3, torch.float16, 1)
    x = make_x(1, 1024, torch.float16, 2)
    with pytest.raises(RuntimeError, match="lut must be float16|lut must be Half"):
        torch.ops.decdec.ap_gemv(x, qw, lut.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="x has 512 input channels, qweight expects 1024"):
        torch.ops.decdec.ap_gemv(make_x(1, 512, torch.float16, 3), qw, lut)
    with pytest.raises(RuntimeError, match="x must be float16 or bfloat16"):
        torch.ops.decdec.ap_gemv(x.float(), qw, lut)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.decdec.ap_gemv(x, qw.transpose(1, 2).contiguous().transpose(1, 2), lut)
    qr, scales, _ = make_residual(1024, 256, torch.float16, 4)
    bounds = make_bounds(x, 4)
    with pytest.raises(RuntimeError, match="bounds must be Float"):
        torch.ops.decdec.dec(x, qr, scales, bounds.half(), 4, 8)
    with pytest.raises(RuntimeError, match="q_residual must be a CUDA tensor"):
        torch.ops.decdec.dec(x, qr.cpu(), scales, bounds, 4, 8)
    b, a, qb = make_lutgemm(1024, 256, 3, torch.float16, 5)
    with pytest.raises(RuntimeError, match="lutgemm groups must split in=1024 into multiples of 32 channels, got 3"):
        torch.ops.decdec.lutgemm_gemv(x, b, a[:3].contiguous(), qb[:3].contiguous())


def test_place_residual_uses_no_gpu_memory():
    q = formats.pack_residual(torch.randint(-7, 8, (2048, 4096)))
    before = torch.cuda.memory_allocated()
    r = ops.place_residual(q, DEV)
    assert r.is_cuda and r.dtype == torch.int32 and r.shape == q.shape
    assert torch.cuda.memory_allocated() == before
    assert torch.equal(r.cpu(), q)  # readable through its UVA address
    del r


# ---------------------------------------------------------------------------- torch.library / compile / graphs
def _small_args(dtype=torch.float16):
    n, out = 2048, 512
    x = make_x(1, n, dtype, 11)
    qw, lut = make_ap(n, out, 3, dtype, 12)
    b, a, qb = make_lutgemm(n, out, 3, dtype, 13)
    qr, scales, _ = make_residual(n, out, dtype, 14)
    bounds = make_bounds(x, 8)
    return x, qw, lut, b, a, qb, qr, scales, bounds


def test_opcheck():
    x, qw, lut, b, a, qb, qr, scales, bounds = _small_args()
    cases = {
        "ap_gemv": (x, qw, lut),
        "ap_dequant": (qw, lut),
        "lutgemm_gemv": (x, b, a, qb),
        "lutgemm_dequant": (b, a, qb),
        "dec": (x, qr, scales, bounds, 8, 4),
        "ap_gemv_dec": (x, qw, lut, qr, scales, bounds, 8, 4),
        "lutgemm_gemv_dec": (x, b, a, qb, qr, scales, bounds, 8, 4),
        "ap_gemv_dec_parts": (x, qw, lut, qr, bounds, 8, 4),
        "lutgemm_gemv_dec_parts": (x, b, a, qb, qr, bounds, 8, 4),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.decdec, name).default, args)


def _decode_step(x, qw, lut, b, a, qb, qr, scales, bounds):
    y1 = torch.ops.decdec.ap_gemv_dec(x, qw, lut, qr, scales, bounds, 8, 8)
    y2 = torch.ops.decdec.lutgemm_gemv_dec(x, b, a, qb, qr, scales, bounds, 8, 8)
    y3 = torch.ops.decdec.dec(x, qr, scales, bounds, 8, 8)
    y4 = reference.combine_dec_parts(torch.ops.decdec.ap_gemv_dec_parts(x, qw, lut, qr, bounds, 8, 8), scales, x.dtype)
    return y1 + y2.float().sum() * 0 + y3 * 0, y2, y4


def test_compile_fullgraph_equals_eager():
    args = _small_args()
    eager = _decode_step(*args)
    compiled = torch.compile(_decode_step, fullgraph=True)(*args)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


def test_cudagraphs_compile_mode_no_skips():
    from torch._dynamo.utils import counters

    counters.clear()
    args = _small_args()
    fn = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, record, replays
        out = fn(*args)
    eager = _decode_step(*args)
    for e, c in zip(eager, out):
        assert torch.equal(e, c)
    assert sum(counters["inductor"]["cudagraph_skips"].values() if hasattr(counters["inductor"]["cudagraph_skips"], "values") else [counters["inductor"]["cudagraph_skips"]]) == 0


def test_cuda_graph_capture_replay():
    x, qw, lut, b, a, qb, qr, scales, bounds = _small_args()
    static_x = x.clone()
    eager = _decode_step(static_x, qw, lut, b, a, qb, qr, scales, bounds)  # warm-up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = _decode_step(static_x, qw, lut, b, a, qb, qr, scales, bounds)
    for seed in (21, 22, 23):
        static_x.copy_(make_x(1, x.shape[1], x.dtype, seed))
        g.replay()
        expect = _decode_step(static_x, qw, lut, b, a, qb, qr, scales, bounds)
        for e, c in zip(expect, outs):
            assert torch.equal(e, c), "graph replay differs from eager"
    assert not torch.equal(eager[0], outs[0])  # the replays really used the new inputs


@pytest.mark.parametrize("backend", ["ap", "lutgemm"])
def test_gemv_waits_for_the_kernel_that_writes_x(backend):
    """The GEMVs are launched as programmatic dependents (they start while the previous kernel in the stream
    finishes and wait before reading x): x written by a long kernel just before, eager and inside a CUDA graph
    (where the launches become programmatic graph edges), must be the x the GEMV reads."""
    n, out = 4096, 28672
    big = torch.randn(8192, 8192, generator=gen(41), device=DEV, dtype=torch.float16) * 0.01
    v = torch.randn(8192, 1, generator=gen(42), device=DEV, dtype=torch.float16)
    if backend == "ap":
        qw, lut = make_ap(n, out, 3, torch.float16, 43)
        gemv = lambda x: torch.ops.decdec.ap_gemv(x, qw, lut)  # noqa: E731
        dense = reference.ap_dequant(qw, lut.float())
    else:
        b, a, qb = make_lutgemm(n, out, 3, torch.float16, 43)
        gemv = lambda x: torch.ops.decdec.lutgemm_gemv(x, b, a, qb)  # noqa: E731
        dense = reference.lutgemm_dequant(b, a.float(), qb.float())

    def step(vv):
        x = (big @ vv)[:n].t().contiguous()  # [1, n]: a ~20 us GEMM, then a copy, then the GEMV
        return x, gemv(x)

    x, y = step(v)
    close(y, x.float() @ dense.t(), f"{backend} after a GEMM (eager)")
    static_v = v.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gx, gy = step(static_v)
    for seed in (44, 45):
        static_v.copy_(torch.randn(8192, 1, generator=gen(seed), device=DEV, dtype=torch.float16))
        g.replay()
        close(gy, gx.float() @ dense.t(), f"{backend} after a GEMM (graph replay)")


# ---------------------------------------------------------------------------- decode attention
# (H, Hkv, Dh): Llama-3-8B, Phi-3-medium (40/10), SmolLM2 (9/3, Dh 64), Llama-3-70B (rep 8), Phi-3-mini (Dh 96,
# no grouping), the tiny test model (Dh 16)
ATTN_HEADS = [(32, 8, 128), (40, 10, 128), (9, 3, 64), (64, 8, 128), (32, 32, 96), (4, 2, 16)]


def _attn_case(B, H, Hkv, L, Dh, dtype, seed, cache_batch=None):
    g = gen(seed)
    q = torch.randn(B, H, Dh, generator=g, device=DEV).to(dtype)
    k = torch.randn(cache_batch or B, Hkv, L, Dh, generator=g, device=DEV).to(dtype)
    v = torch.randn(cache_batch or B, Hkv, L, Dh, generator=g, device=DEV).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", ATTN_HEADS)
def test_decode_attention(heads, dtype):
    """Kernel vs reference at positions inside the first split, on split edges (63, 64), across many splits,
    the last cache row, with sliding windows, and for two sequences in a larger cache."""
    H, Hkv, Dh = heads
    for L, B, cases in ((200, 1, [(0, 0), (63, 0), (64, 0), (130, 0), (199, 0), (150, 40), (199, 64)]),
                        (4100, 2, [(4099, 0), (2047, 0), (4000, 2047)])):
        q, k, v = _attn_case(B, H, Hkv, L, Dh, dtype, seed=L + H, cache_batch=B + 1)
        for p, window in cases:
            pos = torch.tensor([p], device=DEV)
            y = torch.ops.decdec.decode_attention(q, k, v, pos, window)
            ref = reference.decode_attention(q.float(), k.float(), v.float(), pos, window)
            assert y.shape == (B, H * Dh) and y.dtype == dtype
            close(y, ref, f"attention H={H} Hkv={Hkv} Dh={Dh} L={L} pos={p} window={window}", rel=2.0)


def test_decode_attention_deterministic_and_graph_replays_follow_pos():
    """Same inputs, same bits (the split merge has a fixed order; the counters come back to zero); one
    recorded graph serves every position written into pos before its replay."""
    q, k, v = _attn_case(1, 32, 8, 1000, 128, torch.float16, seed=5)
    pos = torch.tensor([777], device=DEV)
    a = torch.ops.decdec.decode_attention(q, k, v, pos, 0)
    assert torch.equal(a, torch.ops.decdec.decode_attention(q, k, v, pos, 0))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.decdec.decode_attention(q, k, v, pos, 0)
    for p in (3, 64, 500, 999):
        pos.fill_(p)
        g.replay()
        close(out, reference.decode_attention(q.float(), k.float(), v.float(), pos, 0), f"graph pos={p}", rel=2.0)
        assert torch.equal(out, torch.ops.decdec.decode_attention(q, k, v, pos, 0))


def _rope_case(B, H, Hkv, L, Dh, R, dtype, seed, cache_batch=None):
    g = gen(seed)
    qkv = torch.randn(B, (H + 2 * Hkv) * Dh, generator=g, device=DEV).to(dtype)
    kv = torch.randn(2, cache_batch or B, Hkv, L, Dh, generator=g, device=DEV).to(dtype)
    ang = torch.rand(1, R // 2, generator=g, device=DEV) * 6.0
    emb = torch.cat([ang, ang], dim=-1)
    return qkv, emb.cos(), emb.sin(), kv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", ATTN_HEADS)
def test_decode_attention_rope(heads, dtype):
    """RoPE + KV-cache write + attention in one kernel vs the reference (which does the three steps apart): the
    output, the cache row at pos (v copied bit for bit, k as the model's apply_rope rounds it), every other row
    untouched; full and partial rotary, split edges, a window, two sequences in a larger cache."""
    H, Hkv, Dh = heads
    for R in sorted({Dh, Dh // 2 - (Dh // 2) % 2}):
        for p, window in ((0, 0), (63, 0), (64, 0), (130, 0), (199, 0), (150, 40)):
            qkv, cos, sin, kv = _rope_case(2, H, Hkv, 200, Dh, R, dtype, seed=p + H + R, cache_batch=3)
            kv_ref = kv.clone()
            pos = torch.tensor([p], device=DEV)
            what = f"attention_rope H={H} Hkv={Hkv} Dh={Dh} R={R} pos={p} window={window} {dtype}"
            y = torch.ops.decdec.decode_attention_rope(qkv, cos, sin, kv, pos, H, window)
            ref = reference.decode_attention_rope(qkv, cos, sin, kv_ref, pos, H, window)
            assert y.shape == (2, H * Dh) and y.dtype == dtype
            close(y, ref, what, rel=2.0)
            row = torch.zeros(kv.shape[3], dtype=torch.bool, device=DEV)
            row[p] = True
            assert torch.equal(kv[:, :, :, ~row], kv_ref[:, :, :, ~row]), what + ": rows other than pos changed"
            assert torch.equal(kv[:, 2], kv_ref[:, 2]), what + ": the third cache sequence changed"
            assert torch.equal(kv[1, :2, :, p], kv_ref[1, :2, :, p]), what + ": v row"
            torch.testing.assert_close(kv[0, :2, :, p].float(), kv_ref[0, :2, :, p].float(), rtol=1e-2, atol=1e-2,
                                       msg=lambda m: f"{what}: k row: {m}")


def test_decode_attention_rope_in_a_graph_and_opcheck():
    """One recorded graph serves every position (the cache row it writes follows pos); opcheck (mutation of kv
    declared); errors name the fix."""
    qkv, cos, sin, kv = _rope_case(1, 32, 8, 300, 128, 128, torch.float16, seed=8)
    pos = torch.tensor([5], device=DEV)
    torch.library.opcheck(torch.ops.decdec.decode_attention_rope.default, (qkv, cos, sin, kv.clone(), pos, 32, 0))
    kv_ref = kv.clone()
    g = torch.cuda.CUDAGraph()
    torch.ops.decdec.decode_attention_rope(qkv, cos, sin, kv.clone(), pos, 32, 0)  # warm-up outside capture
    with torch.cuda.graph(g):
        out = torch.ops.decdec.decode_attention_rope(qkv, cos, sin, kv, pos, 32, 0)
    for p in (3, 64, 200, 299):
        pos.fill_(p)
        g.replay()
        ref = reference.decode_attention_rope(qkv, cos, sin, kv_ref, pos, 32, 0)
        close(out, ref, f"graph pos={p}", rel=2.0)
        assert torch.equal(kv[1], kv_ref[1])
    with pytest.raises(RuntimeError, match="kv must be Half like q, got Float"):
        torch.ops.decdec.decode_attention_rope(qkv, cos, sin, kv.float(), pos, 32, 0)
    with pytest.raises(RuntimeError, match=r"qkv rows must hold \(H \+ 2 Hkv\) Dh"):
        torch.ops.decdec.decode_attention_rope(qkv, cos, sin, kv, pos, 24, 0)
    with pytest.raises(RuntimeError, match="cos and sin must be contiguous float32"):
        torch.ops.decdec.decode_attention_rope(qkv, cos.half(), sin, kv, pos, 32, 0)


def test_decode_attention_opcheck_and_errors():
    q, k, v = _attn_case(1, 8, 2, 80, 64, torch.float16, seed=6)
    pos = torch.tensor([70], device=DEV)
    torch.library.opcheck(torch.ops.decdec.decode_attention.default, (q, k, v, pos, 0))
    with pytest.raises(RuntimeError, match="k_cache must be Half like q, got Float"):
        torch.ops.decdec.decode_attention(q, k.float(), v, pos, 0)
    with pytest.raises(RuntimeError, match="pos must be one int64 on q's device"):
        torch.ops.decdec.decode_attention(q, k, v, pos.cpu(), 0)
    q9 = torch.randn(1, 72, 64, device=DEV, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="H / Hkv <= 8"):
        torch.ops.decdec.decode_attention(q9, torch.zeros(1, 8, 80, 64, device=DEV, dtype=torch.float16),
                                          torch.zeros(1, 8, 80, 64, device=DEV, dtype=torch.float16), pos, 0)
