"""Original HF checkpoint -> DecDEC checkpoint directory (DESIGN.md §4).

Steps: calibrate on real text with the dense model (per-linear |x| order statistics -> DEC
thresholds; channel energies -> quantizer sensitivity; a few activations for the lutgemm clip
search), quantize every projection (``ap`` or ``lutgemm``), build its 4-bit residual
"cheatsheet", choose mixed-precision bit-widths by measured sensitivity, and write everything
into a staging directory that is renamed into place only when complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from decdec import checkpoint as ckpt
from decdec import quantize, reference
from decdec.model import PROJECTIONS, ModelArgs, Transformer, hf_to_decdec_state_dict

PREPARE_VERSION = 2  # bump when quantizers change: cached embedded checkpoints are then rebuilt
STORAGE_DTYPE = torch.float16


@dataclass
class PrepareSpec:
    backend: str  # ap | lutgemm
    bits: int = 3  # uniform bit-width (mixed: the lower one)
    mixed: bool = False  # 3.5-bit: the most sensitive half of the layers get bits + 1
    group_size: int | None = None  # lutgemm; None = 128, or the largest multiple of 32 dividing every in
    calib_tokens: int = 4096
    calib_seq_len: int = 512
    clip_tokens: int = 256  # activations kept per linear for the lutgemm clip search
    meta: dict = field(default_factory=dict)  # extra manifest entries (source names, ...)


def auto_group_size(args: ModelArgs, requested: int | None) -> int:
    ins = {i for i, _ in args.projection_shapes().values()}
    if requested is not None:
        bad = sorted(i for i in ins if i % requested)
        if bad or requested % 32:
            raise ValueError(f"lutgemm group_size={requested} must be a multiple of 32 dividing every in_features {sorted(ins)}")
        return requested
    for g in (128, 96, 64, 32):
        if all(i % g == 0 for i in ins):
            return g
    raise ValueError(f"no lutgemm group size divides in_features {sorted(ins)}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False)


@torch.no_grad()
def calibrate(model: Transformer, tokens: torch.Tensor, seq_len: int, clip_tokens: int):
    """Run the dense model over ``tokens`` [N] and collect per-linear statistics.

    Returns ({(proj, layer): ThresholdCalibrator}, {(proj, layer): activations [<=clip_tokens, in]}).
    """
    cals: dict[tuple[str, int], quantize.ThresholdCalibrator] = {}
    samples: dict[tuple[str, int], list[torch.Tensor]] = {}
    hooks = []
    for proj, layer, mod in model.linears():
        key = (proj, layer)
        cals[key] = quantize.ThresholdCalibrator(mod.in_features)
        samples[key] = []

        def hook(_m, inputs, key=key):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            cals[key].update(x)
            have = sum(s.shape[0] for s in samples[key])
            if have < clip_tokens:
                samples[key].append(x[: clip_tokens - have].clone())

        hooks.append(mod.register_forward_pre_hook(hook))
    n_seq = max(1, tokens.numel() // seq_len)
    model.setup_caches(1, seq_len, torch.float32, torch.device("cpu"))
    try:
        with _progress() as bar:
            task = bar.add_task("calibrating (dense model, real text)", total=n_seq)
            for s in range(n_seq):
                chunk = tokens[s * seq_len:(s + 1) * seq_len].view(1, -1)
                model(chunk, torch.arange(chunk.shape[1]))
                bar.advance(task)
    finally:
        for h in hooks:
            h.remove()
    return cals, {k: torch.cat(v) for k, v in samples.items()}


def _quantize_one(spec: PrepareSpec, w: torch.Tensor, bits: int, group: int, cal, x) -> tuple[dict, torch.Tensor]:
    """One projection: (tensors by suffix, dequantized W_q fp32)."""
    if spec.backend == "ap":
        qweight, lut = quantize.quantize_ap(w, bits, channel_weight=cal.channel_energy)
        return {"qweight": qweight, "lut": lut.to(STORAGE_DTYPE)}, reference.ap_dequant(qweight, lut.float())
    if spec.backend == "lutgemm":
        binary, alpha, q_bias = quantize.quantize_lutgemm(w, bits, group_size=group, x=x)
        t = {"binary": binary, "alpha": alpha.to(STORAGE_DTYPE), "q_bias": q_bias.to(STORAGE_DTYPE)}
        return t, reference.lutgemm_dequant(binary, alpha.float(), q_bias.float())
    raise ValueError(f"cannot quantize for backend {spec.backend!r}; choose ap or lutgemm")


def _sensitivity(w: torch.Tensor, w_q: torch.Tensor, energy: torch.Tensor) -> float:
    """Relative output error energy of one projection: sum_i e_i |E_:,i|^2 / sum_i e_i |W_:,i|^2."""
    e = energy.float()
    return float(((w - w_q) ** 2).sum(0) @ e / ((w**2).sum(0) @ e).clamp_min(1e-30))


def prepare_checkpoint(original: Path, out_dir: Path, spec: PrepareSpec, calib_text: str, overwrite: bool = False) -> Path:
    """Quantize the HF checkpoint at ``original`` into a DecDEC checkpoint at ``out_dir``."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    src = ckpt.Checkpoint.open(original)
    args = ModelArgs.from_hf_config(src.hf_config)
    sd = {k: v.float() for k, v in hf_to_decdec_state_dict(ckpt.load_original_state_dict(original), args).items()}
    group = auto_group_size(args, spec.group_size) if spec.backend == "lutgemm" else None

    tok = AutoTokenizer.from_pretrained(original)
    ids = torch.tensor(tok(calib_text, add_special_tokens=False)["input_ids"][: spec.calib_tokens], dtype=torch.long)
    if ids.numel() < spec.calib_seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, need at least {spec.calib_seq_len}")
    with torch.device("meta"):
        dense = Transformer(args)
    dense.load_state_dict(sd, assign=True)
    cals, acts = calibrate(dense, ids, min(spec.calib_seq_len, args.max_position_embeddings), spec.clip_tokens)
    del dense

    def weight_of(proj: str, layer: int) -> torch.Tensor:
        return sd[f"layers.{layer}.{PROJECTIONS[proj]}.weight"]

    bitwidths = {layer: spec.bits for layer in range(args.n_layers)}
    if spec.mixed:
        sens = []
        with _progress() as bar:
            task = bar.add_task(f"sensitivity at {spec.bits} bits", total=args.n_layers)
            for layer in range(args.n_layers):
                s = 0.0
                for proj in PROJECTIONS:
                    w = weight_of(proj, layer)
                    _, w_q = _quantize_one(spec, w, spec.bits, group, cals[(proj, layer)], acts[(proj, layer)])
                    s += _sensitivity(w, w_q, cals[(proj, layer)].channel_energy)
                sens.append(s)
                bar.advance(task)
        order = sorted(range(args.n_layers), key=lambda i: -sens[i])
        for layer in order[: args.n_layers // 2]:
            bitwidths[layer] = spec.bits + 1

    weights: dict[str, torch.Tensor] = {}
    cheat: dict[str, torch.Tensor] = {}
    thresholds: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not any(f".{PROJECTIONS[p]}." in k for p in PROJECTIONS):
            weights[k] = v.to(STORAGE_DTYPE)
    with _progress() as bar:
        task = bar.add_task(f"quantizing ({spec.backend}) + residuals", total=args.n_layers * len(PROJECTIONS))
        for layer in range(args.n_layers):
            for proj in PROJECTIONS:
                name = f"layers.{layer}.{PROJECTIONS[proj]}"
                w = weight_of(proj, layer)
                cal = cals[(proj, layer)]
                tensors, w_q = _quantize_one(spec, w, bitwidths[layer], group, cal, acts[(proj, layer)])
                for suffix, t in tensors.items():
                    weights[f"{name}.{suffix}"] = t
                q_residual, scales = quantize.residual_cheatsheet(w, w_q)
                cheat[f"{name}.q_residual"] = q_residual
                cheat[f"{name}.scales"] = scales.to(STORAGE_DTYPE)
                thresholds[f"{name}.thresholds"] = cal.thresholds
                thresholds[f"{name}.channel_hits"] = cal.channel_hits  # static-selection ablation
                bar.advance(task)

    manifest = {
        "format": ckpt.FORMAT,
        "format_version": ckpt.FORMAT_VERSION,
        "prepare_version": PREPARE_VERSION,
        "backend": spec.backend,
        "bits": spec.bits,
        "mixed": spec.mixed,
        "group_size": group,
        "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
        "source_model": {"path": str(original), "sha256": ckpt.file_sha256(sorted(Path(original).glob("*.safetensors")))},
        "calibration": {"tokens": int(ids.numel()), "seq_len": spec.calib_seq_len},
        "prepare_seconds": None,
        **spec.meta,
    }
    with ckpt.StagingDir(out_dir, overwrite=overwrite) as tmp:
        ckpt.save_tensors_atomic(tmp / ckpt.WEIGHTS, weights)
        ckpt.save_tensors_atomic(tmp / ckpt.CHEATSHEET, cheat)
        ckpt.save_tensors_atomic(tmp / ckpt.THRESHOLDS, thresholds)
        if spec.mixed:
            ckpt.write_json_atomic(tmp / ckpt.BITWIDTH_MAP, {str(k): v for k, v in bitwidths.items()})
        ckpt.write_json_atomic(tmp / "config.json", src.hf_config)
        tok.save_pretrained(tmp)
        manifest["prepare_seconds"] = round(time.perf_counter() - t0, 1)
        ckpt.write_json_atomic(tmp / ckpt.MANIFEST, manifest)  # last: its presence marks completeness
    return Path(out_dir)
