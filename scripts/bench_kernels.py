"""Benchmark the decdec CUDA kernels (prints a table, writes CSV + markdown under --out-dir).

Ceilings first (device-to-device copy bandwidth, counting bytes read + written; pinned host->device
memcpy bandwidth), then for the Llama-3-8B and Phi-3-medium projection shapes (in x out):
base GEMV time and achieved GB/s (ap and lutgemm, 3 and 4 bits), torch's fp16 GEMV (F.linear),
DEC alone (time, achieved PCIe fetch GB/s of the selected residual rows; eager and from CUDA graphs), and the fused
DEC || GEMV op (ap 3-bit and lutgemm 3-bit) with its slowdown over the base GEMV for
k_chunk in {0,1,2,4,8,16,32} and several n_tb, and the decode path's variant without the in-kernel
combine ({ap,lutgemm}_gemv_dec_parts, from CUDA graphs).

Timing: CUDA events around every call, many calls queued behind a GPU sleep (so host launch time
is not measured), median; weights and x rotate over copies totalling >= 4x the L2 so the cache
does not flatter. Weights are synthetic (speed does not depend on their values).

    python scripts/bench_kernels.py --out-dir outputs/bench [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decdec import formats, ops, reference
from decdec.sinks import write_csv
from decdec.timing import consume, graph_seconds

LLAMA = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
PHI3 = [(5120, 7680), (5120, 5120), (5120, 35840), (17920, 5120)]
K_CHUNKS = [0, 1, 2, 4, 8, 16, 32]


def timeit(fn, n_inputs: int, iters: int = 200, batch: int = 50, warmup: int = 10) -> float:
    """Median GPU time (microseconds) of fn(i), i rotating over n_inputs."""
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    times = []
    k = 0
    for _ in range(math.ceil(iters / batch)):
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(batch)]
        torch.cuda._sleep(40_000_000)  # ~20 ms: the queue fills while the GPU sleeps
        for s, e in ev:
            s.record()
            fn(k % n_inputs)
            e.record()
            k += 1
        torch.cuda.synchronize()
        times += [s.elapsed_time(e) * 1e3 for s, e in ev]
    return statistics.median(times)


def timeit_graph(fn, n_inputs: int, calls: int = 24, replays: int = 15) -> float:
    """Median per-call GPU time (microseconds) of fn(i) replayed from one CUDA graph of `calls`
    calls (i rotating over n_inputs), i.e. without per-launch host gaps, as a decoder running CUDA graphs sees it."""
    return graph_seconds(lambda i: fn(i % n_inputs), calls, reps=replays) * 1e6


def ceilings() -> dict:
    n = 1 << 28  # 1 GiB of fp32
    a = torch.empty(n, device="cuda")
    b = torch.empty_like(a)
    a.uniform_()
    t = timeit(lambda i: b.copy_(a), 1, iters=20, batch=10, warmup=3)
    hbm = 2 * a.numel() * 4 / (t * 1e-6) / 1e9
    del a, b
    h = torch.empty(1 << 28, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    t = timeit(lambda i: d.copy_(h, non_blocking=True), 1, iters=20, batch=10, warmup=3)
    h2d = h.numel() / (t * 1e-6) / 1e9
    del h, d
    torch.cuda.empty_cache()
    return {"hbm_copy_GBps": hbm, "pinned_h2d_GBps": h2d}


def rand_words(shape, device="cuda") -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device=device)


def copies_for(nbytes: int, l2: int) -> int:
    return max(2, math.ceil(4 * l2 / max(nbytes, 1)))


def bench_shape(n: int, out: int, args, l2: int, sms: int, rows: list, summary: dict) -> None:
    dt = torch.float16
    key = f"{n}x{out}"
    res = summary.setdefault(key, {})
    nx = 16
    xs = [torch.randn(1, n, device="cuda", dtype=dt) * torch.rand(1, n, device="cuda", dtype=dt) * 3 for _ in range(nx)]

    def record(kind, bits, t_us, nbytes=None, k_chunk="", n_tb="", slowdown=""):
        gbps = nbytes / (t_us * 1e-6) / 1e9 if nbytes else ""
        rows.append(dict(shape=key, kind=kind, bits=bits, k_chunk=k_chunk, n_tb=n_tb, time_us=round(t_us, 2),
                         GBps=round(gbps, 1) if gbps != "" else "",
                         slowdown_pct=round(slowdown, 1) if slowdown != "" else ""))
        return gbps

    base = {}
    for bits in (3, 4):
        # ap: qweight [b, out, in/32] + lut [out, 2^b]
        wbytes = bits * out * n // 8 + out * 2**bits * 2
        c = copies_for(wbytes, l2)
        qws = [rand_words((bits, out, n // 32)) for _ in range(c)]
        luts = [torch.randn(out, 2**bits, device="cuda", dtype=dt) * 0.05 for _ in range(c)]
        if bits == 3 and ops.ap3_bmma_supported(n, out):  # the binary-tensor-core GEMV (models: where ops.bmma_preferred, DEC off)
            qbm = [formats.pack_ap3_bmma(q) for q in qws]
            tbm = timeit_graph(lambda i: torch.ops.decdec.ap_gemv(xs[i % nx], qbm[i % c], luts[i % c]), c * nx)
            res["ap3_bmma_graph"] = (tbm, record("ap_gemv_graph_bmma", bits, tbm, wbytes + 2 * (n + out)))
            del qbm
        if ops.ap3_kernel_layout(bits, dt, n):  # what a built model runs (QuantLinear.use_kernel_layout)
            tb = timeit_graph(lambda i: torch.ops.decdec.ap_gemv(xs[i % nx], qws[i % c], luts[i % c]), c * nx)
            record("ap_gemv_graph_bitplanes", bits, tb, wbytes + 2 * (n + out))
            qws = [formats.pack_ap3_kernel(q) for q in qws]
        t = timeit(lambda i: torch.ops.decdec.ap_gemv(xs[i % nx], qws[i % c], luts[i % c]), c * nx)
        g = record("ap_gemv", bits, t, wbytes + 2 * (n + out))
        tg = timeit_graph(lambda i: torch.ops.decdec.ap_gemv(xs[i % nx], qws[i % c], luts[i % c]), c * nx)
        record("ap_gemv_graph", bits, tg, wbytes + 2 * (n + out))
        base[("ap", bits)] = (t, qws, luts, c, tg)
        res[f"ap{bits}"] = (t, g)
        res[f"ap{bits}_graph"] = (tg, (wbytes + 2 * (n + out)) / (tg * 1e-6) / 1e9)
        # lutgemm: binary [in/32, b, out] + alpha [in/128, b, out] + q_bias [in/128, out]
        groups = n // 128
        lbytes = bits * out * n // 8 + (groups * bits * out + groups * out) * 2
        c = copies_for(lbytes, l2)
        bs = [rand_words((n // 32, bits, out)) for _ in range(c)]
        als = [torch.rand(groups, bits, out, device="cuda", dtype=dt) * 0.03 for _ in range(c)]
        qbs = [torch.randn(groups, out, device="cuda", dtype=dt) * 0.01 for _ in range(c)]
        t = timeit(lambda i: torch.ops.decdec.lutgemm_gemv(xs[i % nx], bs[i % c], als[i % c], qbs[i % c]), c * nx)
        g = record("lutgemm_gemv", bits, t, lbytes + 2 * (n + out))
        tg = timeit_graph(lambda i: torch.ops.decdec.lutgemm_gemv(xs[i % nx], bs[i % c], als[i % c], qbs[i % c]),
                          c * nx)
        record("lutgemm_gemv_graph", bits, tg, lbytes + 2 * (n + out))
        base[("lutgemm", bits)] = (t, bs, als, qbs, c, tg)
        res[f"lg{bits}"] = (t, g)
        res[f"lg{bits}_graph"] = (tg, (lbytes + 2 * (n + out)) / (tg * 1e-6) / 1e9)
        if bits == 4:
            del qws, luts, bs, als, qbs
    fbytes = out * n * 2
    c = copies_for(fbytes, l2)
    ws = [torch.randn(out, n, device="cuda", dtype=dt) * 0.02 for _ in range(c)]
    t = timeit(lambda i: F.linear(xs[i % nx], ws[i % c]), c * nx)
    g = record("torch_fp16_gemv", 16, t, fbytes + 2 * (n + out))
    res["fp16"] = (t, g)
    tg = timeit_graph(lambda i: F.linear(xs[i % nx], ws[i % c]), c * nx)
    record("torch_fp16_gemv_graph", 16, tg, fbytes + 2 * (n + out))
    res["fp16_graph"] = (tg, fbytes / (tg * 1e-6) / 1e9)
    del ws
    torch.cuda.empty_cache()

    # DEC: residual in pinned host memory (zero-copy)
    q_res = ops.place_residual(rand_words((n, out // 8), device="cpu"), torch.device("cuda"))
    scales = torch.rand(out, device="cuda", dtype=dt) * 0.01
    thr = torch.cat(xs).float().abs().amax(0).sort(descending=True).values
    n_tbs = sorted({t for t in args.n_tb if t <= sms} | {sms})
    res["dec"] = {}
    res["dec_graph"] = {}
    for k in K_CHUNKS[1:]:
        bounds = reference.bounds_from_thresholds(thr, k).cuda()
        fetch = reference.k_total(k, n) * out // 2
        best = bestg = None
        for ntb in n_tbs:
            t = timeit(lambda i: torch.ops.decdec.dec(xs[i % nx], q_res, scales, bounds, k, ntb), nx)
            g = record("dec", "", t, fetch, k, ntb)
            if best is None or t < best[0]:
                best = (t, g, ntb)
            # from a CUDA graph (no launch gaps between the queued calls), as the GEMVs' graph rows
            tg = timeit_graph(lambda i: torch.ops.decdec.dec(xs[i % nx], q_res, scales, bounds, k, ntb), nx)
            gg = record("dec_graph", "", tg, fetch, k, ntb)
            if bestg is None or tg < bestg[0]:
                bestg = (tg, gg, ntb)
        res["dec"][k] = best
        res["dec_graph"][k] = bestg
        if k in (1, 8):  # diagnostics: selection alone (1 block), and DEC with the residual in HBM
            from decdec import _C

            t = timeit(lambda i: _C.dec_select(xs[i % nx], bounds, k), nx)
            record("dec_select_only", "", t, None, k, 1)
            q_dev = rand_words((n, out // 8))
            t = timeit(lambda i: torch.ops.decdec.dec(xs[i % nx], q_dev, scales, bounds, k, best[2]), nx)
            record("dec_residual_in_hbm", "", t, fetch, k, best[2])
            print(f"  {key} k={k}: dec {best[0]:.1f} us (n_tb {best[2]}), selection only {rows[-2]['time_us']} us, "
                  f"residual in HBM {rows[-1]['time_us']} us", flush=True)
            del q_dev

    # fused DEC || GEMV over the 3-bit base GEMVs, eager and from a CUDA graph
    for backend in ("ap", "lutgemm"):
        tb = base[(backend, 3)]
        t_base, tg_base = tb[0], tb[-1]
        res[f"fused_{backend}"] = {}
        res[f"fused_{backend}_graph"] = {}
        res[f"fused_{backend}_parts_graph"] = {}
        if backend == "ap":  # each call followed by a consumer kernel: no GEMV chains into the next GEMV's slots
            _, qws, luts, c, _ = tb
            tgc_base = timeit_graph(lambda i: consume(torch.ops.decdec.ap_gemv(xs[i % nx], qws[i % c], luts[i % c])),
                                    c * nx)
            record("ap_gemv_graph_consumer", 3, tgc_base)
            res["fused_ap_parts_consumer_graph"] = {}
            chain = ops.dec_chain_supported(3, n)  # chain mode (DEC, then the GEMV; final output): the decode path
            if chain:
                res["fused_ap_chain_graph"], res["fused_ap_chain_consumer_graph"] = {}, {}
        for k in K_CHUNKS:
            bounds = reference.bounds_from_thresholds(thr, max(k, 1)).cuda()
            best = bestg = bestp = bestpc = bestch = bestchc = None
            for ntb in n_tbs if k else n_tbs[:1]:
                if backend == "ap":
                    _, qws, luts, c, _ = tb
                    fn = lambda i: torch.ops.decdec.ap_gemv_dec(  # noqa: E731
                        xs[i % nx], qws[i % c], luts[i % c], q_res, scales, bounds, k, ntb)
                    fp = lambda i: torch.ops.decdec.ap_gemv_dec_parts(  # noqa: E731
                        xs[i % nx], qws[i % c], luts[i % c], q_res, bounds, k, ntb)
                else:
                    _, bs, als, qbs, c, _ = tb
                    fn = lambda i: torch.ops.decdec.lutgemm_gemv_dec(  # noqa: E731
                        xs[i % nx], bs[i % c], als[i % c], qbs[i % c], q_res, scales, bounds, k, ntb)
                    fp = lambda i: torch.ops.decdec.lutgemm_gemv_dec_parts(  # noqa: E731
                        xs[i % nx], bs[i % c], als[i % c], qbs[i % c], q_res, bounds, k, ntb)
                # the decode path: GEMV || DEC without the in-kernel combine (the step's next kernel adds them)
                tp = timeit_graph(fp, c * nx)
                slowp = (tp / tg_base - 1) * 100
                record(f"fused_{backend}_parts_graph", 3, tp, None, k, ntb, slowp)
                if bestp is None or tp < bestp[0]:
                    bestp = (tp, slowp, ntb)
                if backend == "ap":
                    tpc = timeit_graph(lambda i: consume(fp(i)), c * nx)
                    slowpc = (tpc / tgc_base - 1) * 100
                    record("fused_ap_parts_graph_consumer", 3, tpc, None, k, ntb, slowpc)
                    if bestpc is None or tpc < bestpc[0]:
                        bestpc = (tpc, slowpc, ntb)
                if backend == "ap" and chain:  # DEC, then the GEMV as its programmatic dependent (csrc Fused::chain)
                    fch = lambda i: torch.ops.decdec.ap_gemv_dec_chain(  # noqa: E731
                        xs[i % nx], qws[i % c], luts[i % c], q_res, scales, bounds, k, ntb)
                    tch = timeit_graph(fch, c * nx)
                    slowch = (tch / tg_base - 1) * 100
                    record("fused_ap_chain_graph", 3, tch, None, k, ntb, slowch)
                    if bestch is None or tch < bestch[0]:
                        bestch = (tch, slowch, ntb)
                    tchc = timeit_graph(lambda i: consume(fch(i)), c * nx)
                    slowchc = (tchc / tgc_base - 1) * 100
                    record("fused_ap_chain_graph_consumer", 3, tchc, None, k, ntb, slowchc)
                    if bestchc is None or tchc < bestchc[0]:
                        bestchc = (tchc, slowchc, ntb)
                t = timeit(fn, c * nx)
                slow = (t / t_base - 1) * 100
                record(f"fused_{backend}", 3, t, None, k, ntb, slow)
                if best is None or t < best[0]:
                    best = (t, slow, ntb)
                tg = timeit_graph(fn, c * nx)
                slowg = (tg / tg_base - 1) * 100
                record(f"fused_{backend}_graph", 3, tg, None, k, ntb, slowg)
                if bestg is None or tg < bestg[0]:
                    bestg = (tg, slowg, ntb)
            res[f"fused_{backend}"][k] = best
            res[f"fused_{backend}_graph"][k] = bestg
            res[f"fused_{backend}_parts_graph"][k] = bestp
            if backend == "ap":
                res["fused_ap_parts_consumer_graph"][k] = bestpc
                if chain:
                    res["fused_ap_chain_graph"][k] = bestch
                    res["fused_ap_chain_consumer_graph"][k] = bestchc
    del base, q_res
    torch.cuda.empty_cache()


def markdown(summary: dict, ceil: dict, card: str) -> str:
    hbm = ceil["hbm_copy_GBps"]
    lines = [
        f"card: {card}; HBM copy {hbm:.0f} GB/s (read+write), pinned H2D memcpy {ceil['pinned_h2d_GBps']:.1f} GB/s",
        "",
        "| shape (in x out) | ap 3-bit | ap 4-bit | lutgemm 3-bit | lutgemm 4-bit | torch fp16 | ap3 vs fp16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in summary.items():
        def cell(name):
            t, g = r[name]
            return f"{t:.1f} us ({g:.0f} GB/s, {100 * g / hbm:.0f}%)"
        lines.append(f"| {key} | {cell('ap3')} | {cell('ap4')} | {cell('lg3')} | {cell('lg4')} | "
                     f"{r['fp16'][0]:.1f} us ({r['fp16'][1]:.0f} GB/s) | {r['fp16'][0] / r['ap3'][0]:.2f}x |")
    lines += ["", "Same, timed from CUDA graphs (no per-launch gaps; how a graph-captured decoder runs); ap 3-bit bmma: the "
              "binary-tensor-core GEMV (formats.pack_ap3_bmma; its x-planes kernel included; models hold it where ops.bmma_preferred and DEC is off there):",
              "",
              "| shape (in x out) | ap 3-bit | ap 3-bit bmma | ap 4-bit | lutgemm 3-bit | lutgemm 4-bit | torch fp16 | "
              "ap3 vs fp16 |",
              "|---|---|---|---|---|---|---|---|"]
    for key, r in summary.items():
        def cellg(name):
            if name not in r:
                return "-"
            t, g = r[name]
            return f"{t:.1f} us ({g:.0f} GB/s, {100 * g / hbm:.0f}%)"
        lines.append(f"| {key} | {cellg('ap3_graph')} | {cellg('ap3_bmma_graph')} | {cellg('ap4_graph')} | "
                     f"{cellg('lg3_graph')} | {cellg('lg4_graph')} | {r['fp16_graph'][0]:.1f} us | "
                     f"{r['fp16_graph'][0] / r['ap3_graph'][0]:.2f}x |")
    for backend in ("ap", "lutgemm", "ap_graph", "lutgemm_graph", "ap_parts_graph", "lutgemm_parts_graph",
                    "ap_parts_consumer_graph", "ap_chain_graph", "ap_chain_consumer_graph"):
        if any(f"fused_{backend}" not in r for r in summary.values()):
            continue  # chain rows: only where chain mode serves every shape
        how = backend.replace("_parts_consumer_graph", " (CUDA graph, parts, every call and every base GEMV followed by"
                              " a plain consumer kernel, as in a decode step)")
        how = how.replace("_chain_consumer_graph", " (CUDA graph, chain mode: DEC then the GEMV, final output; every call"
                          " and every base GEMV followed by a plain consumer kernel)")
        how = how.replace("_chain_graph", " (CUDA graph, chain mode, back to back)")
        how = how.replace("_parts_graph", " (CUDA graph, parts: no in-kernel combine, the decode path)")
        lines += ["", f"Fused DEC || {how.replace('_graph', ' (CUDA graph)')} 3-bit GEMV: slowdown over the "
                  "base GEMV at the best n_tb (n_tb)", "",
                  "| shape | " + " | ".join(f"k={k}" for k in K_CHUNKS) + " |", "|---" * (len(K_CHUNKS) + 1) + "|"]
        for key, r in summary.items():
            f = r[f"fused_{backend}"]
            lines.append(f"| {key} | " + " | ".join(f"{f[k][1]:+.1f}% ({f[k][2]})" for k in K_CHUNKS) + " |")
    for name, how in (("dec", ""), ("dec_graph", ", from CUDA graphs")):
        lines += ["", f"DEC alone at the best n_tb{how}: time, fetch GB/s (% of pinned memcpy) (n_tb)", "",
                  "| shape | " + " | ".join(f"k={k}" for k in K_CHUNKS[1:]) + " |", "|---" * len(K_CHUNKS) + "|"]
        for key, r in summary.items():
            d = r[name]
            lines.append(f"| {key} | " + " | ".join(
                f"{d[k][0]:.1f} us, {d[k][1]:.1f} GB/s ({100 * d[k][1] / ceil['pinned_h2d_GBps']:.0f}%) ({d[k][2]})"
                for k in K_CHUNKS[1:]) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="outputs/bench_kernels")
    p.add_argument("--quick", action="store_true", help="two shapes only")
    p.add_argument("--shapes", default="llama,phi3")
    p.add_argument("--n-tb", type=int, nargs="+", default=[4, 8, 16, 32, 66])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU", file=sys.stderr)
        return 2
    ops.load_cuda_kernels()
    props = torch.cuda.get_device_properties(0)
    card = f"{props.name} ({props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB)"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ceil = ceilings()
    print(f"{card}: HBM copy {ceil['hbm_copy_GBps']:.0f} GB/s, pinned H2D {ceil['pinned_h2d_GBps']:.1f} GB/s",
          flush=True)
    shapes = []
    if "llama" in args.shapes:
        shapes += LLAMA
    if "phi3" in args.shapes:
        shapes += PHI3
    if args.quick:
        shapes = [LLAMA[1], LLAMA[2]]
    rows, summary = [], {}
    for n, out in shapes:
        bench_shape(n, out, args, props.L2_cache_size, props.multi_processor_count, rows, summary)
        r = summary[f"{n}x{out}"]
        print(f"{n}x{out}: ap3 {r['ap3'][0]:.1f} us ({r['ap3'][1]:.0f} GB/s) lg3 {r['lg3'][0]:.1f} us "
              f"fp16 {r['fp16'][0]:.1f} us; fused ap k=4 {r['fused_ap'][4][1]:+.1f}%, "
              f"parts (graph) {r['fused_ap_parts_graph'][4][1]:+.1f}% "
              + (f"chain + consumer (graph) {r['fused_ap_chain_consumer_graph'][4][1]:+.1f}% "
                 if "fused_ap_chain_consumer_graph" in r else "")
              + f"[{time.time() - t0:.0f} s]", flush=True)
    write_csv(out_dir / "bench_kernels.csv", rows)
    md = markdown(summary, ceil, card)
    (out_dir / "bench_kernels.md").write_text(md)
    try:
        from rich.console import Console
        from rich.markdown import Markdown

        Console(width=200).print(Markdown(md))
    except ImportError:
        print(md)
    print(f"wrote {out_dir / 'bench_kernels.csv'} and {out_dir / 'bench_kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
