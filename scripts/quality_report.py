"""Quality report: what dynamic error compensation buys, in perplexity, on the embedded model.

    python scripts/quality_report.py [--tokens 10240] [--window 2048] [-o model=tiny ...]

Teacher-forced perplexity on Britannica 1911 (never used for calibration) for: the original
model, 4-bit, 3.5-bit (mixed) and 3-bit for ``ap`` and ``lutgemm``; 3-bit + DEC at k_chunk in
{4, 8, 16, 32, 64, 128} (all four projections); and dynamic vs exact top-k vs static vs random
selection at one k_chunk. Each model is built once and its k_chunk changed in place.
Prints a table and writes CSV + markdown under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from decdec import checkpoint as ckpt
from decdec import evaluate
from decdec.builder import build_model
from decdec.config import register_configs
from decdec.run import _evaluation_text, resolve_checkpoint, resolve_device, resolve_dtype
from decdec.sinks import write_csv

REPO = Path(__file__).resolve().parent.parent
K_CHUNKS = (4, 8, 16, 32, 64, 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10240)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--ablation-k", type=int, default=32, help="k_chunk of the selection ablation")
    ap.add_argument("--backends", nargs="*", default=["ap", "lutgemm"])
    ap.add_argument("--text", default="britannica")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "quality")
    ap.add_argument("-o", "--override", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    register_configs()
    rows: list[dict] = []
    console = Console()
    t_start = time.perf_counter()

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        def load(overrides):
            cfg = OmegaConf.to_object(compose("config", overrides=["logger=yaml", *a.overrides, *overrides]))
            device = resolve_device(cfg.device)
            dtype = resolve_dtype(cfg.precision.dtype, device)
            path = resolve_checkpoint(cfg)
            built = build_model(ckpt.Checkpoint.open(path), cfg.backend.name, cfg.precision.bits, cfg.precision.mixed,
                                dtype, device, cfg.dec)
            return cfg, built, device, dtype, path

        cfg, _, _, _, path = load(["backend=fp16", "dec=off"])
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        ids = torch.tensor(tok(_evaluation_text(cfg, a.text), add_special_tokens=False)["input_ids"][: a.tokens])
        bos = tok.bos_token_id

        def measure(label: str, backend: str, precision: str, built, device, dtype, k_chunk: int, selection: str):
            for _, _, m in built.model.linears():
                if getattr(m, "dec", None) is not None:
                    m.set_dec(k_chunk, 1)
            evaluate.set_teacher_forced(built.model, selection, seed=0)
            t0 = time.perf_counter()
            r = evaluate.perplexity(built.model, ids, a.window, a.window, device, dtype, bos, progress=False)
            row = {"setting": label, "backend": backend, "precision": precision, "k_chunk": k_chunk,
                   "selection": selection, "perplexity": r["perplexity"], "tokens": r["tokens_evaluated"],
                   "dec_rows_per_token": built.dec_rows_per_token(), "seconds": time.perf_counter() - t0}
            rows.append(row)
            console.print(f"{label:40s} ppl {row['perplexity']:9.4f}  ({row['seconds']:.0f} s)")

        _, built, device, dtype, _ = load(["backend=fp16", "dec=off", "precision.dtype=float32"])
        measure("original (dense fp32)", "fp16", "-", built, device, dtype, 0, "dynamic")
        for backend in a.backends:
            for precision in ("w4", "w3.5"):
                _, built, device, dtype, _ = load([f"backend={backend}", f"precision={precision}"])
                measure(f"{backend} {precision}", backend, precision, built, device, dtype, 0, "dynamic")
            _, built, device, dtype, _ = load([f"backend={backend}", "precision=w3"])
            measure(f"{backend} w3", backend, "w3", built, device, dtype, 0, "dynamic")
            for k in K_CHUNKS:
                measure(f"{backend} w3 + DEC k_chunk={k}", backend, "w3", built, device, dtype, k, "dynamic")
            for sel in ("exact_topk", "static", "random"):
                measure(f"{backend} w3 + {sel} k_chunk={a.ablation_k}", backend, "w3", built, device, dtype,
                        a.ablation_k, sel)

    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.node()} ({platform.machine()}, {torch.get_num_threads()} threads)"
    table = Table(title=f"perplexity, {a.text}, {rows[0]['tokens']} tokens, window {a.window} ({stamp})")
    for col in ("setting", "perplexity", "DEC rows/token", "s"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        table.add_row(r["setting"], f"{r['perplexity']:.3f}", str(r["dec_rows_per_token"]), f"{r['seconds']:.0f}")
    console.print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"quality-{dt.datetime.now():%Y%m%d-%H%M%S}"
    write_csv(stem.with_suffix(".csv"), rows)
    lines = [f"# quality report {stamp}", "",
             f"machine: {machine}; torch {torch.__version__}; text {a.text}, {rows[0]['tokens']} tokens, window {a.window}, "
             f"BOS per window; overrides {a.overrides}; total {time.perf_counter() - t_start:.0f} s", "",
             "| setting | perplexity | DEC rows/token |", "|---|---|---|"]
    lines += [f"| {r['setting']} | {r['perplexity']:.3f} | {r['dec_rows_per_token']} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv and {stem}.md")


if __name__ == "__main__":
    main()
