"""Plot perplexity vs k_chunk from quality_report.py CSVs.

    python scripts/plot_quality.py docs/results/quality-*.csv --out docs/quality_smollm2.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--labels", nargs="*", help="one label per CSV (default: file stem)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    original = None
    for i, path in enumerate(a.csv):
        rows = list(csv.DictReader(open(path)))
        tag = a.labels[i] if a.labels else path.stem
        for backend in sorted({r["backend"] for r in rows if r["backend"] != "fp16"}):
            t = f" ({tag})" if backend == "lutgemm" else ""  # the labels tell lutgemm variants apart
            dec = sorted(((int(r["k_chunk"]), float(r["perplexity"])) for r in rows
                          if r["backend"] == backend and r["precision"] == "w3" and r["selection"] == "dynamic"))
            ks = [max(k, 1) for k, _ in dec]
            line, = axis.plot(ks, [p for _, p in dec], "o-", label=f"{backend} 3-bit + DEC{t}")
            for prec, style in (("w3.5", "--"), ("w4", ":")):
                p = [float(r["perplexity"]) for r in rows if r["backend"] == backend and r["precision"] == prec]
                if p:
                    axis.axhline(p[0], color=line.get_color(), ls=style, lw=1, label=f"{backend} {prec[1:]}-bit{t}")
        original = original or next((float(r["perplexity"]) for r in rows if r["backend"] == "fp16"), None)
    if original:
        axis.axhline(original, color="k", lw=1, label="original")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("k_chunk (residual rows per 1024 input channels; 0 plotted at 1)")
    axis.set_ylabel("perplexity (Britannica 1911)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
