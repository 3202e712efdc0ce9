"""Sampling, the Generator, and DEC inside generation on the tiny quantized model."""

from __future__ import annotations


import pytest
import torch

from conftest import compose_cfg, typed
from decdec import checkpoint as ckpt
from decdec.builder import build_model
from decdec.generate import (Generator, StaticDecode, argmax_last, graph_signature, inductor_options, logits_to_probs,
                             sample)

CPU = torch.device("cpu")
PROMPT = torch.tensor([1, 17, 42, 99, 7, 250, 3], dtype=torch.long)


def test_greedy_sample_is_argmax_of_last_position():
    logits = torch.randn(3, 5, 320, generator=torch.Generator().manual_seed(0))
    tok = sample(logits, 0.0, 200)
    assert tok.shape == (3, 1) and tok.dtype == torch.int64
    assert torch.equal(tok[:, 0], logits[:, -1].argmax(-1))


@pytest.mark.parametrize("V", [1, 1000, 1024, 1025, 5000, 128256])
def test_argmax_last_equals_torch_argmax_with_ties(V):
    g = torch.Generator().manual_seed(V)
    v = torch.randn(4, V, generator=g)
    v[1] = torch.randint(0, 3, (V,), generator=g).float()  # many ties: the first maximum must win
    v[2] = 0.0
    v[3, -1] = 100.0  # the maximum in the padded last chunk
    got = argmax_last(v, chunk=1024)
    assert got.shape == (4, 1) and got.dtype == torch.int64
    assert torch.equal(got[:, 0], torch.argmax(v, dim=-1))
    assert torch.equal(argmax_last(v, chunk=7)[:, 0], torch.argmax(v, dim=-1))


def test_temperature_sampling_stays_in_top_k():
    torch.manual_seed(0)
    base = torch.randn(320)
    logits = base.expand(2000, 1, 320).clone()  # 2000 independent draws from one distribution
    top = set(torch.topk(base, 5).indices.tolist())
    picks = sample(logits, 1.5, 5)[:, 0].tolist()
    assert set(picks) <= top
    assert len(set(picks)) > 1  # it really samples
    # top_k=1 degenerates to greedy whatever the temperature
    assert set(sample(logits[:50], 5.0, 1)[:, 0].tolist()) == {int(base.argmax())}


def test_logits_to_probs_top_k():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    p = logits_to_probs(logits, 1.0, 2)
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0] == 0 and p[3] == 0 and p[1] > p[2] > 0
    assert torch.equal(logits_to_probs(logits, 1.0, None) > 0, torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny_ap(tiny_checkpoint):
    """The tiny ap w3 model with DEC attached (k_chunk set per test via set_k)."""
    dec = typed(compose_cfg(["model=tiny"])).dec
    built = build_model(ckpt.Checkpoint.open(tiny_checkpoint("ap", "w3")), "ap", 3, False, torch.float32, CPU, dec)
    return built.model.eval()


def set_k(model, k: int) -> None:
    for _, _, m in model.linears():
        m.set_dec(k, 2)


def test_static_decode_step_bookkeeping():
    """A step feeds tok at pos to fn, writes the next token to out[pos + 1] and advances tok and pos
    in place (the buffers a CUDA graph captures); fn sees the same tensors every step."""
    seen = []

    def fn(model, tok, pos, temperature, top_k):
        seen.append((tok.data_ptr(), pos.data_ptr(), int(tok), int(pos), temperature, top_k))
        return (tok * 10 + pos).view(1, 1)

    d = StaticDecode(None, fn, CPU, 6)
    d.tok.fill_(3)
    d.pos.fill_(1)
    d.step(0.5, 7)
    d.step(0.5, 7)
    assert [x[2:] for x in seen] == [(3, 1, 0.5, 7), (31, 2, 0.5, 7)]
    assert len({x[:2] for x in seen}) == 1  # static buffers, no copies
    assert d.out.tolist() == [0, 0, 31, 312, 0, 0] and int(d.tok) == 312 and int(d.pos) == 3


def test_graph_signature_tracks_dec_settings_and_caches(tiny_ap):
    """compile=cudagraphs records again when what its graphs bake in changes: k_chunk / n_tb of any
    projection, the decode attention op, or the KV caches (setup_caches reallocates them)."""
    set_k(tiny_ap, 0)
    tiny_ap.setup_caches(1, 16, torch.float32, CPU)
    base = graph_signature(tiny_ap)
    assert graph_signature(tiny_ap) == base
    next(iter(tiny_ap.linears()))[2].set_dec(8, 2)
    assert graph_signature(tiny_ap) != base
    set_k(tiny_ap, 0)
    assert graph_signature(tiny_ap) == base
    tiny_ap.use_decode_attention()  # another attention op in the step
    assert graph_signature(tiny_ap) != base
    tiny_ap.use_decode_attention(False)
    assert graph_signature(tiny_ap) == base
    tiny_ap.setup_caches(1, 16, torch.float32, CPU)
    assert graph_signature(tiny_ap) != base


@torch.no_grad()
def test_generator_rejects_prompt_longer_than_cache(tiny_ap):
    gen = Generator(tiny_ap, CPU, torch.float32, max_seq_length=PROMPT.numel() + 4)
    with pytest.raises(ValueError, match=r"prompt \(7\) \+ max_new_tokens \(5\) exceeds the KV cache \(11\)"):
        gen.generate(PROMPT, 5)
    assert gen.generate(PROMPT, 4).numel() == PROMPT.numel() + 4  # exactly full is fine


@torch.no_grad()
def test_start_then_decode_equals_generate_and_keeps_to_its_budget(tiny_ap):
    """generate = start (prefill, first token) + decode of the rest, which timing code syncs between; decode takes at
    most the steps start allowed."""
    gen = Generator(tiny_ap, CPU, torch.float32, max_seq_length=PROMPT.numel() + 8)
    want = gen.generate(PROMPT, 6)
    gen.start(PROMPT, 6)
    gen.decode(2)
    gen.decode(3)
    assert torch.equal(gen._decode.out[: PROMPT.numel() + 6], want)
    with pytest.raises(ValueError, match="1 decode steps asked, 0 left of this generation"):
        gen.decode(1)
    gen.start(PROMPT, 3)
    with pytest.raises(ValueError, match="4 decode steps asked, 2 left"):
        gen.decode(4)


def test_generator_compile_modes(tiny_ap):
    with pytest.raises(ValueError, match="cudagraphs needs a CUDA device"):
        Generator(tiny_ap, CPU, torch.float32, 16, "cudagraphs")
    with pytest.raises(ValueError, match="reduce-overhead needs a CUDA device"):
        Generator(tiny_ap, CPU, torch.float32, 16, "reduce-overhead")
    with pytest.raises(ValueError, match="unknown compile mode"):
        Generator(tiny_ap, CPU, torch.float32, 16, "jit")


def test_compiled_decode_gets_the_inductor_options(tiny_ap, monkeypatch):
    """The compiled step is built with our inductor options on top of the mode's own (torch takes one or the other)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    Generator(tiny_ap, CPU, torch.float32, 16, "inductor")
    ours = {"realize_reads_threshold": 8, "combo_kernels": True}
    assert seen == [{"fullgraph": True, "options": ours}]
    assert inductor_options("reduce-overhead") == {"triton.cudagraphs": True, **ours}


@torch.no_grad()
def test_dec_k_chunk_zero_equals_dec_off(tiny_ap, tiny_checkpoint):
    dec_off = typed(compose_cfg(["model=tiny", "dec=off"])).dec
    off = build_model(ckpt.Checkpoint.open(tiny_checkpoint("ap", "w3")), "ap", 3, False, torch.float32, CPU,
                      dec_off).model.eval()
    assert all(m.k_chunk == 0 for _, _, m in off.linears())
    set_k(tiny_ap, 0)
    n = 12
    a = Generator(off, CPU, torch.float32, PROMPT.numel() + n).generate(PROMPT, n)
    b = Generator(tiny_ap, CPU, torch.float32, PROMPT.numel() + n).generate(PROMPT, n)
    assert torch.equal(a, b)
    # and the decode logits are bit-identical, not just their argmax
    pos = torch.tensor([PROMPT.numel()])
    tok = a[PROMPT.numel()].view(1, 1)
    assert torch.equal(off(tok, pos), tiny_ap(tok, pos))


@torch.no_grad()
def test_dec_changes_decode_logits(tiny_ap):
    s = PROMPT.numel()
    tiny_ap.setup_caches(1, s + 1, torch.float32, CPU)
    tiny_ap(PROMPT.view(1, -1), torch.arange(s))
    tok, pos = torch.tensor([[5]]), torch.tensor([s])
    set_k(tiny_ap, 0)
    base = tiny_ap(tok, pos)
    set_k(tiny_ap, 64)
    dec = tiny_ap(tok, pos)
    set_k(tiny_ap, 1024)
    full = tiny_ap(tok, pos)
    set_k(tiny_ap, 0)
    assert torch.equal(tiny_ap(tok, pos), base)  # switching back restores the base path exactly
    d64, d1024 = (dec - base).abs().max().item(), (full - base).abs().max().item()
    assert d64 > 1e-4 and d1024 > 1e-4 and not torch.equal(dec, full)


@torch.no_grad()
def test_kv_cache_decode_equals_full_forward_argmax_chain(tiny_ap):
    set_k(tiny_ap, 0)  # DEC is decode-only by design; without it both paths compute the same function
    n = 10
    gen = Generator(tiny_ap, CPU, torch.float32, PROMPT.numel() + n)
    tokens = gen.generate(PROMPT, n).tolist()
    seq = PROMPT.tolist()
    for _ in range(n):
        logits = tiny_ap(torch.tensor([seq]), torch.arange(len(seq)))  # full forward, no cache reuse
        seq.append(int(logits[0, -1].argmax()))
    assert tokens == seq
