"""Kernel timing shared by the autotuner (decdec.tune) and scripts/bench_kernels.py. torch only (the GPU
image runs the kernel benchmark without hydra)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def graph_seconds(fn: Callable[[int], object], calls: int, reps: int = 7, warmup: int = 3) -> float:
    """Median seconds per call of ``fn(i)`` (i = 0 .. calls - 1; callers rotate inputs with it) replayed
    from one CUDA graph of ``calls`` calls, timed with CUDA events: what a decoder running CUDA graphs
    sees, without the host's per-launch dispatch (eager event timings measure ~20 us of that)."""
    for i in range(warmup):
        fn(i)  # outside capture: lazy workspaces (the fused op sizes its own here) and compilation
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(samples)


def host_seconds(fn: Callable[[int], object], calls: int, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds per call of ``fn(i)`` in a host loop (the CPU path, where the ops run synchronously)."""
    for i in range(warmup):
        fn(i)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def consume(y: torch.Tensor) -> torch.Tensor:
    """A plain (not programmatically dependent) kernel reading a projection's decode output, as the pointwise kernel
    after it in a compiled step does (RoPE, SiLU x up, the residual add + norm). The tuner and the kernel benchmark
    time every call followed by it, with DEC and without: back to back, the base GEMV would chain into the next call's
    GEMV (the GEMVs trigger their dependents early) while the fused op's join cannot, charging DEC ~1.5-2 us per call
    that decode never pays (H200, docs/PERF.md session 10: fused k=4 +19.5 % over the GEMV back to back, +9.9 % each
    followed by a consumer, at 4096x28672)."""
    return torch.add(y.reshape(-1)[:8], 1)

