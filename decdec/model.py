"""Decoder-only Transformer (Llama-3, Phi-3, SmolLM2) with a static KV cache, gpt-fast style.

Build on ``meta``, load with ``load_state_dict(sd, assign=True)``, then ``setup_caches``.
The four projections of every layer are always fused (``wqkv``, ``wo``, ``w1w3``, ``w2``) and
are built by a caller-supplied ``make_linear`` so quantized linears plug in without touching
this file. RoPE uses HF's rotate_half convention, so HF q/k weights load without permutation.

Shapes: B batch, S tokens this call, L = max_seq_length of the cache, D = dim,
H / Hkv query / key-value heads, Dh head_dim, R rotary dims (= Dh unless partial rotary), V vocab.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import decdec.ops  # noqa: F401  registers torch.ops.decdec (decode_attention)
from decdec import reference

# config key -> module path inside a layer (``layers[i].<path>``)
PROJECTIONS = {"qkv": "attention.wqkv", "o": "attention.wo", "gate_up": "feed_forward.w1w3", "down": "feed_forward.w2"}

MakeLinear = Callable[[str, int, int, int], nn.Module]  # (proj, layer_idx, in_features, out_features)

_ARCH_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "phi3": "phi3"}
_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelArgs:
    arch: str  # "llama" | "phi3" (phi3 differs only in its HF checkpoint: fused qkv_proj / gate_up_proj)
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None = default RoPE; else {"rope_type": "llama3", factor, ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated (Phi-style)
    sliding_window: int | None = None  # key j is visible to query i iff i - window < j <= i (HF semantics)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """Args from the dict of an HF ``config.json`` (or ``PretrainedConfig.to_dict()``).

        Accepts model_type llama / mistral / phi3, old-style ``rope_scaling`` + ``rope_theta`` and
        transformers-5 ``rope_parameters``. Raises ValueError for anything this model would
        silently get wrong (unknown model_type, missing keys, biases, other activations or RoPE types).
        """
        model_type = config.get("model_type")
        if model_type not in _ARCH_OF_MODEL_TYPE:
            raise ValueError(
                f"unsupported model_type {model_type!r}: decdec.model supports {sorted(_ARCH_OF_MODEL_TYPE)}"
            )
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "rms_norm_eps", "max_position_embeddings")
        missing = [k for k in required if config.get(k) is None]
        if missing:
            raise ValueError(f"HF config (model_type {model_type!r}) lacks required keys {missing}")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}: only 'silu'")
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                raise ValueError(f"unsupported {flag}=True: decdec.model has bias-free projections")

        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r}: decdec.model supports {list(_ROPE_TYPES)}")
        rope_scaling = None
        if rope_type == "llama3":
            lacking = [k for k in _LLAMA3_KEYS if k not in rope]
            if lacking:
                raise ValueError(f"llama3 rope_scaling lacks keys {lacking}")
            rope_scaling = {"rope_type": "llama3", **{k: rope[k] for k in _LLAMA3_KEYS}}

        n_heads = config["num_attention_heads"]
        return cls(
            arch=_ARCH_OF_MODEL_TYPE[model_type],
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            intermediate_size=config["intermediate_size"],
            norm_eps=float(config["rms_norm_eps"]),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rope_scaling=rope_scaling,
            max_position_embeddings=config["max_position_embeddings"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))),
            # HF's Llama ignores a sliding_window key; Phi-3 / Mistral apply it
            sliding_window=config.get("sliding_window") if model_type != "llama" else None,
        )

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """{proj: (in_features, out_features)} of the four fused projections of every layer."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {
            "qkv": (self.dim, q + 2 * kv),
            "o": (q, self.dim),
            "gate_up": (self.dim, 2 * self.intermediate_size),
            "down": (self.intermediate_size, self.dim),
        }


def _default_linear(proj: str, layer_idx: int, in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


def add_norm_project(linear: nn.Module, a: Tensor, b: Tensor | None, norm: nn.Module, b_from: nn.Module | None = None
                     ) -> tuple[Tensor, Tensor]:
    """(linear(norm(h)), h), h = a + b (a when b is None): through the linear's fused kernel where it has one
    (``QuantLinear.forward_addnorm``), else as separate ops (a plain ``nn.Linear``). ``b_from``: the projection
    that produced b; when it runs DEC, its combine (GEMV + scale * DEC) is a pointwise op that the compiled step
    fuses into a separate add + norm kernel, so the fused GEMV would add a kernel instead of removing one. In chain mode
    (``QuantLinear.dec_chain``) b_from's output is final, and the fusion stays."""
    if hasattr(linear, "forward_addnorm") and (getattr(b_from, "k_chunk", 0) == 0 or getattr(b_from, "dec_chain", False)):
        return linear.forward_addnorm(a, b, norm)
    h = a if b is None else a + b
    return linear(norm(h)), h


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies [R/2] float32 (default or llama3-scaled), same formulas as HF."""
    r = args.rotary_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling
    factor, lo, hi, old_len = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (> old_len/lo) are slowed by `factor`, short ones (< old_len/hi) kept, smooth in between
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


apply_rope = reference.apply_rope  # x [B, S, nH, Dh]; cos/sin [S, R] float32 (first R dims rotated, rotate_half)


def gqa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [B, H, S, Dh], k/v [B, Hkv, L, Dh], mask [1, 1, S, L] bool -> [B, S, H * Dh].

    Grouped-query attention without expanding K/V to H heads: query head h uses KV head h // rep
    (rep = H / Hkv, as repeat_interleave would), so the rep query heads of a KV head are stacked as
    rep * S query rows of that head. Same math per (head, query) as the expanded form; no copy of
    the cache per step (a decode step otherwise materialises K and V twice over every position).
    H200, synthetic Llama-3-8B ap w3 decode (docs/PERF.md, session 4): 280 us of attention kernels per
    token against 315 us with repeat_interleave; a hand-written decode form (broadcast products and
    softmax, all inductor kernels) was slower than both."""
    B, H, S, Dh = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    if rep == 1:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, S, Dh]
        return y.transpose(1, 2).reshape(B, S, H * Dh)
    qg = q.reshape(B, Hkv, rep * S, Dh)  # rows (r, s): heads h = kv * rep + r are contiguous
    mg = mask.expand(1, 1, S, mask.shape[-1]).repeat(1, 1, rep, 1)  # [1, 1, rep * S, L], rows (r, s)
    y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg)  # [B, Hkv, rep * S, Dh]
    return y.view(B, Hkv, rep, S, Dh).permute(0, 3, 1, 2, 4).reshape(B, S, H * Dh)


class KVCache(nn.Module):
    """K and V of every layer position in one buffer ``kv [2, B, Hkv, L, Dh]``, so that a step writes
    both with one indexed store; ``k_cache`` / ``v_cache`` are its two halves (views)."""

    def __init__(self, max_batch_size: int, max_seq_length: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (2, max_batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def k_cache(self) -> Tensor:
        return self.kv[0]

    @property
    def v_cache(self) -> Tensor:
        return self.kv[1]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """input_pos [S]; k, v [B, Hkv, S, Dh] -> full caches [B, Hkv, L, Dh] after writing."""
        kv = self.kv[:, : k.shape[0]]
        kv[:, :, :, input_pos] = torch.stack([k, v]).to(kv.dtype)
        return kv[0], kv[1]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]; normalised in float32 like HF, then scaled in x's dtype."""
        return reference.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, make_linear: MakeLinear):
        super().__init__()
        shapes = args.projection_shapes()
        self.wqkv = make_linear("qkv", layer_idx, *shapes["qkv"])
        self.wo = make_linear("o", layer_idx, *shapes["o"])
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window or 0
        self.decode_op = False  # decode steps through decdec.decode_attention (Transformer.use_decode_attention)
        self.decode_rope = False  # ... as decode_attention_rope: RoPE and the KV-cache write inside the attention kernel
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        """x [B, S, D]; cos/sin [S, R]; mask [1, 1, S, L] bool; input_pos [S] -> [B, S, D]."""
        return self.attend(self.wqkv(x), cos, sin, mask, input_pos)

    def attend(self, qkv: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        """The layer after the qkv projection: qkv [B, S, (H + 2 Hkv) Dh] -> o-projection output [B, S, D]."""
        B, S, _ = qkv.shape
        if S == 1 and self.decode_op and self.decode_rope and self.kv_cache.kv.dtype == qkv.dtype:
            # one kernel: RoPE of q and k, the KV-cache write at input_pos and the attention (rows <= pos)
            y = torch.ops.decdec.decode_attention_rope(qkv.reshape(B, -1), cos, sin, self.kv_cache.kv, input_pos,
                                                       self.n_heads, self.window).view(B, 1, -1)
            return self.wo(y)
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(B, S, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, S, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, nH, S, Dh]
        k, v = self.kv_cache.update(input_pos, k, v)  # [B, Hkv, L, Dh]
        if S == 1 and self.decode_op and k.dtype == q.dtype:  # one kernel, rows <= pos only (pos read on the device)
            y = torch.ops.decdec.decode_attention(q.reshape(B, self.n_heads, self.head_dim), k, v, input_pos,
                                                  self.window).view(B, 1, -1)
        else:
            y = gqa_attention(q, k.to(q.dtype), v.to(q.dtype), mask)  # [B, S, H * Dh]
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, make_linear: MakeLinear):
        super().__init__()
        shapes = args.projection_shapes()
        self.w1w3 = make_linear("gate_up", layer_idx, *shapes["gate_up"])
        self.w2 = make_linear("down", layer_idx, *shapes["down"])

    def forward(self, x: Tensor) -> Tensor:
        """x [B, S, D] -> [B, S, D]; w1w3 gives [B, S, 2I] = (gate, up)."""
        return self.down(self.w1w3(x))

    def down(self, gate_up: Tensor) -> Tensor:
        """[B, S, 2I] (gate, up) -> w2(silu(gate) * up) [B, S, D]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, make_linear: MakeLinear):
        super().__init__()
        self.attention = Attention(args, layer_idx, make_linear)
        self.feed_forward = FeedForward(args, layer_idx, make_linear)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        """x [B, S, D] -> [B, S, D] (pre-norm residual block)."""
        h, f = self.forward_pending(x, None, cos, sin, mask, input_pos)
        return h + f

    def forward_pending(self, a: Tensor, b: Tensor | None, cos: Tensor, sin: Tensor, mask: Tensor,
                        input_pos: Tensor, b_from: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """The block on the input x = a + b (b None: x = a; ``b_from`` produced b), returning its output as the pending
        sum (h, f), h + f. Same math as ``forward``; the adds are left to the next projection, whose GEMV performs
        them with the RMSNorm where the decode kernels allow (``add_norm_project``), instead of separate kernels."""
        qkv, x = add_norm_project(self.attention.wqkv, a, b, self.attention_norm, b_from)
        o = self.attention.attend(qkv, cos, sin, mask, input_pos)
        w13 = self.feed_forward.w1w3
        if getattr(w13, "glu_pairs", False):  # SiLU x up inside the gate_up GEMV where it can (QuantLinear.use_glu_layout)
            act, h = w13.forward_addnorm_glu(x, o, self.ffn_norm,
                                             fuse=getattr(self.attention.wo, "k_chunk", 0) == 0
                                             or getattr(self.attention.wo, "dec_chain", False))
            return h, self.feed_forward.w2(act)
        gate_up, h = add_norm_project(w13, x, o, self.ffn_norm, self.attention.wo)
        return h, self.feed_forward.down(gate_up)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, make_linear: MakeLinear | None = None):
        super().__init__()
        self.args = args
        make_linear = make_linear or _default_linear
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i, make_linear) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
            # load_state_dict(assign=True) replaces tok_embeddings.weight: re-tie afterwards, and
            # accept state dicts without output.weight (HF omits lm_head for tied models).
            self.register_load_state_dict_post_hook(_retie_output)
        self.max_batch_size = self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype, device) -> None:
        """Allocate KV caches [max_batch_size, Hkv, max_seq_length, Dh] in `dtype`, RoPE tables
        [max_seq_length, R] float32 and the causal (+ sliding window) mask [L, L] bool on `device`."""
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        a = self.args
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, a.n_kv_heads, a.head_dim, dtype, device)
        freqs = torch.outer(torch.arange(max_seq_length, dtype=torch.float32), rope_inv_freq(a))  # [L, R/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [L, R], HF rotate_half layout
        self.register_buffer("rope_cos", emb.cos().to(device), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(device), persistent=False)
        pos = torch.arange(max_seq_length, device=device)
        mask = pos[None, :] <= pos[:, None]  # [L(query), L(key)]
        if a.sliding_window is not None:
            mask &= pos[None, :] > pos[:, None] - a.sliding_window
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        """idx [B, S] int64 tokens at positions input_pos [S] int64 -> logits [B, S, V] in the
        dtype of `output.weight` (cast to float32 for losses). Writes K/V at input_pos in the cache."""
        if self.max_seq_length < 0:
            raise RuntimeError("call setup_caches(...) before forward")
        mask = self.causal_mask[input_pos][None, None]  # [1, 1, S, L]
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [S, R]
        a, b = self.tok_embeddings(idx), None  # [B, S, D]; the residual stream is a + b
        b_from = None  # the projection that produced b (the previous layer's down)
        for layer in self.layers:
            a, b = layer.forward_pending(a, b, cos, sin, mask, input_pos, b_from)
            b_from = layer.feed_forward.w2
        return self.output(self.norm(a if b is None else a + b))

    def decode_attention_supported(self) -> bool:
        """Whether ``torch.ops.decdec.decode_attention`` serves these heads (<= 8 query heads per KV head,
        head_dim <= 256)."""
        a = self.args
        return a.n_heads // a.n_kv_heads <= 8 and a.head_dim <= 256

    def use_decode_attention(self, on: bool = True, rope: bool | None = None) -> None:
        """Run decode steps (S = 1) through ``torch.ops.decdec.decode_attention``: one kernel per layer that
        reads only cache rows <= pos, instead of SDPA over the whole masked cache. The model is built with
        SDPA; runs pick with ``Config.attention`` (``choose_attention``). ``rope`` (default: off unless the
        environment sets DECDEC_ATTN_ROPE=1, the A/B knob): through ``decode_attention_rope``, which also applies
        RoPE and writes the step's K/V into the cache, so no kernel runs between the qkv projection and it. Correct
        on the GPU, but slower end to end in every H200 A/B so far (synthetic Llama-3-8B ap w3; session 18, after
        its kernel cut its extra cost per call over decode_attention from 4.7 to 1.1 us: 474.1 vs 482.0 tokens/s;
        docs/PERF.md, GPU end to end), so the unfused path stays the default."""
        a = self.args
        if on and not self.decode_attention_supported():
            raise ValueError(f"decode_attention supports <= 8 query heads per KV head and head_dim <= 256, "
                             f"got {a.n_heads}/{a.n_kv_heads} heads, head_dim {a.head_dim}")
        if rope is None:
            rope = os.environ.get("DECDEC_ATTN_ROPE", "0") == "1"
        for layer in self.layers:
            layer.attention.decode_op = on
            layer.attention.decode_rope = rope

    def choose_attention(self, mode: str, device: torch.device) -> str:
        """Apply ``Config.attention`` and return what decode steps use ("kernel" or "sdpa"). ``auto`` takes the
        kernel on CUDA where the heads allow it: a synthetic Llama-3-8B ap w3 decode on an H200 ran at 393.6
        tokens/s with it against 350.0 with SDPA over 128 tokens, and 384.3 against 302.9 over 512 (same run,
        docs/PERF.md, session 7). On the CPU the op is the pure-PyTorch reference, so ``auto`` keeps SDPA there."""
        if mode not in ("auto", "kernel", "sdpa"):  # decdec.config.ATTENTIONS (not imported: it pulls in Hydra)
            raise ValueError(f"attention={mode!r}; choose auto, kernel or sdpa")
        on = mode == "kernel" or (mode == "auto" and device.type == "cuda" and self.decode_attention_supported())
        self.use_decode_attention(on)
        return "kernel" if on else "sdpa"

    def linears(self) -> Iterator[tuple[str, int, nn.Module]]:
        """(proj, layer_idx, module) for all 4 * n_layers projections, layer-major, PROJECTIONS order."""
        for i, layer in enumerate(self.layers):
            for proj, path in PROJECTIONS.items():
                yield proj, i, layer.get_submodule(path)


def _retie_output(module: Transformer, incompatible_keys) -> None:
    module.output.weight = module.tok_embeddings.weight
    missing = incompatible_keys.missing_keys
    if "output.weight" in missing:
        missing.remove("output.weight")


def hf_to_decdec_state_dict(state_dict: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Rename (and fuse) an HF LlamaForCausalLM / Phi3ForCausalLM state dict to ours.

    q/k/v [*, D] -> layers.i.attention.wqkv.weight [(H + 2 Hkv) Dh, D] (cat on dim 0, no permutation);
    gate/up -> layers.i.feed_forward.w1w3.weight [2I, D]; Phi-3's qkv_proj / gate_up_proj are already
    fused in that order. With tied embeddings only tok_embeddings.weight is emitted (lm_head ignored).
    Raises KeyError listing missing tensors, and for unexpected ones (e.g. biases) rather than drop them.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    used: set[str] = set()
    missing: list[str] = []

    def take(name: str) -> Tensor | None:
        if name not in sd:
            missing.append(name)
            return None
        used.add(name)
        return sd[name]

    def cat(*names: str) -> Tensor | None:
        parts = [take(n) for n in names]
        return None if any(p is None for p in parts) else torch.cat(parts, dim=0)

    out = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if args.tie_word_embeddings:
        used.add("lm_head.weight")
    else:
        out["output.weight"] = take("lm_head.weight")
    for i in range(args.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        if args.arch == "phi3":
            wqkv, w1w3 = take(hf + "self_attn.qkv_proj.weight"), take(hf + "mlp.gate_up_proj.weight")
        else:
            wqkv = cat(*(hf + f"self_attn.{p}_proj.weight" for p in "qkv"))
            w1w3 = cat(hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")
        out[ours + "attention.wqkv.weight"] = wqkv
        out[ours + "attention.wo.weight"] = take(hf + "self_attn.o_proj.weight")
        out[ours + "feed_forward.w1w3.weight"] = w1w3
        out[ours + "feed_forward.w2.weight"] = take(hf + "mlp.down_proj.weight")
        out[ours + "attention_norm.weight"] = take(hf + "input_layernorm.weight")
        out[ours + "ffn_norm.weight"] = take(hf + "post_attention_layernorm.weight")
    if missing:
        raise KeyError(f"HF state dict ({args.arch}, {args.n_layers} layers) lacks {len(missing)} tensors: {missing}")
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise KeyError(f"HF state dict has tensors decdec.model does not use: {unexpected}")
    return out
