"""Decode attention (torch.ops.decdec.decode_attention): its reference equals the model's masked
grouped-query attention, opcheck, errors, and the model's decode path through it."""

from __future__ import annotations

import pytest
import torch

import decdec.ops  # noqa: F401  registers torch.ops.decdec
from decdec import reference
from decdec.model import gqa_attention

OPS = torch.ops.decdec


def _case(B, H, Hkv, L, Dh, seed=0, dtype=torch.float32, cache_batch=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Dh, generator=g).to(dtype)
    k = torch.randn(cache_batch or B, Hkv, L, Dh, generator=g).to(dtype)
    v = torch.randn(cache_batch or B, Hkv, L, Dh, generator=g).to(dtype)
    return q, k, v


def _tiny_ap_model():
    """The tiny synthetic ap 3-bit model on the CPU, DEC off."""
    from decdec.config import DecConfig, KChunk
    from decdec.synthetic import build_synthetic

    off = DecConfig(name="off", n_tb=1, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=0))
    return build_synthetic("tiny", "ap", 3, False, torch.float32, torch.device("cpu"), off, seed=0).model


def _masked(q, k, v, p, window):
    """The prefill path's attention for one query at position p (causal mask, optional window)."""
    B, H, Dh = q.shape
    L = k.shape[2]
    j = torch.arange(L)
    mask = j <= p
    if window:
        mask &= j > p - window
    return gqa_attention(q.view(B, H, 1, Dh), k[:B], v[:B], mask.view(1, 1, 1, L)).view(B, H * Dh)


@pytest.mark.parametrize("B,H,Hkv,Dh", [(1, 32, 8, 128), (2, 9, 3, 64), (1, 4, 4, 16), (1, 64, 8, 128)])
@pytest.mark.parametrize("p,window", [(0, 0), (5, 0), (70, 0), (99, 0), (70, 16), (99, 100), (10, 64)])
def test_reference_equals_masked_gqa_attention(B, H, Hkv, Dh, p, window):
    q, k, v = _case(B, H, Hkv, 100, Dh, seed=p, cache_batch=B + 1)
    got = reference.decode_attention(q, k, v, torch.tensor([p]), window)
    torch.testing.assert_close(got, _masked(q, k, v, p, window), rtol=1e-5, atol=1e-5)
    assert got.shape == (B, H * Dh)


def test_only_rows_up_to_pos_and_inside_the_window_matter():
    q, k, v = _case(1, 8, 2, 64, 32, seed=3)
    base = reference.decode_attention(q, k, v, torch.tensor([40]), 10)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 41:] = 1e4  # after pos
    v2[:, :, :31] = -1e4  # before the window (rows 31..40 attend)
    assert torch.equal(reference.decode_attention(q, k2, v2, torch.tensor([40]), 10), base)
    v2[:, :, 31] += 1.0
    assert not torch.equal(reference.decode_attention(q, k2, v2, torch.tensor([40]), 10), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k, v = _case(2, 8, 2, 48, 16, seed=1, dtype=dtype)
    result = torch.library.opcheck(OPS.decode_attention.default, (q, k, v, torch.tensor([17]), 0))
    assert all(r == "SUCCESS" for r in result.values()), result
    assert torch.equal(OPS.decode_attention(q, k, v, torch.tensor([17]), 8),
                       reference.decode_attention(q, k, v, torch.tensor([17]), 8))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q, k, v, p: (q[0], k, v, p), "q must be \\[B, H, Dh\\]"),
        (lambda q, k, v, p: (q, k, v[:, :, :5], p), "one shape"),
        (lambda q, k, v, p: (q, k[..., :8].contiguous(), v[..., :8].contiguous(), p), "do not fit q"),
        (lambda q, k, v, p: (q[:, :7].contiguous(), k, v, p), "7 query heads do not group over 2 KV heads"),
        (lambda q, k, v, p: (q, k, v, p.int()), "pos must be one int64"),
        (lambda q, k, v, p: (q, k, v, torch.tensor([48])), "position 48 outside the KV cache of 48 rows"),
    ],
)
def test_errors_name_the_values(change, message):
    q, k, v = _case(1, 8, 2, 48, 16)
    with pytest.raises((RuntimeError, ValueError), match=message):
        OPS.decode_attention(*change(q, k, v, torch.tensor([3])), 0)


def test_window_must_not_be_negative():
    q, k, v = _case(1, 8, 2, 48, 16)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        OPS.decode_attention(q, k, v, torch.tensor([3]), -1)


def test_model_decode_step_uses_it_and_equals_prefill_attention(monkeypatch):
    """A decode step (S = 1, decode_attention) gives the logits a prefill of the same prefix gives at its
    last position (masked gqa_attention), with a sliding window shorter than the prefix too."""
    model = _tiny_ap_model()
    model.use_decode_attention()
    calls = []
    real = reference.decode_attention
    monkeypatch.setattr(reference, "decode_attention", lambda *a: calls.append(a[3]) or real(*a))
    tokens = torch.randint(0, model.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    for window in (None, 6):
        model.args.sliding_window = window
        for layer in model.layers:
            layer.attention.window = window or 0
        model.setup_caches(1, 32, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            full = model(tokens, torch.arange(20))[0, -1]
            model.setup_caches(1, 32, torch.float32, torch.device("cpu"))
            model(tokens[:, :19], torch.arange(19))
            step = model(tokens[:, 19:], torch.tensor([19]))[0, -1]
        torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * model.args.n_layers and all(int(p) == 19 for p in calls)  # decode steps only


def test_choose_attention_follows_the_config():
    """auto: the kernel on CUDA where the heads allow it, SDPA on the CPU (where the op is the reference);
    kernel / sdpa force it; kernel on heads the op does not serve is an error."""
    model = _tiny_ap_model()
    on = lambda: [layer.attention.decode_op for layer in model.layers]  # noqa: E731
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert model.choose_attention("auto", cpu) == "sdpa" and not any(on())
    assert model.choose_attention("kernel", cpu) == "kernel" and all(on())
    assert model.choose_attention("sdpa", cuda) == "sdpa" and not any(on())
    assert model.choose_attention("auto", cuda) == "kernel" and all(on())  # sets flags only; nothing runs
    with pytest.raises(ValueError, match="choose auto, kernel or sdpa"):
        model.choose_attention("flash", cpu)
    model.args.n_heads = 9 * model.args.n_kv_heads
    assert model.choose_attention("auto", cuda) == "sdpa" and not any(on())
    with pytest.raises(ValueError, match="<= 8 query heads per KV head"):
        model.choose_attention("kernel", cuda)


def test_use_decode_attention_is_off_by_default_and_checks_the_shape():
    model = _tiny_ap_model()
    assert not any(layer.attention.decode_op for layer in model.layers)
    model.use_decode_attention()
    assert all(layer.attention.decode_op for layer in model.layers)
    model.args.n_heads = 9 * model.args.n_kv_heads
    with pytest.raises(ValueError, match="<= 8 query heads per KV head"):
        model.use_decode_attention()


def test_run_resolves_attention_without_built_kernels(monkeypatch):
    """On CUDA without the built extension (backend=fp16 needs none), attention=auto falls back to SDPA and
    attention=kernel stops with the build command; with it, auto takes the kernel."""
    from decdec import ops
    from decdec.config import DecConfig, KChunk
    from decdec.run import ConfigError, resolve_attention
    from decdec.synthetic import build_synthetic

    off = DecConfig(name="off", n_tb=1, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=0))
    model = build_synthetic("tiny", "fp16", 16, False, torch.float32, torch.device("cpu"), off, seed=0).model
    cuda = torch.device("cuda")  # choose_attention only sets flags: nothing runs on the device

    def missing():
        raise ops.KernelsUnavailable("decdec CUDA kernels are not built (test); build the CUDA kernels first")

    monkeypatch.setattr(ops, "load_cuda_kernels", missing)
    assert resolve_attention(model, "auto", cuda) == "sdpa"
    assert not any(layer.attention.decode_op for layer in model.layers)
    with pytest.raises(ConfigError, match="attention=kernel: decdec CUDA kernels are not built.*attention=sdpa"):
        resolve_attention(model, "kernel", cuda)
    assert resolve_attention(model, "sdpa", cuda) == "sdpa"
    monkeypatch.setattr(ops, "load_cuda_kernels", lambda: "_C.so")
    assert resolve_attention(model, "auto", cuda) == "kernel"
    assert all(layer.attention.decode_op for layer in model.layers)


# ---------------------------------------------------------------------------- decode_attention_rope
def _rope_case(B, H, Hkv, L, Dh, R, seed=0, dtype=torch.float32, cache_batch=None):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (H + 2 * Hkv) * Dh, generator=g).to(dtype)
    kv = torch.randn(2, cache_batch or B, Hkv, L, Dh, generator=g).to(dtype)
    ang = torch.rand(1, R // 2, generator=g) * 6.0
    emb = torch.cat([ang, ang], dim=-1)  # the model's rotate_half layout
    return qkv, emb.cos(), emb.sin(), kv


@pytest.mark.parametrize("B,H,Hkv,Dh,R", [(1, 32, 8, 128, 128), (2, 9, 3, 64, 64), (1, 4, 2, 16, 8), (2, 4, 4, 16, 16)])
@pytest.mark.parametrize("p,window", [(0, 0), (37, 0), (99, 0), (70, 16)])
def test_rope_reference_equals_the_unfused_steps(B, H, Hkv, Dh, R, p, window):
    """decode_attention_rope = the model's unfused decode: apply_rope to q and k, the KV-cache write at p, then
    decode_attention; every other cache row (and the extra cache sequence) is left as it was."""
    qkv, cos, sin, kv = _rope_case(B, H, Hkv, 100, Dh, R, seed=p + H, dtype=torch.float16, cache_batch=B + 1)
    before = kv.clone()
    pos = torch.tensor([p])
    y = reference.decode_attention_rope(qkv, cos, sin, kv, pos, H, window)
    q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    q = reference.apply_rope(q.view(B, 1, H, Dh), cos, sin).view(B, H, Dh)
    k = reference.apply_rope(k.view(B, 1, Hkv, Dh), cos, sin).view(B, Hkv, Dh)
    expect_kv = before.clone()
    expect_kv[0, :B, :, p], expect_kv[1, :B, :, p] = k, v.view(B, Hkv, Dh)
    assert torch.equal(kv, expect_kv)
    assert torch.equal(y, reference.decode_attention(q, expect_kv[0], expect_kv[1], pos, window))
    if R < Dh:  # the dims past R pass unrotated
        assert torch.equal(kv[0, :B, :, p, R:], qkv[:, H * Dh:(H + Hkv) * Dh].view(B, Hkv, Dh)[..., R:])


def test_rope_op_opcheck_and_errors():
    qkv, cos, sin, kv = _rope_case(1, 4, 2, 40, 16, 16, seed=3)
    pos = torch.tensor([21])
    torch.library.opcheck(OPS.decode_attention_rope.default, (qkv, cos, sin, kv, pos, 4, 0))
    with pytest.raises(RuntimeError, match=r"qkv rows hold 128 values, \(H \+ 2 Hkv\) Dh = \(6 \+ 2 x 2\) x 16"):
        OPS.decode_attention_rope(qkv, cos, sin, kv, pos, 6, 0)
    with pytest.raises(RuntimeError, match="kv must be \\[2, B, Hkv, L, Dh\\]"):
        OPS.decode_attention_rope(qkv, cos, sin, kv[0], pos, 4, 0)
    with pytest.raises(RuntimeError, match="kv must be torch.float32 like qkv"):
        OPS.decode_attention_rope(qkv, cos, sin, kv.half(), pos, 4, 0)
    with pytest.raises(RuntimeError, match="R even <= 16"):
        OPS.decode_attention_rope(qkv, cos[:, :3], sin[:, :3], kv, pos, 4, 0)
    with pytest.raises(ValueError, match="position 40 outside the KV cache of 40 rows"):
        OPS.decode_attention_rope(qkv, cos, sin, kv, torch.tensor([40]), 4, 0)


def test_rope_op_under_torch_compile_writes_the_cache_in_place():
    """Compiled (inductor, fullgraph) the op still writes the module's cache buffer itself -- the same storage, no
    copy of the cache -- and gives the eager result."""
    from torch._inductor.utils import run_and_get_code

    class Step(torch.nn.Module):
        def __init__(self, kv):
            super().__init__()
            self.register_buffer("kv", kv)

        def forward(self, qkv, cos, sin, pos):
            return OPS.decode_attention_rope(qkv * 1.0, cos, sin, self.kv, pos, 4, 0) + 1.0

    qkv, cos, sin, kv = _rope_case(1, 4, 2, 40, 16, 16, seed=4)
    eager, compiled = Step(kv.clone()), Step(kv.clone())
    ptr = compiled.kv.data_ptr()
    pos = torch.tensor([9])
    with torch.no_grad():
        want = eager(qkv, cos, sin, pos)
        got, code = run_and_get_code(torch.compile(compiled, fullgraph=True), qkv, cos, sin, pos)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(compiled.kv, eager.kv) and compiled.kv.data_ptr() == ptr
    assert not any("copy_" in c for c in code), "the compiled step copies the cache"


def test_model_decode_with_rope_op_equals_the_unfused_decode():
    """The model's decode step through decode_attention_rope gives the logits and the cache of the unfused path
    (apply_rope, KVCache.update, decode_attention)."""
    model = _tiny_ap_model()
    tokens = torch.randint(0, model.args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    out = {}
    for rope in (False, True):
        model.use_decode_attention(True, rope=rope)
        assert all(layer.attention.decode_rope == rope for layer in model.layers)
        model.setup_caches(1, 16, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            model(tokens[:, :10], torch.arange(10))
            steps = [model(tokens[:, i:i + 1], torch.tensor([i]))[0, -1] for i in (10, 11)]
        out[rope] = (steps, [layer.attention.kv_cache.kv.clone() for layer in model.layers])
    for a, b in zip(out[False][0], out[True][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(out[False][1], out[True][1]):
        assert torch.equal(a, b)


def test_decode_rope_knob(monkeypatch):
    model = _tiny_ap_model()
    model.use_decode_attention()
    assert not any(layer.attention.decode_rope for layer in model.layers)  # off by default (slower, session 17)
    monkeypatch.setenv("DECDEC_ATTN_ROPE", "1")
    model.use_decode_attention()
    assert all(layer.attention.decode_rope for layer in model.layers)
    model.use_decode_attention(True, rope=False)  # an explicit choice wins over the environment
    assert not any(layer.attention.decode_rope for layer in model.layers)
