"""Sweeps: one Hydra multirun job = one keyed, resumable, fault-isolated unit of work.

``decdec.run.main`` hands every multirun job to ``run_job``:

- **Key.** ``config_key(resolved)`` hashes the resolved config without the keys that do not
  change a result (``logger``, ``cache_dir``, ``task.print_*``). Job numbers and directory names
  play no part, so a grid may be re-ordered or extended and finished jobs are still found.
- **Resume.** Before running, the sweep dir is searched for a ``summary.yaml`` with
  ``status: ok`` and the same ``config_key``; if one exists the job is skipped and that summary
  returned (a job found under another directory gets a copy marked ``reused_from``).
- **Done marker.** ``summary.yaml`` with ``config_key`` is written atomically *last*, after the
  Run (and its W&B run) closed. The YAML sink's own ``summary.yaml`` lacks ``config_key``, so a
  job killed at any point before the very end never looks complete; it is re-run, and its stale
  files (samples, env, W&B run) are removed first.
- **Faults.** An exception of a job is caught, written to ``summary.yaml`` (``status: failed``,
  ``error``, ``traceback``) and the sweep goes on; ``SweepCallback`` prints the failures when
  the sweep ends and makes the process exit with status 1 (``fail_exit``). Failed jobs re-run
  on the next attempt. KeyboardInterrupt is not caught (nothing is marked done).
- **W&B.** Every job is one run in the group ``sweep_group(sweep_dir)`` (the sweep dir's last
  two path components, e.g. ``sweeps/k_chunk``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import yaml

SUMMARY = "summary.yaml"
# Keys that never change what a job measures: where logs go, where the cache is, what is printed.
IGNORED_KEYS = ("logger", "cache_dir", "task.print_result", "task.print_windows")
# Files a (possibly interrupted) attempt leaves in its job dir; removed before a re-run.
STALE = ("samples.yaml", "env.yaml", "dec_tuned.yaml", SUMMARY, "wandb")


def config_key(resolved: dict, ignored: tuple[str, ...] = IGNORED_KEYS) -> str:
    """16 hex digits of sha256 over the resolved config (plain dict) minus ``ignored`` dotted keys."""
    cfg = copy.deepcopy(resolved)
    cfg.pop("hydra", None)
    for dotted in ignored:
        *parents, last = dotted.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    blob = json.dumps(cfg, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sweep_group(sweep_dir: str | Path) -> str:
    """W&B group of a sweep: the last two components of its directory (at most 128 chars)."""
    parts = Path(sweep_dir).resolve().parts
    return "/".join(parts[-2:])[-128:]


def dec_tags(dec: Any, mixed: bool = False) -> list[str]:
    """W&B tags naming the DEC settings: ``n_tb=8``, a projection's own ``n_tb.down=66``,
    ``k_chunk=qkv8-o8-gate_up8-down16`` (per bit-width when mixed, e.g. ``b3.k_chunk=...``); none when DEC is off."""
    if not dec.enabled:
        return []

    def one(prefix: str, d) -> list[str]:
        k, own = d.k_chunk, getattr(d, "n_tb_proj", None)
        per = [f"{prefix}n_tb.{p}={getattr(own, p)}" for p in ("qkv", "o", "gate_up", "down")
               if own is not None and getattr(own, p, None) is not None]
        return [f"{prefix}n_tb={d.n_tb}", *per, f"{prefix}k_chunk=qkv{k.qkv}-o{k.o}-gate_up{k.gate_up}-down{k.down}"]

    if mixed and dec.per_bits:
        return [t for b, d in sorted(dec.per_bits.items()) for t in one(f"b{b}.", d)]
    return one("", dec)


def read_summary(job_dir: Path) -> dict | None:
    """The job's ``summary.yaml`` as a dict; None when missing or unreadable (interrupted)."""
    try:
        data = yaml.safe_load((Path(job_dir) / SUMMARY).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(summary: dict | None, key: str | None = None) -> bool:
    """Finished successfully and marked by ``run_job`` (``config_key`` present, matching ``key``)."""
    if not summary or summary.get("status") != "ok" or "config_key" not in summary:
        return False
    return key is None or summary["config_key"] == key


def find_complete(sweep_dir: Path, key: str) -> tuple[Path, dict] | None:
    """A job dir under ``sweep_dir`` that completed with config ``key`` (originals before reuses)."""
    found = []
    for path in sorted(Path(sweep_dir).rglob(SUMMARY)):
        if any(part.startswith(".") or part == "wandb" for part in path.relative_to(sweep_dir).parts[:-1]):
            continue
        s = read_summary(path.parent)
        if is_complete(s, key):
            found.append((bool(s.get("reused_from")), path.parent, s))
    if not found:
        return None
    _, job_dir, summary = min(found, key=lambda t: (t[0], str(t[1])))
    return job_dir, summary


def write_summary(job_dir: Path, summary: dict) -> None:
    from decdec.sinks import _atomic_write_yaml, _plain

    Path(job_dir).mkdir(parents=True, exist_ok=True)
    _atomic_write_yaml(Path(job_dir) / SUMMARY, _plain(summary, "summary"))


def clean_stale(job_dir: Path) -> None:
    """Remove what an earlier, unfinished attempt left in ``job_dir`` (``.hydra/`` is kept)."""
    for name in STALE:
        p = Path(job_dir) / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


@contextlib.contextmanager
def cache_lock(cache_dir: str | Path):
    """An exclusive lock on ``<cache_dir>/.lock`` (POSIX ``flock``) while checkpoints are resolved:
    parallel jobs (submitit, Slurm) that find a cold cache build each checkpoint once, the others
    wait and then find it. Cheap once the cache is warm (resolution returns at once)."""
    import fcntl

    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def release(compile_mode: str) -> None:
    """Between in-process jobs: drop compiled graphs and free memory (Run.__exit__ freed the model)."""
    if compile_mode != "none":
        import torch._dynamo

        torch._dynamo.reset()
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_job(sweep_dir: Path, job_dir: Path, resolved: dict, execute: Callable[[], dict],
            compile_mode: str = "none") -> dict:
    """Run one multirun job with resume and fault isolation (see the module docstring).

    ``execute`` runs the job and returns its summary; returns the summary that was written.
    """
    sweep_dir, job_dir = Path(sweep_dir), Path(job_dir)
    key = config_key(resolved)
    done = find_complete(sweep_dir, key)
    if done is not None:
        src, summary = done
        if src.resolve() != job_dir.resolve():
            summary = {**summary, "reused_from": str(src.relative_to(sweep_dir))}
            write_summary(job_dir, summary)
        print(f"[decdec] skip {job_dir.name}: already complete (config {key} in {src.relative_to(sweep_dir)})")
        return summary
    clean_stale(job_dir)
    try:
        summary = {**execute(), "config_key": key}
    except Exception as e:  # noqa: BLE001 -- one job's failure must not stop the sweep
        summary = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                   "config_key": key}
        print(f"[decdec] job {job_dir.name} FAILED: {summary['error']}", file=sys.stderr)
    finally:
        release(compile_mode)
    write_summary(job_dir, summary)  # last: the done marker
    return summary


# ---------------------------------------------------------------------------- end of a sweep
try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object


class SweepCallback(_Callback):
    """Hydra callback (``hydra.callbacks.sweep`` in ``conf/config.yaml``): when a multirun ends,
    print the failed/missing jobs, optionally write the report, and exit 1 if any job failed.

    ``report``: run ``decdec.report`` on the sweep dir (CSV, markdown, PNG plots).
    ``fail_exit``: exit status 1 when a job failed or is missing (CI-friendly).
    """

    def __init__(self, report: bool = False, fail_exit: bool = True) -> None:
        self.report = report
        self.fail_exit = fail_exit

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from decdec import report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = report.collect(sweep_dir)
        if self.report:
            report.write_report(rows, sweep_dir, show=True)
        bad = [r for r in rows if r["status"] != "ok"]
        ok = len(rows) - len(bad)
        print(f"[decdec] sweep {sweep_dir}: {ok}/{len(rows)} jobs ok")
        if bad:
            print(f"[decdec] {len(bad)} job(s) not ok:", file=sys.stderr)
            for r in bad:
                print(f"  {r['status']:>10}  job {report.short_job(r['job'])}: {r['overrides']}"
                      + (f"\n              {r['error']}" if r.get("error") else ""), file=sys.stderr)
            if self.fail_exit:
                sys.stdout.flush()
                sys.exit(1)
