"""Checkpoint directories: layout, manifest, validation, atomic writes.

A DecDEC checkpoint directory (what ``model.checkpoint_path`` points at) holds::

    config.json              the HF model config (architecture, shapes)
    tokenizer*.json ...      HF tokenizer files
    manifest.json            format version, backend, bits, group size, source-model hash
    weights.safetensors      quantized linears (per backend) + embeddings and norms
    cheatsheet.safetensors   4-bit residuals: <linear>.q_residual [in, out/8] int32, <linear>.scales [out]
    thresholds.safetensors   <linear>.thresholds [in] fp32 (DEC bucket boundaries)
    bitwidth_map.json        mixed precision only: {"layer index": 3 | 4}

Linear names are ``layers.{i}.attention.wqkv`` etc. (``decdec.model.PROJECTIONS``).
An original (dense) checkpoint is a plain HF directory: config.json + ``*.safetensors``.
Nothing is ever unpickled: tensors come from safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "decdec-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
CHEATSHEET = "cheatsheet.safetensors"
THRESHOLDS = "thresholds.safetensors"
BITWIDTH_MAP = "bitwidth_map.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot serve the requested run; the message names the fix."""


# ---------------------------------------------------------------------------- atomic writes
def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StagingDir:
    """Build a directory under a temporary name next to ``final``; rename it into place on success.

    An interrupted write leaves only ``.<name>.staging-*`` behind, never a directory that looks
    complete. ``with StagingDir(final) as tmp: ...write into tmp...``
    """

    def __init__(self, final: Path, overwrite: bool = False):
        self.final = Path(final)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.final.exists() and not self.overwrite:
            raise CheckpointError(f"{self.final} already exists; remove it or choose another output directory")
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.staging-"))
        os.chmod(self.tmp, 0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- reading
def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} at {path} is not valid JSON ({e}); re-create the checkpoint") from None


def load_original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (``model.safetensors`` or sharded with an index)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(path.glob("*.bin"))
        hint = " (found .bin files: convert them to safetensors first)" if bins else ""
        raise CheckpointError(f"no *.safetensors weights in {path}{hint}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    return sd


@dataclass
class Checkpoint:
    """An opened, validated checkpoint directory."""

    path: Path
    hf_config: dict
    manifest: dict | None  # None for an original (dense HF) directory

    @property
    def backend(self) -> str:
        return self.manifest["backend"] if self.manifest else "fp16"

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path).expanduser()
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint directory {path} does not exist; set model.checkpoint_path to a directory made by "
                "scripts/prepare_checkpoint.py (or an original HF directory for backend=fp16)"
            )
        hf_config = _read_json(path / "config.json", "config.json")
        manifest = None
        if (path / MANIFEST).exists():
            manifest = _read_json(path / MANIFEST, MANIFEST)
            if manifest.get("format") != FORMAT:
                raise CheckpointError(f"{path / MANIFEST} is not a {FORMAT} manifest")
            if manifest.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path} has checkpoint format version {manifest.get('format_version')}, this decdec reads "
                    f"version {FORMAT_VERSION}; re-create it with scripts/prepare_checkpoint.py"
                )
            needed = [WEIGHTS] + ([CHEATSHEET, THRESHOLDS] if manifest["backend"] != "fp16" else [])
            if manifest.get("mixed"):
                needed.append(BITWIDTH_MAP)
            missing = [n for n in needed if not (path / n).exists()]
            if missing:
                raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; re-create it with scripts/prepare_checkpoint.py")
        return cls(path=path, hf_config=hf_config, manifest=manifest)

    def check_request(self, backend: str, bits: int, mixed: bool) -> None:
        """Fail early when the checkpoint cannot serve ``backend`` at ``bits`` (mixed or not)."""
        if backend == "fp16":
            return  # any checkpoint with dense weights; checked when loading
        if self.manifest is None:
            raise CheckpointError(
                f"{self.path} is an original (dense) checkpoint; backend={backend} needs a quantized one: "
                f"run scripts/prepare_checkpoint.py --backend {backend} on it, or use backend=fp16"
            )
        m = self.manifest
        if m["backend"] != backend:
            raise CheckpointError(f"checkpoint {self.path} was quantized for backend={m['backend']}, not backend={backend}")
        if bool(m.get("mixed")) != mixed:
            want = "precision=w3.5 (mixed)" if m.get("mixed") else f"precision=w{m['bits']}"
            raise CheckpointError(f"checkpoint {self.path} holds {want} weights; choose that precision or another checkpoint")
        if not mixed and m["bits"] != bits:
            raise CheckpointError(f"checkpoint {self.path} holds {m['bits']}-bit weights, precision asks for {bits}-bit")

    def bitwidth_map(self) -> dict[int, int]:
        raw = _read_json(self.path / BITWIDTH_MAP, BITWIDTH_MAP)
        try:
            bw = {int(k): int(v) for k, v in raw.items()}
        except (AttributeError, ValueError):
            raise CheckpointError(f"{self.path / BITWIDTH_MAP} must map layer index -> 3 or 4") from None
        bad = {k: v for k, v in bw.items() if v not in (3, 4)}
        if bad:
            raise CheckpointError(f"{self.path / BITWIDTH_MAP}: unsupported bit-widths {bad}; only 3 and 4 are supported")
        return bw

    def tensor_shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        with safe_open(self.path / name, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def load(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.path / name)


def load_reference_pt(path: Path) -> Any:
    """Artifacts of the original DecDEC tools (``cheatsheet.pt``, ``thresholds.pt``): tensors only."""
    return torch.load(path, map_location="cpu", weights_only=True)
