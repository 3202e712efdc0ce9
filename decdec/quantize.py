"""Quantizers: ap (weighted 1-D k-means), lutgemm (group RTN + clip search -> BCQ), the 4-bit
residual ("cheatsheet") and DEC's threshold calibration. Semantics: ``shared/DESIGN.md`` §2-3.

Every function takes the original weight ``w [out, in]`` (fp32 or castable) and works on
blocks of rows, so memory stays bounded for 14336x4096 or 4096x28672 matrices; nothing loops
over single rows in Python.
"""

from __future__ import annotations

import math

import torch

from decdec import formats, reference

# Elements processed at once per row block; about 16 MB per fp32 buffer.
CHUNK_ELEMENTS = 1 << 22
AP_ITERS = 30
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5  # AWQ's auto-clip tries ratios 1, 0.95, ..., 0.55
RESIDUAL_CANDIDATES = 32


def _check_weight(w: torch.Tensor, name: str = "w") -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {w.dtype}")
    w = w.to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or inf; quantize the original finite weight")
    return w


def _row_blocks(n_rows: int, row_len: int, per_row: int = 1, chunk_rows: int | None = None, multiple: int = 1):
    """Yield (start, stop) row ranges of at most ``CHUNK_ELEMENTS / (row_len * per_row)`` rows
    (or ``chunk_rows``), rounded to a multiple of ``multiple`` rows (at least one multiple)."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(1, row_len * per_row))
    chunk_rows = max(multiple, chunk_rows // multiple * multiple)
    for s in range(0, n_rows, chunk_rows):
        yield s, min(n_rows, s + chunk_rows)


# ============================================================================ ap (k-means)
def ap_codes(w: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid codes. w [out, in], lut [out, 2**b] sorted ascending -> codes [out, in] int64.

    A weight exactly halfway between two centroids takes the lower code.
    """
    w = _check_weight(w)
    if lut.dim() != 2 or lut.shape[0] != w.shape[0]:
        raise ValueError(f"lut must be [out={w.shape[0]}, 2**b], got shape {tuple(lut.shape)}")
    lut = lut.to(torch.float32)
    mids = ((lut[:, 1:] + lut[:, :-1]) / 2).contiguous()  # [out, K-1]
    codes = torch.empty(w.shape, dtype=torch.int64, device=w.device)
    for s, e in _row_blocks(*w.shape):
        codes[s:e] = torch.searchsorted(mids[s:e], w[s:e].contiguous())
    return codes


def _segment_sums(prefix: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """prefix [R, n] inclusive cumulative sums, bounds [R, K+1] in 0..n -> segment sums [R, K]
    (segment j is sorted positions ``bounds[j] .. bounds[j+1]-1``)."""
    p = prefix.gather(1, (bounds - 1).clamp_(min=0)) * (bounds > 0)  # sum of the first `bounds` items
    return p[:, 1:] - p[:, :-1]


def _kmeans_block(
    x: torch.Tensor, cw: torch.Tensor | None, k: int, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Lloyd k-means of each row of x [R, n]; element (r, i) weighs cw[i] (cw [n]) or
    cw[r, i] (cw [R, n]). -> (lut [R, k] fp32 ascending, codes [R, n] int64 == ap_codes(x, lut)).

    1-D clusters of nearest-centroid assignment are contiguous ranges of the sorted row, so after
    one sort per row every Lloyd step only needs k-1 binary searches and prefix-sum lookups per
    row (O(k log n), not O(n)). Prefix sums are float64 so the differences stay accurate.
    """
    r, n = x.shape
    xs, order = x.sort(dim=1)  # [R, n]
    xs = xs.contiguous()
    if cw is None:
        ws = torch.ones_like(xs, dtype=torch.float64)
    else:
        ws = (cw.gather(1, order) if cw.dim() == 2 else cw[order]).to(torch.float64)
    p0 = ws.cumsum(1)  # [R, n] weight mass
    p1 = (ws * xs.to(torch.float64)).cumsum(1)  # weighted sum

    first = torch.zeros(r, 1, dtype=torch.int64, device=x.device)
    last = torch.full((r, 1), n, dtype=torch.int64, device=x.device)
    # Init: split each sorted row at weighted quantiles into k bins of equal weight mass; the
    # weighted mean of each bin (the median element where a bin is empty) starts its centroid.
    # Bin means reach into the tails, where plain quantile points would not.
    total = p0[:, -1:]
    targets = total * torch.arange(1, k, dtype=torch.float64, device=x.device) / k  # [R, k-1]
    cuts = torch.searchsorted(p0, targets.contiguous()) + 1  # bins end after the crossing item
    cuts.clamp_(max=n)
    bounds = torch.cat([first, cuts, last], 1)
    s0 = _segment_sums(p0, bounds)
    centre = total * (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) / k  # [R, k]
    median = xs.gather(1, torch.searchsorted(p0, centre).clamp_(max=n - 1))
    c = torch.where(s0 > 0, _segment_sums(p1, bounds) / s0.clamp_min(1e-300), median.to(torch.float64))
    c = c.sort(dim=1).values
    for _ in range(iters):
        mids = ((c[:, 1:] + c[:, :-1]) / 2).to(torch.float32).contiguous()
        # Elements <= mid_j belong to clusters <= j (ties go to the lower centroid, as in ap_codes).
        b = torch.searchsorted(xs, mids, right=True)
        bounds = torch.cat([first, b, last], 1)  # [R, k+1]
        s0 = _segment_sums(p0, bounds)
        s1 = _segment_sums(p1, bounds)
        empty = bounds[:, 1:] == bounds[:, :-1]
        c = torch.where(empty, c, s1 / s0.clamp_min(1e-300))
        rows = empty.any(1).nonzero().flatten()
        if rows.numel():
            cw_rows = cw[rows] if cw is not None and cw.dim() == 2 else cw
            c[rows] = _reseed_empty(x[rows], cw_rows, c[rows], empty[rows])
        c = c.sort(dim=1).values
    lut = c.to(torch.float32)
    # Final nearest-centroid codes without a search per element: sorted position p has code
    # #{j : b_j <= p} with b_j = #{x <= mid_j}, exactly what ap_codes' searchsorted gives.
    mids = ((lut[:, 1:] + lut[:, :-1]) / 2).contiguous()
    b = torch.searchsorted(xs, mids, right=True)  # [R, k-1]
    marks = torch.zeros(r, n + 1, dtype=torch.int64, device=x.device)
    marks.scatter_add_(1, b, torch.ones_like(b))
    codes = torch.empty(r, n, dtype=torch.int64, device=x.device)
    codes.scatter_(1, order, marks[:, :n].cumsum(1))
    return lut, codes


def _reseed_empty(x: torch.Tensor, cw: torch.Tensor | None, c: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Move the first empty centroid of each row to the element with the largest weighted error.

    x [E, n], cw None, [n] or [E, n], c [E, k] float64, empty [E, k] bool -> new c [E, k].
    Rows whose elements all sit on a centroid (fewer distinct values than k) keep their
    centroids: there is nothing left to fit.
    """
    xd = x.to(torch.float64)
    cs = c.sort(dim=1).values
    mids = ((cs[:, 1:] + cs[:, :-1]) / 2).contiguous()
    near = cs.gather(1, torch.searchsorted(mids, xd.contiguous()))
    err = (xd - near).square()
    if cw is not None:
        err = err * cw.to(torch.float64)
    best_err, best = err.max(dim=1)
    j = empty.to(torch.int64).argmax(dim=1)  # first empty cluster
    new = c.clone()
    fill = best_err > 0
    rows = torch.arange(c.shape[0], device=c.device)
    new[rows[fill], j[fill]] = xd[rows[fill], best[fill]]
    return new


def quantize_ap(
    w: torch.Tensor,
    bits: int,
    channel_weight: torch.Tensor | None = None,
    iters: int = AP_ITERS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SqueezeLLM-style non-uniform quantization: per output row, weighted 1-D k-means.

    w [out, in] original weight (``in`` a multiple of 32); ``channel_weight [in]`` >= 0 is the
    sensitivity of each input channel (e.g. ``ThresholdCalibrator.channel_energy``, mean x_i^2),
    or ``[out, in]`` per-element sensitivities (SqueezeLLM's Fisher: squared gradients);
    None weighs all elements equally. Element (r, i) weighs ``channel_weight[i]`` (or ``[r, i]``),
    clamped to at least 1e-6 of the mean so dead channels still get a code.
    Init: the weighted means of 2**bits bins of equal weight mass (split at weighted quantiles);
    then exactly ``iters`` Lloyd steps; an empty cluster is re-seeded at the worst-fit element.

    Returns ``qweight [bits, out, in/32] int32`` (``formats.pack_bitplanes``) and
    ``lut [out, 2**bits] fp32`` sorted ascending per row; codes are nearest-centroid.
    """
    w = _check_weight(w)
    out, inp = w.shape
    if not 1 <= bits <= 8:
        raise ValueError(f"ap bits must be in 1..8, got {bits}")
    if inp % 32:
        raise ValueError(f"ap packs 32 codes per int32 word: in={inp} must be a multiple of 32")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    cw = None
    if channel_weight is not None:
        cw = channel_weight.detach().to(device=w.device, dtype=torch.float32)
        if tuple(cw.shape) not in ((inp,), (out, inp)):
            raise ValueError(
                f"channel_weight must be [in={inp}] (per channel) or [out={out}, in={inp}] (per element), "
                f"got shape {tuple(cw.shape)}"
            )
        if not bool(torch.isfinite(cw).all()) or bool((cw < 0).any()):
            raise ValueError("channel_weight must be finite and non-negative")
        mean = float(cw.mean())
        if mean <= 0:
            raise ValueError("channel_weight is all zeros; pass None for uniform weights")
        cw = cw.clamp_min(mean * 1e-6)
    k = 2**bits
    lut = torch.empty(out, k, dtype=torch.float32, device=w.device)
    qweight = torch.empty(bits, out, inp // 32, dtype=torch.int32, device=w.device)
    # The sort, the float64 prefix sums and gathers need ~8 buffers of the block.
    for s, e in _row_blocks(out, inp, per_row=4):
        lut[s:e], codes = _kmeans_block(w[s:e], cw if cw is None or cw.dim() == 1 else cw[s:e], k, iters)
        qweight[:, s:e] = formats.pack_bitplanes(codes, bits)
    return qweight, lut


def dequantize_ap(qweight: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """qweight [b, out, in/32] int32, lut [out, 2**b] -> W [out, in] (the reference's dequant)."""
    return reference.ap_dequant(qweight, lut)


# ============================================================================ uniform / lutgemm
def _check_group(inp: int, group_size: int, need_32: bool = False) -> int:
    if group_size <= 0 or inp % group_size:
        raise ValueError(f"group_size={group_size} must divide in={inp}")
    if need_32 and group_size % 32:
        raise ValueError(
            f"lutgemm packs 32 weights per word: group_size={group_size} must be a multiple of 32 "
            f"dividing in={inp} (e.g. 64 or 96 for SmolLM2's in=576)"
        )
    return inp // group_size


def _minmax(wg: torch.Tensor, bits: int, clip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """wg [..., gs] -> (scale, zero) [...] for asymmetric RTN with integer zero point.

    ``clip`` [...] in (0, 1] limits the range like AWQ's auto-clip: weights are clamped to
    ``±clip * max|w_g|`` before taking min and max.
    """
    qmax = 2**bits - 1
    lo = wg.amin(-1)
    hi = wg.amax(-1)
    if clip is not None:
        lim = wg.abs().amax(-1) * clip
        lo = torch.maximum(lo, -lim)
        hi = torch.minimum(hi, lim)
    # A (near-)constant group has no range: widen it to include 0 so the integer zero point and
    # the codes stay in range (an all-zero group then decodes exactly to 0).
    flat = (hi - lo) <= 1e-6 * torch.maximum(lo.abs(), hi.abs())
    lo = torch.where(flat, torch.minimum(lo, torch.zeros_like(lo)), lo)
    hi = torch.where(flat, torch.maximum(hi, torch.zeros_like(hi)), hi)
    span = hi - lo
    # Divide by a tensor, not a Python scalar: CUDA turns scalar division into a multiply by the
    # reciprocal, and CPU and GPU would then disagree by an ulp.
    scale = span / torch.tensor(float(qmax), device=span.device)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group
    # zero = round(qmax * (-lo / span)), not round(-lo / scale): a clipped group is symmetric
    # (-lo == hi) and sits exactly on the tie qmax/2, which only this form computes exactly.
    frac = torch.where(span > 0, -lo / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
    zero = (frac * qmax).round().clamp(0, qmax)
    return scale, zero


def _fake_quant(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """wg [..., gs], scale/zero [...] -> codes [..., gs] float (0..2**b-1)."""
    return (wg / scale.unsqueeze(-1)).round().add_(zero.unsqueeze(-1)).clamp_(0, 2**bits - 1)


def quantize_uniform(
    w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per output row and group of ``group_size`` input channels.

    w [out, in]; ``clip [out, in/group]`` optional range shrink factors in (0, 1] (from
    ``search_clip``). Returns ``q [out, in] int64`` codes in 0..2**bits-1 and
    ``scale, zero [out, in/group] fp32`` with ``W ~= scale * (q - zero)``. ``zero`` is an integer
    (stored as fp32), as in AWQ/GPTQ checkpoints; ``formats.uniform_to_bcq`` is exact for any zero.
    """
    w = _check_weight(w)
    out, inp = w.shape
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    ng = _check_group(inp, group_size)
    if clip is not None:
        clip = clip.to(torch.float32)
        if tuple(clip.shape) != (out, ng):
            raise ValueError(f"clip must be [out={out}, in/group={ng}], got {tuple(clip.shape)}")
        if bool((clip <= 0).any()) or bool((clip > 1).any()):
            raise ValueError("clip factors must lie in (0, 1]")
    q = torch.empty(out, inp, dtype=torch.int64, device=w.device)
    scale = torch.empty(out, ng, dtype=torch.float32, device=w.device)
    zero = torch.empty(out, ng, dtype=torch.float32, device=w.device)
    for s, e in _row_blocks(out, inp):
        wg = w[s:e].view(e - s, ng, group_size)
        sc, z = _minmax(wg, bits, None if clip is None else clip[s:e])
        q[s:e] = _fake_quant(wg, sc, z, bits).view(e - s, inp).to(torch.int64)
        scale[s:e], zero[s:e] = sc, z
    return q, scale, zero


def dequantize_uniform(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q [out, in], scale/zero [out, n_groups] -> W [out, in] fp32 = scale * (q - zero)."""
    out, inp = q.shape
    ng = scale.shape[1]
    qg = q.to(torch.float32).view(out, ng, inp // ng)
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).view(out, inp)


def clip_ratios(grid: int = CLIP_GRID, max_shrink: float = CLIP_MAX_SHRINK) -> torch.Tensor:
    """Candidate shrink factors ``1 - i/grid`` for ``i < grid*max_shrink`` (AWQ: 1.0 .. 0.55)."""
    n = max(1, int(grid * max_shrink))
    return 1.0 - torch.arange(n, dtype=torch.float32) / grid


def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    grid: int = CLIP_GRID,
    max_shrink: float = CLIP_MAX_SHRINK,
) -> torch.Tensor:
    """Activation-aware clipping (AWQ auto-clip) for ``quantize_uniform``.

    w [out, in], x [T, in] calibration activations (any float dtype; T tokens).
    For each (row, group) choose the factor among ``clip_ratios(grid, max_shrink)`` (1.0 included,
    so never worse than no clipping) minimizing ``||(W_g - Q(W_g)) x_g||^2`` summed over tokens.
    That objective is ``d^T G_g d`` with ``G_g = x_g^T x_g``, so all T tokens are used at a cost
    independent of T. Ties keep the larger factor. Returns ``clip [out, in/group] fp32``.
    """
    w = _check_weight(w)
    out, inp = w.shape
    ng = _check_group(inp, group_size)
    if x.dim() < 2 or x.shape[-1] != inp:
        raise ValueError(f"x must be [T, in={inp}] activations, got shape {tuple(x.shape)}")
    xf = x.reshape(-1, inp).to(device=w.device, dtype=torch.float64)
    xg = xf.view(-1, ng, group_size).transpose(0, 1)  # [ng, T, gs]
    gram = (xg.transpose(1, 2) @ xg).to(torch.float32)  # [ng, gs, gs]
    ratios = clip_ratios(grid, max_shrink)
    clip = torch.empty(out, ng, dtype=torch.float32, device=w.device)
    for s, e in _row_blocks(out, inp, per_row=2):
        wg = w[s:e].view(e - s, ng, group_size)
        best = torch.full((e - s, ng), math.inf, device=w.device)
        best_ratio = torch.ones(e - s, ng, device=w.device)
        for ratio in ratios.tolist():
            rt = torch.full((e - s, ng), ratio, device=w.device)
            sc, z = _minmax(wg, bits, rt)
            d = wg - (_fake_quant(wg, sc, z, bits) - z.unsqueeze(-1)) * sc.unsqueeze(-1)  # [R, ng, gs]
            dt = d.transpose(0, 1)  # [ng, R, gs]
            err = ((dt @ gram) * dt).sum(-1).t()  # [R, ng]
            better = err < best
            best = torch.where(better, err, best)
            best_ratio = torch.where(better, rt, best_ratio)
        clip[s:e] = best_ratio
    return clip


def search_scale(
    w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, grid: int = CLIP_GRID
) -> tuple[torch.Tensor, float]:
    """AWQ's activation-aware per-input-channel scale search (auto-scale) for group RTN.

    w [out, in] (a fused projection: all linears that read the same input, e.g. ``wqkv``),
    x [T, in] calibration activations. For ``ratio`` in ``i / grid`` (i < grid), candidate scales
    are ``s = mean_t|x|^ratio`` normalized by ``sqrt(max s * min s)``; the one minimizing
    ``||(W - Q(W diag(s)) diag(1/s)) x||^2`` over all tokens wins (ratio 0, s = 1, is plain RTN,
    so the result is never worse than RTN on the calibration objective). Cost grows with
    ``min(T, in)``: subsample tokens for speed.

    Returns ``(s [in] fp32, ratio)``. To use it, fold ``1/s`` into the op producing x (the RMSNorm
    weight, or the rows of the up half of ``w1w3`` for ``w2``) and quantize ``w * s`` with
    ``quantize_lutgemm(w * s, bits, group_size, x=x / s)``.
    """
    w = _check_weight(w)
    out, inp = w.shape
    ng = _check_group(inp, group_size)
    if x.dim() < 2 or x.shape[-1] != inp:
        raise ValueError(f"x must be [T, in={inp}] activations, got shape {tuple(x.shape)}")
    xf = x.reshape(-1, inp).to(device=w.device, dtype=torch.float32)
    x_mean = xf.abs().mean(0)
    # ||D x||^2 summed over tokens = tr(D G D^T): use the Gram matrix when it is the smaller operand.
    use_gram = xf.shape[0] > inp
    gram = (xf.double().t() @ xf.double()).float() if use_gram else None
    best_err, best_s, best_ratio = math.inf, torch.ones(inp, device=w.device), 0.0
    for i in range(grid):
        ratio = i / grid
        sc = x_mean.pow(ratio).clamp(min=1e-4)
        sc = sc / (sc.max() * sc.min()).sqrt()
        err = 0.0
        for s, e in _row_blocks(out, inp, per_row=3):
            ws = (w[s:e] * sc).view(e - s, ng, group_size)
            scale, zero = _minmax(ws, bits, None)
            wq = ((_fake_quant(ws, scale, zero, bits) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).view(e - s, inp) / sc
            d = w[s:e] - wq
            err += float(((d @ gram) * d).sum()) if use_gram else float((xf @ d.t()).square().sum())
        if err < best_err:
            best_err, best_s, best_ratio = err, sc, ratio
    return best_s.to(torch.float32), best_ratio


def quantize_lutgemm(
    w: torch.Tensor, bits: int, group_size: int = formats.BCQ_GROUP, x: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise uniform RTN (with ``search_clip`` when activations ``x [T, in]`` are given),
    converted exactly to binary coding.

    w [out, in]; ``group_size`` must divide ``in`` and be a multiple of 32.
    Returns ``binary [in/32, bits, out] int32``, ``alpha [in/group, bits, out] fp32``,
    ``q_bias [in/group, out] fp32`` (``formats.uniform_to_bcq``).
    """
    w = _check_weight(w)
    out, inp = w.shape
    ng = _check_group(inp, group_size, need_32=True)
    clip = None if x is None else search_clip(w, x, bits, group_size)
    binary = torch.empty(inp // 32, bits, out, dtype=torch.int32, device=w.device)
    alpha = torch.empty(ng, bits, out, dtype=torch.float32, device=w.device)
    q_bias = torch.empty(ng, out, dtype=torch.float32, device=w.device)
    # Row blocks keep the int64 codes and bit planes of a 28672x4096 matrix out of memory.
    for s, e in _row_blocks(out, inp, per_row=bits + 1):
        q, scale, zero = quantize_uniform(w[s:e], bits, group_size, None if clip is None else clip[s:e])
        binary[:, :, s:e], alpha[:, :, s:e], q_bias[:, s:e] = formats.uniform_to_bcq(q, scale, zero, bits)
    return binary, alpha, q_bias


def dequantize_lutgemm(binary: torch.Tensor, alpha: torch.Tensor, q_bias: torch.Tensor) -> torch.Tensor:
    """binary [in/32, b, out], alpha [n_groups, b, out], q_bias [n_groups, out] -> W [out, in]."""
    return reference.lutgemm_dequant(binary, alpha, q_bias)


# ============================================================================ residual
def _residual_levels(e: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e [R, in] fp32 -> (levels [R, in] int64 in -L..L, scale [R] fp32), L = 2**(bits-1) - 1.

    Grid search over ``max|e_r|/L * t/32, t=1..32`` minimizing the squared error of
    ``e - scale * clamp(round(e / scale), -L, L)``; the first (smallest) candidate wins ties.
    An all-zero row gets scale 0 and levels 0.

    The 32 errors are exact sums, not 32 passes over e: in a row sorted by |e|, the elements of
    level k form the range ``s*(k-1/2) <= |e| < s*(k+1/2)``, so with prefix sums of |e| and e^2
    each candidate costs L binary searches per row and its error is
    ``sum_k S2_k - 2 s k S1_k + s^2 k^2 N_k``. Sums are float64, so they are at least as exact
    as a direct fp32 sum (elements on a rounding boundary err the same at either level).
    """
    lmax = 2 ** (bits - 1) - 1
    r, n = e.shape
    a = e.abs().sort(dim=1).values  # [R, n] ascending
    amax = a[:, -1]  # [R]
    ad = a.to(torch.float64)
    zero = torch.zeros(r, 1, dtype=torch.float64, device=e.device)
    p1 = torch.cat([zero, ad.cumsum(1)], 1)  # [R, n+1]
    p2 = torch.cat([zero, ad.square().cumsum(1)], 1)
    # max|e|/L * t/32 as one fp32 multiply, so every device gets the same candidates.
    factor = (torch.arange(1, RESIDUAL_CANDIDATES + 1, dtype=torch.float64) / (lmax * RESIDUAL_CANDIDATES))
    cand = amax.unsqueeze(1) * factor.to(device=e.device, dtype=torch.float32)  # [R, 32] fp32, as stored
    k = torch.arange(lmax + 1, dtype=torch.float64, device=e.device)  # levels 0..L
    # Elements of level <= k: |e| < s*(k+1/2) (boundary ties have equal error either way).
    edges = cand.to(torch.float64).unsqueeze(2) * (k[:-1] + 0.5)  # [R, 32, L]
    idx = torch.searchsorted(ad, edges.view(r, -1).contiguous()).view(r, RESIDUAL_CANDIDATES, lmax)
    ends = torch.cat([torch.zeros_like(idx[..., :1]), idx, torch.full_like(idx[..., :1], n)], 2)  # [R, 32, L+2]

    def seg(p):  # sums of each level's range: [R, 32, L+1]
        v = p.gather(1, ends.view(r, -1)).view(r, RESIDUAL_CANDIDATES, lmax + 2)
        return v[..., 1:] - v[..., :-1]

    cnt = (ends[..., 1:] - ends[..., :-1]).to(torch.float64)
    sk = cand.to(torch.float64).unsqueeze(2) * k  # reconstruction s*k: [R, 32, L+1]
    err = (seg(p2) - 2 * sk * seg(p1) + sk.square() * cnt).sum(2)  # [R, 32]
    best_scale = cand.gather(1, err.argmin(1, keepdim=True)).squeeze(1)  # first minimum wins
    safe = best_scale.clamp_min(1e-30).unsqueeze(1)
    levels = (e / safe).round().clamp(-lmax, lmax)
    levels = torch.where(best_scale.unsqueeze(1) > 0, levels, torch.zeros_like(levels))
    return levels.to(torch.int64), best_scale


def residual_cheatsheet(
    w: torch.Tensor, w_q: torch.Tensor, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DecDEC's 4-bit residual of ``E = w - w_q``: per output row symmetric levels -7..7 with the
    scale grid-searched over ``max|E_r|/7 * t/32, t=1..32`` minimizing the fp32 squared error.

    w, w_q [out, in] (``out`` a multiple of 8). Returns ``q_residual [in, out/8] int32``
    (``formats.pack_residual``) and ``scales [out] fp32``; all-zero rows get scale 0.
    ``chunk_rows`` bounds the rows processed at once (default: ~4M elements per block).
    """
    w = _check_weight(w)
    w_q = _check_weight(w_q, "w_q")
    if w.shape != w_q.shape:
        raise ValueError(f"w {tuple(w.shape)} and w_q {tuple(w_q.shape)} must have the same shape")
    out, inp = w.shape
    if out % 8:
        raise ValueError(f"the residual packs 8 output rows per word: out={out} must be a multiple of 8")
    q_residual = torch.empty(inp, out // 8, dtype=torch.int32, device=w.device)
    scales = torch.empty(out, dtype=torch.float32, device=w.device)
    for s, e in _row_blocks(out, inp, per_row=4, chunk_rows=chunk_rows, multiple=8):
        lv, scales[s:e] = _residual_levels(w[s:e] - w_q[s:e], 4)
        q_residual[:, s // 8 : e // 8] = formats.pack_residual(lv)
    return q_residual, scales


def residual_dequant(w: torch.Tensor, w_q: torch.Tensor, bits: int = 4, chunk_rows: int | None = None) -> torch.Tensor:
    """Dequantized residual ``scale_r * level`` of ``E = w - w_q`` at 2..8 bits: [out, in] fp32.

    For analysis (2- and 8-bit variants): same per-row grid search with levels
    ``-(2**(bits-1)-1) .. 2**(bits-1)-1``; ``bits=4`` equals unpacking ``residual_cheatsheet``.
    """
    w = _check_weight(w)
    w_q = _check_weight(w_q, "w_q")
    if w.shape != w_q.shape:
        raise ValueError(f"w {tuple(w.shape)} and w_q {tuple(w_q.shape)} must have the same shape")
    if not 2 <= bits <= 8:
        raise ValueError(f"residual bits must be in 2..8, got {bits}")
    out, inp = w.shape
    res = torch.empty(out, inp, dtype=torch.float32, device=w.device)
    for s, e in _row_blocks(out, inp, per_row=4, chunk_rows=chunk_rows):
        lv, sc = _residual_levels(w[s:e] - w_q[s:e], bits)
        res[s:e] = lv.to(torch.float32) * sc.unsqueeze(1)
    return res


# ============================================================================ thresholds
class ThresholdCalibrator:
    """Running statistics of one linear's input activations for DEC.

    ``update(x)`` with x [..., in] (any float dtype; computed in fp32). After updates:
    ``thresholds [in] fp32``: ``thresholds[j]`` = max over tokens of the j-th largest |x|
    (non-increasing); ``channel_energy [in] fp32``: mean over tokens of x_i^2 (ap's
    ``channel_weight``); ``channel_hits [in] int64``: tokens in which channel i was among the
    top ``ceil(in/16)`` by |x| (for the static-selection ablation); ``tokens``: tokens seen.
    Statistics live on the CPU whatever the device of x.
    """

    def __init__(self, in_features: int):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.hit_k = -(-in_features // 16)
        self.tokens = 0
        self._max_sorted = torch.zeros(in_features, dtype=torch.float32)
        self._energy = torch.zeros(in_features, dtype=torch.float64)
        self._hits = torch.zeros(in_features, dtype=torch.int64)

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of x [..., in] (processed in blocks of rows to bound memory)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., in={self.in_features}], got shape {tuple(x.shape)}")
        xf = x.detach().reshape(-1, self.in_features)
        for s, e in _row_blocks(xf.shape[0], self.in_features, per_row=2):
            # Work on x's device (the GPU during a real calibration); only [in] vectors come back.
            blk = xf[s:e].to(torch.float32)
            if not bool(torch.isfinite(blk).all()):
                raise ValueError("activations contain NaN or inf")
            a = blk.abs()
            srt = a.sort(dim=1, descending=True).values
            torch.maximum(self._max_sorted, srt.amax(0).cpu(), out=self._max_sorted)
            self._energy += blk.to(torch.float64).square().sum(0).cpu()
            top = a.topk(self.hit_k, dim=1).indices.flatten()
            self._hits += torch.bincount(top, minlength=self.in_features).cpu()
        self.tokens += xf.shape[0]

    def _need(self) -> None:
        if self.tokens == 0:
            raise RuntimeError(
                "ThresholdCalibrator has seen no tokens; call update(x) with calibration activations first"
            )

    @property
    def thresholds(self) -> torch.Tensor:
        """[in] fp32, non-increasing."""
        self._need()
        return self._max_sorted.clone()

    @property
    def channel_energy(self) -> torch.Tensor:
        """[in] fp32 mean of x_i^2 over tokens."""
        self._need()
        return (self._energy / self.tokens).to(torch.float32)

    @property
    def channel_hits(self) -> torch.Tensor:
        """[in] int64 count of tokens where channel i was in the top ceil(in/16) by |x|."""
        self._need()
        return self._hits.clone()
