"""The decoder layer's four ap 3-bit projection ops in the two 3-bit layouts, on the GPU, from CUDA graphs.

    python scripts/bench_bmma_ops.py --out docs/perf_runs/bmma_ops.md

For Llama-3-8B and Phi-3-medium (fp16, M = 1): qkv through ``ap_gemv_addnorm`` (add + RMSNorm prologue), o through
``ap_gemv``, gate_up through ``ap_gemv_addnorm_glu`` (SiLU x up epilogue; in the kernel layout where that does not serve,
``ap_gemv_addnorm`` and then SiLU x up, as QuantLinear does) and down through ``ap_gemv``, each with its
weights in the streaming kernels' layout (``formats.pack_ap3_kernel``, what models use) and in the binary-tensor-core
layout (``formats.pack_ap3_bmma``), on the same random codes and LUTs (gate_up's rows taken as in GLU pair order). Per op: the median per-call
time of a graph of calls (weights rotating over >= 4x the L2, so the L2 does not flatter), each call followed by a
consumer kernel as in a decode step (decdec.timing.consume), the ratio, and the two outputs' agreement (it exits 1 if
they differ by more than the fp16 rounding). The layer row sums the four. Prints a table and writes a markdown file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decdec import formats, ops  # noqa: E402
from decdec.timing import consume, graph_seconds  # noqa: E402

MODELS = {  # hidden, q + k + v rows, intermediate
    "llama3-8b": (4096, 6144, 14336),
    "phi3-medium": (5120, 7680, 17920),
}


def projections(hidden: int, qkv: int, inter: int) -> list[tuple[str, int, int]]:
    return [("qkv", hidden, qkv), ("o", hidden, hidden), ("gate_up", hidden, 2 * inter), ("down", inter, hidden)]


def bench_projection(kind: str, n: int, out: int, l2: int, seed: int) -> dict:
    dt16 = torch.float16
    g = torch.Generator(device="cuda").manual_seed(seed)
    wbytes = 3 * out * n // 8 + out * 16
    c = max(2, math.ceil(4 * l2 / wbytes))
    qws = [torch.randint(-(2**31), 2**31 - 1, (3, out, n // 32), dtype=torch.int32, device="cuda", generator=g)
           for _ in range(c)]
    luts = [(torch.randn(out, 8, device="cuda", generator=g) * 0.05).to(dt16) for _ in range(c)]
    nx = 8
    xs = [(torch.randn(1, n, device="cuda", generator=g) * 2).to(dt16) for _ in range(nx)]
    bs = [(torch.randn(1, n, device="cuda", generator=g) * 2).to(dt16) for _ in range(nx)]
    gamma = (torch.rand(n, device="cuda", generator=g) + 0.5).to(dt16)
    layouts = {"kernel": [formats.pack_ap3_kernel(q) for q in qws],
               "bmma": [formats.pack_ap3_bmma(q) for q in qws]}
    del qws

    def call(qw, lut, i):
        x = xs[i % nx]
        if kind == "qkv":
            return torch.ops.decdec.ap_gemv_addnorm(x, bs[i % nx], gamma, 1e-5, qw, lut)[0]
        if kind == "gate_up":
            if formats.is_ap3_bmma_layout(qw, lut) or ops.glu_supported(3, n):
                return torch.ops.decdec.ap_gemv_addnorm_glu(x, bs[i % nx], gamma, 1e-5, qw, lut)[0]
            y = torch.ops.decdec.ap_gemv_addnorm(x, bs[i % nx], gamma, 1e-5, qw, lut)[0]  # as QuantLinear falls back
            return torch.nn.functional.silu(y[:, 0::2]) * y[:, 1::2]
        return torch.ops.decdec.ap_gemv(x, qw, lut)

    res = {}
    outs = {}
    for name, qw in layouts.items():
        outs[name] = call(qw[0], luts[0], 0).float()
        calls = c * nx
        res[name] = graph_seconds(lambda i: consume(call(qw[i % c], luts[i % c], i)), calls, reps=9) * 1e6
    ref = outs["kernel"]
    res["err"] = ((outs["bmma"] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_bmma_ops.md"), help="markdown table written here")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_bmma_ops.py needs a CUDA GPU (the binary-tensor-core GEMV has no CPU timing to compare)")
        return 2
    ops.load_cuda_kernels()
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    env = {k: v for k, v in os.environ.items() if k.startswith("DECDEC_")}
    lines = [f"{props.name}, torch {torch.__version__}, {dt.date.today()}, env {env or 'default'}; per-call us from "
             "CUDA graphs, each call followed by a consumer kernel; err: max |bmma - kernel| / max |kernel|.", "",
             "| model | projection | in x out | op | kernel layout (us) | bmma layout (us) | bmma / kernel | err |",
             "|---|---|---|---|---|---|---|---|"]
    bad = False
    for model in args.models:
        tot = {"kernel": 0.0, "bmma": 0.0}
        for kind, n, out in projections(*MODELS[model]):
            op = {"qkv": "ap_gemv_addnorm", "gate_up": "ap_gemv_addnorm_glu"}.get(kind, "ap_gemv")
            if kind == "gate_up" and not ops.glu_supported(3, n):
                op += " (kernel layout: ap_gemv_addnorm, then SiLU x up)"
            if not ops.ap3_bmma_supported(n, out):
                lines.append(f"| {model} | {kind} | {n}x{out} | {op} | | not supported | | |")
                continue
            r = bench_projection(kind, n, out, l2, seed=n + out)
            tot["kernel"] += r["kernel"]
            tot["bmma"] += r["bmma"]
            lines.append(f"| {model} | {kind} | {n}x{out} | {op} | {r['kernel']:.2f} | {r['bmma']:.2f} | "
                         f"{r['bmma'] / r['kernel']:.3f} | {r['err']:.1e} |")
            print(lines[-1], flush=True)
            if not r["err"] < 4e-3:
                print(f"MISMATCH: {model} {kind}: the two layouts differ by {r['err']:.2e} of max |y|")
                bad = True
        lines.append(f"| {model} | layer (sum) | | | {tot['kernel']:.2f} | {tot['bmma']:.2f} | "
                     f"{tot['bmma'] / max(tot['kernel'], 1e-9):.3f} | |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
