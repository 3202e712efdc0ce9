"""Sweeps (issue 6): presets compose, jobs are keyed by config, resume skips finished jobs, a failing
job is recorded while the others complete, one process per job with submitit_local, W&B groups."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import RUN_PY, compose_cfg, typed
from decdec import report, sweep
from decdec.sinks import read_offline_run

TINY_SWEEP = ["model=tiny", "logger=yaml", "task.num_samples=2", "task.max_new_tokens=3", "task.print_result=false"]


def _load(p: Path):
    return yaml.safe_load(p.read_text())


def _cli(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DECDEC_CACHE": str(cache), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(RUN_PY), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _jobs(sweep_dir: Path) -> dict[str, Path]:
    """job dirs by their swept k_chunk value (``...dec.k_chunk.down=<v>,...``)."""
    out = {}
    for d in sweep_dir.iterdir():
        if d.is_dir() and not d.name.startswith(".") and d.name != "plots":
            out[d.name.split("dec.k_chunk.down=")[1].split(",")[0]] = d
    return out


# ---------------------------------------------------------------------------- config keys, presets
def test_config_key_ignores_logging_and_cache_only():
    base = OmegaConf.to_container(compose_cfg(["model=tiny"]), resolve=True)
    same = OmegaConf.to_container(compose_cfg(["model=tiny", "logger=yaml", "cache_dir=/elsewhere",
                                               "task.print_result=false"]), resolve=True)
    other = OmegaConf.to_container(compose_cfg(["model=tiny", "dec.k_chunk.down=16"]), resolve=True)
    seed = OmegaConf.to_container(compose_cfg(["model=tiny", "seed=1"]), resolve=True)
    assert sweep.config_key(base) == sweep.config_key(same)
    assert len({sweep.config_key(base), sweep.config_key(other), sweep.config_key(seed)}) == 3


@pytest.mark.parametrize("preset,params", [
    ("k_chunk", {"dec.k_chunk.down"}),
    ("n_tb", {"dec.n_tb"}),
    ("backend_precision", {"backend", "precision", "dec.enabled"}),
    ("quality_speed", {"task", "backend", "dec.k_chunk.down"}),
])
def test_presets_compose_every_grid_point(preset, params):
    cfg = compose_cfg(["model=tiny", f"sweep={preset}"], return_hydra_config=True)
    grid = dict(cfg.hydra.sweeper.params)
    assert set(grid) == params
    assert cfg.hydra.callbacks.sweep.report is True and cfg.hydra.sweep.dir == f"outputs/sweeps/{preset}"
    # every grid value composes into a typed config (first and last of each parameter)
    for key, values in grid.items():
        for v in {values.split(",")[0], values.split(",")[-1]}:
            t = typed(compose_cfg(["model=tiny", f"sweep={preset}", f"{key}={v}"]))
            if preset in ("k_chunk", "quality_speed") and key == "dec.k_chunk.down":
                assert t.dec.k_chunk.qkv == t.dec.k_chunk.o == t.dec.k_chunk.gate_up == t.dec.k_chunk.down == int(v)
    if preset == "quality_speed":
        assert typed(compose_cfg(["model=tiny", "sweep=quality_speed", "task=perplexity"])).task.name == "perplexity"


def test_dec_tags():
    t = typed(compose_cfg(["model=tiny", "dec.k_chunk.down=16"]))
    assert sweep.dec_tags(t.dec) == ["n_tb=2", "k_chunk=qkv64-o64-gate_up64-down16"]
    assert sweep.dec_tags(typed(compose_cfg(["model=tiny", "dec=off"])).dec) == []
    own = typed(compose_cfg(["model=tiny", "dec.k_chunk.down=16", "dec.n_tb_proj.down=66"]))
    assert sweep.dec_tags(own.dec) == ["n_tb=2", "n_tb.down=66", "k_chunk=qkv64-o64-gate_up64-down16"]
    mixed = sweep.dec_tags(t.dec, mixed=True)
    assert "b3.n_tb=2" in mixed and "b4.k_chunk=qkv32-o32-gate_up32-down32" in mixed
    assert all(len(tag) <= 64 for tag in mixed)


# ---------------------------------------------------------------------------- run_job unit
def test_run_job_records_failure_and_interrupt_leaves_nothing_complete(tmp_path):
    sw, job = tmp_path / "sweep", tmp_path / "sweep" / "0_x"
    resolved = {"a": 1, "logger": {"yaml": {}}}

    def boom():
        raise RuntimeError("kernel exploded")

    s = sweep.run_job(sw, job, resolved, boom)
    on_disk = _load(job / sweep.SUMMARY)
    assert s["status"] == on_disk["status"] == "failed" and "RuntimeError: kernel exploded" in on_disk["error"]
    assert "Traceback" in on_disk["traceback"] and on_disk["config_key"] == sweep.config_key(resolved)

    def interrupted():
        (job / "samples.yaml").write_text("- {index: 0}\n")
        (job / sweep.SUMMARY).write_text(yaml.safe_dump({"status": "ok"}))  # the sink's, without the marker
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run_job(sw, job, resolved, interrupted)
    assert not sweep.is_complete(sweep.read_summary(job))  # looks unfinished, gets re-run
    calls = []
    s = sweep.run_job(sw, job, resolved, lambda: calls.append(1) or {"status": "ok", "x": 2})
    assert calls == [1] and not (job / "samples.yaml").exists()  # the stale attempt was cleaned first
    assert sweep.is_complete(_load(job / sweep.SUMMARY), sweep.config_key(resolved))
    # complete now: the same config elsewhere in the sweep is not run again, but reused
    s2 = sweep.run_job(sw, sw / "5_y", {**resolved, "logger": None}, lambda: calls.append(2) or {})
    assert calls == [1] and s2["reused_from"] == "0_x" and s2["x"] == 2


# ---------------------------------------------------------------------------- end to end
def test_submitit_local_sweep_failure_report_and_resume(tmp_path, cache_dir):
    """4 jobs, one process each (submitit_local); k_chunk=2000 fails only its own job; the report has
    all four; after an 'interruption' of two jobs, a re-run runs exactly those (and the failed one)."""
    sw = tmp_path / "sweep"
    args = ["-m", "sweep=k_chunk", *TINY_SWEEP, "dec.k_chunk.down=0,16,32,2000", "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={sw}"]
    proc = _cli(args, tmp_path, cache_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]  # a job failed: the sweep says so in its status
    assert "1 job(s) not ok" in proc.stderr and "dec.k_chunk.qkv=2000 is outside 0..1024" in proc.stderr
    jobs = _jobs(sw)
    assert set(jobs) == {"0", "16", "32", "2000"}
    assert (sw / ".submitit").is_dir()  # each job ran through submitit in its own process
    summaries = {k: _load(d / "summary.yaml") for k, d in jobs.items()}
    for k in ("0", "16", "32"):
        assert sweep.is_complete(summaries[k]) and summaries[k]["k_chunk"]["down"] == int(k)
    assert summaries["2000"]["status"] == "failed" and "0..1024" in summaries["2000"]["error"]
    assert summaries["0"]["dec_rows_per_token"] == 0 < summaries["16"]["dec_rows_per_token"]
    # the report (multirun-end callback of the preset): CSV, markdown, plots, failures shown
    rows = {r["k_chunk.down"]: r for r in _read_csv(sw / "report.csv")}
    assert {k: rows[k]["status"] for k in rows} == {"0": "ok", "16": "ok", "32": "ok", "2000": "failed"}
    assert float(rows["0"]["slowdown"]) == 0.0 and float(rows["16"]["mean_tokens_per_s"]) > 0
    assert "| failed |" in (sw / "report.md").read_text()
    for png in ("tokens_per_s_vs_k_chunk", "perplexity_vs_k_chunk", "pareto_perplexity_vs_slowdown"):
        assert (sw / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # interrupt two jobs: 16 killed mid-run (no summary, partial samples), 32 killed while closing W&B
    # (the YAML sink's summary is there, the done marker is not)
    (jobs["16"] / "summary.yaml").unlink()
    sink_summary = {k: v for k, v in summaries["32"].items() if k != "config_key"}
    (jobs["32"] / "summary.yaml").write_text(yaml.safe_dump(sink_summary))
    assert report.collect(sw)[2]["status"] == "incomplete"
    before = {k: (d / "env.yaml").stat().st_mtime_ns for k, d in jobs.items() if k != "2000"}
    summary_0 = (jobs["0"] / "summary.yaml").stat().st_mtime_ns

    proc = _cli(args, tmp_path, cache_dir)
    assert proc.returncode == 1 and "1 job(s) not ok" in proc.stderr
    after = {k: (d / "env.yaml").stat().st_mtime_ns for k, d in jobs.items() if k != "2000"}
    assert after["0"] == before["0"] and (jobs["0"] / "summary.yaml").stat().st_mtime_ns == summary_0  # skipped
    assert after["16"] > before["16"] and after["32"] > before["32"]  # re-ran
    for k in ("0", "16", "32"):
        assert sweep.is_complete(_load(jobs[k] / "summary.yaml"))
    assert _load(jobs["2000"] / "summary.yaml")["status"] == "failed"  # failures are retried, and fail again
    assert [r["status"] for r in _read_csv(sw / "report.csv")] == ["ok", "ok", "ok", "failed"]


def test_inprocess_multirun_wandb_group_tags_and_reuse(tmp_path, cache_dir):
    """Default launcher (one process): every job is a W&B run in the sweep's group, tagged with its DEC
    settings; re-running with the grid re-ordered reuses the finished jobs instead of running them."""
    sw = tmp_path / "runs" / "ksweep"
    base = ["-m", *TINY_SWEEP, "logger=[yaml,wandb]", f"hydra.sweep.dir={sw}"]
    proc = _cli([*base, "dec.k_chunk.down=0,16"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2/2 jobs ok" in proc.stdout
    for k, d in _jobs(sw).items():
        run = read_offline_run(d)
        assert run["complete"] and run["run"]["group"] == "runs/ksweep" == sweep.sweep_group(sw)
        assert {"tiny", "ap", "w3", "n_tb=2", f"k_chunk=qkv64-o64-gate_up64-down{k}"} <= set(run["run"]["tags"])
    proc = _cli([*base, "dec.k_chunk.down=16,0"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[decdec] skip") == 2 and "Time for inference" not in proc.stdout
    new = [d for d in sw.iterdir() if d.is_dir() and d.name.startswith("0_dec.k_chunk.down=16")]
    assert len(new) == 1 and _load(new[0] / "summary.yaml")["reused_from"].startswith("1_dec.k_chunk.down=16")
    assert not (new[0] / "wandb").exists()
    rows = report.collect(sw)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)  # the reuse is not a third job


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))
