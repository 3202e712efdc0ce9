"""Build the DecDEC model from a checkpoint directory: meta-init, load with ``assign=True``,
attach residuals + thresholds, apply the DEC settings (``k_chunk``, ``n_tb``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from decdec import checkpoint as ckpt
from decdec.config import PROJECTIONS, DecConfig, KChunk
from decdec.linear import QuantLinear
from decdec.model import PROJECTIONS as MODULES
from decdec.model import ModelArgs, Transformer, hf_to_decdec_state_dict
from decdec.reference import chunk_quotas

SUPPORTED_BITS = (3, 4)


@dataclass
class DecChoice:
    """The resolved DEC setting of one bit-width: n_tb and k_chunk per projection."""

    n_tb: dict[str, int]
    k_chunk: dict[str, int]


def resolve_dec(dec: DecConfig, backend: str, bitwidths: set[int], mixed: bool) -> dict[int, DecChoice]:
    """DEC settings per bit-width, validated (errors name the config key to fix)."""

    def choice(n_tb: int, n_tb_proj, k: KChunk, where: str) -> DecChoice:
        if n_tb < 1:
            raise ValueError(f"{where}.n_tb must be >= 1, got {n_tb}")
        nt = {}
        for p in PROJECTIONS:
            v = getattr(n_tb_proj, p, None) if n_tb_proj is not None else None
            if v is not None and int(v) < 1:
                raise ValueError(f"{where}.n_tb_proj.{p} must be >= 1 (or null for {where}.n_tb), got {v}")
            nt[p] = int(v) if v is not None else int(n_tb)
        kc = {p: int(getattr(k, p)) for p in PROJECTIONS}
        for p, v in kc.items():
            if not 0 <= v <= 1024:
                raise ValueError(f"{where}.k_chunk.{p}={v} is outside 0..1024 (rows fetched per 1024 input channels)")
        return DecChoice(nt, kc)

    off = DecChoice({p: 1 for p in PROJECTIONS}, {p: 0 for p in PROJECTIONS})
    if not dec.enabled or backend == "fp16":
        return {b: off for b in bitwidths}
    if not mixed:
        c = choice(dec.n_tb, getattr(dec, "n_tb_proj", None), dec.k_chunk, "dec")
        return {b: c for b in bitwidths}
    have = {int(b) for b in dec.per_bits}
    if have != set(bitwidths):
        raise ValueError(
            f"mixed precision uses bit-widths {sorted(bitwidths)} but dec.per_bits gives {sorted(have)}: give exactly one "
            f"entry (n_tb, k_chunk) per bit-width, e.g. dec.per_bits.3.k_chunk.down=8"
        )
    per = {int(b): v for b, v in dec.per_bits.items()}
    return {b: choice(per[b].n_tb, getattr(per[b], "n_tb_proj", None), per[b].k_chunk, f"dec.per_bits.{b}")
            for b in bitwidths}


@dataclass
class BuiltModel:
    model: Transformer
    args: ModelArgs
    checkpoint: ckpt.Checkpoint | None  # None for a synthetic model
    bitwidths: dict[int, int]  # layer -> bits (all equal unless mixed)
    dec: dict[int, DecChoice]  # bits -> DEC setting
    group_size: int | None

    def dec_rows_per_token(self) -> int:
        """Residual rows DEC fetches per decoded token over the whole model."""
        return sum(sum(chunk_quotas(m.k_chunk, m.in_features)) for _, _, m in self.model.linears())

    def dec_bytes_per_token(self) -> int:
        """Residual bytes fetched over PCIe per decoded token (a row costs out/2 bytes)."""
        return sum(sum(chunk_quotas(m.k_chunk, m.in_features)) * m.out_features // 2 for _, _, m in self.model.linears())


def _check_shapes(model: Transformer, sd: dict[str, torch.Tensor], path: Path) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        want.pop("output.weight", None)  # tied to tok_embeddings; checkpoints store it once
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {want[k]}" for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    # packed integer tensors must have the exact dtype; floats are cast to the compute dtype on load
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    wrong += [f"{k}: checkpoint {sd[k].dtype} vs model {dtypes[k]}" for k in want if k in sd
              and (sd[k].dtype != dtypes[k] if not dtypes[k].is_floating_point else not sd[k].is_floating_point())]
    if missing or unexpected or wrong:
        lines = [f"checkpoint {path} does not match its config.json / the requested backend and precision:"]
        if missing:
            lines.append(f"  missing {len(missing)} tensors, e.g. {missing[:3]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
        if wrong:
            lines.append(f"  {len(wrong)} shape/dtype mismatches, e.g. {wrong[:3]}")
        lines.append("  re-create the checkpoint with scripts/prepare_checkpoint.py for this backend/precision")
        raise ckpt.CheckpointError("\n".join(lines))


def build_model(checkpoint: ckpt.Checkpoint, backend: str, bits: int, mixed: bool, dtype: torch.dtype,
                device: torch.device, dec: DecConfig) -> BuiltModel:
    args = ModelArgs.from_hf_config(checkpoint.hf_config)
    if backend == "fp16":
        if checkpoint.manifest is not None:
            raise ckpt.CheckpointError(
                f"backend=fp16 runs the original dense weights, but {checkpoint.path} is a quantized checkpoint; "
                "point model.checkpoint_path at the original HF directory"
            )
        bitwidths = {layer: 16 for layer in range(args.n_layers)}
        sd = hf_to_decdec_state_dict(ckpt.load_original_state_dict(checkpoint.path), args)
        group = None
    else:
        checkpoint.check_request(backend, bits, mixed)
        if mixed:
            bitwidths = checkpoint.bitwidth_map()
            if set(bitwidths) != set(range(args.n_layers)):
                raise ckpt.CheckpointError(
                    f"{checkpoint.path / ckpt.BITWIDTH_MAP} must name every layer 0..{args.n_layers - 1}, got {sorted(bitwidths)}"
                )
        else:
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"precision.bits={bits} is unsupported; choose 3 or 4 (or precision=w3.5)")
            bitwidths = {layer: bits for layer in range(args.n_layers)}
        sd = checkpoint.load(ckpt.WEIGHTS)
        group = checkpoint.manifest.get("group_size")
    choices = resolve_dec(dec, backend, set(bitwidths.values()), mixed)

    def make_linear(proj: str, layer: int, in_features: int, out_features: int) -> QuantLinear:
        return QuantLinear(backend, in_features, out_features, bits=bitwidths[layer], group_size=group or 128, dtype=dtype)

    with torch.device("meta"):
        model = Transformer(args, make_linear)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    _check_shapes(model, sd, checkpoint.path)
    model.load_state_dict(sd, assign=True)
    model = model.to(device)
    for proj, _, mod in model.linears():
        if proj == "gate_up":
            mod.use_glu_layout()  # SiLU x up in the gate_up GEMV's epilogue where the kernels serve it
        mod.use_kernel_layout()

    if backend != "fp16":
        cheat = checkpoint.load(ckpt.CHEATSHEET)
        thr = checkpoint.load(ckpt.THRESHOLDS)
        for proj, layer, mod in model.linears():
            name = f"layers.{layer}.{MODULES[proj]}"
            try:
                mod.attach_dec(cheat[f"{name}.q_residual"], cheat[f"{name}.scales"], thr[f"{name}.thresholds"], device,
                               channel_hits=thr.get(f"{name}.channel_hits"))
            except KeyError as e:
                raise ckpt.CheckpointError(f"{checkpoint.path}: cheatsheet/thresholds lack {e}; re-create the checkpoint") from None
            c = choices[bitwidths[layer]]
            mod.set_dec(c.k_chunk[proj], c.n_tb[proj])
    return BuiltModel(model, args, checkpoint, bitwidths, choices, group)

