"""The sweep report on a hand-made sweep dir: statuses (ok, failed, incomplete, missing), slowdowns joined
across tasks, the Pareto front, CSV/markdown/PNG outputs, and the CLI's exit status."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from decdec import report

REPO = Path(__file__).resolve().parent.parent


def _job(sweep: Path, num: int, task: str, backend: str, k: int, summary: dict | None, key: str = "k") -> Path:
    overrides = [f"task={task}", f"backend={backend}", f"dec.k_chunk.down={k}"]
    d = sweep / f"{num}_{','.join(overrides)}"
    (d / ".hydra").mkdir(parents=True)
    config = {"task": {"name": task}, "model": {"name": "tiny"}, "backend": {"name": backend},
              "precision": {"name": "w3"}, "compile": {"mode": "none"}, "device": "cpu",
              "dec": {"name": "tiny", "enabled": True, "n_tb": 2,
                      "k_chunk": {"qkv": "${dec.k_chunk.down}", "o": "${dec.k_chunk.down}",
                                  "gate_up": "${dec.k_chunk.down}", "down": k}}}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        base = {"status": "ok", "task": task, "device": "cpu", "k_chunk": {p: k for p in report.PROJ},
                "dec_rows_per_token": k, "config_key": f"{key}{num}"}
        (d / "summary.yaml").write_text(yaml.safe_dump({**base, **summary}))
    return d


@pytest.fixture
def sweep(tmp_path) -> Path:
    sw = tmp_path / "sweep"
    sw.mkdir()
    # the grid Hydra expanded: task x backend x k_chunk = 2 x 2 x 3 = 12 jobs
    (sw / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"task": "generate,perplexity", "backend": "ap,lutgemm"}},
        "overrides": {"task": ["dec.k_chunk.down=0,16,32"]}}}))
    n = 0
    for backend, speed, ppl in (("ap", (100.0, 90.0, 50.0), (20.0, 15.0, 14.0)),
                                ("lutgemm", (80.0, 60.0, 40.0), (25.0, 24.0, 26.0))):
        for k, tps, p in zip((0, 16, 32), speed, ppl):
            if backend == "lutgemm" and k == 32:
                continue  # never started: "missing"
            _job(sw, n, "generate", backend, k, {"mean_tokens_per_s": tps, "median_tokens_per_s": tps})
            n += 1
            if backend == "lutgemm" and k == 16:
                _job(sw, n, "perplexity", backend, k, {"status": "failed", "error": "RuntimeError: boom"})
            else:
                _job(sw, n, "perplexity", backend, k, {"perplexity": p})
            n += 1
    _job(sw, n, "perplexity", "ap", 99, None)  # a job dir without a summary: interrupted
    return sw


def test_collect_statuses_and_slowdowns(sweep):
    rows = report.collect(sweep)
    status = {(r["overrides"]): r["status"] for r in rows}
    assert sum(s == "ok" for s in status.values()) == 9
    assert status["task=perplexity backend=lutgemm dec.k_chunk.down=16"] == "failed"
    assert status["task=perplexity backend=ap dec.k_chunk.down=99"] == "incomplete"
    missing = sorted(sorted(r["overrides"].split()) for r in rows if r["status"] == "missing")
    assert missing == [["backend=lutgemm", "dec.k_chunk.down=32", f"task={t}"] for t in ("generate", "perplexity")]
    by = {(r["task"], r["backend"], r["k_chunk.down"]): r for r in rows if r["status"] == "ok"}
    assert by[("generate", "ap", 0)]["slowdown"] == 0.0
    assert by[("generate", "ap", 32)]["slowdown"] == pytest.approx(100 / 50 - 1)
    assert by[("perplexity", "ap", 16)]["slowdown"] == pytest.approx(100 / 90 - 1)  # joined from task=generate
    assert by[("perplexity", "lutgemm", 0)]["slowdown"] == 0.0
    assert by[("perplexity", "ap", 16)]["k_chunk"] == 16  # interpolations in .hydra/config.yaml resolved
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["error"] == "RuntimeError: boom"


def test_pareto_front():
    pts = [(0.0, 20.0), (0.1, 15.0), (0.2, 16.0), (0.5, 14.0), (0.4, 14.5)]
    assert report.pareto_front(pts) == [(0.0, 20.0), (0.1, 15.0), (0.4, 14.5), (0.5, 14.0)]


def test_write_report_files(sweep):
    out = report.write_report(report.collect(sweep), sweep, show=False)
    with open(out["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and list(rows[0]) == list(report.COLUMNS)
    assert sorted({r["status"] for r in rows}) == ["failed", "incomplete", "missing", "ok"]
    md = out["markdown"].read_text()
    assert "13 jobs: 9 ok, 1 failed, 1 incomplete, 2 missing" in md and "RuntimeError: boom" in md
    assert md.count("(not run)") == 2
    assert {p.name for p in out["plots"]} == {"tokens_per_s_vs_k_chunk.png", "perplexity_vs_k_chunk.png",
                                              "pareto_perplexity_vs_slowdown.png"}
    for p in out["plots"]:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5000


def test_report_cli(sweep):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), str(sweep), "--no-plots"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # jobs failed or missing
    assert "failed: job 9 " in proc.stderr and "missing: job (not run)" in proc.stderr
    assert "boom" in proc.stdout and (sweep / "report.csv").exists() and not (sweep / "plots").exists()
    for d in sweep.iterdir():  # an all-ok sweep exits 0
        if d.is_dir() and not yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())[0].startswith("task=gen"):
            import shutil

            shutil.rmtree(d)
    (sweep / "multirun.yaml").unlink()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), str(sweep), "--quiet", "--no-plots"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
