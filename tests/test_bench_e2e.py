"""scripts/bench_e2e.py on the tiny model (CPU): the --dec option puts a DEC config on the quantized settings only."""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def _bench(tmp_path: Path, monkeypatch, *extra: str) -> tuple[list[dict], list[list[str]]]:
    out = tmp_path / "bench"
    argv = ["bench_e2e.py", "-o", "model=tiny", "--settings", "fp16", "ap-w3", "--targets", "--samples", "1",
            "--tokens", "3", "--out", str(out), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "scripts" / "bench_e2e.py"), run_name="__main__")
    (table,) = out.glob("e2e-*.csv")
    rows = list(csv.DictReader(table.open()))
    overrides = [yaml.safe_load((d / "env.yaml").read_text())["overrides"] for d in sorted(table.with_suffix("").iterdir())]
    return rows, overrides


def test_dec_option_applies_to_quantized_settings_only(tmp_path, monkeypatch, cache_dir):
    rows, overrides = _bench(tmp_path, monkeypatch, "--dec", "tiny")
    assert [r["setting"] for r in rows] == ["fp16 dec=off", "ap-w3 dec=tiny"]
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    assert "dec=off" in overrides[0] and "dec=tiny" not in overrides[0]
    assert "dec=tiny" in overrides[1] and "dec=off" not in overrides[1]


def test_dec_off_by_default(tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("DECDEC_BMMA", "0")  # an A/B switch: every row says it ran with it
    rows, overrides = _bench(tmp_path, monkeypatch)
    assert [r["setting"] for r in rows] == ["fp16 dec=off", "ap-w3 dec=off"]
    assert all("dec=off" in o for o in overrides)
    assert all("DECDEC_BMMA=0" in r["knobs"].split() for r in rows), [r["knobs"] for r in rows]


def test_unknown_dec_config_is_a_clear_error_before_any_run(tmp_path, monkeypatch):
    import pytest

    out = tmp_path / "bench"
    monkeypatch.setattr(sys, "argv", ["bench_e2e.py", "-o", "model=tiny", "--settings", "ap-w3", "--targets",
                                      "--dec", "nosuch", "--out", str(out)])
    with pytest.raises(SystemExit, match="no conf/dec/nosuch.yaml; choose one of .*llama3"):
        runpy.run_path(str(REPO / "scripts" / "bench_e2e.py"), run_name="__main__")
    assert not out.exists()


def test_profile_timeline_idle_time_counts_only_gaps_with_no_kernel_running():
    prof = runpy.run_path(str(REPO / "scripts" / "profile_e2e.py"), run_name="profile_e2e")
    ks = [("gemv", 0.0, 10.0, 7), ("dec", 2.0, 12.0, 9),  # overlapping on two streams: no idle
          ("combine", 15.0, 2.0, 7),  # 1 us after dec ends (14)
          ("gemv", 16.5, 5.0, 7),  # starts inside combine (PDL-style overlap): no idle
          ("norm", 25.0, 1.0, 7)]  # 3.5 us after 21.5
    assert prof["idle_before"](ks) == [0.0, 0.0, 1.0, 0.0, 3.5]
    assert dict(prof["idle_by_kernel"](ks)) == {"gemv": 0.0, "dec": 0.0, "combine": 1.0, "norm": 3.5}
    assert prof["span_us"](ks) == 26.0 and prof["span_us"]([]) == 0.0
    # what each adds past every earlier end: gemv 10, dec 4 (to 14), combine 2 (after its idle), gemv 4.5 (to 21.5),
    # norm 1; with the idle, that is the span
    assert prof["adds"](ks) == [10.0, 4.0, 2.0, 4.5, 1.0]
    assert sum(prof["adds"](ks)) + sum(prof["idle_before"](ks)) == prof["span_us"](ks)
    assert dict(prof["adds_by_kernel"](ks)) == {"gemv": 14.5, "dec": 4.0, "combine": 2.0, "norm": 1.0}
    nested = [("long", 0.0, 10.0, 7), ("inside", 2.0, 3.0, 9)]  # ends before the long one: adds nothing
    assert prof["adds"](nested) == [10.0, 0.0]


def test_profile_categories_name_every_decode_kernel():
    prof = runpy.run_path(str(REPO / "scripts" / "profile_e2e.py"), run_name="profile_e2e")
    cat = prof["category"]
    assert cat("void decdec::(anonymous namespace)::ap3_bmma_kernel<__half, 4, true>(uint4 const*, ...)") == \
        "quantized GEMV"
    assert cat("void decdec::(anonymous namespace)::ap3_xplanes_kernel<__half, true>(__half const*, int, ...)") == \
        "x planes (bmma GEMV's input)"
    assert cat("void decdec::ap3_gemv_stream_kernel<4>(...)") == "quantized GEMV"
    assert cat("triton_poi_fused_ap_gemv_mul_silu_0") == "fused pointwise (inductor)"
    assert cat("nvjet_hsh_64x8_64x16_2x1_v_bz_TNN") == "dense GEMM/GEMV (cuBLAS)"
    assert cat("something_else") == "other"


def test_targets_run_as_one_tune(tmp_path, monkeypatch, cache_dir):
    """--targets: one tune run serves every target (the projections timed once), a row per target."""
    from decdec import tune

    calls = []
    real = tune.time_projections
    monkeypatch.setattr(tune, "time_projections", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows, overrides = _bench(tmp_path, monkeypatch, "-o", "task.iters=2", "-o", "task.k_chunks=[0,64,256]",
                             "--targets", "0.5", "0.9")
    assert [r["setting"].split(" (")[0] for r in rows] == ["fp16 dec=off", "ap-w3 dec=off", "ap-w3 + DEC tuned 50.0%",
                                                            "ap-w3 + DEC tuned 90.0%"]
    assert len(calls) == 1 and len(overrides) == 3  # two settings, one tune
    assert "task.target_slowdowns=[0.5,0.9]" in overrides[2]
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)


def test_profile_timeline_prints_idle_and_adds_from_chrome_traces(tmp_path, capsys):
    """print_timeline end to end on fake profiles (their Chrome traces): the decode steps' idle and adds per kernel
    name, less the prefill run's, and the window's rows."""
    import json

    prof = runpy.run_path(str(REPO / "scripts" / "profile_e2e.py"), run_name="profile_e2e")

    class Fake:
        def __init__(self, ks):
            self.ks = ks

        def export_chrome_trace(self, path):
            events = [{"name": n, "ts": ts, "dur": d, "cat": "kernel", "args": {"stream": s}}
                      for n, ts, d, s in self.ks] + [{"name": "cpu_op", "ts": 0.0, "cat": "cpu_op"}]
            Path(path).write_text(json.dumps({"traceEvents": events}))

    pre = [("prefill_gemm", 0.0, 50.0, 7)]
    step = [("qkv_gemv", 100.0, 10.0, 7), ("attention", 108.0, 6.0, 7), ("o_gemv", 115.0, 4.0, 7)]
    prof["print_timeline"](Fake(pre + step), Fake(pre), 1, 3)
    out = capsys.readouterr().out
    assert "o_gemv" in out and "adds" in out
    # per name (one step): qkv idle 50 (after the prefill's end) adds 10, attention adds 4, o idle 1 adds 4
    rows = [ln for ln in out.splitlines() if ln.startswith("│")]
    cells = [[c.strip() for c in ln.strip().strip("│").split("│")] for ln in rows]
    per_name = {c[0]: c[1:] for c in cells if len(c) == 3}
    assert per_name["qkv_gemv"] == ["50.0", "10.0"] and per_name["attention"] == ["0.0", "4.0"], per_name
    assert per_name["o_gemv"] == ["1.0", "4.0"] and per_name["prefill_gemm"] == ["0.0", "0.0"], per_name
    window = [c for c in cells if len(c) == 7]  # from the trace's middle: start, dur, end, stream, idle, adds, kernel
    assert [(c[6], c[0], c[4], c[5]) for c in window] == [("attention", "0.0", "0.0", "4.0"),
                                                          ("o_gemv", "7.0", "1.0", "4.0")], window
