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

DEVICE = "cuda"  # tests run the same code on the CPU (with a host timer) to check it, not to time it
TIMER = graph_seconds

MODELS = {  # hidden, q + k + v rows, intermediate
    "llama3-8b": (4096, 6144, 14336),
    "phi3-medium": (5120, 7680, 17920),
}


def projections(hidden: int, qkv: int, inter: int) -> list[tuple[str, int, int]]:
    return [("qkv", hidden, qkv), ("o", hidden, hidden), ("gate_up", hidden, 2 * inter), ("down", inter, hidden)]


class Projection:
    """One projection's random 3-bit codes and LUTs in both layouts, ``copies`` of each (rotated so the L2 does not
    hold them), and the op a decode step runs on it."""

    def __init__(self, kind: str, n: int, out: int, l2: int, seed: int):
        self.kind, self.n, self.out = kind, n, out
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        wbytes = 3 * out * n // 8 + out * 16
        self.copies = max(2, math.ceil(4 * l2 / wbytes))
        qws = [torch.randint(-(2**31), 2**31 - 1, (3, out, n // 32), dtype=torch.int32, device=DEVICE, generator=g)
               for _ in range(self.copies)]
        self.luts = [(torch.randn(out, 8, device=DEVICE, generator=g) * 0.05).half() for _ in range(self.copies)]
        self.gamma = (torch.rand(n, device=DEVICE, generator=g) + 0.5).half()
        self.weights = {"kernel": [formats.pack_ap3_kernel(q) for q in qws],
                        "bmma": [formats.pack_ap3_bmma(q) for q in qws]}

    def __call__(self, layout: str, i: int, x: torch.Tensor, b: torch.Tensor | None = None):
        """The op on copy i: qkv and gate_up take (a, b) and return (y, h); o and down take x and return y."""
        qw, lut = self.weights[layout][i % self.copies], self.luts[i % self.copies]
        if self.kind == "qkv":
            return torch.ops.decdec.ap_gemv_addnorm(x, b, self.gamma, 1e-5, qw, lut)
        if self.kind == "gate_up":
            if layout == "bmma" or ops.glu_supported(3, self.n):
                return torch.ops.decdec.ap_gemv_addnorm_glu(x, b, self.gamma, 1e-5, qw, lut)
            y, h = torch.ops.decdec.ap_gemv_addnorm(x, b, self.gamma, 1e-5, qw, lut)  # as QuantLinear falls back
            return torch.nn.functional.silu(y[:, 0::2]) * y[:, 1::2], h
        return torch.ops.decdec.ap_gemv(x, qw, lut)


def rand_inputs(n: int, count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [(torch.randn(1, n, device=DEVICE, generator=g) * 2).half() for _ in range(count)]


def bench_projection(proj: Projection, seed: int) -> dict:
    nx = 8
    xs, bs = rand_inputs(proj.n, nx, seed), rand_inputs(proj.n, nx, seed + 1)

    def call(layout, i):
        r = proj(layout, i, xs[i % nx], bs[i % nx])
        return r[0] if isinstance(r, tuple) else r

    res, outs = {}, {}
    for layout in ("kernel", "bmma"):
        outs[layout] = call(layout, 0).float()
        res[layout] = TIMER(lambda i: consume(call(layout, i)), proj.copies * nx) * 1e6
    ref = outs["kernel"]
    res["err"] = ((outs["bmma"] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return res


def bench_chain(projs: dict[str, Projection], plans: dict[str, dict[str, str]], seed: int) -> dict[str, float]:
    """The four ops chained as a decode step runs them (each output feeding the next op; the attention left out:
    o reads the first ``hidden`` of qkv's outputs), per plan (projection -> layout): median us per layer from graphs.
    What the op-level sum cannot show: how each op overlaps its neighbours (programmatic launches)."""
    hidden, nx = projs["qkv"].n, 8
    xs, bs = rand_inputs(hidden, nx, seed), rand_inputs(hidden, nx, seed + 1)
    calls = max(p.copies for p in projs.values()) * nx

    def layer(plan, i):
        y, h = projs["qkv"](plan["qkv"], i, xs[i % nx], bs[i % nx])
        o = projs["o"](plan["o"], i, y[:, :hidden].contiguous())
        act, _ = projs["gate_up"](plan["gate_up"], i, h, o)
        return consume(projs["down"](plan["down"], i, act))

    return {name: TIMER(lambda i: layer(plan, i), calls) * 1e6 for name, plan in plans.items()}


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
    chains: list[str] = []
    plan_names: list[str] = []
    for model in args.models:
        tot = {"kernel": 0.0, "bmma": 0.0}
        projs: dict[str, Projection] = {}
        for kind, n, out in projections(*MODELS[model]):
            op = {"qkv": "ap_gemv_addnorm", "gate_up": "ap_gemv_addnorm_glu"}.get(kind, "ap_gemv")
            if kind == "gate_up" and not ops.glu_supported(3, n):
                op += " (kernel layout: ap_gemv_addnorm, then SiLU x up)"
            if not ops.ap3_bmma_supported(n, out):
                lines.append(f"| {model} | {kind} | {n}x{out} | {op} | | not supported | | |")
                continue
            projs[kind] = Projection(kind, n, out, l2, seed=n + out)
            r = bench_projection(projs[kind], seed=n + out + 1)
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
        if len(projs) == 4:
            kernel = dict.fromkeys(projs, "kernel")
            plans = {"kernel layout": kernel, "gate_up bmma (models now)": {**kernel, "gate_up": "bmma"},
                     "gate_up + down bmma": {**kernel, "gate_up": "bmma", "down": "bmma"},
                     "all bmma (DECDEC_BMMA=all)": dict.fromkeys(projs, "bmma")}
            chain = bench_chain(projs, plans, seed=7)
            plan_names = list(chain)
            base = chain["kernel layout"]
            chains.append(f"| {model} | " + " | ".join(f"{t:.2f} ({t / base:.3f})" for t in chain.values()) + " |")
            print(chains[-1], flush=True)
        del projs
        torch.cuda.empty_cache()
    lines += ["", "The four ops chained as a step runs them (attention left out; us per layer from CUDA graphs, ratio to the "
              "kernel layout):", "", "| model | " + " | ".join(plan_names) + " |", "|---" * (len(plan_names) + 1) + "|",
              *chains]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
