"""Import artifacts made by the original DecDEC tools (SNU-ARC/DecDEC) into our layouts.

The original tools write, per model:

``cheatsheet.pt``  (``decdec_setup/cheatsheet.py``)
    a list with one dict per decoder layer, keyed by HF module name (``self_attn.q_proj``, ...,
    ``mlp.down_proj``; Phi-3: fused ``self_attn.qkv_proj`` / ``mlp.gate_up_proj``), each entry
    ``{"cheatsheet": [in, out/8] int32, "reordered_scales": [out]}``. The nibble layout is exactly
    ours (``formats.pack_residual``); the scale of output ``8c+n`` sits at ``n*(out/8)+c``.
``thresholds.pt``  (``decdec_setup/thresholds.py``)
    a list with one dict per layer, module name -> ``[in]`` (j-th largest ``|x|``, max over tokens).
LUT-GEMM ``pytorch_model.bin``
    a state dict with ``model.layers.{i}.<module>.binary [in/32, b, out] int32``,
    ``.alpha [in/g, b, out]`` and ``.q_bias [in/g, out]`` -- exactly our ``lutgemm`` layout.

Everything is loaded with ``torch.load(weights_only=True)`` (``checkpoint.load_reference_pt``):
a file holding any pickled object other than tensors and plain containers is refused.

Our projections are fused (``wqkv``, ``w1w3``): q/k/v and gate/up are concatenated on the
output dim. Each part is converted to natural order *before* concatenation (the original
``lutgemm_convert.py`` concatenates the already-permuted scales, which only its own kernel reads).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from decdec import checkpoint as ckpt
from decdec.formats import reference_scales_to_natural
from decdec.model import PROJECTIONS, ModelArgs

# proj -> (HF module names concatenated in this order, the Phi-3 fused name or None)
HF_MODULES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.qkv_proj"),
    "o": (("self_attn.o_proj",), None),
    "gate_up": (("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_up_proj"),
    "down": (("mlp.down_proj",), None),
}
KNOWN_MODULES = {m for parts, fused in HF_MODULES.values() for m in (*parts, *([fused] if fused else []))}
LUTGEMM_SUFFIXES = ("binary", "alpha", "q_bias")


class ReferenceImportError(ckpt.CheckpointError):
    """A reference artifact that cannot be imported; the message names the file, layer and key."""


# ---------------------------------------------------------------------------- loading
def _load(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ReferenceImportError(f"{what} not found: {path}")
    try:
        return ckpt.load_reference_pt(path)
    except Exception as e:  # UnpicklingError for objects, RuntimeError for a non-torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReferenceImportError(
            f"refusing to load {what} {path}: it is not a plain tensor file that torch.load(weights_only=True) "
            f"accepts (only tensors, lists and dicts are allowed; nothing else is unpickled): {first}"
        ) from e


def _per_layer_list(obj: Any, path: Path, what: str) -> list[dict]:
    if not isinstance(obj, (list, tuple)) or not all(isinstance(d, dict) for d in obj):
        raise ReferenceImportError(
            f"{what} {path} must be a list with one dict per layer (module name -> entry), got {type(obj).__name__}"
        )
    if not obj:
        raise ReferenceImportError(f"{what} {path} is an empty list (no layers)")
    return list(obj)


def _layer_modules(layer: dict, path: Path, i: int) -> dict[str, Any]:
    """Module name -> entry, with an optional ``model.layers.{i}.`` prefix stripped; unknown names refused."""
    out: dict[str, Any] = {}
    prefix = f"model.layers.{i}."
    for k, v in layer.items():
        name = k[len(prefix):] if isinstance(k, str) and k.startswith(prefix) else k
        if name not in KNOWN_MODULES:
            raise ReferenceImportError(
                f"{path}: layer {i} has module {k!r}, which is none of {sorted(KNOWN_MODULES)}"
            )
        out[name] = v
    return out


def _parts(modules: dict[str, Any], proj: str, path: Path, i: int) -> list[str]:
    """The HF module names that make up ``proj`` in this layer (split or Phi-3 fused)."""
    parts, fused = HF_MODULES[proj]
    have_split = [p for p in parts if p in modules]
    if fused is not None and fused in modules:
        if have_split:
            raise ReferenceImportError(f"{path}: layer {i} has both {fused!r} and {have_split}; expected one form")
        return [fused]
    missing = [p for p in parts if p not in modules]
    if missing:
        alt = f" (or the fused {fused!r})" if fused else ""
        raise ReferenceImportError(f"{path}: layer {i} lacks module(s) {missing}{alt}")
    return list(parts)


def _tensor(v: Any, path: Path, where: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise ReferenceImportError(f"{path}: {where} must be a tensor, got {type(v).__name__}")
    return v


# ---------------------------------------------------------------------------- cheatsheet
def import_reference_cheatsheet(path: str | Path) -> dict[str, torch.Tensor]:
    """``cheatsheet.pt`` of the original tools -> our cheatsheet tensors.

    Returns ``layers.{i}.<PROJECTIONS[proj]>.q_residual [in, out/8] int32`` and ``.scales [out]``
    (natural order, the stored float dtype). q/k/v (gate/up) are concatenated on the output dim:
    ``q_residual`` along its words (dim 1), which is exact because every part packs whole groups
    of 8 output rows (``out_part = 8 * words``, checked against its scale count), and scales after
    undoing each part's permutation.
    """
    path = Path(path)
    layers = _per_layer_list(_load(path, "cheatsheet"), path, "cheatsheet")
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        modules = _layer_modules(layer, path, i)
        for proj, module_path in PROJECTIONS.items():
            residuals, scales = [], []
            for m in _parts(modules, proj, path, i):
                entry = modules[m]
                if not isinstance(entry, dict) or not {"cheatsheet", "reordered_scales"} <= set(entry):
                    got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                    raise ReferenceImportError(
                        f"{path}: layer {i} {m} must be a dict with 'cheatsheet' and 'reordered_scales', got {got}"
                    )
                q = _tensor(entry["cheatsheet"], path, f"layer {i} {m}.cheatsheet")
                s = _tensor(entry["reordered_scales"], path, f"layer {i} {m}.reordered_scales")
                if q.dim() != 2 or q.dtype != torch.int32:
                    raise ReferenceImportError(
                        f"{path}: layer {i} {m}.cheatsheet must be [in, out/8] int32, got {list(q.shape)} {q.dtype}"
                    )
                if s.dim() != 1 or not s.is_floating_point() or s.numel() != 8 * q.shape[1]:
                    raise ReferenceImportError(
                        f"{path}: layer {i} {m}.reordered_scales must be a float vector of out = 8 * {q.shape[1]} = "
                        f"{8 * q.shape[1]} entries (cheatsheet {list(q.shape)}), got {list(s.shape)} {s.dtype}"
                    )
                if residuals and q.shape[0] != residuals[0].shape[0]:
                    raise ReferenceImportError(
                        f"{path}: layer {i} {proj} parts disagree on in_features: {m}.cheatsheet has "
                        f"{q.shape[0]} rows, the first part {residuals[0].shape[0]}"
                    )
                residuals.append(q)
                scales.append(reference_scales_to_natural(s))
            name = f"layers.{i}.{module_path}"
            out[f"{name}.q_residual"] = torch.cat(residuals, dim=1).contiguous()
            out[f"{name}.scales"] = torch.cat(scales).contiguous()
    return out


# ---------------------------------------------------------------------------- thresholds
def import_reference_thresholds(path: str | Path) -> dict[str, torch.Tensor]:
    """``thresholds.pt`` of the original tools -> ``layers.{i}.<PROJECTIONS[proj]>.thresholds [in]`` fp32.

    q/k/v (and gate/up) read the same input, so the original tools record the same vector for
    each; when they differ (e.g. calibrated separately) we take the elementwise maximum, which is
    exactly the threshold vector of the union of their calibration tokens (each entry is a max
    over tokens of the j-th largest ``|x|``). Vectors must be 1-D and non-increasing.
    """
    path = Path(path)
    layers = _per_layer_list(_load(path, "thresholds"), path, "thresholds")
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        modules = _layer_modules(layer, path, i)
        for proj, module_path in PROJECTIONS.items():
            vecs = []
            for m in _parts(modules, proj, path, i):
                t = _tensor(modules[m], path, f"layer {i} {m}")
                if t.dim() != 1 or not t.is_floating_point() or t.numel() == 0:
                    raise ReferenceImportError(f"{path}: layer {i} {m} must be a non-empty float vector [in], got "
                                               f"{list(t.shape)} {t.dtype}")
                if vecs and t.numel() != vecs[0].numel():
                    raise ReferenceImportError(f"{path}: layer {i} {proj} parts disagree on in_features: {m} has "
                                               f"{t.numel()} entries, the first part {vecs[0].numel()}")
                t = t.to(torch.float32)
                if bool((t[1:] > t[:-1]).any()):
                    raise ReferenceImportError(f"{path}: layer {i} {m} is not sorted descending; thresholds[j] must be "
                                               "the max over tokens of the j-th largest |x|")
                vecs.append(t)
            out[f"layers.{i}.{module_path}.thresholds"] = torch.stack(vecs).amax(0).contiguous()
    return out


# ---------------------------------------------------------------------------- LUT-GEMM weights
_LUTGEMM_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)\.(binary|alpha|q_bias)$")


def import_lutgemm_bin(path: str | Path, n_layers: int) -> dict[str, torch.Tensor]:
    """LUT-GEMM ``pytorch_model.bin`` -> ``layers.{i}.<PROJECTIONS[proj]>.{binary,alpha,q_bias}``.

    Per module ``binary [in/32, b, out] int32``, ``alpha [in/g, b, out]``, ``q_bias [in/g, out]``;
    fused projections concatenate their parts on the out dim (the last dim of each). Tensors that
    are not ``binary``/``alpha``/``q_bias`` of a decoder layer (embeddings, norms) are ignored
    here; ``import_reference_checkpoint`` takes them from the .bin when present (AWQ folds its
    scales into the norms), else from the original HF checkpoint. Float dtypes are kept as stored.
    """
    path = Path(path)
    sd = _load(path, "LUT-GEMM state dict")
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise ReferenceImportError(f"LUT-GEMM state dict {path} must be a dict of name -> tensor, got {type(sd).__name__}")
    by_layer: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for k, v in sd.items():
        m = _LUTGEMM_KEY.match(k)
        if not m:
            continue
        i, module, suffix = int(m.group(1)), m.group(2), m.group(3)
        if i >= n_layers:
            raise ReferenceImportError(f"{path}: {k} names layer {i}, but the model has {n_layers} layers")
        if module not in KNOWN_MODULES:
            raise ReferenceImportError(f"{path}: {k} names module {module!r}, which is none of {sorted(KNOWN_MODULES)}")
        by_layer.setdefault(i, {}).setdefault(module, {})[suffix] = _tensor(v, path, k)
    out: dict[str, torch.Tensor] = {}
    for i in range(n_layers):
        modules = by_layer.get(i)
        if not modules:
            raise ReferenceImportError(f"{path}: no binary/alpha/q_bias tensors for layer {i} "
                                       f"(expected keys like model.layers.{i}.self_attn.q_proj.binary)")
        for proj, module_path in PROJECTIONS.items():
            got: dict[str, list[torch.Tensor]] = {s: [] for s in LUTGEMM_SUFFIXES}
            first = None
            for m in _parts(modules, proj, path, i):
                key = f"model.layers.{i}.{m}"
                t = modules[m]
                lacking = [s for s in LUTGEMM_SUFFIXES if s not in t]
                if lacking:
                    raise ReferenceImportError(f"{path}: {key} lacks {lacking}")
                b, a, qb = t["binary"], t["alpha"], t["q_bias"]
                if b.dim() != 3 or b.dtype != torch.int32:
                    raise ReferenceImportError(f"{path}: {key}.binary must be [in/32, b, out] int32, got {list(b.shape)} {b.dtype}")
                nw, bits, o = b.shape
                if (a.dim() != 3 or not a.is_floating_point() or a.shape[1:] != (bits, o) or not a.shape[0]
                        or (32 * nw) % a.shape[0] or ((32 * nw) // a.shape[0]) % 32):
                    raise ReferenceImportError(
                        f"{path}: {key}.alpha must be [in/g, b={bits}, out={o}] float with g a multiple of 32 dividing "
                        f"in={32 * nw}, got {list(a.shape)} {a.dtype}")
                if qb.dim() != 2 or not qb.is_floating_point() or qb.shape != (a.shape[0], o):
                    raise ReferenceImportError(f"{path}: {key}.q_bias must be [in/g={a.shape[0]}, out={o}] float, got "
                                               f"{list(qb.shape)} {qb.dtype}")
                if first is None:
                    first = (key, nw, bits, a.shape[0])
                elif (nw, bits, a.shape[0]) != first[1:]:
                    raise ReferenceImportError(
                        f"{path}: {key} (in/32={nw}, bits={bits}, groups={a.shape[0]}) does not match {first[0]} "
                        f"(in/32={first[1]}, bits={first[2]}, groups={first[3]}); fused parts must agree")
                for s, x in zip(LUTGEMM_SUFFIXES, (b, a, qb)):
                    got[s].append(x)
            name = f"layers.{i}.{module_path}"
            for s in LUTGEMM_SUFFIXES:
                out[f"{name}.{s}"] = torch.cat(got[s], dim=-1).contiguous()
    return out


# ---------------------------------------------------------------------------- checkpoint directory
def _check_against_model(tensors: dict[str, torch.Tensor], args: ModelArgs, what: str, path: Path) -> None:
    """Every projection of every layer present with the shapes ``config.json`` implies."""
    shapes = args.projection_shapes()
    problems = []
    for i in range(args.n_layers):
        for proj, module_path in PROJECTIONS.items():
            inp, out = shapes[proj]
            name = f"layers.{i}.{module_path}"
            want = ({"q_residual": (inp, out // 8), "scales": (out,)} if what == "cheatsheet"
                    else {"thresholds": (inp,)} if what == "thresholds"
                    else {"binary": (inp // 32, None, out), "q_bias": (None, out)})
            for suffix, shape in want.items():
                t = tensors.get(f"{name}.{suffix}")
                if t is None:
                    problems.append(f"{name}.{suffix} missing")
                elif len(t.shape) != len(shape) or any(w is not None and g != w for g, w in zip(t.shape, shape)):
                    problems.append(f"{name}.{suffix}: {list(t.shape)}, config.json implies "
                                    f"{['*' if w is None else w for w in shape]}")
    extra = sorted({k.split(".")[1] for k in tensors if k.startswith("layers.")} - {str(i) for i in range(args.n_layers)})
    if extra:
        problems.append(f"layers {extra} beyond the model's {args.n_layers}")
    if problems:
        raise ReferenceImportError(f"{what} from {path} does not fit the model of config.json "
                                   f"({len(problems)} problems): {problems[:4]}")


def _original_non_projection(original: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Embeddings, norms (and untied lm_head) of an HF checkpoint, read tensor by tensor
    (bounded memory: the dense projections are never loaded)."""
    names = _original_names(args)
    files = sorted(original.glob("*.safetensors"))
    if not files:
        raise ReferenceImportError(f"no *.safetensors weights in {original}: the embeddings and norms come from there")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                if k in names:
                    out[names[k]] = h.get_tensor(k)
    missing = [k for k, ours in names.items() if ours not in out]
    if missing:
        raise ReferenceImportError(f"original checkpoint {original} lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    from decdec.prepare import STORAGE_DTYPE

    return {k: v.to(STORAGE_DTYPE) for k, v in out.items()}


def _bin_non_projection(path: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Embeddings and norms stored in a LUT-GEMM ``pytorch_model.bin`` (HF names), if any.

    An AWQ-quantized model folds its activation scales into the RMSNorm weights, so the .bin's
    norms -- not the original checkpoint's -- belong with its binary codes.
    """
    hf = _original_names(args)
    sd = _load(path, "LUT-GEMM state dict")
    from decdec.prepare import STORAGE_DTYPE

    return {hf[k]: v.to(STORAGE_DTYPE) for k, v in sd.items() if k in hf and isinstance(v, torch.Tensor)}


def _original_names(args: ModelArgs) -> dict[str, str]:
    """HF name -> ours for the embeddings, norms and (untied) lm_head."""
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    if not args.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(args.n_layers):
        names[f"model.layers.{i}.input_layernorm.weight"] = f"layers.{i}.attention_norm.weight"
        names[f"model.layers.{i}.post_attention_layernorm.weight"] = f"layers.{i}.ffn_norm.weight"
    return names


def _file_record(path: Path) -> dict:
    return {"path": str(Path(path).resolve()), "sha256": ckpt.file_sha256([Path(path)])}


def import_reference_checkpoint(
    original_dir: str | Path,
    out_dir: str | Path,
    backend: str,
    bits: int,
    cheatsheet_pt: str | Path,
    thresholds_pt: str | Path,
    lutgemm_bin: str | Path | None = None,
    weights_from: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Build a complete DecDEC checkpoint directory from artifacts of the original tools.

    ``original_dir``: the dense HF checkpoint (config.json, tokenizer, ``*.safetensors``);
    config and tokenizer are copied from it. Quantized weights come from exactly one of

    * ``lutgemm_bin`` (``backend="lutgemm"``): LUT-GEMM's ``pytorch_model.bin`` plus the
      original's embeddings and norms. Per-layer bit-widths are read from ``binary``; layers at
      ``bits`` and ``bits + 1`` make a mixed (3.5-bit) checkpoint with ``bitwidth_map.json``.
    * ``weights_from``: an existing DecDEC checkpoint of the same model and ``backend``/``bits``
      whose weights (and bitwidth map) are kept; only cheatsheet and thresholds are swapped.
      Its ``channel_hits`` (our calibration's static-selection counts) are not carried over:
      they do not belong to the imported thresholds.

    ``backend="ap"`` has no reference weight format we read (the original any-precision files
    pack differently), so it needs ``weights_from``. The directory appears only when complete
    (``checkpoint.StagingDir``); its manifest records ``imported_from``.
    """
    t0 = time.perf_counter()
    original, out_dir = Path(original_dir), Path(out_dir)
    if backend not in ("ap", "lutgemm"):
        raise ValueError(f"backend={backend!r}: importing supports ap or lutgemm")
    if (lutgemm_bin is None) == (weights_from is None):
        if backend == "ap" and lutgemm_bin is None:
            raise NotImplementedError(
                "backend=ap: importing the original tools' any-precision weights is not supported; quantize with "
                "scripts/prepare_checkpoint.py --backend ap and pass that directory as weights_from to swap in the "
                "imported cheatsheet/thresholds")
        raise ValueError("give exactly one source of quantized weights: lutgemm_bin (backend=lutgemm) or weights_from")
    if lutgemm_bin is not None and backend != "lutgemm":
        raise ValueError(f"lutgemm_bin holds LUT-GEMM weights; it needs backend=lutgemm, not backend={backend}")

    src = ckpt.Checkpoint.open(original)
    if src.manifest is not None:
        raise ReferenceImportError(f"{original} is a DecDEC checkpoint; original_dir must be the dense HF checkpoint")
    args = ModelArgs.from_hf_config(src.hf_config)

    bitwidth_map: dict[int, int] | None = None
    imported: dict[str, Any] = {}
    if weights_from is not None:
        base = ckpt.Checkpoint.open(weights_from)
        if base.manifest is None:
            raise ReferenceImportError(f"weights_from={base.path} is not a DecDEC checkpoint (no {ckpt.MANIFEST})")
        if ModelArgs.from_hf_config(base.hf_config) != args:
            raise ReferenceImportError(f"weights_from={base.path} was made for a different model than {original} "
                                       "(config.json shapes differ)")
        m = base.manifest
        if m["backend"] != backend or m["bits"] != bits:
            raise ReferenceImportError(f"weights_from={base.path} holds backend={m['backend']} {m['bits']}-bit weights, "
                                       f"not backend={backend} {bits}-bit")
        mixed, group = bool(m.get("mixed")), m.get("group_size")
        storage = m.get("storage_dtype")
        if mixed:
            bitwidth_map = base.bitwidth_map()
        weights_file: Path | None = base.path / ckpt.WEIGHTS
        weights = None
        imported["weights_from"] = {"path": str(base.path.resolve()), "source_model": m.get("source_model")}
    else:
        weights = import_lutgemm_bin(lutgemm_bin, args.n_layers)
        _check_against_model(weights, args, "LUT-GEMM weights", Path(lutgemm_bin))
        per_layer = {i: int(weights[f"layers.{i}.{PROJECTIONS['qkv']}.binary"].shape[1]) for i in range(args.n_layers)}
        for i in range(args.n_layers):
            for proj, module_path in PROJECTIONS.items():
                b = int(weights[f"layers.{i}.{module_path}.binary"].shape[1])
                if b != per_layer[i]:
                    raise ReferenceImportError(f"{lutgemm_bin}: layer {i} mixes bit-widths ({proj} has {b}, qkv "
                                               f"{per_layer[i]}); a layer has one bit-width")
        found = set(per_layer.values())
        if found == {bits}:
            mixed = False
        elif found == {bits, bits + 1}:
            mixed, bitwidth_map = True, per_layer
        else:
            raise ReferenceImportError(f"{lutgemm_bin} holds {sorted(found)}-bit layers; bits={bits} expects {bits} "
                                       f"(or {bits} and {bits + 1} for mixed precision)")
        groups = {args.projection_shapes()[proj][0] // weights[f"layers.{i}.{mp}.alpha"].shape[0]
                  for i in range(args.n_layers) for proj, mp in PROJECTIONS.items()}
        if len(groups) != 1:
            raise ReferenceImportError(f"{lutgemm_bin}: projections use different group sizes {sorted(groups)}; "
                                       "decdec needs one group size per checkpoint")
        group = groups.pop()
        storage = str(weights[f"layers.0.{PROJECTIONS['qkv']}.alpha"].dtype).removeprefix("torch.")
        weights.update(_original_non_projection(original, args))
        weights.update(_bin_non_projection(Path(lutgemm_bin), args))  # AWQ-folded norms win
        weights_file = None
        imported["lutgemm_bin"] = _file_record(Path(lutgemm_bin))

    cheat = import_reference_cheatsheet(cheatsheet_pt)
    _check_against_model(cheat, args, "cheatsheet", Path(cheatsheet_pt))
    thresholds = import_reference_thresholds(thresholds_pt)
    _check_against_model(thresholds, args, "thresholds", Path(thresholds_pt))
    imported.update(cheatsheet=_file_record(Path(cheatsheet_pt)), thresholds=_file_record(Path(thresholds_pt)))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(original)
    manifest = {
        "format": ckpt.FORMAT,
        "format_version": ckpt.FORMAT_VERSION,
        "backend": backend,
        "bits": bits,
        "mixed": mixed,
        "group_size": group,
        "storage_dtype": storage,
        "source_model": {"path": str(original), "sha256": ckpt.file_sha256(sorted(original.glob("*.safetensors")))},
        "imported_from": imported,
        "import_seconds": None,
    }
    with ckpt.StagingDir(out_dir, overwrite=overwrite) as tmp:
        if weights_file is not None:
            shutil.copyfile(weights_file, tmp / ckpt.WEIGHTS)
            os.chmod(tmp / ckpt.WEIGHTS, 0o644)
        else:
            ckpt.save_tensors_atomic(tmp / ckpt.WEIGHTS, weights)
        ckpt.save_tensors_atomic(tmp / ckpt.CHEATSHEET, cheat)
        ckpt.save_tensors_atomic(tmp / ckpt.THRESHOLDS, thresholds)
        if mixed:
            ckpt.write_json_atomic(tmp / ckpt.BITWIDTH_MAP, {str(k): v for k, v in bitwidth_map.items()})
        ckpt.write_json_atomic(tmp / "config.json", src.hf_config)
        tok.save_pretrained(tmp)
        manifest["import_seconds"] = round(time.perf_counter() - t0, 1)
        ckpt.write_json_atomic(tmp / ckpt.MANIFEST, manifest)  # last: its presence marks completeness
    return out_dir
