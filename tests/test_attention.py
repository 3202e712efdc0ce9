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
    from decdec.config import DecConfig, KChunk
    from decdec.synthetic import build_synthetic

    off = DecConfig(name="off", n_tb=1, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=0))
    model = build_synthetic("tiny", "ap", 3, False, torch.float32, torch.device("cpu"), off, seed=0).model
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
    from decdec.config import DecConfig, KChunk
    from decdec.synthetic import build_synthetic

    off = DecConfig(name="off", n_tb=1, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=0))
    model = build_synthetic("tiny", "ap", 3, False, torch.float32, torch.device("cpu"), off, seed=0).model
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
    from decdec.config import DecConfig, KChunk
    from decdec.synthetic import build_synthetic

    off = DecConfig(name="off", n_tb=1, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=0))
    model = build_synthetic("tiny", "ap", 3, False, torch.float32, torch.device("cpu"), off, seed=0).model
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
