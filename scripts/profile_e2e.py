"""Where a decode step's GPU time goes, per kernel, on one card (torch.profiler / CUPTI, no nsys).

    python scripts/profile_e2e.py -o model=llama3 -o model.source=synthetic -o device=cuda \
        -o compile=cudagraphs -o backend=ap -o precision=w3 -o dec=off --steps 32

Builds the model as `run.py` does, decodes one warm-up sample (records the CUDA graphs), then profiles
`--steps` decode steps and prints, per kernel name and per token: calls, GPU microseconds, share of
the GPU time; the same grouped into categories (quantized GEMV, DEC, dense GEMM, attention, fused
pointwise, copies); and the step's wall time against the sum of its kernels (GPU idle = host bound or
launch gaps). Writes the per-kernel table as CSV under --out. ``--timeline N`` also prints where the GPU sits idle:
per kernel, the time no kernel ran on any stream just before it started (launch gaps, a fork / join's event waits), and
N consecutive kernels from the middle of the decode (start offset, duration, stream, idle before) -- the order and
overlap inside one decoder layer, which per-kernel sums do not show.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from decdec.config import register_configs
from decdec.run import Run, env_device_name

REPO = Path(__file__).resolve().parent.parent

CATEGORIES = [  # first match wins; patterns on the demangled kernel name
    ("attention", r"flash|fmha|attention|sdpa"),  # incl. inductor's kernels preparing SDPA's inputs
    ("fused pointwise (inductor)", r"^triton_"),  # named after the ops they fuse (e.g. ..._ap_gemv_mul_silu)
    ("x planes (bmma GEMV's input)", r"ap3_xplanes"),
    ("quantized GEMV", r"ap3_gemv|ap_gemv|ap3_bmma|lutgemm_gemv"),
    ("DEC", r"dec_kernel|dec_select"),
    ("dense GEMM/GEMV (cuBLAS)", r"nvjet|gemv|gemm|cutlass|xmma|cublas|splitK"),
    ("copy / fill", r"copy|memcpy|memset|fill|Memcpy|Memset|elementwise"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name):
            return cat
    return "other"


def trace_kernels(prof) -> list[tuple[str, float, float, int]]:
    """(name, start us, duration us, stream) of every GPU kernel in a profile, by start time (its Chrome trace)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    ks = [(e["name"], float(e["ts"]), float(e.get("dur", 0.0)), int(e.get("args", {}).get("stream", -1)))
          for e in events if e.get("cat") == "kernel"]
    return sorted(ks, key=lambda k: k[1])


def idle_before(kernels: list[tuple[str, float, float, int]]) -> list[float]:
    """For each kernel (sorted by start), the time no kernel was running on any stream just before it started."""
    out, busy_until = [], None
    for _, ts, dur, _ in kernels:
        out.append(max(0.0, ts - busy_until) if busy_until is not None else 0.0)
        busy_until = ts + dur if busy_until is None else max(busy_until, ts + dur)
    return out


def adds(kernels: list[tuple[str, float, float, int]]) -> list[float]:
    """For each kernel (sorted by start), the busy time it adds to the span: how far its end lies past both its start
    and every earlier kernel's end. With programmatic dependent launch a kernel starts while its predecessor runs, so
    its duration overstates what it costs the step; this does not: span = sum of adds + sum of ``idle_before``."""
    out, busy_until = [], None
    for _, ts, dur, _ in kernels:
        out.append(max(0.0, ts + dur - max(ts, busy_until if busy_until is not None else ts)))
        busy_until = ts + dur if busy_until is None else max(busy_until, ts + dur)
    return out


def _by_kernel(kernels: list[tuple[str, float, float, int]], values: list[float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for k, v in zip(kernels, values):
        out[k[0]] += v
    return out


def idle_by_kernel(kernels: list[tuple[str, float, float, int]]) -> dict[str, float]:
    """Idle time before each kernel (``idle_before``) summed per kernel name (microseconds)."""
    return _by_kernel(kernels, idle_before(kernels))


def adds_by_kernel(kernels: list[tuple[str, float, float, int]]) -> dict[str, float]:
    """What each kernel adds to the span (``adds``) summed per kernel name (microseconds)."""
    return _by_kernel(kernels, adds(kernels))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--override", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "profile")
    ap.add_argument("--timeline", type=int, default=0, metavar="N",
                    help="also print the idle time before each kernel and N consecutive kernels of the decode")
    a = ap.parse_args()
    register_configs()
    from decdec.generate import Generator

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=yaml", "task=tune", *a.overrides])
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        with Run(OmegaConf.to_object(cfg), a.out / f"run-{stamp}", OmegaConf.to_container(cfg, resolve=True),
                 a.overrides) as run:
            _, built = run._build()
            g = torch.Generator().manual_seed(0)
            prompt = torch.randint(0, built.args.vocab_size, (16,), generator=g)
            sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
            gen = Generator(built.model, run.device, run.dtype, prompt.numel() + a.steps + 8, cfg.compile.mode)
            gen.generate(prompt, a.steps + 1)  # warm-up: compiles and records the graphs
            gen.generate(prompt, a.steps + 1)
            sync()
            t0 = time.perf_counter()
            gen.generate(prompt, 1)
            t0_enq = time.perf_counter()  # the host has queued the prefill
            sync()
            t1 = time.perf_counter()
            gen.generate(prompt, a.steps + 1)
            t_enq = time.perf_counter()  # the host has queued the prefill and every step (the graphs run behind it)
            sync()
            t2 = time.perf_counter()
            wall_us = ((t2 - t1) - (t1 - t0)) / a.steps * 1e6  # per decode step, prefill excluded
            # host time to queue a step: queueing time minus the prefill's queueing time (not its wall time,
            # which made this negative when the host is fast); a host that runs ahead until the launch queue
            # is full reads as the GPU's step time here
            host_us = ((t_enq - t1) - (t0_enq - t0)) / a.steps * 1e6
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof_pre:
                gen.generate(prompt, 1)
                sync()
            with torch.profiler.profile(activities=acts) as prof:
                gen.generate(prompt, a.steps + 1)
                sync()
            device_name = env_device_name(run.device)

    def kernels(p) -> dict[str, list[float]]:
        out = defaultdict(list)
        for e in p.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
                out[e.name].append(e.device_time)  # microseconds
        return out

    pre, full = kernels(prof_pre), kernels(prof)
    rows = []
    for name, times in full.items():  # decode steps = full run minus the prefill-only run
        t = sum(times) - sum(pre.get(name, []))
        n = len(times) - len(pre.get(name, []))
        if n > 0 or t > 0:
            rows.append({"kernel": name, "category": category(name), "calls_per_token": n / a.steps,
                         "us_per_token": t / a.steps})
    rows.sort(key=lambda r: -r["us_per_token"])
    gpu_us = sum(r["us_per_token"] for r in rows)
    if not rows:
        raise SystemExit(f"no GPU kernels recorded on {device_name} (this profiles CUDA decode; use -o device=cuda)")
    cats = defaultdict(float)
    for r in rows:
        cats[r["category"]] += r["us_per_token"]

    title = (f"{device_name}, {' '.join(a.overrides)}: decode step wall {wall_us:.1f} us "
             f"({1e6 / wall_us:.1f} tokens/s), kernels {gpu_us:.1f} us ({100 * gpu_us / wall_us:.0f} % busy), "
             f"host queues a step in {host_us:.1f} us")
    t = Table(title=title)
    for col in ("category", "us/token", "% of kernels"):
        t.add_column(col, justify="left" if col == "category" else "right")
    for c, us in sorted(cats.items(), key=lambda kv: -kv[1]):
        t.add_row(c, f"{us:.1f}", f"{100 * us / gpu_us:.1f}")
    Console(width=200).print(t)
    k = Table(title=f"top {a.top} kernels per decode token")
    for col in ("kernel", "category", "calls", "us/token", "us/call"):
        k.add_column(col, justify="left" if col in ("kernel", "category") else "right")
    for r in rows[: a.top]:
        calls = r["calls_per_token"]
        k.add_row(r["kernel"][:110], r["category"], f"{calls:.1f}", f"{r['us_per_token']:.1f}",
                  f"{r['us_per_token'] / calls:.2f}" if calls else "-")
    Console(width=220).print(k)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"profile-{stamp}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kernel", "category", "calls_per_token", "us_per_token"])
        w.writeheader()
        w.writerows(rows)
    if a.timeline:
        print_timeline(prof, prof_pre, a.steps, a.timeline)
    print(f"wall_us_per_token={wall_us:.1f} kernel_us_per_token={gpu_us:.1f} host_us_per_token={host_us:.1f} wrote {path}")


def span_us(kernels: list[tuple[str, float, float, int]]) -> float:
    """First kernel's start to last kernel's end (microseconds)."""
    return max(ts + dur for _, ts, dur, _ in kernels) - kernels[0][1] if kernels else 0.0


def print_timeline(prof, prof_pre, steps: int, n: int) -> None:
    ks, pre = trace_kernels(prof), trace_kernels(prof_pre)
    idle, add = idle_by_kernel(ks), adds_by_kernel(ks)
    for name, us in idle_by_kernel(pre).items():  # decode steps only: less the prefill run's
        idle[name] -= us
    for name, us in adds_by_kernel(pre).items():
        add[name] -= us
    total, step = sum(idle.values()) / steps, (span_us(ks) - span_us(pre)) / steps
    # under the profiler (host callbacks between launches), so compared with the profiled step, not the unprofiled wall
    t = Table(title=f"Per decode token under the profiler ({step:.1f} us profiled step): the GPU idle before each "
                    f"kernel ({total:.1f} us in all) and the busy time each kernel adds to the step's span")
    for col in ("kernel", "idle us/token", "adds us/token"):
        t.add_column(col, justify="left" if col == "kernel" else "right")
    for name in sorted(idle.keys() | add.keys(), key=lambda k: -(idle.get(k, 0.0) + add.get(k, 0.0)))[:15]:
        t.add_row(name[:110], f"{idle.get(name, 0.0) / steps:.1f}", f"{add.get(name, 0.0) / steps:.1f}")
    Console(width=200).print(t)
    mid = len(ks) // 2
    window, gaps, added = ks[mid:mid + n], idle_before(ks)[mid:mid + n], adds(ks)[mid:mid + n]
    t = Table(title=f"{len(window)} consecutive decode kernels (offsets from the first, us; adds: past every "
                    f"earlier kernel's end)")
    for col in ("start", "dur", "end", "stream", "idle before", "adds", "kernel"):
        t.add_column(col, justify="left" if col == "kernel" else "right")
    t0 = window[0][1] if window else 0.0
    for (name, ts, dur, stream), gap, ad in zip(window, gaps, added):
        t.add_row(f"{ts - t0:.1f}", f"{dur:.1f}", f"{ts + dur - t0:.1f}", str(stream), f"{gap:.1f}", f"{ad:.1f}",
                  name[:90])
    Console(width=200).print(t)


if __name__ == "__main__":
    main()
