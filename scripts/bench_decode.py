"""Decode throughput of one model under several settings, on one device, in one process.

    python scripts/bench_decode.py                       # embedded SmolLM2 on the CPU
    python scripts/bench_decode.py -o model=tiny --settings "ap w3, dec=off" "ap w3 + DEC"

Each setting is a list of Hydra overrides (the same ones run.py takes). For each: build the
model, run one warm-up sample, then ``--samples`` timed samples of ``--tokens`` new tokens
(prefill included, as run.py reports), and report the median tokens/s and the ratio to the
first setting. Prints a table and writes CSV + markdown under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from decdec import checkpoint as ckpt
from decdec.builder import build_model
from decdec.config import register_configs
from decdec.generate import Generator
from decdec.run import _encode_prompt, resolve_checkpoint, resolve_device, resolve_dtype, validate
from decdec.sinks import write_csv

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "fp16 (dense)": ["backend=fp16", "dec=off"],
    "ap w3, dec=off": ["backend=ap", "dec=off"],
    "ap w3 + DEC": ["backend=ap"],
    "lutgemm w3, dec=off": ["backend=lutgemm", "dec=off"],
    "lutgemm w3 + DEC": ["backend=lutgemm"],
}


def bench_one(overrides: list[str], samples: int, tokens: int) -> dict:
    cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision.dtype, device)
    validate(cfg, device)
    path = resolve_checkpoint(cfg)
    c = ckpt.Checkpoint.open(path)
    built = build_model(c, cfg.backend.name, cfg.precision.bits, cfg.precision.mixed, dtype, device, cfg.dec)
    from transformers import AutoTokenizer

    prompt = _encode_prompt(AutoTokenizer.from_pretrained(path), cfg.task.prompt, cfg.task.chat and cfg.model.chat_template)
    gen = Generator(built.model, device, dtype, prompt.numel() + tokens, cfg.compile.mode)
    rates = []
    for i in range(samples + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen.generate(prompt, tokens, 0.0, None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # sample 0 is the warm-up
            rates.append(tokens / (time.perf_counter() - t0))
    return {"tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "dec_rows_per_token": built.dec_rows_per_token(), "dtype": str(dtype).removeprefix("torch."),
            "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), help=f"subset of {list(SETTINGS)}")
    ap.add_argument("-o", "--override", dest="overrides", action="append", default=[],
                    help="a Hydra override applied to every setting (repeatable), e.g. -o model=tiny")
    a = ap.parse_args()
    register_configs()
    rows = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for name in a.settings:
            ov = ["logger=yaml", *a.overrides, *SETTINGS[name]]
            r = bench_one(ov, a.samples, a.tokens)
            rows.append({"setting": name, **r})
            print(f"{name}: {r['tokens_per_s']:.2f} tokens/s")
    base = rows[0]["tokens_per_s"]
    machine = f"{platform.node()} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    table = Table(title=f"decode tokens/s, median of {a.samples} x {a.tokens} tokens ({stamp}, {rows[0]['device']})")
    for col in ("setting", "tokens/s", "min", "max", f"vs {rows[0]['setting']}", "DEC rows/token"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        table.add_row(r["setting"], f"{r['tokens_per_s']:.2f}", f"{r['min']:.2f}", f"{r['max']:.2f}",
                      f"{r['tokens_per_s'] / base:.3f}", str(r["dec_rows_per_token"]))
    Console().print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"decode-{dt.datetime.now():%Y%m%d-%H%M%S}"
    write_csv(stem.with_suffix(".csv"), rows)
    lines = [f"# decode benchmark {stamp}", "", f"machine: {machine}; torch {torch.__version__}; overrides: {a.overrides}", "",
             "| setting | tokens/s (median) | min | max | ratio | DEC rows/token |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['tokens_per_s']:.2f} | {r['min']:.2f} | {r['max']:.2f} | "
              f"{r['tokens_per_s'] / base:.3f} | {r['dec_rows_per_token']} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv and {stem}.md")


if __name__ == "__main__":
    main()
