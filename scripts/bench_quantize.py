"""Time the quantizers on SmolLM2-135M's linear shapes (random weights, same shapes), or on one
Llama-3-8B layer with --llama3. Prints a table; asserts nothing (see tests/test_quantize.py).

    /work/venv/bin/python scripts/bench_quantize.py [--layers 30] [--bits 3] [--tokens 512] [--llama3]
        [--device cuda] [--threads 1]

Random weights: speed does not depend on the values. Activations are random with per-channel
scales spread over 10x (a stand-in for calibration data, used by the clip search and as ap's
channel weights).
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch
from rich.console import Console
from rich.table import Table

from decdec import quantize, reference

# W [out, in] per projection (DESIGN.md names; q,k,v and gate,up fused on out).
SMOLLM2 = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens per linear")
    ap.add_argument("--llama3", action="store_true", help="one Llama-3-8B layer instead of SmolLM2")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the weights live")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default). On a shared 2-core machine 1 thread is "
                         "steadier: 2 OpenMP threads on one free core spin and can run several times slower")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = LLAMA3_8B if args.llama3 else SMOLLM2
    layers = 1 if args.llama3 else args.layers
    group = 128 if args.llama3 else 64  # SmolLM2: 576 = 4.5 * 128, so 64

    g = torch.Generator().manual_seed(0)
    dev = torch.device(args.device)

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()
    steps = ["calibrate", "ap", "lutgemm_rtn", "lutgemm_clip", "residual(ap)"]
    times = {(name, s): 0.0 for name in shapes for s in steps}
    numel = {name: 0 for name in shapes}
    for _ in range(layers):
        for name, (out, inp) in shapes.items():
            w = (torch.randn(out, inp, generator=g) * 0.02).to(dev)
            x = (torch.randn(args.tokens, inp, generator=g) * torch.logspace(-0.5, 0.5, inp)).to(dev)
            numel[name] += w.numel()
            clock()

            t = clock()
            cal = quantize.ThresholdCalibrator(inp)
            cal.update(x)
            cw = cal.channel_energy
            times[name, "calibrate"] += clock() - t

            t = clock()
            qweight, lut = quantize.quantize_ap(w, args.bits, channel_weight=cw)
            times[name, "ap"] += clock() - t

            t = clock()
            quantize.quantize_lutgemm(w, args.bits, group)
            times[name, "lutgemm_rtn"] += clock() - t

            t = clock()
            quantize.quantize_lutgemm(w, args.bits, group, x=x)
            times[name, "lutgemm_clip"] += clock() - t

            w_q = reference.ap_dequant(qweight, lut)  # not timed: the pipeline has it anyway
            t = clock()
            quantize.residual_cheatsheet(w, w_q)
            times[name, "residual(ap)"] += clock() - t

    model = ("Llama-3-8B (1 layer)" if args.llama3 else f"SmolLM2-135M ({layers} layers)") + f" on {dev.type}"
    table = Table(title=f"{model}, {args.bits}-bit, lutgemm group {group}, {args.tokens} calibration tokens: seconds")
    table.add_column("projection")
    table.add_column("W [out, in]")
    table.add_column("weights (M)", justify="right")
    for s in steps:
        table.add_column(s, justify="right")
    for name, (out, inp) in shapes.items():
        table.add_row(name, f"{out}x{inp}", f"{numel[name] / 1e6:.1f}", *(f"{times[name, s]:.2f}" for s in steps))
    table.add_row("total", "", f"{sum(numel.values()) / 1e6:.1f}",
                  *(f"{sum(times[n, s] for n in shapes):.2f}" for s in steps), style="bold")
    console = Console(width=150)
    console.print(table)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    console.print(f"torch {torch.__version__}, {where}, {platform.machine()}, peak RSS {rss_gb:.2f} GB")


if __name__ == "__main__":
    main()
