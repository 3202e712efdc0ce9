"""Quantizer invariants: codes/LUT, k-means quality, exact BCQ, clip search, residual, thresholds."""

from __future__ import annotations

import pytest
import torch

from decdec import formats, quantize, reference


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gaussian(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=_gen(seed)) * 0.02


def _heavy(out: int, inp: int, seed: int = 1) -> torch.Tensor:
    # Student-t with 3 degrees of freedom: outliers like real LLM weights.
    g = _gen(seed)
    z = torch.randn(out, inp, generator=g)
    chi = torch.randn(out, inp, 3, generator=g).square().sum(-1)
    return z / (chi / 3).sqrt() * 0.02


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().sum() / b.square().sum())


# ---------------------------------------------------------------------------- ap
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ap_codes_in_range_and_lut_sorted(bits):
    w = _heavy(40, 96)
    qweight, lut = quantize.quantize_ap(w, bits)
    assert qweight.shape == (bits, 40, 3) and qweight.dtype == torch.int32
    assert lut.shape == (40, 2**bits) and lut.dtype == torch.float32
    assert bool((lut[:, 1:] >= lut[:, :-1]).all())
    codes = formats.unpack_bitplanes(qweight)
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**bits
    assert torch.equal(codes, quantize.ap_codes(w, lut))
    # Codes are nearest-centroid: no other LUT entry is closer.
    wq = reference.ap_dequant(qweight, lut)
    best = (w.unsqueeze(-1) - lut.unsqueeze(1)).abs().amin(-1)
    assert torch.allclose((w - wq).abs(), best, atol=1e-7)
    # Each row's centroids stay within its range.
    assert bool((lut >= w.amin(1, keepdim=True) - 1e-7).all()) and bool((lut <= w.amax(1, keepdim=True) + 1e-7).all())


@pytest.mark.parametrize("make", [_gaussian, _heavy])
@pytest.mark.parametrize("bits", [3, 4])
def test_ap_beats_uniform_rtn_with_same_levels(make, bits):
    w = make(64, 512)
    qweight, lut = quantize.quantize_ap(w, bits)
    q, s, z = quantize.quantize_uniform(w, bits, group_size=512)  # per row: 2**bits levels too
    e_ap = _rel_err(reference.ap_dequant(qweight, lut), w)
    e_rtn = _rel_err(quantize.dequantize_uniform(q, s, z), w)
    assert e_ap < 0.8 * e_rtn, (e_ap, e_rtn)


def test_ap_lloyd_iterations_do_not_increase_error():
    w = _heavy(32, 256)
    errs = [_rel_err(reference.ap_dequant(*quantize.quantize_ap(w, 3, iters=it)), w) for it in (0, 2, 10, 30)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]


def test_ap_weighted_kmeans_favours_heavy_channels():
    w = _heavy(64, 256)
    cw = torch.ones(256)
    cw[:32] = 1000.0
    wq_u = reference.ap_dequant(*quantize.quantize_ap(w, 3))
    wq_w = reference.ap_dequant(*quantize.quantize_ap(w, 3, channel_weight=cw))
    heavy_u = (w - wq_u)[:, :32].square().sum()
    heavy_w = (w - wq_w)[:, :32].square().sum()
    assert heavy_w < 0.6 * heavy_u
    # With 1000x weight the heavy channels nearly own the 8 centroids: close to k-means on them alone.
    alone = reference.ap_dequant(*quantize.quantize_ap(w[:, :32].contiguous(), 3))
    assert heavy_w < 1.1 * (w[:, :32] - alone).square().sum()
    # ... and the weighted objective it optimizes is lower.
    obj = lambda wq: float(((w - wq).square() * cw).sum())  # noqa: E731
    assert obj(wq_w) < obj(wq_u)


def test_ap_degenerate_rows_and_empty_clusters():
    w = _gaussian(8, 64)
    w[0] = 0.0  # all equal
    w[1] = torch.tensor([0.5, -0.5]).repeat(32)  # 2 distinct values, 8 clusters
    w[2, :60] = 1.0  # one dominant value and 4 others
    qweight, lut = quantize.quantize_ap(w, 3)
    assert bool(torch.isfinite(lut).all())
    assert bool((lut[:, 1:] >= lut[:, :-1]).all())
    wq = reference.ap_dequant(qweight, lut)
    assert torch.equal(wq[0], w[0])
    assert torch.equal(wq[1], w[1])
    assert torch.equal(wq[2], w[2])  # 5 distinct values fit exactly in 8 clusters
    # Zero-weight channels still get codes and do not break anything.
    cw = torch.zeros(64)
    cw[0] = 1.0
    qweight, lut = quantize.quantize_ap(w, 3, channel_weight=cw)
    assert bool(torch.isfinite(lut).all())


def test_ap_chunking_matches_single_block(monkeypatch):
    w = _heavy(50, 64)
    ref = quantize.quantize_ap(w, 3)
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 64 * 7)  # blocks of one or a few rows
    got = quantize.quantize_ap(w, 3)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_ap_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize.quantize_ap(torch.randn(4, 40), 3)
    with pytest.raises(ValueError, match="2-D"):
        quantize.quantize_ap(torch.randn(4, 4, 32), 3)
    with pytest.raises(ValueError, match="channel_weight"):
        quantize.quantize_ap(torch.randn(4, 64), 3, channel_weight=torch.ones(32))
    with pytest.raises(ValueError, match="non-negative"):
        quantize.quantize_ap(torch.randn(4, 64), 3, channel_weight=-torch.ones(64))
    with pytest.raises(ValueError, match="NaN"):
        quantize.quantize_ap(torch.full((4, 64), float("nan")), 3)


# ---------------------------------------------------------------------------- uniform / lutgemm
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_codes_and_error_bound(bits):
    w = _heavy(16, 256)
    q, scale, zero = quantize.quantize_uniform(w, bits, group_size=64)
    assert q.shape == (16, 256) and q.dtype == torch.int64
    assert scale.shape == zero.shape == (16, 4)
    assert int(q.min()) >= 0 and int(q.max()) < 2**bits
    assert torch.equal(zero, zero.round())
    # Unclipped RTN with an integer zero point: error at most one step per weight.
    wq = quantize.dequantize_uniform(q, scale, zero)
    step = scale.repeat_interleave(64, dim=1)
    assert bool(((w - wq).abs() <= step * (1 + 1e-5)).all())


def test_uniform_clipped_group_zero_is_exact_tie():
    # Clipping both ends makes the group symmetric: zero = round(7 * 0.5) = 4 (half to even), on
    # every device, whatever the rounding of the scale.
    w = torch.linspace(-1.0, 1.0, 64, dtype=torch.float32).mul(torch.rand(1, generator=_gen(2)) + 0.1)
    w = w.reshape(1, 64).repeat(5, 1) * torch.tensor([[1.0], [3.0], [0.37], [1e-3], [123.0]])
    q, scale, zero = quantize.quantize_uniform(w, 3, 64, clip=torch.full((5, 1), 0.8))
    assert bool((zero == 4).all())
    assert torch.allclose(scale[:, 0], 1.6 * w.amax(1) / 7, rtol=1e-6)


def test_uniform_constant_groups():
    w = torch.zeros(2, 64)
    w[1, :32] = 0.3
    q, scale, zero = quantize.quantize_uniform(w, 3, group_size=32)
    wq = quantize.dequantize_uniform(q, scale, zero)
    assert torch.allclose(wq, w, atol=1e-7)


@pytest.mark.parametrize("bits,group", [(3, 64), (4, 128), (2, 32)])
def test_lutgemm_is_exact_bcq_conversion(bits, group):
    w = _heavy(24, 256)
    x = torch.randn(64, 256, generator=_gen(5))
    binary, alpha, q_bias = quantize.quantize_lutgemm(w, bits, group, x=x)
    ng = 256 // group
    assert binary.shape == (8, bits, 24) and alpha.shape == (ng, bits, 24) and q_bias.shape == (ng, 24)
    clip = quantize.search_clip(w, x, bits, group)
    q, scale, zero = quantize.quantize_uniform(w, bits, group, clip)
    expect = quantize.dequantize_uniform(q, scale, zero)
    got = quantize.dequantize_lutgemm(binary, alpha, q_bias)
    assert torch.allclose(got, expect, rtol=0, atol=4 * float(scale.max()) * 2**-23 * 2**bits)


def test_lutgemm_chunking_matches_single_block(monkeypatch):
    w = _heavy(40, 128)
    x = torch.randn(32, 128, generator=_gen(6))
    ref = quantize.quantize_lutgemm(w, 3, 64, x=x)
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 128 * 4 * 3)  # 3-row blocks
    got = quantize.quantize_lutgemm(w, 3, 64, x=x)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_lutgemm_group_errors():
    w = torch.randn(8, 576)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize.quantize_lutgemm(w, 3, group_size=48)
    with pytest.raises(ValueError, match="divide"):
        quantize.quantize_lutgemm(w, 3, group_size=128)  # 576 % 128 != 0
    with pytest.raises(ValueError, match="divide"):
        quantize.quantize_uniform(w, 3, group_size=100)
    with pytest.raises(ValueError, match="clip"):
        quantize.quantize_uniform(w, 3, 64, clip=torch.ones(8, 3))
    with pytest.raises(ValueError, match="x must be"):
        quantize.search_clip(w, torch.randn(4, 100), 3, 64)
    binary, alpha, q_bias = quantize.quantize_lutgemm(w, 3, group_size=64)
    assert alpha.shape == (9, 3, 8)


def test_clip_search_never_worse_than_no_clip():
    w = _heavy(32, 256, seed=3)
    x = torch.randn(200, 256, generator=_gen(4)) * torch.linspace(0.1, 3, 256)
    clip = quantize.search_clip(w, x, 3, 64)
    assert clip.shape == (32, 4)
    assert bool((clip <= 1).all()) and bool((clip >= 0.55 - 1e-6).all())
    assert bool((clip < 1).any())  # heavy tails: clipping helps somewhere

    def objective(c):
        wq = quantize.dequantize_uniform(*quantize.quantize_uniform(w, 3, 64, c))
        d = (w - wq).double().view(32, 4, 64)
        xg = x.double().view(-1, 4, 64)
        return torch.einsum("rgi,tgi->rgt", d, xg).square().sum(-1)  # [out, groups]

    base = objective(None)
    best = objective(clip)
    assert bool((best <= base * (1 + 1e-5) + 1e-12).all())
    assert float(best.sum()) < float(base.sum())
    # The chosen factor is the brute-force best in every group.
    per_ratio = torch.stack([objective(torch.full((32, 4), r)) for r in quantize.clip_ratios().tolist()])
    assert bool((best <= per_ratio.amin(0) * (1 + 1e-5) + 1e-12).all())


# ---------------------------------------------------------------------------- residual
def _brute_force_residual(e: torch.Tensor, lmax: int = 7):
    """Per row: errors of all 32 candidate scales, computed independently in fp64."""
    amax = e.abs().amax(1, keepdim=True).double()
    t = torch.arange(1, 33, dtype=torch.float64)
    cand = (amax / lmax) * t / 32  # [out, 32]
    ed = e.double().unsqueeze(1)
    lv = (ed / cand.unsqueeze(-1)).round().clamp(-lmax, lmax)
    errs = (ed - lv * cand.unsqueeze(-1)).square().sum(-1)  # [out, 32]
    return cand, errs


def test_residual_round_trip_matches_brute_force():
    w = _heavy(48, 96, seed=7)
    w_q = reference.ap_dequant(*quantize.quantize_ap(w, 3))
    q_residual, scales = quantize.residual_cheatsheet(w, w_q)
    assert q_residual.shape == (96, 6) and q_residual.dtype == torch.int32
    assert scales.shape == (48,) and scales.dtype == torch.float32
    e = w - w_q
    levels = formats.unpack_residual(q_residual)
    assert int(levels.abs().max()) <= 7
    approx = levels.float() * scales.unsqueeze(1)
    got_err = (e.double() - approx.double()).square().sum(1)
    cand, errs = _brute_force_residual(e)
    best_err, best_t = errs.min(1)
    assert bool((got_err <= best_err * (1 + 1e-5) + 1e-20).all())
    # The chosen scale is the brute-force argmin (random data: no near-ties).
    assert torch.allclose(scales.double(), cand.gather(1, best_t[:, None]).squeeze(1), rtol=1e-6)
    # The analysis variant agrees with the packed 4-bit residual.
    assert torch.allclose(quantize.residual_dequant(w, w_q, bits=4), approx)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_residual_other_bits_match_brute_force(bits):
    w = _gaussian(32, 128, seed=9)
    w_q = reference.ap_dequant(*quantize.quantize_ap(w, 2))
    e = w - w_q
    got = quantize.residual_dequant(w, w_q, bits=bits)
    lmax = 2 ** (bits - 1) - 1
    cand, errs = _brute_force_residual(e, lmax)
    got_err = (e.double() - got.double()).square().sum(1)
    assert bool((got_err <= errs.min(1).values * (1 + 1e-5) + 1e-20).all())
    # The output lies on the brute-force argmin scale's grid, within -lmax..lmax steps.
    steps = got.double() / cand.gather(1, errs.argmin(1, keepdim=True))
    assert torch.allclose(steps, steps.round(), atol=1e-4) and float(steps.abs().max()) <= lmax + 1e-4


def test_residual_chunking_and_zero_rows():
    w = _gaussian(16, 64)
    w_q = w.clone()
    w_q[3:] = reference.ap_dequant(*quantize.quantize_ap(w, 2))[3:]  # rows 0..2: zero residual
    q1, s1 = quantize.residual_cheatsheet(w, w_q)
    q2, s2 = quantize.residual_cheatsheet(w, w_q, chunk_rows=3)  # rounded up to 8 rows
    assert torch.equal(q1, q2) and torch.equal(s1, s2)
    assert bool(torch.isfinite(s1).all()) and bool((s1[:3] == 0).all()) and bool((s1[3:] > 0).all())
    assert bool((formats.unpack_residual(q1)[:3] == 0).all())


def test_residual_bits_variants_order():
    w = _heavy(16, 128)
    w_q = reference.ap_dequant(*quantize.quantize_ap(w, 3))
    errs = [_rel_err(w_q + quantize.residual_dequant(w, w_q, bits=b), w) for b in (2, 4, 8)]
    base = _rel_err(w_q, w)
    assert base > errs[0] > errs[1] > errs[2]


def test_full_dec_reduces_output_error():
    w = _heavy(64, 256, seed=11)
    x = torch.randn(8, 256, generator=_gen(12))
    qweight, lut = quantize.quantize_ap(w, 3)
    q_residual, scales = quantize.residual_cheatsheet(w, reference.ap_dequant(qweight, lut))
    cal = quantize.ThresholdCalibrator(256)
    cal.update(x)
    bounds = reference.bounds_from_thresholds(cal.thresholds, 1024)  # k_chunk=1024: every channel
    y_true = x @ w.t()
    y_q = reference.ap_gemv(x, qweight, lut)
    y_dec = reference.ap_gemv_dec(x, qweight, lut, q_residual, scales, bounds, 1024)
    err_q = float((y_q - y_true).square().sum())
    err_dec = float((y_dec - y_true).square().sum())
    assert err_dec < 0.2 * err_q
    # Partial DEC also helps, monotonically in k_chunk (on average over tokens).
    y_half = reference.ap_gemv_dec(x, qweight, lut, q_residual, scales, bounds, 256)
    err_half = float((y_half - y_true).square().sum())
    assert err_dec < err_half < err_q


def test_residual_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize.residual_cheatsheet(torch.randn(12, 32), torch.randn(12, 32))
    with pytest.raises(ValueError, match="same shape"):
        quantize.residual_cheatsheet(torch.randn(16, 32), torch.randn(16, 64))


# ---------------------------------------------------------------------------- thresholds
def test_thresholds_match_brute_force():
    g = _gen(21)
    cal = quantize.ThresholdCalibrator(96)
    batches = [torch.randn(2, 5, 96, generator=g).to(torch.bfloat16), torch.randn(7, 96, generator=g) * 3]
    for b in batches:
        cal.update(b)
    xs = torch.cat([b.reshape(-1, 96).float() for b in batches])
    expect = xs.abs().sort(1, descending=True).values.amax(0)
    assert cal.tokens == 17
    assert torch.equal(cal.thresholds, expect)
    assert bool((cal.thresholds[1:] <= cal.thresholds[:-1]).all())
    assert torch.allclose(cal.channel_energy, xs.square().mean(0))
    top = xs.abs().topk(6, dim=1).indices  # ceil(96 / 16) = 6
    assert torch.equal(cal.channel_hits, torch.bincount(top.flatten(), minlength=96))
    assert int(cal.channel_hits.sum()) == 17 * 6


def test_thresholds_chunked_update(monkeypatch):
    x = torch.randn(300, 64, generator=_gen(3))
    a = quantize.ThresholdCalibrator(64)
    a.update(x)
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 64 * 2 * 7)
    b = quantize.ThresholdCalibrator(64)
    b.update(x)
    assert torch.equal(a.thresholds, b.thresholds) and torch.equal(a.channel_hits, b.channel_hits)
    assert torch.allclose(a.channel_energy, b.channel_energy)


def test_thresholds_errors():
    cal = quantize.ThresholdCalibrator(32)
    with pytest.raises(RuntimeError, match="update"):
        cal.thresholds
    with pytest.raises(ValueError, match="in=32"):
        cal.update(torch.randn(4, 16))


# ---------------------------------------------------------------------------- device
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantizers_on_cuda_agree_with_cpu():
    w = _heavy(256, 512, seed=31)
    x = torch.randn(128, 512, generator=_gen(32))
    wc, xc = w.cuda(), x.cuda()
    qw, lut = quantize.quantize_ap(w, 3, channel_weight=x.square().mean(0))
    qw_c, lut_c = quantize.quantize_ap(wc, 3, channel_weight=xc.square().mean(0))
    assert qw_c.is_cuda and lut_c.is_cuda
    assert torch.allclose(lut_c.cpu(), lut, atol=1e-6)
    codes, codes_c = formats.unpack_bitplanes(qw), formats.unpack_bitplanes(qw_c.cpu())
    assert float((codes == codes_c).float().mean()) > 0.999
    bcq, bcq_c = quantize.quantize_lutgemm(w, 3, 128, x=x), quantize.quantize_lutgemm(wc, 3, 128, x=xc)
    deq, deq_c = quantize.dequantize_lutgemm(*bcq), quantize.dequantize_lutgemm(*(t.cpu() for t in bcq_c))
    assert float(((deq - deq_c).abs() < 1e-6).float().mean()) > 0.99  # clip ties may flip a group
    w_q = reference.ap_dequant(qw, lut)
    qr, sc = quantize.residual_cheatsheet(w, w_q)
    qr_c, sc_c = quantize.residual_cheatsheet(wc, w_q.cuda())
    assert float((sc_c.cpu() == sc).float().mean()) > 0.99
    cal, cal_c = quantize.ThresholdCalibrator(512), quantize.ThresholdCalibrator(512)
    cal.update(x)
    cal_c.update(xc)
    assert torch.equal(cal.thresholds, cal_c.thresholds)


# ---------------------------------------------------------------------------- AWQ scale search
def test_search_scale_never_worse_than_rtn_and_helps_with_outlier_channels():
    w = _gaussian(48, 256, seed=41)
    x = torch.randn(300, 256, generator=_gen(42))
    x[:, :8] *= 30.0  # a few salient input channels, as in real LLM activations
    s, ratio = quantize.search_scale(w, x, 3, 64)
    assert s.shape == (256,) and bool((s > 0).all())

    def out_err(scale):
        wq = quantize.dequantize_uniform(*quantize.quantize_uniform(w * scale, 3, 64)) / scale
        return float((x.double() @ (w - wq).double().t()).square().sum())

    assert ratio > 0
    assert out_err(s) < 0.9 * out_err(torch.ones(256))
    # Gram path (T > in) and direct path (T <= in) choose the same scales.
    s2, ratio2 = quantize.search_scale(w, x[:200], 3, 64)
    s3, ratio3 = quantize.search_scale(torch.cat([w, w]), torch.cat([x[:200]] * 2), 3, 64)
    assert ratio3 == ratio2 and torch.allclose(s2, s3)


def test_search_scale_bad_inputs():
    with pytest.raises(ValueError, match="x must be"):
        quantize.search_scale(torch.randn(8, 64), torch.randn(10, 32), 3, 32)
    with pytest.raises(ValueError, match="divide"):
        quantize.search_scale(torch.randn(8, 64), torch.randn(10, 64), 3, 48)


def test_ap_per_element_weights_match_per_channel_and_focus_error():
    w = _heavy(32, 128, seed=51)
    cw = torch.rand(128, generator=_gen(52)) + 0.05
    a = quantize.quantize_ap(w, 3, channel_weight=cw)
    b = quantize.quantize_ap(w, 3, channel_weight=cw.expand(32, 128))  # same weights, [out, in] form
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-7)
    fisher = torch.ones(32, 128)
    fisher[:, 64:] = 1e-3  # only the first half of every row matters
    wq_u = reference.ap_dequant(*quantize.quantize_ap(w, 3))
    wq_f = reference.ap_dequant(*quantize.quantize_ap(w, 3, channel_weight=fisher))
    # Same distribution in both halves, so the gain is modest but must be there, on the weighted
    # objective k-means minimizes and on the half that matters.
    assert (w - wq_f)[:, :64].square().sum() < 0.95 * (w - wq_u)[:, :64].square().sum()
    assert ((w - wq_f).square() * fisher).sum() < ((w - wq_u).square() * fisher).sum()
    with pytest.raises(ValueError, match=r"\[out=32, in=128\]"):
        quantize.quantize_ap(w, 3, channel_weight=torch.ones(16, 128))
