"""decdec.model against transformers' Llama / Phi-3 on tiny random checkpoints (CPU, fp32)."""

import pytest
import torch
import torch.nn as nn
import transformers

from decdec.model import PROJECTIONS, ModelArgs, Transformer, gqa_attention, hf_to_decdec_state_dict, rope_inv_freq

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def hf_llama(**over):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**TINY, **over})
    return transformers.LlamaForCausalLM(cfg).eval(), {**TINY, "model_type": "llama", **over}


def hf_phi3(**over):
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(**{**TINY, "pad_token_id": 0, **over})
    return transformers.Phi3ForCausalLM(cfg).eval(), {**TINY, "model_type": "phi3", **over}


def ours_from(hf_model, config: dict, max_seq: int = 32, batch: int = 2) -> Transformer:
    args = ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(hf_to_decdec_state_dict(hf_model.state_dict(), args), assign=True)
    model.setup_caches(batch, max_seq, torch.float32, "cpu")
    return model.eval()


CASES = {
    "llama3_gqa": lambda: hf_llama(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, max_position_embeddings=256),
    "smollm2_tied": lambda: hf_llama(hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                                      tie_word_embeddings=True),
    "phi3_fused": lambda: hf_phi3(),
    "phi3_window_partial": lambda: hf_phi3(sliding_window=5, partial_rotary_factor=0.5),
}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_prefill_matches_hf(case):
    hf, config = CASES[case]()
    model = ours_from(hf, config)
    idx = torch.randint(0, TINY["vocab_size"], (2, 12))
    expected = hf(idx).logits
    got = model(idx, torch.arange(12))
    assert got.shape == (2, 12, TINY["vocab_size"])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama3_gqa", "phi3_window_partial"])
@torch.no_grad()
def test_decode_matches_full_forward(case):
    hf, config = CASES[case]()
    model = ours_from(hf, config)
    idx = torch.randint(0, TINY["vocab_size"], (2, 10))
    full = model(idx, torch.arange(10))
    # prefill 4 tokens, then decode one at a time from the static cache
    steps = [model(idx[:, :4], torch.arange(4))]
    steps += [model(idx[:, p : p + 1], torch.tensor([p])) for p in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_compiles_fullgraph_and_batch_below_cache_size():
    hf, config = CASES["llama3_gqa"]()
    model = ours_from(hf, config, batch=4)  # cache for 4 sequences, run with 2
    idx = torch.randint(0, TINY["vocab_size"], (2, 7))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # graph breaks raise
    steps = [compiled(idx[:, :6], torch.arange(6)), compiled(idx[:, 6:], torch.tensor([6]))]
    torch.testing.assert_close(torch.cat(steps, dim=1), hf(idx).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_bf16_model_and_cache():
    hf, config = CASES["smollm2_tied"]()
    model = ours_from(hf, config).to(torch.bfloat16)
    model.setup_caches(2, 32, torch.bfloat16, "cpu")
    idx = torch.randint(0, TINY["vocab_size"], (2, 5))
    logits = model(idx, torch.arange(5))
    assert logits.dtype == torch.bfloat16 and model.output.weight is model.tok_embeddings.weight
    torch.testing.assert_close(logits.float(), hf(idx).logits, atol=0.1, rtol=0.05)


@torch.no_grad()
def test_tied_embeddings_share_parameter_after_load():
    hf, config = CASES["smollm2_tied"]()
    model = ours_from(hf, config)
    assert model.output.weight is model.tok_embeddings.weight
    assert "output.weight" not in hf_to_decdec_state_dict(hf.state_dict(), model.args)
    # our own state dict (which lists output.weight) round-trips into a fresh meta model too
    with torch.device("meta"):
        again = Transformer(model.args)
    again.load_state_dict(model.state_dict(), assign=True)
    assert again.output.weight is again.tok_embeddings.weight
    assert not any(t.is_meta for t in again.parameters())


def test_llama3_rope_matches_hf():
    hf, config = CASES["llama3_gqa"]()
    ref = hf.model.rotary_emb.inv_freq
    got = rope_inv_freq(ModelArgs.from_hf_config(config))
    torch.testing.assert_close(got, ref)
    # the three regimes (kept, smoothed, divided by factor) are all exercised
    default = rope_inv_freq(ModelArgs.from_hf_config({**config, "rope_scaling": None}))
    ratio = default / got
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


def test_from_hf_config_parses_and_rejects():
    args = ModelArgs.from_hf_config({**TINY, "model_type": "llama", "rope_scaling": LLAMA3_ROPE})
    assert (args.arch, args.n_kv_heads, args.head_dim) == ("llama", 2, 16)
    assert args.rope_scaling["rope_type"] == "llama3" and not args.tie_word_embeddings
    assert args.sliding_window is None and ModelArgs.from_hf_config(
        {**TINY, "model_type": "phi3", "sliding_window": 2047}).sliding_window == 2047
    # transformers-5 style to_dict() (rope_parameters) gives the same args
    hf_dict = transformers.LlamaConfig(**TINY, rope_scaling=LLAMA3_ROPE).to_dict()
    assert ModelArgs.from_hf_config(hf_dict) == args
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelArgs.from_hf_config({**TINY, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="lacks required keys \\['hidden_size'\\]"):
        ModelArgs.from_hf_config({**{k: v for k, v in TINY.items() if k != "hidden_size"}, "model_type": "llama"})
    with pytest.raises(ValueError, match="rope type 'longrope'"):
        ModelArgs.from_hf_config({**TINY, "model_type": "phi3", "rope_scaling": {"type": "longrope"}})
    with pytest.raises(ValueError, match="attention_bias"):
        ModelArgs.from_hf_config({**TINY, "model_type": "llama", "attention_bias": True})


def test_hf_state_dict_missing_and_unexpected_keys():
    hf, config = CASES["phi3_fused"]()
    args = ModelArgs.from_hf_config(config)
    sd = hf.state_dict()
    with pytest.raises(KeyError, match="model.layers.1.mlp.gate_up_proj.weight"):
        hf_to_decdec_state_dict({k: v for k, v in sd.items() if "1.mlp.gate_up" not in k}, args)
    with pytest.raises(KeyError, match="does not use.*self_attn.o_proj.bias"):
        hf_to_decdec_state_dict({**sd, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, args)


class Recording(nn.Linear):
    """A stand-in for a quantized linear: only `module(x)` [B, S, in] -> [B, S, out] is relied on."""

    def __init__(self, proj, layer_idx, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        self.key = (proj, layer_idx, in_features, out_features)


@torch.no_grad()
def test_make_linear_gets_projection_shapes():
    calls = []

    def make_linear(proj, layer_idx, in_features, out_features):
        calls.append((proj, layer_idx, in_features, out_features))
        return Recording(proj, layer_idx, in_features, out_features)

    config = {**TINY, "model_type": "llama", "head_dim": 24}  # head_dim != hidden / heads
    args = ModelArgs.from_hf_config(config)
    assert args.projection_shapes() == {"qkv": (64, 4 * 24 + 2 * 2 * 24), "o": (96, 64),
                                        "gate_up": (64, 192), "down": (96, 64)}
    model = Transformer(args, make_linear)
    shapes = args.projection_shapes()
    assert sorted(calls) == sorted((p, i, *shapes[p]) for i in range(2) for p in PROJECTIONS)
    listed = list(model.linears())
    assert [(p, i) for p, i, _ in listed] == [(p, i) for i in range(2) for p in PROJECTIONS]
    assert all(m.key == (p, i, *shapes[p]) and m is model.layers[i].get_submodule(PROJECTIONS[p])
               for p, i, m in listed)
    model.setup_caches(1, 8, torch.float32, "cpu")
    assert model(torch.zeros(1, 3, dtype=torch.long), torch.arange(3)).shape == (1, 3, TINY["vocab_size"])


def test_state_dict_has_no_buffers():
    hf, config = CASES["llama3_gqa"]()
    model = ours_from(hf, config)
    keys = set(model.state_dict())
    assert keys == set(hf_to_decdec_state_dict(hf.state_dict(), model.args))
    assert not any("cache" in k or "rope" in k or "mask" in k for k in keys)


@pytest.mark.parametrize("H,Hkv,S", [(8, 2, 1), (8, 2, 5), (6, 6, 3), (40, 10, 1), (4, 1, 4)])
def test_gqa_attention_equals_expanded_heads(H, Hkv, S):
    """Grouped rows == repeat_interleave'd K/V (query head h reads KV head h // rep), causal mask, any S."""
    g = torch.Generator().manual_seed(H * 100 + S)
    B, L, Dh = 2, 11, 16
    q, k, v = (torch.randn(B, n, s, Dh, generator=g, dtype=torch.float64) for n, s in ((H, S), (Hkv, L), (Hkv, L)))
    pos = torch.arange(L - S, L)
    mask = (torch.arange(L)[None, :] <= pos[:, None])[None, None]  # [1, 1, S, L]
    rep = H // Hkv
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)  # [B, H, S, Dh]
    got = gqa_attention(q, k, v, mask)
    assert got.shape == (B, S, H * Dh)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(B, S, H * Dh), rtol=1e-12, atol=1e-12)
    mask2 = mask.clone()
    mask2[..., 0] = False  # a different mask must change the result (the mask is applied per row)
    assert not torch.allclose(gqa_attention(q, k, v, mask2), got)


def test_add_norm_project_keeps_separate_ops_after_a_dec_projection():
    """The fused add + RMSNorm GEMV is skipped when b comes from a projection running DEC (its combine then fuses
    into the separate add + norm kernel); the result is the same math either way."""
    from decdec.model import RMSNorm, add_norm_project

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.fused_calls = nn.Linear(8, 4, bias=False), 0

        def forward(self, x):
            return self.lin(x)

        def forward_addnorm(self, a, b, norm):
            self.fused_calls += 1
            h = a + b
            return self(norm(h)), h

    class Dec(nn.Module):
        k_chunk = 16

    probe, norm = Probe(), RMSNorm(8, 1e-5)
    a, b = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    y1, h1 = add_norm_project(probe, a, b, norm, None)
    y2, h2 = add_norm_project(probe, a, b, norm, Dec())
    assert probe.fused_calls == 1
    assert torch.equal(h1, a + b) and torch.equal(h2, a + b) and torch.allclose(y1, y2)

    class Chain(Dec):  # DEC in chain mode: the projection's output is final, nothing to combine
        dec_chain = True

    y3, h3 = add_norm_project(probe, a, b, norm, Chain())
    assert probe.fused_calls == 2, "after a chain-mode DEC projection the fused add + norm GEMV stays"
    assert torch.equal(h3, a + b) and torch.allclose(y3, y1)


@torch.no_grad()
def test_glu_layout_model_decodes_the_same_logits():
    """A synthetic model with its gate_up rows in GLU pair order (forced on the CPU) gives the same logits as without,
    in prefill and in decode steps, with DEC off and on."""
    from decdec.config import DecConfig
    from decdec.synthetic import build_synthetic

    dec = DecConfig(name="t", n_tb=1)
    ref = build_synthetic("tiny", "ap", 3, False, torch.float32, torch.device("cpu"), dec).model
    glu = build_synthetic("tiny", "ap", 3, False, torch.float32, torch.device("cpu"), dec).model
    assert all(m.use_glu_layout(force=True) for p, _, m in glu.linears() if p == "gate_up")
    for k in (0, 16):
        for model in (ref, glu):
            for _, _, m in model.linears():
                m.set_dec(k, 1)
            model.setup_caches(1, 16, torch.float32, "cpu")
        tokens = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(3))
        assert torch.equal(glu(tokens, torch.arange(6)), ref(tokens, torch.arange(6))), k
        for pos in (6, 7):
            step = tokens[:, pos - 6: pos - 5]
            assert torch.equal(glu(step, torch.tensor([pos])), ref(step, torch.tensor([pos]))), (k, pos)

