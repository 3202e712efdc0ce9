"""SYNTHETIC models of real shapes, for speed measurements without downloading weights.

``model.source=synthetic`` builds Llama-3-8B, Phi-3-medium or Llama-3-70B shaped DecDEC models
directly on the device: random bit-plane codes + sorted per-row LUTs (ap) or random binary codes
+ alphas (lutgemm), random 4-bit residuals in pinned host memory, and thresholds shaped like
calibrated ones (sorted |N(0,1)| order statistics, max over tokens). Decode speed does not depend
on weight values, only on shapes, bit-widths and DEC settings -- but the text is noise, and every
output of such a run says ``synthetic: true``.
"""

from __future__ import annotations

import math

import torch

from decdec.builder import BuiltModel, resolve_dec
from decdec.config import DecConfig
from decdec.linear import QuantLinear
from decdec.model import ModelArgs, Transformer

# HF-config-shaped dicts of the real models (only shapes and RoPE matter for speed).
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "phi3-medium": dict(model_type="phi3", hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=10, vocab_size=32064, rope_theta=10000.0,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # SmolLM2's projection and head shapes with 4 layers: GPU tests of compiled decode (a 30-layer step took
    # ~30 s to compile per test on the H200)
    "smollm2-4l": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=320, rope_theta=10000.0,
                 max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


# Llama-3-8B's projection shapes with 2 layers and a small vocabulary: GPU tests of the decode kernels that only
# serve in = 4096 (the fused add + RMSNorm GEMV)
SHAPES["llama3-2l"] = {**SHAPES["llama3-8b"], "num_hidden_layers": 2, "vocab_size": 1024}


def _random_int32(shape, generator, device) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=generator, device=device)


def synthetic_thresholds(in_features: int, generator: torch.Generator) -> torch.Tensor:
    """[in] fp32, non-increasing: max over 256 tokens of the sorted |N(0,1)| activations."""
    x = torch.randn(256, in_features, generator=generator).abs()
    return x.sort(dim=1, descending=True).values.amax(0)


@torch.no_grad()
def build_synthetic(shape: str, backend: str, bits: int, mixed: bool, dtype: torch.dtype, device: torch.device,
                    dec: DecConfig, group_size: int | None = None, seed: int = 0) -> BuiltModel:
    """A DecDEC model of ``SHAPES[shape]`` with random weights, built in seconds on ``device``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}; choose one of {sorted(SHAPES)}")
    args = ModelArgs.from_hf_config(SHAPES[shape])
    bitwidths = {layer: (bits + (layer % 2) if mixed else bits) for layer in range(args.n_layers)}
    if backend == "fp16":
        bitwidths = {layer: 16 for layer in range(args.n_layers)}
    if backend == "lutgemm" and group_size is None:
        from decdec.prepare import auto_group_size

        group_size = auto_group_size(args, None)
    choices = resolve_dec(dec, backend, set(bitwidths.values()), mixed)
    gcpu = torch.Generator().manual_seed(seed)
    gdev = torch.Generator(device=device).manual_seed(seed)

    def make_linear(proj, layer, in_features, out_features):
        return QuantLinear(backend, in_features, out_features, bits=bitwidths[layer], group_size=group_size or 128,
                           dtype=dtype)

    with torch.device("meta"):
        model = Transformer(args, make_linear)
    model = model.to_empty(device=device).to(dtype)  # embeddings/norms in the compute dtype too
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dtype == torch.int32:
            t.copy_(_random_int32(t.shape, gdev, device))
        elif name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gdev)
    for proj, _, mod in model.linears():
        if backend == "ap":
            mod.lut.copy_(mod.lut.sort(dim=1).values)
            if proj == "gate_up":
                mod.use_glu_layout()  # as builder.build_model
            mod.use_kernel_layout()  # as builder.build_model: the CUDA GEMVs' own layout where they read it
        if backend == "fp16":
            continue
        std = 0.02 / math.sqrt(2 ** mod.bits)
        # every nibble odd (1..15): valid levels -7..7, never the unused nibble 0
        q_residual = _random_int32((mod.in_features, mod.out_features // 8), gcpu, "cpu") | 0x11111111
        scales = torch.full((mod.out_features,), std / 7, dtype=torch.float32)
        mod.attach_dec(q_residual, scales, synthetic_thresholds(mod.in_features, gcpu), device)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    for proj, layer, mod in model.linears():
        if backend != "fp16":
            c = choices[bitwidths[layer]]
            mod.set_dec(c.k_chunk[proj], c.n_tb[proj])
    return BuiltModel(model, args, None, bitwidths, choices, group_size)
