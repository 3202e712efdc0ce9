"""Pure-PyTorch oracle of every DecDEC op (DESIGN.md §2-3). Runs on any device; the CPU kernels
of ``decdec.ops`` are these functions and the CUDA kernels are tested against them.

Shapes: ``x [M, in]`` (M tokens; decode has M = 1), outputs ``[M, out]`` in ``x.dtype``.
All arithmetic is fp32; the result is cast once at the end.
"""

from __future__ import annotations

import os
import weakref

import torch

from decdec import formats

CHUNK = 1024  # DEC selects per chunk of 1024 input channels
N_BUCKETS = 32


# ---------------------------------------------------------------------------- base weights
def ap_dequant(qweight: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """qweight [b, out, in/32] int32 (or a 3-bit layout of the kernels': [out, in/256, 3, 8], [out/16, in/512, 6, 32, 4]),
    lut [out, 2**b] -> W [out, in] in lut.dtype."""
    if formats.is_ap3_kernel_layout(qweight, lut):
        qweight = formats.unpack_ap3_kernel(qweight)
    elif formats.is_ap3_bmma_layout(qweight, lut):
        qweight = formats.unpack_ap3_bmma(qweight)
    codes = formats.unpack_bitplanes(qweight)  # [out, in]
    return torch.gather(lut, 1, codes)


def lutgemm_dequant(binary: torch.Tensor, alpha: torch.Tensor, q_bias: torch.Tensor) -> torch.Tensor:
    """binary [in/32, b, out], alpha [n_groups, b, out], q_bias [n_groups, out] -> W [out, in].

    ``sum_p alpha_p (2 bit_p - 1) + q_bias = 2 sum_p alpha_p bit_p + (q_bias - sum_p alpha_p)``,
    evaluated per group without materializing repeated alphas.
    """
    bits = formats.unpack_bcq(binary)  # [b, out, in] uint8
    n_bits, out, inp = bits.shape
    groups = alpha.shape[0]
    a = alpha.to(torch.float32).permute(1, 2, 0).unsqueeze(-1)  # [b, out, G, 1]
    acc = torch.zeros(out, groups, inp // groups, dtype=torch.float32, device=binary.device)
    for p in range(n_bits):
        acc += bits[p].view(out, groups, -1) * a[p]
    offset = (q_bias.to(torch.float32).t() - alpha.to(torch.float32).sum(1).t()).unsqueeze(-1)  # [out, G, 1]
    return (2 * acc + offset).view(out, inp).to(alpha.dtype)


# The fp32 W of CPU projections (and DEC's int8 residual levels and sorted bucket floors), kept between calls: without
# it every CPU decode step unpacks all weights' bit-planes (ap) or binary codes (lutgemm) again (70 % of the embedded
# model's decode step, docs/PERF.md "CPU"). One entry per live quantized tensor (dropped with it), valid while the
# tensors are the same objects, unmodified (version counters); DECDEC_CPU_WEIGHT_CACHE_MB (default 2048) bounds the
# total, past it the values are recomputed per call. The values are the same either way.
_W_CACHE: dict[int, tuple] = {}


def cpu_weight_cache_bytes() -> int:
    """Bytes the CPU reference keeps between calls (``_cpu_weight``)."""
    return sum(e[2].numel() * e[2].element_size() for e in _W_CACHE.values())


def _cpu_weight(dequant, *tensors: torch.Tensor, nbytes: int | None = None) -> torch.Tensor | None:
    """dequant(*tensors) (a W), from the cache above when the tensors are on the CPU (never modify the result). With
    ``nbytes`` (the result's size): None instead of computing a result that would not be kept, for a caller that
    needs only part of it and can compute that part alone."""
    first = tensors[0]
    if first.device.type != "cpu" or torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
        return None if nbytes is not None else dequant(*tensors)
    key, stamp = id(first), tuple(t._version for t in tensors)
    e = _W_CACHE.get(key)
    if e is not None and len(e[0]) == len(tensors) and all(r() is t for r, t in zip(e[0], tensors)) and e[1] == stamp:
        return e[2]
    budget = int(os.environ.get("DECDEC_CPU_WEIGHT_CACHE_MB", "2048")) << 20
    room = budget - cpu_weight_cache_bytes() + (e[2].numel() * e[2].element_size() if e is not None else 0)
    if nbytes is not None and nbytes > room:
        _W_CACHE.pop(key, None)  # stale, and the new one would not fit
        return None
    w = dequant(*tensors)
    if w.numel() * w.element_size() <= room:
        if e is None:
            weakref.finalize(first, _W_CACHE.pop, key, None)
        _W_CACHE[key] = (tuple(weakref.ref(t) for t in tensors), stamp, w)
    elif e is not None:
        del _W_CACHE[key]  # stale, and the new W does not fit
    return w


def _ap_w(qweight: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    return ap_dequant(qweight, lut.to(torch.float32))


def _lutgemm_w(binary: torch.Tensor, alpha: torch.Tensor, q_bias: torch.Tensor) -> torch.Tensor:
    return lutgemm_dequant(binary, alpha.to(torch.float32), q_bias.to(torch.float32))


def ap_dequant_kept(qweight: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """ap_dequant (a new tensor in lut.dtype), from the CPU cache above (the CPU ``ap_dequant`` op: prefill)."""
    return _cpu_weight(_ap_w, qweight, lut).to(lut.dtype, copy=True)


def lutgemm_dequant_kept(binary: torch.Tensor, alpha: torch.Tensor, q_bias: torch.Tensor) -> torch.Tensor:
    """lutgemm_dequant (a new tensor in alpha.dtype), from the CPU cache above (the CPU ``lutgemm_dequant`` op)."""
    return _cpu_weight(_lutgemm_w, binary, alpha, q_bias).to(alpha.dtype, copy=True)


def ap_gemv(x: torch.Tensor, qweight: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    w = _cpu_weight(_ap_w, qweight, lut)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)


def lutgemm_gemv(x: torch.Tensor, binary: torch.Tensor, alpha: torch.Tensor, q_bias: torch.Tensor) -> torch.Tensor:
    w = _cpu_weight(_lutgemm_w, binary, alpha, q_bias)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)


# ---------------------------------------------------------------------------- DEC selection
def k_total(k_chunk: int, in_features: int) -> int:
    """Residual rows selected in total for one token: floor(k_chunk * in / 1024)."""
    return k_chunk * in_features // CHUNK


def chunk_quotas(k_chunk: int, in_features: int) -> list[int]:
    """Rows each 1024-channel chunk selects; a ragged last chunk of length L gets floor(k*L/1024)."""
    lengths = [min(CHUNK, in_features - s) for s in range(0, in_features, CHUNK)]
    return [k_chunk * n // CHUNK for n in lengths]


def bounds_from_thresholds(thresholds: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """The two bucket boundaries ``[a, b]`` (fp32): ``a = thresholds[0]``, ``b = thresholds[k-1]``."""
    k = max(k_total(k_chunk, thresholds.numel()), 1)
    t = thresholds.to(torch.float32)
    return torch.stack([t[0], t[k - 1]])


def bucket_floors(bounds: torch.Tensor) -> torch.Tensor:
    """bounds [2] fp32 -> floors [32] fp32; the kernels evaluate these exact fp32 expressions:
    ``floor_i = a + ((b - a) * i) / 15`` for i < 15, ``floor_15 = b`` exactly (the formula at
    i = 15 misses b by an ulp in ~30 % of fp32 cases, which would push ``|x| == b`` -- a calibrated
    threshold value -- out of bucket 15), ``floor_i = (b * (31 - i)) / 16`` for i >= 16.
    """
    a, b = bounds[0].to(torch.float32), bounds[1].to(torch.float32)
    i = torch.arange(15, dtype=torch.float32, device=bounds.device)
    upper = a + ((b - a) * i) / 15.0
    lower = (b * (31.0 - torch.arange(16, 32, dtype=torch.float32, device=bounds.device))) / 16.0
    return torch.cat([upper, b.reshape(1), lower])


def _ascending_floors(bounds: torch.Tensor) -> torch.Tensor:
    """The floors in ascending order where they are non-increasing (the usual case, a >= b >= 0), else empty."""
    floors = bucket_floors(bounds)
    return floors.flip(0).contiguous() if bool((floors[:-1] >= floors[1:]).all()) else floors[:0]


def bucket_index(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Bucket of each channel: ``#{i : floor_i > |x|}`` (0 = largest values, 31 = smallest)."""
    ax = x.to(torch.float32).abs()
    ascending = _cpu_weight(_ascending_floors, bounds)  # a layer's bounds stay put between decode steps
    if ascending.numel():  # a binary search
        return N_BUCKETS - torch.searchsorted(ascending, ax.contiguous(), right=True)
    return (bucket_floors(bounds) > ax.unsqueeze(-1)).sum(-1)


def select_channels(x: torch.Tensor, bounds: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """DEC's channel selection. x [M, in] -> bool mask [M, in].

    Per chunk, buckets are taken from 0 downward until the chunk's quota is full; inside the
    bucket that overflows the lowest channel indices win (the kernel's choice there is free).
    That is: the quota channels of the chunk with the smallest (bucket, index) pairs.
    """
    m, n = x.shape
    n_chunks = -(-n // CHUNK)
    quotas = chunk_quotas(k_chunk, n)
    kmax = max(quotas)
    if kmax == 0:
        return torch.zeros(m, n, dtype=torch.bool, device=x.device)
    bucket = torch.nn.functional.pad(bucket_index(x, bounds), (0, n_chunks * CHUNK - n), value=N_BUCKETS)
    pos = torch.arange(CHUNK, device=x.device)
    key = bucket.view(m, n_chunks, CHUNK) * CHUNK + pos  # (bucket, index) as one number, distinct in a chunk
    first = torch.topk(key, kmax, dim=-1, largest=False).indices  # a padded channel never ranks within a quota
    take = pos[:kmax] < torch.tensor(quotas, device=x.device).view(n_chunks, 1)  # a ragged last chunk takes fewer
    mask = torch.zeros(m, n_chunks, CHUNK, dtype=torch.bool, device=x.device)
    mask.scatter_(-1, first, take.expand(m, n_chunks, kmax))
    return mask.view(m, n_chunks * CHUNK)[:, :n]


# ---------------------------------------------------------------------------- DEC
def _residual_levels(q_residual: torch.Tensor) -> torch.Tensor:
    """All of q_residual's signed levels (nibble - 8) as int8 [in, out] (kept on the CPU by ``_cpu_weight``)."""
    return formats.unpack_residual(q_residual).to(torch.int8).t().contiguous()


def _residual_level_rows(q_residual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The signed levels of the given input channels: [len(rows), out] fp32 (unscaled, as DEC's parts sum them)."""
    kept = _cpu_weight(_residual_levels, q_residual, nbytes=q_residual.numel() * 8)  # all rows, int8 (CPU decode)
    levels = kept[rows] if kept is not None else formats.unpack_residual(q_residual[rows]).t()  # [len(rows), out]
    return levels.to(torch.float32)


def residual_rows(q_residual: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dequantized residual of the given input channels: [len(rows), out] fp32."""
    return _residual_level_rows(q_residual, rows) * scales.to(torch.float32)


def dec_residual(
    x: torch.Tensor, q_residual: torch.Tensor, scales: torch.Tensor, bounds: torch.Tensor, k_chunk: int
) -> torch.Tensor:
    """The error-compensation term ``sum_{j in S} x_j * scale_r * (nibble_rj - 8)``: [M, out] fp32."""
    m = x.shape[0]
    out = scales.numel()
    if k_chunk == 0:
        return torch.zeros(m, out, dtype=torch.float32, device=x.device)
    return dec_residual_masked(x, select_channels(x, bounds, k_chunk), q_residual, scales)


def dec(x, q_residual, scales, bounds, k_chunk):
    """DEC alone, in x.dtype."""
    return dec_residual(x, q_residual, scales, bounds, k_chunk).to(x.dtype)


def ap_gemv_dec(x, qweight, lut, q_residual, scales, bounds, k_chunk):
    """Base ap GEMV plus DEC; ``k_chunk == 0`` is bit-identical to ``ap_gemv``."""
    if k_chunk == 0:
        return ap_gemv(x, qweight, lut)
    w = _cpu_weight(_ap_w, qweight, lut)
    y = x.to(torch.float32) @ w.t() + dec_residual(x, q_residual, scales, bounds, k_chunk)
    return y.to(x.dtype)


def lutgemm_gemv_dec(x, binary, alpha, q_bias, q_residual, scales, bounds, k_chunk):
    if k_chunk == 0:
        return lutgemm_gemv(x, binary, alpha, q_bias)
    w = _cpu_weight(_lutgemm_w, binary, alpha, q_bias)
    y = x.to(torch.float32) @ w.t() + dec_residual(x, q_residual, scales, bounds, k_chunk)
    return y.to(x.dtype)


def dec_chunk_parts(x: torch.Tensor, q_residual: torch.Tensor, bounds: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """DEC's unscaled per-chunk sums ``sum_{j in S, j in chunk c} x_j * (nibble_rj - 8)``: [P, M, out] fp32,
    P = ceil(in / 1024) (zeros where k_chunk == 0 or a chunk's quota is 0)."""
    m, n = x.shape
    out = q_residual.shape[1] * 8
    p = -(-n // CHUNK)
    parts = torch.zeros(p, m, out, dtype=torch.float32, device=x.device)
    if k_chunk == 0:
        return parts
    mask = select_channels(x, bounds, k_chunk)
    rows = mask.any(0).nonzero().flatten()  # every selected row, in order: each chunk's are a contiguous run
    if rows.numel() == 0:
        return parts
    xs = (x.to(torch.float32) * mask)[:, rows]
    levels = _residual_level_rows(q_residual, rows)
    edges = torch.searchsorted(rows, torch.arange(p + 1, device=x.device) * CHUNK).tolist()
    for c, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        if hi > lo:  # chunk c's rows alone, as its DEC unit sums them
            parts[c] = xs[:, lo:hi] @ levels[lo:hi]
    return parts


MAX_CONSUMER_PARTS = 4  # csrc/kernels.h kMaxConsumerParts


def dec_parts_rows(in_features: int) -> int:
    """P': DEC rows of a parts op's output -- one per 1024-channel chunk up to MAX_CONSUMER_PARTS chunks, else one
    (the chunks summed by the kernel)."""
    p = -(-in_features // CHUNK)
    return p if p <= MAX_CONSUMER_PARTS else 1


def _dec_rows(x, q_residual, bounds, k_chunk) -> torch.Tensor:
    parts = dec_chunk_parts(x, q_residual, bounds, k_chunk)
    if parts.shape[0] <= MAX_CONSUMER_PARTS:
        return parts
    acc = parts[0].clone()
    for p in parts[1:]:  # in chunk order, as the kernel's last arrival sums them
        acc += p
    return acc[None]


def ap_gemv_dec_parts(x, qweight, lut, q_residual, bounds, k_chunk):
    """[1 + P', M, out] fp32: the base GEMV (fp32, not rounded), then DEC's unscaled chunk sums (``dec_parts_rows``)."""
    w = _cpu_weight(_ap_w, qweight, lut)
    return torch.cat([(x.to(torch.float32) @ w.t())[None], _dec_rows(x, q_residual, bounds, k_chunk)])


def lutgemm_gemv_dec_parts(x, binary, alpha, q_bias, q_residual, bounds, k_chunk):
    w = _cpu_weight(_lutgemm_w, binary, alpha, q_bias)
    return torch.cat([(x.to(torch.float32) @ w.t())[None], _dec_rows(x, q_residual, bounds, k_chunk)])


def combine_dec_parts(parts: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y = GEMV + scale * DEC, rounded once to ``dtype``: parts [1 + P', M, out] fp32 -> [M, out]. Pointwise with a
    sum over at most MAX_CONSUMER_PARTS rows, so a compiled decode step fuses it into the next pointwise kernel."""
    return (parts[0] + parts[1:].sum(0) * scales.to(torch.float32)).to(dtype)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm: normalised in float32 like HF, then scaled by ``weight`` in h's dtype."""
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).type_as(h)


def ap_gemv_addnorm(a, b, gamma, eps, qweight, lut):
    """(y, h): h = a + b (the residual stream), y = ap_gemv(rms_norm(h, gamma, eps))."""
    h = a + b
    return ap_gemv(rms_norm(h, gamma, eps), qweight, lut), h


def ap_gemv_addnorm_glu(a, b, gamma, eps, qweight, lut):
    """(act, h): h = a + b, y = ap_gemv(rms_norm(h)) with rows in GLU pair order (gate_i, up_i) (formats.glu_pair_order),
    act = fp16(silu(g) * u) of each pair in fp32 (g, u: the rounded GEMV outputs) -> [M, out / 2]."""
    y, h = ap_gemv_addnorm(a, b, gamma, eps, qweight, lut)
    g, u = y[:, 0::2].float(), y[:, 1::2].float()
    return (torch.nn.functional.silu(g) * u).to(y.dtype), h


def ap_gemv_addnorm_dec_parts(a, b, gamma, eps, qweight, lut, q_residual, bounds, k_chunk):
    """(parts, h): h = a + b, parts = ap_gemv_dec_parts(rms_norm(h, gamma, eps), ...) (DEC selects from the
    normalised x)."""
    h = a + b
    return ap_gemv_dec_parts(rms_norm(h, gamma, eps), qweight, lut, q_residual, bounds, k_chunk), h


def ap_gemv_addnorm_dec(a, b, gamma, eps, qweight, lut, q_residual, scales, bounds, k_chunk):
    """(y, h): h = a + b, y = ap_gemv_dec(rms_norm(h, gamma, eps), ...) (DEC selects from the normalised x)."""
    h = a + b
    return ap_gemv_dec(rms_norm(h, gamma, eps), qweight, lut, q_residual, scales, bounds, k_chunk), h


def ap_gemv_addnorm_glu_dec(a, b, gamma, eps, qweight, lut, q_residual, scales, bounds, k_chunk):
    """(act, h) for gate_up rows in GLU pair order (formats.glu_pair_order) with DEC's residual and scales in the
    original order (gates, then ups): y = GEMV + DEC per original row, rounded once, then act = fp16(silu(g) * u) of
    each (gate_i, up_i) in fp32, as ``ap_gemv_addnorm_glu`` -> [M, out / 2]."""
    from decdec.formats import glu_unpair

    h = a + b
    x = rms_norm(h, gamma, eps)
    w = _cpu_weight(_ap_w, qweight, lut)
    y = glu_unpair(x.to(torch.float32) @ w.t())
    if k_chunk:
        y = y + dec_residual(x, q_residual, scales, bounds, k_chunk)
    y = y.to(x.dtype)
    g, u = y.chunk(2, dim=-1)
    return (torch.nn.functional.silu(g.float()) * u.float()).to(x.dtype), h


# ---------------------------------------------------------------------------- selection ablations
def _per_chunk_topk(scores: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """scores [M, in] -> mask [M, in] of the floor(k_chunk*L/1024) highest scores of every chunk
    (ties: lowest channel index first, like ``select_channels``)."""
    m, n = scores.shape
    mask = torch.zeros(m, n, dtype=torch.bool, device=scores.device)
    for c, quota in enumerate(chunk_quotas(k_chunk, n)):
        if quota == 0:
            continue
        s = scores[:, c * CHUNK:(c + 1) * CHUNK]
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :quota]
        mask[:, c * CHUNK:(c + 1) * CHUNK].scatter_(1, order, True)
    return mask


def select_exact_topk(x: torch.Tensor, k_chunk: int) -> torch.Tensor:
    """The exact per-chunk top-|x| channels (what the bucket approximation approximates)."""
    return _per_chunk_topk(x.to(torch.float32).abs(), k_chunk)


def select_static(channel_hits: torch.Tensor, m: int, k_chunk: int) -> torch.Tensor:
    """The same channels for every token: per chunk, the ones most often in calibration's top set."""
    return _per_chunk_topk(channel_hits.to(torch.float32).view(1, -1), k_chunk).expand(m, -1)


def select_random(m: int, n: int, k_chunk: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random channels, per token and chunk (the quota is the same as DEC's)."""
    return _per_chunk_topk(torch.rand(m, n, generator=generator), k_chunk)


def dec_residual_masked(x: torch.Tensor, mask: torch.Tensor, q_residual: torch.Tensor,
                        scales: torch.Tensor) -> torch.Tensor:
    """``sum_{j: mask[m, j]} x_mj * R[:, j]`` for any selection mask [M, in] -> [M, out] fp32."""
    rows = mask.any(0).nonzero().flatten()  # only the selected rows are read (like the kernel)
    xs = (x.to(torch.float32) * mask)[:, rows]
    return xs @ residual_rows(q_residual, scales, rows)


# ---------------------------------------------------------------------------- decode attention
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, nH, Dh]; cos/sin [S, R] float32 -> [B, S, nH, Dh] (first R dims rotated, rotate_half): fp32
    x * cos + rotate_half(x) * sin, rounded to x.dtype; the decode attention kernel computes exactly this."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r].float(), x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # [S, 1, R] broadcasts over B and heads
    out = x_rot * cos + rotated * sin
    return torch.cat([out.type_as(x), x_pass], dim=-1)


def decode_attention_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                          pos: torch.Tensor, n_heads: int, window: int) -> torch.Tensor:
    """One decode step's attention from the qkv projection's output: qkv [B, (H + 2 Hkv) Dh] unrotated, cos/sin
    [1, R] (this position), kv [2, >= B, Hkv, L, Dh] the K and V caches. Applies RoPE to q and k, writes k and v
    into the caches at row pos (in place), then decode_attention. Returns y [B, H * Dh]."""
    B = qkv.shape[0]
    Hkv, L, Dh = kv.shape[2], kv.shape[3], kv.shape[4]
    p = int(pos.reshape(-1)[0])
    if not 0 <= p < L:
        raise ValueError(f"decode_attention_rope: position {p} outside the KV cache of {L} rows")
    q, k, v = qkv.split([n_heads * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    cs, sn = cos.reshape(1, -1), sin.reshape(1, -1)
    q = apply_rope(q.reshape(B, 1, n_heads, Dh), cs, sn).reshape(B, n_heads, Dh)
    k = apply_rope(k.reshape(B, 1, Hkv, Dh), cs, sn).reshape(B, Hkv, Dh)
    kv[0, :B, :, p] = k.to(kv.dtype)
    kv[1, :B, :, p] = v.reshape(B, Hkv, Dh).to(kv.dtype)
    return decode_attention(q, kv[0], kv[1], pos, window)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     window: int) -> torch.Tensor:
    """One decode query per sequence against its KV cache (grouped-query), the model's attention for S = 1.

    q [B, H, Dh] (RoPE applied), k_cache / v_cache [>= B, Hkv, L, Dh], pos [1] int64: the query's position;
    cache rows lo..pos attend (lo = pos - window + 1 with a sliding window > 0, else 0); query head h reads
    KV head h // (H / Hkv). Scale 1 / sqrt(Dh). Returns y [B, H * Dh] in q.dtype (fp32 math)."""
    B, H, Dh = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    p = int(pos.reshape(-1)[0])
    if not 0 <= p < L:
        raise ValueError(f"decode_attention: position {p} outside the KV cache of {L} rows")
    lo = max(0, p - window + 1) if window > 0 else 0
    k = k_cache[:B, :, lo:p + 1].float()  # [B, Hkv, n, Dh]
    v = v_cache[:B, :, lo:p + 1].float()
    qg = q.float().reshape(B, Hkv, H // Hkv, Dh)  # heads h = g * rep + r
    w = torch.softmax(torch.einsum("bgrd,bgnd->bgrn", qg, k) / Dh**0.5, dim=-1)
    return torch.einsum("bgrn,bgnd->bgrd", w, v).reshape(B, H * Dh).to(q.dtype)
