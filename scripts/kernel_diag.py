"""Timing diagnostics for the kernels (GPU machine): per-launch event overhead (a trivial kernel),
event-timed vs CUDA-graph-timed GEMV and DEC selection, to separate kernel time from gaps."""

from __future__ import annotations

import statistics
import sys

import torch

from decdec import ops, reference


def ev_time(fn, n=100):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    torch.cuda._sleep(40_000_000)
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in ev)


def graph_time(fn, reps=20, n=20):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e3 / reps)
    return statistics.median(ts)


def main() -> int:
    ops.load_cuda_kernels()
    from decdec import _C

    tiny = torch.zeros(1, device="cuda")
    print(f"trivial kernel: events {ev_time(lambda: tiny.add_(1)):.2f} us, graph {graph_time(lambda: tiny.add_(1)):.2f} us")
    for n, out in [(4096, 4096), (4096, 28672)]:
        x = torch.randn(1, n, device="cuda", dtype=torch.half)
        qw = torch.randint(-(2**31), 2**31 - 1, (3, out, n // 32), dtype=torch.int32, device="cuda")
        lut = torch.randn(out, 8, device="cuda", dtype=torch.half)
        b = torch.randint(-(2**31), 2**31 - 1, (n // 32, 3, out), dtype=torch.int32, device="cuda")
        a = torch.rand(n // 128, 3, out, device="cuda", dtype=torch.half)
        qb = torch.rand(n // 128, out, device="cuda", dtype=torch.half)
        w = torch.randn(out, n, device="cuda", dtype=torch.half)
        thr = x.float().abs()[0].sort(descending=True).values
        for name, fn in [
            ("ap_gemv 3b", lambda: torch.ops.decdec.ap_gemv(x, qw, lut)),
            ("lutgemm 3b", lambda: torch.ops.decdec.lutgemm_gemv(x, b, a, qb)),
            ("F.linear fp16", lambda: torch.nn.functional.linear(x, w)),
        ]:
            print(f"{n}x{out} {name}: events {ev_time(fn):.2f} us, graph (L2-warm) {graph_time(fn):.2f} us")
        q_dev = torch.randint(-(2**31), 2**31 - 1, (n, out // 8), dtype=torch.int32, device="cuda")
        q_pin = ops.place_residual(q_dev.cpu(), torch.device("cuda"))
        sc = torch.rand(out, device="cuda", dtype=torch.half)
        for k in (1, 8, 32):
            bounds = reference.bounds_from_thresholds(thr, k).cuda()
            line = (f"{n}x{out} k={k}: select {ev_time(lambda: _C.dec_select(x, bounds, k)):.2f} us "
                    f"(graph {graph_time(lambda: _C.dec_select(x, bounds, k)):.2f})")
            for ntb in (4, 16, 64):
                line += (f"; n_tb={ntb}: dec pinned graph "
                         f"{graph_time(lambda: torch.ops.decdec.dec(x, q_pin, sc, bounds, k, ntb)):.2f}, hbm "
                         f"{graph_time(lambda: torch.ops.decdec.dec(x, q_dev, sc, bounds, k, ntb)):.2f}, fused ap graph "
                         f"{graph_time(lambda: torch.ops.decdec.ap_gemv_dec(x, qw, lut, q_pin, sc, bounds, k, ntb)):.2f}")
            print(line + " us", flush=True)
    for n in (1024, 4096, 14336):  # selection cost per chunk (one block walks all chunks)
        x = torch.randn(1, n, device="cuda", dtype=torch.half)
        bounds = reference.bounds_from_thresholds(x.float().abs()[0].sort(descending=True).values, 8).cuda()
        print(f"dec_select in={n}: graph {graph_time(lambda: _C.dec_select(x, bounds, 8)):.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
