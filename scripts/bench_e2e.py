"""End-to-end decode benchmark on one card in one process (issue: GPU end to end).

    python scripts/bench_e2e.py -o model=llama3 -o model.source=synthetic -o device=cuda -o compile=cudagraphs

For the model given by the overrides: decode tokens/s (prefill excluded, median of samples)
of ``backend=fp16`` (dense), ``ap``/``lutgemm`` at 3 and 4 bits with ``dec=off``, and ``ap`` w3
with DEC autotuned (task=tune) for each target slowdown; the memory floor of each setting
(bytes the weights occupy -- read once per token -- over the measured HBM copy bandwidth); and
peak GPU memory with and without DEC. Prints a table, writes CSV + markdown under --out.
``--dec llama3`` runs the quantized settings with that DEC config (conf/dec/) instead of dec=off.
"""

from __future__ import annotations

import argparse
import gc
import csv
import datetime as dt
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from decdec import tune
from decdec.config import register_configs
from decdec.run import Run, env_device_name, knobs_label

REPO = Path(__file__).resolve().parent.parent


def hbm_bandwidth(device: torch.device) -> float | None:
    """Measured device copy bandwidth, bytes/s (read + write), 1 GiB buffers."""
    if device.type != "cuda":
        return None
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * n / times[len(times) // 2]


def weight_bytes(model) -> int:
    """Bytes of everything decode reads once per token: weights (not KV cache / RoPE tables)."""
    skip = ("kv_cache", "cos", "sin", "mask", "freqs")
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if any(s in name for s in skip) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    emb = model.tok_embeddings.weight
    if model.output.weight.data_ptr() != emb.data_ptr():
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()  # decode looks up one row only
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--override", dest="overrides", action="append", default=[])
    ap.add_argument("--targets", type=float, nargs="*", default=[0.025, 0.05, 0.10])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--settings", nargs="*", default=["fp16", "ap-w3", "lutgemm-w3", "ap-w4", "lutgemm-w4"],
                    help="backend[-precision][+attention][@compile], e.g. fp16 ap-w3 ap-w3@reduce-overhead ap-w3+sdpa "
                         "(+sdpa / +kernel: decode attention through SDPA / decdec.decode_attention instead of "
                         "attention=auto)")
    ap.add_argument("--dec", default="off",
                    help="DEC config of the quantized settings (conf/dec/NAME.yaml, e.g. llama3: the model's shipped "
                         "k_chunk / n_tb); default off. fp16 always runs without DEC")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    a = ap.parse_args()
    decs = sorted(f.stem for f in (REPO / "conf" / "dec").glob("*.yaml"))
    if a.dec != "off" and a.dec not in decs:
        raise SystemExit(f"--dec {a.dec}: no conf/dec/{a.dec}.yaml; choose one of {', '.join(decs)}")
    register_configs()
    rows = []
    knobs = knobs_label()  # the DECDEC_* switches of this process, on every row and in the title
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tune_args = [f"task.verify_tokens={a.tokens}", f"task.verify_samples={a.samples}"]

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        def make_run(overrides):
            gc.collect()  # the previous setting's model must be gone before this one's peak is measured
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cfg = compose("config", overrides=["logger=yaml", *a.overrides, *overrides])
            run_dir = a.out / f"e2e-{stamp}" / f"{len(rows)}"
            return Run(OmegaConf.to_object(cfg), run_dir, OmegaConf.to_container(cfg, resolve=True), overrides)

        bw = None
        for setting in a.settings:
            spec, _, mode = setting.partition("@")  # "ap-w3@inductor": this setting with compile=inductor
            spec, plus, extra = spec.partition("+")
            if plus and extra not in ("sdpa", "kernel"):
                raise SystemExit(f"setting {setting!r}: unknown modifier +{extra} (choose +sdpa or +kernel)")
            backend, _, prec = spec.partition("-")
            dec = "off" if backend == "fp16" else a.dec
            ov = [f"backend={backend}", f"dec={dec}"] + ([f"precision={prec}"] if prec else [])
            ov += [f"compile={mode}"] if mode else []
            ov += [f"attention={extra}"] if plus else []
            with make_run(["task=tune", *tune_args, *ov]) as run:
                bw = bw or hbm_bandwidth(run.device)
                _, built = run._build()
                after_build = torch.cuda.memory_allocated(run.device) if run.device.type == "cuda" else None
                g = torch.Generator().manual_seed(0)
                prompt = torch.randint(0, built.args.vocab_size, (16,), generator=g)
                run._reset_peak()
                rate = run._decode_rate(built, prompt, a.tokens, a.samples)
                wb = weight_bytes(built.model)
                rows.append({"setting": f"{setting} dec={dec}", "tokens_per_s": rate, "compile": mode or "(overrides)", "weight_bytes": wb,
                             "floor_tokens_per_s": bw / wb if bw else None, "peak_gpu_bytes": run._peak(),
                             "gpu_bytes_after_build": after_build,
                             "device": env_device_name(run.device), "knobs": knobs})
                run._finish({"status": "ok"})
                run.model = None
            del built  # or this model stays allocated through the next settings' peak measurements
            print(rows[-1])
        if a.targets:  # one tune for every target: one model build, dec=off rate and set of projection timings
            targets = "[" + ",".join(repr(float(x)) for x in a.targets) + "]"
            with make_run(["task=tune", *tune_args, "backend=ap", "precision=w3",
                           f"task.target_slowdowns={targets}"]) as run:
                summary = run.execute()
            for s in summary.get("targets") or [summary]:  # one target: the summary is its own
                outcome = tune.outcome(s["measured_slowdown"], s["verified"])
                rows.append({"setting": f"ap-w3 + DEC tuned {s['target_slowdown']:.1%} ({outcome})",
                             "tokens_per_s": s["tuned_tokens_per_s"], "weight_bytes": None, "floor_tokens_per_s": None,
                             "peak_gpu_bytes": s["peak_gpu_bytes_tuned"], "device": env_device_name(run.device),
                             "dec_off_tokens_per_s": s["base_tokens_per_s"], "choice": s["choice"],
                             "peak_gpu_bytes_dec_off": s["peak_gpu_bytes_dec_off"], "knobs": knobs})
                print(rows[-1])

    dense = rows[0]["tokens_per_s"]
    table = Table(title=f"decode tokens/s on {rows[0]['device']} ({stamp}); HBM copy {bw / 1e12 if bw else 0:.2f} TB/s"
                        + (f"; {knobs}" if knobs else ""))
    for col in ("setting", "tokens/s", "x dense", "floor tokens/s", "% of floor", "peak GPU GiB"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        floor = r["floor_tokens_per_s"]
        table.add_row(r["setting"], f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / dense:.2f}",
                      f"{floor:.1f}" if floor else "-", f"{100 * r['tokens_per_s'] / floor:.0f} %" if floor else "-",
                      f"{r['peak_gpu_bytes'] / 2**30:.2f}" if r["peak_gpu_bytes"] else "-")
    Console().print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"e2e-{stamp}"
    keys = sorted({k for r in rows for k in r})
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {stem}.csv")


if __name__ == "__main__":
    main()
