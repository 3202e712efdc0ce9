"""Original HF checkpoint -> DecDEC checkpoint directory (DESIGN.md §4).

Steps: calibrate on real text with the dense model (per-linear |x| order statistics -> DEC
thresholds; channel energies -> quantizer sensitivity; a few activations for the lutgemm clip
search), quantize every projection (``ap`` or ``lutgemm``), build its 4-bit residual
"cheatsheet", choose mixed-precision bit-widths by measured sensitivity, and write everything
into a staging directory that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from decdec import checkpoint as ckpt
from decdec import quantize, reference
from decdec.model import PROJECTIONS, ModelArgs, Transformer, hf_to_decdec_state_dict

PREPARE_VERSION = 3  # bump when quantizers change: cached embedded checkpoints are then rebuilt
STORAGE_DTYPE = torch.float16


@dataclass
class PrepareSpec:
    backend: str  # ap | lutgemm
    bits: int = 3  # uniform bit-width (mixed: the lower one)
    mixed: bool = False  # 3.5-bit: the most sensitive half of the layers get bits + 1
    group_size: int | None = None  # lutgemm; None = 128, else 64 or 32, whichever divides every in
    fisher: bool = False  # ap: Fisher weights (squared gradients) instead of activation energy (worse here: docs/RESULTS.md)
    fisher_tokens: int = 2048  # calibration tokens whose loss gradients make the Fisher weights
    awq: bool = True  # lutgemm: AWQ activation-aware per-channel scales, folded into the preceding op
    awq_grid: int = 10  # scale exponents tried per projection
    awq_tokens: int = 128  # calibration tokens used by the scale search
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
    for g in (128, 64, 32):  # powers of two: the group sizes the CUDA kernels are tested with
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


def _quantize_one(spec: PrepareSpec, w: torch.Tensor, bits: int, group: int, cal: "LinearStats", x,
                  fisher: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """One projection: (tensors by suffix, dequantized W_q fp32). ``fisher`` [out, in] (ap only)
    replaces the per-channel activation energy as the k-means sensitivity when given."""
    if spec.backend == "ap":
        weight = fisher if fisher is not None else cal.channel_energy
        qweight, lut = quantize.quantize_ap(w, bits, channel_weight=weight)
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


@dataclass
class LinearStats:
    """Calibration statistics of one linear, persisted so an interrupted prepare can resume."""

    thresholds: torch.Tensor  # [in] fp32
    channel_energy: torch.Tensor  # [in] fp32
    channel_hits: torch.Tensor  # [in] int64
    acts: torch.Tensor  # [<=clip_tokens, in] fp32


def _calibration_stats(work: Path, sd, args: ModelArgs, tok, spec: PrepareSpec, calib_text: str,
                       name: str = "calibration.safetensors"):
    """{(proj, layer): LinearStats} from work/<name>, or computed (dense model ``sd``) and saved there."""
    f = work / name
    if f.exists():
        t = load_file(f)
        n_tokens = int(t.pop("__tokens__").item())
        stats = {}
        for layer in range(args.n_layers):
            for proj in PROJECTIONS:
                k = f"{layer}.{proj}"
                stats[(proj, layer)] = LinearStats(t[f"{k}.thresholds"], t[f"{k}.energy"], t[f"{k}.hits"], t[f"{k}.acts"])
        return stats, n_tokens
    ids = torch.tensor(tok(calib_text, add_special_tokens=False)["input_ids"][: spec.calib_tokens], dtype=torch.long)
    if ids.numel() < spec.calib_seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, need at least {spec.calib_seq_len}")
    with torch.device("meta"):
        dense = Transformer(args)
    dense.load_state_dict(sd, assign=True)
    cals, acts = calibrate(dense, ids, min(spec.calib_seq_len, args.max_position_embeddings), spec.clip_tokens)
    stats = {key: LinearStats(c.thresholds, c.channel_energy, c.channel_hits, acts[key]) for key, c in cals.items()}
    flat = {"__tokens__": torch.tensor([ids.numel()])}
    for (proj, layer), st in stats.items():
        k = f"{layer}.{proj}"
        flat.update({f"{k}.thresholds": st.thresholds, f"{k}.energy": st.channel_energy, f"{k}.hits": st.channel_hits,
                     f"{k}.acts": st.acts})
    ckpt.save_tensors_atomic(f, flat)
    return stats, int(ids.numel())


# Which op produces each projection's input, for folding AWQ's 1/s into it.
_AWQ_PRODUCERS = {"qkv": "attention_norm", "gate_up": "ffn_norm"}


def awq_fold(sd: dict[str, torch.Tensor], args: ModelArgs, stats, spec: PrepareSpec, group: int, work: Path) -> dict:
    """AWQ scale search per projection; folds ``1/s`` into the producer of its input, in place.

    qkv and gate_up: their RMSNorm weight; down: the rows of the up half of ``w1w3``; o only
    without GQA (v's rows then map one-to-one onto o's input channels). The model function is
    unchanged (``W diag(s) diag(1/s) x``), the quantizer then sees ``W diag(s)``. Scales are kept
    in ``work`` so a resumed prepare folds the same ones. Returns {"layer.proj": ratio}.
    """
    f = work / "awq_scales.safetensors"
    if f.exists():
        scales = load_file(f)
    else:
        scales = {}
        projs = ["qkv", "gate_up", "down"] + (["o"] if args.n_heads == args.n_kv_heads else [])
        with _progress() as bar:
            task = bar.add_task("AWQ scale search (lutgemm)", total=args.n_layers * len(projs))
            for layer in range(args.n_layers):
                for proj in projs:
                    w = sd[f"layers.{layer}.{PROJECTIONS[proj]}.weight"]
                    x = stats[(proj, layer)].acts[: spec.awq_tokens]
                    s, ratio = quantize.search_scale(w, x, spec.bits, group, grid=spec.awq_grid)
                    scales[f"{layer}.{proj}"] = s
                    scales[f"{layer}.{proj}.ratio"] = torch.tensor([ratio])
                    bar.advance(task)
        ckpt.save_tensors_atomic(f, scales)
    ratios = {}
    inter, q_out = args.intermediate_size, args.n_heads * args.head_dim
    kv = args.n_kv_heads * args.head_dim
    order = {p: i for i, p in enumerate(PROJECTIONS)}
    keys = sorted((k for k in scales if not k.endswith(".ratio")),
                  key=lambda k: (int(k.split(".")[0]), order[k.split(".")[1]]))  # same order when resumed
    for key in keys:
        layer, proj = key.split(".")
        s = scales[key].float()
        w_key = f"layers.{layer}.{PROJECTIONS[proj]}.weight"
        sd[w_key] = sd[w_key] * s  # columns
        if proj in _AWQ_PRODUCERS:
            n_key = f"layers.{layer}.{_AWQ_PRODUCERS[proj]}.weight"
            sd[n_key] = sd[n_key] / s
        elif proj == "down":  # rows of up = second half of w1w3
            w13 = sd[f"layers.{layer}.feed_forward.w1w3.weight"].clone()
            w13[inter:] = w13[inter:] / s.view(-1, 1)
            sd[f"layers.{layer}.feed_forward.w1w3.weight"] = w13
        elif proj == "o":  # rows of v inside wqkv
            qkv = sd[f"layers.{layer}.attention.wqkv.weight"].clone()
            qkv[q_out + kv:] = qkv[q_out + kv:] / s.view(-1, 1)
            sd[f"layers.{layer}.attention.wqkv.weight"] = qkv
        ratios[key] = float(scales[f"{key}.ratio"])
    return ratios


def fisher_weights(original: Path, args: ModelArgs, tok, spec: PrepareSpec, calib_text: str, work: Path) -> dict:
    """SqueezeLLM's sensitivity: per-element sum of squared loss gradients over calibration text.

    Computed with the HF model of ``original`` (plain autograd, no KV cache), fused to our
    projection names; kept in ``work/fisher.safetensors`` for a resumed prepare.
    Returns {"layers.{i}.<module>": [out, in] fp32}.
    """
    f = work / "fisher.safetensors"
    if f.exists():
        return load_file(f)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    model.train(False)
    ids = torch.tensor(tok(calib_text, add_special_tokens=False)["input_ids"][: spec.fisher_tokens], dtype=torch.long)
    seq = min(spec.calib_seq_len, args.max_position_embeddings)
    n_seq = max(1, ids.numel() // seq)
    sq = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with _progress() as bar:
        task = bar.add_task("Fisher weights (squared gradients)", total=n_seq)
        for s in range(n_seq):
            chunk = ids[s * seq:(s + 1) * seq].view(1, -1)
            model.zero_grad(set_to_none=True)
            model(input_ids=chunk, labels=chunk).loss.backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    sq[n] += p.grad.detach().square()
            bar.advance(task)
    if args.tie_word_embeddings:
        sq.pop("lm_head.weight", None)
    fused = hf_to_decdec_state_dict(sq, args)
    out = {f"layers.{layer}.{PROJECTIONS[proj]}": fused[f"layers.{layer}.{PROJECTIONS[proj]}.weight"]
           for layer in range(args.n_layers) for proj in PROJECTIONS}
    ckpt.save_tensors_atomic(f, out)
    return out


def _work_dir(out_dir: Path, key: dict) -> Path:
    """The resumable work directory of one (source, spec); a different spec starts afresh."""
    work = out_dir.parent / f".{out_dir.name}.partial"
    marker = work / "spec.json"
    if work.exists():
        try:
            same = json.loads(marker.read_text()) == key
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        ckpt.write_json_atomic(marker, key)
    return work


def prepare_checkpoint(original: Path, out_dir: Path, spec: PrepareSpec, calib_text: str, overwrite: bool = False) -> Path:
    """Quantize the HF checkpoint at ``original`` into a DecDEC checkpoint at ``out_dir``.

    Resumable: calibration statistics and every finished layer are kept in
    ``.<out_dir name>.partial/`` next to ``out_dir``; re-running the same preparation after an
    interruption continues from there. ``out_dir`` itself appears only when complete.
    """
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ckpt.CheckpointError(f"{out_dir} already exists; remove it or pass overwrite")
    src = ckpt.Checkpoint.open(original)
    args = ModelArgs.from_hf_config(src.hf_config)
    sd = {k: v.float() for k, v in hf_to_decdec_state_dict(ckpt.load_original_state_dict(original), args).items()}
    group = auto_group_size(args, spec.group_size) if spec.backend == "lutgemm" else None
    source_hash = ckpt.file_sha256(sorted(Path(original).glob("*.safetensors")))
    key = {"prepare_version": PREPARE_VERSION, "source_sha256": source_hash, "backend": spec.backend, "bits": spec.bits,
           "mixed": spec.mixed, "group_size": group, "calib_tokens": spec.calib_tokens,
           "calib_seq_len": spec.calib_seq_len, "clip_tokens": spec.clip_tokens,
           "awq": spec.awq and spec.backend == "lutgemm", "awq_grid": spec.awq_grid, "awq_tokens": spec.awq_tokens,
           "fisher": spec.fisher and spec.backend == "ap", "fisher_tokens": spec.fisher_tokens,
           "calib_text_sha256": hashlib.sha256(calib_text.encode()).hexdigest()}
    work = _work_dir(out_dir, key)
    tok = AutoTokenizer.from_pretrained(original)
    stats, n_calib = _calibration_stats(work, sd, args, tok, spec, calib_text)
    fisher = fisher_weights(original, args, tok, spec, calib_text, work) if spec.backend == "ap" and spec.fisher else {}
    awq_ratios = None
    if spec.backend == "lutgemm" and spec.awq:
        # Fold AWQ scales: the quantizer and the residual then see W diag(s), DEC sees x / s, so
        # thresholds, energies and clip activations are re-calibrated on the folded model.
        awq_ratios = awq_fold(sd, args, stats, spec, group, work)
        stats, _ = _calibration_stats(work, sd, args, tok, spec, calib_text, name="calibration_awq.safetensors")

    def weight_of(proj: str, layer: int) -> torch.Tensor:
        return sd[f"layers.{layer}.{PROJECTIONS[proj]}.weight"]

    bitwidths = {layer: spec.bits for layer in range(args.n_layers)}
    if spec.mixed:
        bw_file = work / ckpt.BITWIDTH_MAP
        if bw_file.exists():
            bitwidths = {int(k): int(v) for k, v in json.loads(bw_file.read_text()).items()}
        else:
            sens = []
            with _progress() as bar:
                task = bar.add_task(f"sensitivity at {spec.bits} bits", total=args.n_layers)
                for layer in range(args.n_layers):
                    s = 0.0
                    for proj in PROJECTIONS:
                        st = stats[(proj, layer)]
                        w = weight_of(proj, layer)
                        _, w_q = _quantize_one(spec, w, spec.bits, group, st, st.acts,
                                               fisher.get(f"layers.{layer}.{PROJECTIONS[proj]}"))
                        s += _sensitivity(w, w_q, st.channel_energy)
                    sens.append(s)
                    bar.advance(task)
            order = sorted(range(args.n_layers), key=lambda i: -sens[i])
            for layer in order[: args.n_layers // 2]:
                bitwidths[layer] = spec.bits + 1
            ckpt.write_json_atomic(bw_file, {str(k): v for k, v in bitwidths.items()})

    with _progress() as bar:
        done = [layer for layer in range(args.n_layers) if (work / f"layer-{layer}.safetensors").exists()]
        task = bar.add_task(f"quantizing ({spec.backend}) + residuals", total=args.n_layers, completed=len(done))
        for layer in range(args.n_layers):
            f = work / f"layer-{layer}.safetensors"
            if f.exists():
                continue
            out: dict[str, torch.Tensor] = {}
            for proj in PROJECTIONS:
                name = f"layers.{layer}.{PROJECTIONS[proj]}"
                st = stats[(proj, layer)]
                w = weight_of(proj, layer)
                tensors, w_q = _quantize_one(spec, w, bitwidths[layer], group, st, st.acts, fisher.get(name))
                for suffix, t in tensors.items():
                    out[f"weights/{name}.{suffix}"] = t
                q_residual, scales = quantize.residual_cheatsheet(w, w_q)
                out[f"cheatsheet/{name}.q_residual"] = q_residual
                out[f"cheatsheet/{name}.scales"] = scales.to(STORAGE_DTYPE)
                out[f"thresholds/{name}.thresholds"] = st.thresholds
                out[f"thresholds/{name}.channel_hits"] = st.channel_hits  # static-selection ablation
            ckpt.save_tensors_atomic(f, out)
            bar.advance(task)

    files: dict[str, dict[str, torch.Tensor]] = {"weights": {}, "cheatsheet": {}, "thresholds": {}}
    for k, v in sd.items():
        if not any(f".{PROJECTIONS[p]}." in k for p in PROJECTIONS):
            files["weights"][k] = v.to(STORAGE_DTYPE)
    for layer in range(args.n_layers):
        for k, v in load_file(work / f"layer-{layer}.safetensors").items():
            which, name = k.split("/", 1)
            files[which][name] = v

    manifest = {
        "format": ckpt.FORMAT,
        "format_version": ckpt.FORMAT_VERSION,
        "prepare_version": PREPARE_VERSION,
        "backend": spec.backend,
        "bits": spec.bits,
        "mixed": spec.mixed,
        "group_size": group,
        "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
        "source_model": {"path": str(original), "sha256": source_hash},
        "calibration": {"tokens": n_calib, "seq_len": spec.calib_seq_len},
        "ap_sensitivity": ("fisher" if fisher else "activation_energy") if spec.backend == "ap" else None,
        "awq": None if awq_ratios is None else {"grid": spec.awq_grid, "tokens": spec.awq_tokens,
                                                "mean_ratio": sum(awq_ratios.values()) / max(len(awq_ratios), 1)},
        "prepare_seconds": None,
        **spec.meta,
    }
    with ckpt.StagingDir(out_dir, overwrite=overwrite) as tmp:
        ckpt.save_tensors_atomic(tmp / ckpt.WEIGHTS, files["weights"])
        ckpt.save_tensors_atomic(tmp / ckpt.CHEATSHEET, files["cheatsheet"])
        ckpt.save_tensors_atomic(tmp / ckpt.THRESHOLDS, files["thresholds"])
        if spec.mixed:
            ckpt.write_json_atomic(tmp / ckpt.BITWIDTH_MAP, {str(k): v for k, v in bitwidths.items()})
        ckpt.write_json_atomic(tmp / "config.json", src.hf_config)
        tok.save_pretrained(tmp)
        manifest["prepare_seconds"] = round(time.perf_counter() - t0, 1)
        ckpt.write_json_atomic(tmp / ckpt.MANIFEST, manifest)  # last: its presence marks completeness
    shutil.rmtree(work, ignore_errors=True)
    return out_dir
