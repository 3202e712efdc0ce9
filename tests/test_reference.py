"""The pure-PyTorch oracle (decdec.reference) against dense math and DESIGN.md §2 written out by hand."""

from __future__ import annotations

import pytest
import torch

from decdec import formats, reference

CHUNK = 1024


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- builders
def _ap(out, inp, bits, seed, lut_dtype=torch.float32):
    """Random ap weights and their dense matrix (indexing written independently of the reference)."""
    g = _gen(seed)
    codes = torch.randint(0, 2**bits, (out, inp), generator=g)
    lut = torch.randn(out, 2**bits, generator=g).to(lut_dtype)
    dense = lut.to(torch.float32)[torch.arange(out).unsqueeze(1), codes]
    return formats.pack_bitplanes(codes, bits), lut, dense


def _lutgemm(out, inp, bits, group, seed, dtype=torch.float32):
    """Random BCQ weights and W[r, i] = sum_p alpha[g,p,r] * (2 bit - 1) + q_bias[g, r], looped by group."""
    g = _gen(seed)
    planes = torch.randint(0, 2, (bits, out, inp), generator=g, dtype=torch.uint8)
    n_groups = inp // group
    alpha = (torch.rand(n_groups, bits, out, generator=g) * 0.1).to(dtype)
    q_bias = (torch.randn(n_groups, out, generator=g) * 0.05).to(dtype)
    dense = torch.empty(out, inp)
    for gi in range(n_groups):
        cols = slice(gi * group, (gi + 1) * group)
        acc = q_bias[gi].float().unsqueeze(1).expand(out, group).clone()
        for p in range(bits):
            acc += alpha[gi, p].float().unsqueeze(1) * (2.0 * planes[p, :, cols].float() - 1.0)
        dense[:, cols] = acc
    return formats.pack_bcq(planes), alpha, q_bias, dense


def _residual(out, inp, seed):
    g = _gen(seed)
    levels = torch.randint(-7, 8, (out, inp), generator=g)
    scales = torch.rand(out, generator=g) * 0.01 + 1e-3
    return formats.pack_residual(levels), scales, levels.to(torch.float32) * scales.unsqueeze(1)


def _activations(m, inp, seed, ties=False):
    """LLM-like activations: a few outlier channels; with ties=True values repeat a lot."""
    g = _gen(seed)
    chan = torch.exp(torch.randn(inp, generator=g))
    x = torch.randn(m, inp, generator=g) * chan
    if ties:
        x = torch.round(x * 2) / 2
    return x


def _thresholds(calib: torch.Tensor) -> torch.Tensor:
    """DESIGN §2: thresholds[j] = max over tokens of the j-th largest |x|."""
    return calib.abs().sort(dim=1, descending=True).values.max(0).values


# ---------------------------------------------------------------------------- base GEMVs and dequant
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ap_dequant_is_lut_lookup(bits):
    qweight, lut, dense = _ap(24, 128, bits, seed=bits)
    w = reference.ap_dequant(qweight, lut)
    assert w.dtype == lut.dtype and w.shape == (24, 128)
    assert torch.equal(w, dense)


@pytest.mark.parametrize("group", [64, 128])
def test_lutgemm_dequant_matches_bcq_formula(group):
    binary, alpha, q_bias, dense = _lutgemm(32, 768, 3, group, seed=group)
    w = reference.lutgemm_dequant(binary, alpha, q_bias)
    assert w.shape == (32, 768) and w.dtype == torch.float32
    torch.testing.assert_close(w, dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [1, 5])
def test_ap_gemv_fp32_equals_dense(m):
    qweight, lut, dense = _ap(48, 576, 3, seed=11)
    x = torch.randn(m, 576, generator=_gen(12))
    y = reference.ap_gemv(x, qweight, lut)
    assert y.shape == (m, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y, x.double().matmul(dense.double().t()).float(), rtol=1e-5, atol=1e-5)


def test_cpu_weight_cache_returns_the_same_values_and_follows_changes(monkeypatch):
    """The CPU reference keeps fp32 W between calls: the same result as without it; an in-place change of the LUT or
    of qweight, or a new LUT tensor, is seen at once; the entry goes with its qweight; a budget of 0 keeps nothing;
    lutgemm's W likewise follows an in-place change of alpha."""
    import gc

    qw, lut, dense = _ap(48, 64, 3, seed=5)
    x = torch.randn(2, 64, generator=_gen(6))
    y = reference.ap_gemv(x, qw, lut)
    torch.testing.assert_close(y, x @ dense.t(), rtol=1e-5, atol=1e-5)
    assert reference._W_CACHE.get(id(qw)) is not None and reference.cpu_weight_cache_bytes() >= 48 * 64 * 4
    assert torch.equal(reference.ap_gemv(x, qw, lut), y)  # from the cache
    lut.mul_(2.0)  # in place: version counter
    torch.testing.assert_close(reference.ap_gemv(x, qw, lut), 2 * y, rtol=1e-5, atol=1e-5)
    lut2 = lut / 2.0  # another tensor with the first values
    torch.testing.assert_close(reference.ap_gemv(x, qw, lut2), y, rtol=1e-5, atol=1e-5)
    qw[0, 0, 0] ^= 1  # flip one bit of row 0's code of channel 0: only that output row changes
    y2 = reference.ap_gemv(x, qw, lut2)
    assert not torch.equal(y2[:, 0], y[:, 0]) and torch.allclose(y2[:, 1:], y[:, 1:], rtol=1e-5, atol=1e-5)
    key = id(qw)
    del qw
    gc.collect()
    assert key not in reference._W_CACHE
    monkeypatch.setenv("DECDEC_CPU_WEIGHT_CACHE_MB", "0")
    qw3, lut3, dense3 = _ap(16, 32, 3, seed=7)
    torch.testing.assert_close(reference.ap_gemv(x[:, :32], qw3, lut3), x[:, :32] @ dense3.t(), rtol=1e-5, atol=1e-5)
    assert id(qw3) not in reference._W_CACHE
    q_small, s_small, _ = _residual(16, 32, seed=13)  # DEC's rows unpacked alone when the levels are not kept
    r_small = torch.tensor([1, 30])
    assert torch.equal(reference.residual_rows(q_small, s_small, r_small),
                       formats.unpack_residual(q_small[r_small]).t().float() * s_small.float())
    assert id(q_small) not in reference._W_CACHE
    monkeypatch.delenv("DECDEC_CPU_WEIGHT_CACHE_MB")
    binary, alpha, q_bias, dense = _lutgemm(24, 128, 3, 64, seed=8)
    x = torch.randn(1, 128, generator=_gen(9))
    y = reference.lutgemm_gemv(x, binary, alpha, q_bias)
    torch.testing.assert_close(y, x @ dense.t(), rtol=1e-4, atol=1e-4)
    assert id(binary) in reference._W_CACHE and torch.equal(reference.lutgemm_gemv(x, binary, alpha, q_bias), y)
    alpha.mul_(0.5)
    q_bias.mul_(0.5)  # W scales by 0.5
    torch.testing.assert_close(reference.lutgemm_gemv(x, binary, alpha, q_bias), 0.5 * y, rtol=1e-4, atol=1e-4)
    q_res, scales, _ = _residual(40, 64, seed=12)  # DEC's residual rows from the kept int8 levels
    rows = torch.tensor([3, 0, 63, 17])
    want = formats.unpack_residual(q_res[rows]).t().float() * scales.float()
    assert torch.equal(reference.residual_rows(q_res, scales, rows), want) and id(q_res) in reference._W_CACHE
    q_res[3] ^= 0x11111111  # in place: the levels follow
    want = formats.unpack_residual(q_res[rows]).t().float() * scales.float()
    assert torch.equal(reference.residual_rows(q_res, scales, rows), want)
    for dt in (torch.float16, torch.bfloat16):  # the dequant ops' CPU form: a fresh W in the LUT's / alphas' dtype
        qw4, lut4, _ = _ap(8, 64, 4, seed=10, lut_dtype=dt)
        w = reference.ap_dequant_kept(qw4, lut4)
        assert w.dtype == dt and torch.equal(w, reference.ap_dequant(qw4, lut4))
        w.zero_()  # the caller's own tensor: the kept W is untouched
        assert torch.equal(reference.ap_dequant_kept(qw4, lut4), reference.ap_dequant(qw4, lut4))
        b5, a5, q5, _ = _lutgemm(16, 128, 2, 64, seed=11, dtype=dt)
        assert torch.equal(reference.lutgemm_dequant_kept(b5, a5, q5), reference.lutgemm_dequant(b5, a5, q5))


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("group", [64, 128])
def test_lutgemm_gemv_fp32_equals_dense(m, group):
    binary, alpha, q_bias, dense = _lutgemm(40, 1152, 4, group, seed=group + m)
    x = torch.randn(m, 1152, generator=_gen(13))
    y = reference.lutgemm_gemv(x, binary, alpha, q_bias)
    assert y.shape == (m, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, x.double().matmul(dense.double().t()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gemvs_within_tolerance(dtype):
    qweight, lut, ap_dense = _ap(48, 576, 4, seed=21, lut_dtype=dtype)
    binary, alpha, q_bias, lg_dense = _lutgemm(48, 576, 3, 64, seed=22, dtype=dtype)
    x = torch.randn(3, 576, generator=_gen(23)).to(dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    y = reference.ap_gemv(x, qweight, lut)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), x.float() @ ap_dense.t(), **tol)
    y = reference.lutgemm_gemv(x, binary, alpha, q_bias)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), x.float() @ lg_dense.t(), **tol)


# ---------------------------------------------------------------------------- buckets
def test_bucket_floors_hand_example():
    floors = reference.bucket_floors(torch.tensor([30.0, 15.0]))
    expect = [30.0 - i for i in range(16)] + [15.0 * (31 - i) / 16 for i in range(16, 32)]
    assert floors.dtype == torch.float32
    assert floors.tolist() == expect


def test_bucket_floors_follow_design_formulas():
    g = _gen(31)
    for _ in range(300):
        a = float(torch.rand(1, generator=g)) * 20
        b = a * float(torch.rand(1, generator=g))
        f = reference.bucket_floors(torch.tensor([a, b]))
        a32, b32 = torch.tensor(a).item(), torch.tensor(b, dtype=torch.float32).item()
        assert f.shape == (32,)
        assert f[0].item() == torch.tensor(a, dtype=torch.float32).item()
        assert f[15].item() == b32  # exact: a threshold value |x| == b is in bucket 15
        assert f[31].item() == 0.0
        assert bool((f[1:] <= f[:-1]).all()), f
        design = [a + (b - a) * i / 15 for i in range(16)] + [b * (31 - i) / 16 for i in range(16, 32)]
        torch.testing.assert_close(f.double(), torch.tensor(design, dtype=torch.float64), rtol=1e-6, atol=1e-6 * a32)


def test_bucket_floors_degenerate_bounds():
    f = reference.bucket_floors(torch.tensor([2.0, 2.0]))  # a == b: buckets 1..15 are empty
    assert torch.equal(f[:16], torch.full((16,), 2.0))
    f = reference.bucket_floors(torch.tensor([3.0, 0.0]))  # b == 0
    assert torch.equal(f[16:], torch.zeros(16)) and f[0] == 3.0 and f[15] == 0.0


def test_bucket_index_boundaries():
    bounds = torch.tensor([30.0, 15.0])
    x = torch.tensor([1e30, 30.0, -30.0, 29.999, 29.0, 15.0, 14.0625, 14.06, 0.9375, 0.9, 1e-7, 0.0, -0.0])
    expect = [0, 0, 0, 1, 1, 15, 16, 17, 30, 31, 31, 31, 31]
    assert reference.bucket_index(x, bounds).tolist() == expect


def test_bucket_index_follows_bounds_changed_in_place():
    """The sorted floors kept between calls (``_cpu_weight``) follow an in-place change of bounds, both ways
    between the binary search (a >= b) and the direct count (a < b, floors not monotone)."""
    x = torch.tensor([[40.0, 30.0, 20.0, 10.0, 5.0, 1.0]])
    bounds = torch.tensor([30.0, 15.0])
    for new in ([30.0, 15.0], [10.0, 2.0], [2.0, 10.0], [30.0, 15.0]):
        bounds.copy_(torch.tensor(new))
        want = (reference.bucket_floors(bounds) > x.abs().unsqueeze(-1)).sum(-1)  # the definition
        assert torch.equal(reference.bucket_index(x, bounds), want), new


def test_bucket_index_at_b_for_awkward_bounds():
    # bounds where a + (b - a) * 15 / 15 != b in fp32: |x| == b must still be bucket 15
    g = _gen(32)
    for _ in range(200):
        a = torch.rand(1, generator=g) * 10
        b = a * torch.rand(1, generator=g)
        assert reference.bucket_index(b, torch.cat([a, b])).item() == 15


def test_bucket_index_is_the_interval_definition():
    x = _activations(4, 700, seed=33)
    bounds = torch.tensor([x.abs().max().item() * 0.8, x.abs().median().item()])
    floors = reference.bucket_floors(bounds)
    idx = reference.bucket_index(x, bounds)
    ax = x.abs()
    assert bool((floors[idx] <= ax).all())
    upper = torch.where(idx > 0, floors[(idx - 1).clamp(min=0)], torch.tensor(float("inf")))
    assert bool((ax < upper).all())


# ---------------------------------------------------------------------------- selection
def _brute_force_select(x: torch.Tensor, bounds: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """DESIGN §2 literally: per token, per chunk, bucket by bucket from 0, lowest indices first."""
    floors = reference.bucket_floors(bounds).tolist()
    m, n = x.shape
    mask = torch.zeros(m, n, dtype=torch.bool)
    for t in range(m):
        for s in range(0, n, CHUNK):
            ax = x[t, s : s + CHUNK].abs().float()
            quota = k_chunk * len(ax) // CHUNK
            for i in range(32):
                if quota == 0:
                    break
                upper = float("inf") if i == 0 else floors[i - 1]
                members = ((ax >= floors[i]) & (ax < upper)).nonzero().flatten()[:quota]
                mask[t, s + members] = True
                quota -= len(members)
    return mask


def _check_selection_property(x, bounds, k_chunk, mask):
    bucket = reference.bucket_index(x, bounds)
    m, n = x.shape
    for t in range(m):
        for s in range(0, n, CHUNK):
            sel, bk = mask[t, s : s + CHUNK], bucket[t, s : s + CHUNK]
            quota = k_chunk * len(sel) // CHUNK
            assert int(sel.sum()) == quota
            if quota == 0:
                continue
            overflow = int(bk[sel].max())
            assert bool(sel[bk < overflow].all())  # every strictly higher bucket fully taken
            assert not bool(sel[bk > overflow].any())  # nothing from a lower one
            ov = (bk == overflow).nonzero().flatten()
            taken = int(sel[ov].sum())
            assert bool(sel[ov[:taken]].all())  # reference: lowest indices of the overflow bucket


@pytest.mark.parametrize("inp", [576, 2304, 1024])
@pytest.mark.parametrize("k_chunk", [0, 1, 8, 37, 256, 1023, 1024])
@pytest.mark.parametrize("ties", [False, True])
def test_select_channels_matches_brute_force(inp, k_chunk, ties):
    x = _activations(3, inp, seed=inp + k_chunk, ties=ties)
    calib = _activations(16, inp, seed=inp + k_chunk + 1, ties=ties)
    bounds = reference.bounds_from_thresholds(_thresholds(calib), max(k_chunk, 1))
    mask = reference.select_channels(x, bounds, k_chunk)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert torch.equal(mask, _brute_force_select(x, bounds, k_chunk))
    _check_selection_property(x, bounds, k_chunk, mask)


def test_select_channels_ragged_counts():
    x = _activations(2, 2304, seed=41)
    bounds = torch.tensor([5.0, 1.0])
    mask = reference.select_channels(x, bounds, 100)
    assert mask[:, :1024].sum(1).tolist() == [100, 100]
    assert mask[:, 1024:2048].sum(1).tolist() == [100, 100]
    assert mask[:, 2048:].sum(1).tolist() == [25, 25]  # floor(100 * 256 / 1024)
    assert reference.select_channels(_activations(2, 576, seed=42), bounds, 100).sum(1).tolist() == [56, 56]


def test_select_channels_all_equal_takes_lowest_indices():
    x = torch.ones(1, 2304)
    mask = reference.select_channels(x, torch.tensor([2.0, 1.5]), 8)
    expect = torch.zeros(2304, dtype=torch.bool)
    expect[0:8] = expect[1024:1032] = expect[2048:2050] = True
    assert torch.equal(mask[0], expect)


def test_select_channels_extremes():
    x = _activations(3, 2304, seed=43)
    bounds = torch.tensor([3.0, 1.0])
    assert not reference.select_channels(x, bounds, 0).any()
    assert reference.select_channels(x, bounds, 1024).all()


def test_chunk_quotas_and_k_total():
    assert reference.chunk_quotas(100, 2304) == [100, 100, 25]
    assert reference.chunk_quotas(8, 576) == [4]
    assert reference.chunk_quotas(1, 576) == [0]
    assert reference.k_total(8, 2304) == 18
    assert reference.k_total(1024, 576) == 576


def test_bounds_from_thresholds_picks_first_and_kth():
    t = torch.linspace(10.0, 0.0, 2304)
    assert reference.bounds_from_thresholds(t, 8).tolist() == [t[0].item(), t[17].item()]  # k = 18
    assert reference.bounds_from_thresholds(t, 1024).tolist() == [t[0].item(), t[-1].item()]
    t = torch.linspace(4.0, 1.0, 576, dtype=torch.float16)
    b = reference.bounds_from_thresholds(t, 64)  # k = 36
    assert b.dtype == torch.float32 and b.tolist() == [t[0].item(), t[35].item()]
    assert reference.bounds_from_thresholds(t, 1).tolist() == [t[0].item(), t[0].item()]  # k = 0 -> clamps to 1


# ---------------------------------------------------------------------------- DEC
def _dec_setup(inp=2304, out=64, m=3, seed=50):
    qweight, lut, dense = _ap(out, inp, 3, seed=seed)
    binary, alpha, q_bias, lg_dense = _lutgemm(out, inp, 3, 128 if inp % 128 == 0 else 64, seed=seed + 1)
    q_residual, scales, r_dense = _residual(out, inp, seed=seed + 2)
    x = _activations(m, inp, seed=seed + 3)
    thresholds = _thresholds(_activations(32, inp, seed=seed + 4))
    return dict(qweight=qweight, lut=lut, dense=dense, binary=binary, alpha=alpha, q_bias=q_bias,
                lg_dense=lg_dense, q_residual=q_residual, scales=scales, r_dense=r_dense, x=x,
                thresholds=thresholds)


def test_k_chunk_zero_is_bit_identical_to_base():
    d = _dec_setup()
    bounds = reference.bounds_from_thresholds(d["thresholds"], 1)
    for dtype in (torch.float32, torch.bfloat16):
        x = d["x"].to(dtype)
        assert torch.equal(reference.ap_gemv_dec(x, d["qweight"], d["lut"], d["q_residual"], d["scales"], bounds, 0),
                           reference.ap_gemv(x, d["qweight"], d["lut"]))
        assert torch.equal(
            reference.lutgemm_gemv_dec(x, d["binary"], d["alpha"], d["q_bias"], d["q_residual"], d["scales"], bounds, 0),
            reference.lutgemm_gemv(x, d["binary"], d["alpha"], d["q_bias"]))
        z = reference.dec(x, d["q_residual"], d["scales"], bounds, 0)
        assert z.dtype == dtype and not z.any()


def test_k_chunk_1024_adds_whole_residual():
    d = _dec_setup()
    x = d["x"]
    bounds = reference.bounds_from_thresholds(d["thresholds"], 1024)
    want_ap = x @ (d["dense"] + d["r_dense"]).t()
    want_lg = x @ (d["lg_dense"] + d["r_dense"]).t()
    y = reference.ap_gemv_dec(x, d["qweight"], d["lut"], d["q_residual"], d["scales"], bounds, 1024)
    torch.testing.assert_close(y, want_ap, rtol=1e-4, atol=1e-4)
    y = reference.lutgemm_gemv_dec(x, d["binary"], d["alpha"], d["q_bias"], d["q_residual"], d["scales"], bounds, 1024)
    torch.testing.assert_close(y, want_lg, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inp", [576, 2304])
@pytest.mark.parametrize("k_chunk", [8, 100])
def test_dec_equals_masked_dense_residual(inp, k_chunk):
    d = _dec_setup(inp=inp, seed=inp + k_chunk)
    x = d["x"]
    bounds = reference.bounds_from_thresholds(d["thresholds"], k_chunk)
    mask = _brute_force_select(x, bounds, k_chunk)
    want = (x * mask) @ d["r_dense"].t()
    got = reference.dec(x, d["q_residual"], d["scales"], bounds, k_chunk)
    assert got.dtype == torch.float32 and got.shape == (3, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    y = reference.ap_gemv_dec(x, d["qweight"], d["lut"], d["q_residual"], d["scales"], bounds, k_chunk)
    torch.testing.assert_close(y, x @ d["dense"].t() + want, rtol=1e-4, atol=1e-4)
    y = reference.lutgemm_gemv_dec(x, d["binary"], d["alpha"], d["q_bias"], d["q_residual"], d["scales"], bounds, k_chunk)
    torch.testing.assert_close(y, x @ d["lg_dense"].t() + want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dec_half_precision_within_tolerance(dtype):
    d = _dec_setup(inp=576, seed=60)
    bounds = reference.bounds_from_thresholds(d["thresholds"], 64)
    x = d["x"].to(dtype)
    want = reference.ap_gemv_dec(x.float(), d["qweight"], d["lut"], d["q_residual"], d["scales"], bounds, 64)
    got = reference.ap_gemv_dec(x, d["qweight"], d["lut"], d["q_residual"], d["scales"], bounds, 64)
    assert got.dtype == dtype
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=5e-3)
    torch.testing.assert_close(got.float(), want, **tol)


def _rtn_ap(w: torch.Tensor, bits: int):
    """Crude per-row asymmetric RTN, expressed as an ap LUT (centroids = the uniform grid)."""
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    step = (hi - lo) / (2**bits - 1)
    codes = torch.round((w - lo) / step).clamp(0, 2**bits - 1).to(torch.int64)
    lut = lo + step * torch.arange(2**bits, dtype=torch.float32)
    return formats.pack_bitplanes(codes, bits), lut, lut.gather(1, codes)


def _quantize_residual(e: torch.Tensor):
    """DESIGN §2: per row symmetric -7..7, scale = max|E_r|/7 * t/32 (t = 1..32) minimizing squared error."""
    best_err = torch.full((e.shape[0],), float("inf"))
    best_scale = torch.zeros(e.shape[0])
    base = e.abs().max(1).values / 7
    for t in range(1, 33):
        s = (base * t / 32).clamp(min=1e-12)
        err = ((torch.round(e / s[:, None]).clamp(-7, 7) * s[:, None] - e) ** 2).sum(1)
        better = err < best_err
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, s, best_scale)
    levels = torch.round(e / best_scale[:, None]).clamp(-7, 7).to(torch.int64)
    return formats.pack_residual(levels), best_scale


def test_dec_error_shrinks_monotonically_with_k_chunk():
    g = _gen(70)
    out, inp = 128, 2304
    w = torch.randn(out, inp, generator=g) * 0.02
    qweight, lut, wq = _rtn_ap(w, 3)
    q_residual, scales = _quantize_residual(w - wq)
    thresholds = _thresholds(_activations(64, inp, seed=71))
    x = _activations(16, inp, seed=72)
    exact = x @ w.t()
    errors = []
    for k_chunk in [0, 4, 16, 64, 256, 1024]:
        bounds = reference.bounds_from_thresholds(thresholds, max(k_chunk, 1))
        y = reference.ap_gemv_dec(x, qweight, lut, q_residual, scales, bounds, k_chunk)
        errors.append((y - exact).norm(dim=1).mean().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * errors[0], errors  # 4-bit residual removes most of a 3-bit error
