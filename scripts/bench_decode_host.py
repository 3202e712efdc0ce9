"""Host cost of a decode step on the GPU: compile=cudagraphs (inductor + one CUDA graph per step,
decdec.generate.GraphedDecode) against compile=reduce-overhead (torch's CUDA-graph trees) and inductor
without graphs; every setting's greedy tokens must equal the plain inductor decode's.

    python scripts/bench_decode_host.py [--shape smollm2-135m] [--backend fp16] [--tokens 64]

A small model makes the host the bottleneck, so tokens/s measures the host's cost per step. Synthetic
weights. Prints one line per setting (median of 3 samples after a warm-up sample).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decdec.config import DecConfig, KChunk
from decdec.generate import Generator
from decdec.synthetic import build_synthetic


def rate(run, n: int) -> tuple[float, torch.Tensor]:
    rates, toks = [], None
    for i in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        toks = run()
        torch.cuda.synchronize()
        if i:
            rates.append((n - 1) / (time.perf_counter() - t0))
    return statistics.median(rates), toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--backend", default="fp16")
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    dev = torch.device("cuda")
    dec = DecConfig(name="off", n_tb=8, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=0))
    model = build_synthetic(a.shape, a.backend, 3, False, torch.float16, dev, dec, seed=0).model
    prompt = torch.arange(1, 17)
    n = a.tokens
    with torch.no_grad():
        results = {}
        for mode in ("cudagraphs", "reduce-overhead", "inductor"):
            torch._dynamo.reset()
            gen = Generator(model, dev, torch.float16, prompt.numel() + n + 4, mode)
            r, toks = rate(lambda: gen.generate(prompt, n), n)
            results[mode] = toks
            print(f"{a.shape} {a.backend} compile={mode}: {r:.1f} tokens/s ({1e6 / r:.1f} us per step)", flush=True)
        same = all(torch.equal(results[m], results["inductor"]) for m in ("cudagraphs", "reduce-overhead"))
        print(f"greedy tokens cudagraphs == reduce-overhead == inductor: {same}", flush=True)
        if not same:
            raise SystemExit("a graphed decode differs from the same compiled step without graphs")

if __name__ == "__main__":
    main()
