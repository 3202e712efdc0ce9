"""Wall-clock of the CPU pipeline on the embedded model: prepare (all artifacts) and perplexity.

    python scripts/bench_pipeline.py [--backend ap] [--tokens 10240] [--k-chunk 32]

1. prepare: the cached original SmolLM2 -> a fresh DecDEC checkpoint (calibration, quantization,
   residual cheatsheet, thresholds) in a temporary directory (the download/conversion of the
   original is cached and not timed);
2. perplexity: teacher-forced, DEC at every position (k_chunk on all projections), over the first
   --tokens tokens of Britannica 1911, window 2048.
Prints a table and writes a markdown file under --out. Targets (issue 3): both under 3 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from decdec import checkpoint as ckpt
from decdec import embedded, evaluate, prepare
from decdec.builder import build_model
from decdec.config import DecConfig, KChunk

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="ap", choices=["ap", "lutgemm"])
    ap.add_argument("--tokens", type=int, default=10240)
    ap.add_argument("--k-chunk", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    a = ap.parse_args()
    cache = Path(os.environ.get("DECDEC_CACHE", Path.home() / ".cache" / "decdec"))
    original = embedded.smollm2_original(cache)
    text = embedded.calibration_text(cache)
    eval_text = embedded.evaluation_text(cache)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        t0 = time.perf_counter()
        spec = prepare.PrepareSpec(backend=a.backend, bits=3)
        prepare.prepare_checkpoint(original, out, spec, text)
        rows.append(("prepare (calibrate + quantize + cheatsheet + thresholds)", time.perf_counter() - t0))

        c = ckpt.Checkpoint.open(out)
        k = a.k_chunk
        dec = DecConfig(name="bench", k_chunk=KChunk(qkv=k, o=k, gate_up=k, down=k))
        built = build_model(c, a.backend, 3, False, torch.float32, torch.device("cpu"), dec)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
        ids = torch.tensor(tok(eval_text, add_special_tokens=False)["input_ids"][: a.tokens])
        evaluate.set_teacher_forced(built.model)
        t0 = time.perf_counter()
        r = evaluate.perplexity(built.model, ids, 2048, 2048, torch.device("cpu"), torch.float32, tok.bos_token_id)
        rows.append((f"perplexity, {r['tokens_evaluated']} tokens, DEC k_chunk={k} (ppl {r['perplexity']:.3f})",
                     time.perf_counter() - t0))
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.node()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    table = Table(title=f"CPU pipeline, embedded SmolLM2, {a.backend} w3 ({stamp}, {machine})")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("target", justify="right")
    for name, s in rows:
        table.add_row(name, f"{s:.1f}", "< 180")
    Console().print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    f = a.out / f"pipeline-{dt.datetime.now():%Y%m%d-%H%M%S}.md"
    f.write_text(f"# CPU pipeline {stamp}\n\nmachine: {machine}; torch {torch.__version__}\n\n| step | seconds |\n|---|---|\n"
                 + "".join(f"| {n} | {s:.1f} |\n" for n, s in rows))
    print(f"wrote {f}")


if __name__ == "__main__":
    main()
