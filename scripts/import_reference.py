"""Build a DecDEC checkpoint directory from artifacts of the original DecDEC tools.

LUT-GEMM weights (the original's pytorch_model.bin) + its cheatsheet.pt / thresholds.pt:

    python scripts/import_reference.py --original /models/Meta-Llama-3-8B-Instruct \
        --cheatsheet ref/cheatsheet.pt --thresholds ref/thresholds.pt \
        --lutgemm-bin ref/pytorch_model.bin --backend lutgemm --bits 3 --out /ckpt/llama3-lutgemm-w3-ref

Our own quantized weights (any backend) with the original tools' cheatsheet/thresholds swapped in:

    python scripts/import_reference.py --original /models/Meta-Llama-3-8B-Instruct \
        --cheatsheet ref/cheatsheet.pt --thresholds ref/thresholds.pt \
        --weights-from /ckpt/llama3-ap-w3 --backend ap --bits 3 --out /ckpt/llama3-ap-w3-ref

Then: python run.py model=llama3 model.checkpoint_path=/ckpt/... backend=... precision=w3
Files are read with torch.load(weights_only=True): nothing but tensors is unpickled. The output
appears only when complete (staging dir + rename).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from decdec import importers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", required=True, type=Path, help="dense HF checkpoint directory (config.json, tokenizer, *.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    p.add_argument("--backend", required=True, choices=["ap", "lutgemm"])
    p.add_argument("--bits", type=int, default=3, choices=[3, 4], help="bit-width (mixed: the lower one)")
    p.add_argument("--cheatsheet", required=True, type=Path, help="the original tools' cheatsheet.pt")
    p.add_argument("--thresholds", required=True, type=Path, help="the original tools' thresholds.pt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lutgemm-bin", type=Path, help="LUT-GEMM pytorch_model.bin (binary/alpha/q_bias); backend=lutgemm")
    src.add_argument("--weights-from", type=Path, help="a DecDEC checkpoint whose quantized weights are kept")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args()
    try:
        out = importers.import_reference_checkpoint(
            a.original, a.out, a.backend, a.bits, a.cheatsheet, a.thresholds,
            lutgemm_bin=a.lutgemm_bin, weights_from=a.weights_from, overwrite=a.overwrite,
        )
    except (ValueError, NotImplementedError) as e:  # CheckpointError is a ValueError
        p.exit(2, f"import_reference.py: error: {e}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
