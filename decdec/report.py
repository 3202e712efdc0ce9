"""Compare the jobs of a sweep: one row per job, a CSV, a markdown table, a rich table, PNG plots.

``python scripts/report.py <sweep dir>`` (or ``hydra.callbacks.sweep.report=true``) reads every job
dir's ``summary.yaml`` and ``.hydra/{config,overrides}.yaml`` and the sweep's ``multirun.yaml``
(the grid Hydra expanded), and writes into the sweep dir:

- ``report.csv`` and ``report.md``: one row per job, failed and missing jobs included;
- ``plots/tokens_per_s_vs_k_chunk.png``  (task=generate jobs), one line per backend/precision/n_tb;
- ``plots/perplexity_vs_k_chunk.png``     (task=perplexity jobs);
- ``plots/pareto_perplexity_vs_slowdown.png``: perplexity against decode slowdown over the same
  model/backend/precision/compile/device with no DEC rows (k_chunk 0 or dec off), the Pareto front
  per backend and precision. Needs both tasks for the same settings (``sweep=quality_speed``).

Status of a row: ``ok``; ``failed`` (its ``error`` column says why); ``incomplete`` (a job dir
without a done marker: running, killed or interrupted); ``missing`` (a grid point of
``multirun.yaml`` that has no job dir at all).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import yaml

from decdec.sweep import SUMMARY, is_complete, read_summary

PROJ = ("qkv", "o", "gate_up", "down")
COLUMNS = ("job", "status", "task", "model", "backend", "precision", "compile", "device", "dec", "n_tb", "k_chunk",
           *(f"k_chunk.{p}" for p in PROJ), "dec_rows_per_token", "mean_tokens_per_s", "median_tokens_per_s",
           "perplexity", "slowdown", "error", "overrides", "config_key", "reused_from", "superseded")
SETTING = ("model", "backend", "precision", "compile", "device")  # what a slowdown is measured against
STATUS_RANK = {"ok": 0, "failed": 1, "incomplete": 2, "missing": 3}


def _load(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Every directory under ``sweep_dir`` that Hydra made for a job (it holds ``.hydra/``)."""
    out = []
    for hydra_dir in sorted(sweep_dir.rglob(".hydra")):
        rel = hydra_dir.parent.relative_to(sweep_dir).parts
        if hydra_dir.is_dir() and rel and not any(p.startswith(".") or p == "wandb" for p in rel):
            out.append(hydra_dir.parent)
    return out


def expected_grid(sweep_dir: Path) -> list[list[str]]:
    """The jobs' override lists of the sweep as Hydra's basic sweeper expands them from
    ``multirun.yaml`` (``hydra.sweeper.params`` + command-line overrides); [] when unknown."""
    conf = _load(sweep_dir / "multirun.yaml")
    if not isinstance(conf, dict):
        return []
    hydra = conf.get("hydra") or {}
    if "BasicSweeper" not in str((hydra.get("sweeper") or {}).get("_target_", "BasicSweeper")):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in ((hydra.get("sweeper") or {}).get("params") or {}).items()]
    params += list((hydra.get("overrides") or {}).get("task") or [])
    try:
        parsed = OverridesParser.create().parse_overrides(params)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 -- a grid we cannot expand: report the job dirs only
        return []
    return [list(job) for batch in batches for job in batch]


def _resolved(config: dict) -> dict:
    """``.hydra/config.yaml`` holds interpolations (``${dec.k_chunk.down}``): resolve what resolves."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except Exception:  # noqa: BLE001 -- e.g. an env var gone: keep the raw values
        return config


def short_job(job: str | None) -> str:
    """A job dir as the table shows it: its job number (Hydra's subdir starts with it), else its name."""
    if job is None:
        return "(not run)"
    head = job.split("/")[-1].split("_", 1)[0]
    return head if head.isdigit() else job


def _flat_k_chunk(summary: dict, config: dict) -> dict:
    k = summary.get("k_chunk")
    if isinstance(k, dict) and k and all(isinstance(v, dict) for v in k.values()):
        k = k[min(k)]  # mixed precision: the lower bit-width's settings
    if not isinstance(k, dict):
        dec = config.get("dec") or {}
        k = dec.get("k_chunk") if dec.get("enabled", True) else {p: 0 for p in PROJ}
    return {f"k_chunk.{p}": (k or {}).get(p) for p in PROJ}


def job_row(sweep_dir: Path, job_dir: Path) -> dict:
    config = _resolved(_load(job_dir / ".hydra" / "config.yaml") or {})
    overrides = _load(job_dir / ".hydra" / "overrides.yaml") or []
    summary = read_summary(job_dir) or {}
    if is_complete(summary):
        status = "ok"
    elif summary.get("status") == "failed":
        status = "failed"
    else:
        status = "incomplete"
    dec = config.get("dec") or {}
    row = {
        "job": str(job_dir.relative_to(sweep_dir)), "status": status,
        "task": summary.get("task") or (config.get("task") or {}).get("name"),
        "model": (config.get("model") or {}).get("name"), "backend": (config.get("backend") or {}).get("name"),
        "precision": (config.get("precision") or {}).get("name"), "compile": (config.get("compile") or {}).get("mode"),
        "device": summary.get("device") or config.get("device"), "dec": dec.get("name"),
        "n_tb": dec.get("n_tb") if dec.get("enabled", True) else None,
        **_flat_k_chunk(summary if status == "ok" else {}, config),
        "dec_rows_per_token": summary.get("dec_rows_per_token"),
        "mean_tokens_per_s": summary.get("mean_tokens_per_s"), "median_tokens_per_s": summary.get("median_tokens_per_s"),
        "perplexity": summary.get("perplexity"), "slowdown": None,
        "error": summary.get("error") if status == "failed" else None,
        "overrides": " ".join(overrides), "config_key": summary.get("config_key"),
        "reused_from": summary.get("reused_from"), "_overrides": frozenset(overrides),
    }
    ks = [row[f"k_chunk.{p}"] for p in PROJ]
    row["k_chunk"] = ks[0] if len(set(ks)) == 1 else "/".join(str(k) for k in ks)
    return row


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job of the sweep (see the module docstring for the statuses), slowdowns filled in."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
    by_overrides: dict[frozenset, dict] = {}
    extra = []
    for job_dir in _job_dirs(sweep_dir):
        row = job_row(sweep_dir, job_dir)
        key = row["_overrides"]
        best = by_overrides.get(key)
        if best is None or STATUS_RANK[row["status"]] < STATUS_RANK[best["status"]]:
            if best is not None:
                extra.append(best)
            by_overrides[key] = row
        else:
            extra.append(row)
    rows = list(by_overrides.values())
    for job in expected_grid(sweep_dir):
        if frozenset(job) not in by_overrides:
            rows.append({**{c: None for c in COLUMNS}, "status": "missing", "job": None, "overrides": " ".join(job),
                         "_overrides": frozenset(job)})
    # an older attempt at the same overrides (e.g. a failed run under another job number) is
    # superseded by the best one; it is named in that row, not counted as a job of its own
    for r in extra:
        best = by_overrides[r["_overrides"]]
        best["superseded"] = [*best.get("superseded", []), f"{r['job']} ({r['status']})"]
    _fill_slowdown(rows)
    return sorted(rows, key=lambda r: (r["job"] is None, _job_num(r["job"]), r["job"] or "", r["overrides"]))


def _job_num(job: str | None) -> int:
    head = (job or "").split("/")[-1].split("_", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def _setting(r: dict) -> tuple:
    return tuple(r.get(k) for k in SETTING)


def _dec_setting(r: dict) -> tuple:
    return (*_setting(r), r.get("n_tb"), *(r.get(f"k_chunk.{p}") for p in PROJ))


def _fill_slowdown(rows: list[dict]) -> None:
    """slowdown = base tokens/s / tokens/s - 1 against a DEC-less generate job of the same setting;
    perplexity jobs get the slowdown of the generate job with the same DEC settings."""
    gen = [r for r in rows if r["status"] == "ok" and r["task"] == "generate" and r["mean_tokens_per_s"]]
    base = {}
    for r in gen:
        if not r["dec_rows_per_token"]:
            base.setdefault(_setting(r), r["mean_tokens_per_s"])
    speed = {}
    for r in gen:
        b = base.get(_setting(r))
        if b:
            r["slowdown"] = b / r["mean_tokens_per_s"] - 1.0
            speed.setdefault(_dec_setting(r), r["slowdown"])
    for r in rows:
        if r["status"] == "ok" and r["task"] == "perplexity":
            r["slowdown"] = speed.get(_dec_setting(r))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (slowdown, perplexity) no other point beats in both (lower is better), by slowdown."""
    front = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


# ---------------------------------------------------------------------------- outputs
def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return "; ".join(map(str, v))
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: (_fmt(r.get(c)) if isinstance(r.get(c), (list, type(None))) else r.get(c)) for c in COLUMNS})


TABLE_COLUMNS = ("job", "status", "task", "backend", "precision", "n_tb", "k_chunk", "dec_rows_per_token",
                 "mean_tokens_per_s", "perplexity", "slowdown", "error")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        cells = [_fmt(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in TABLE_COLUMNS]
        cells[0] = short_job(r["job"]) + ("" if r["job"] else f" {r['overrides']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_rich(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    style = {"ok": "green", "failed": "bold red", "incomplete": "yellow", "missing": "yellow"}
    table = Table(title=title)
    for c in TABLE_COLUMNS:
        table.add_column(c, justify="left" if c in ("job", "status", "task", "error") else "right",
                         overflow="fold", max_width=60 if c == "error" else None)
    for r in rows:
        cells = [_fmt(r.get(c)) for c in TABLE_COLUMNS]
        cells[0] = short_job(r["job"]) + ("" if r["job"] else f" {r['overrides']}")
        table.add_row(*cells, style=style.get(r["status"]))
    Console(width=200).print(table)


def _k_axis(rows: list[dict]) -> tuple[str, str]:
    """(column, label) of the k_chunk to plot against: the projection that varies, all four when
    they vary together, else DEC rows per token."""
    cols = [f"k_chunk.{p}" for p in PROJ]
    varying = [c for c in cols if len({r[c] for r in rows}) > 1]
    if len(varying) == 1:
        return varying[0], varying[0]
    if all(len({r[c] for c in varying}) == 1 for r in rows):
        return "k_chunk", "k_chunk (all projections)"
    return "dec_rows_per_token", "DEC rows per token"


def _series(r: dict) -> str:
    return f"{r['backend']} {r['precision']}" + (f" n_tb={r['n_tb']}" if r.get("n_tb") is not None else "")


def plot(rows: list[dict], out_dir: Path, title: str = "") -> list[Path]:
    """The three PNGs (see the module docstring); a plot without data says so instead of being skipped."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r["status"] == "ok"]
    not_ok = len(rows) - len(ok)
    note = f" ({not_ok} job(s) failed/missing, not plotted)" if not_ok else ""
    written = []

    def vs_k(task: str, metric: str, ylabel: str, name: str) -> None:
        pts = [r for r in ok if r["task"] == task and r.get(metric) is not None]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        if pts:
            col, label = _k_axis(pts)
            for s in sorted({_series(r) for r in pts}):
                xs = sorted((r[col], r[metric]) for r in pts if _series(r) == s)
                ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o", label=s)
            ax.set_xlabel(label)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no successful task={task} jobs", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}{note}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    vs_k("generate", "mean_tokens_per_s", "decode tokens/s (mean)", "tokens_per_s_vs_k_chunk.png")
    vs_k("perplexity", "perplexity", "perplexity", "perplexity_vs_k_chunk.png")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    pts = [r for r in ok if r["task"] == "perplexity" and r["slowdown"] is not None and r["perplexity"] is not None]
    if pts:
        for s in sorted({f"{r['backend']} {r['precision']}" for r in pts}):
            mine = [(100 * r["slowdown"], r["perplexity"]) for r in pts if f"{r['backend']} {r['precision']}" == s]
            line = ax.plot(*zip(*sorted(mine)), linestyle="none", marker="o", alpha=0.35)[0]
            front = pareto_front(mine)
            ax.plot(*zip(*front), marker="o", color=line.get_color(), label=f"{s} (Pareto front)")
        ax.set_xlabel("decode slowdown vs no DEC (%)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "needs task=perplexity and task=generate jobs\nof the same settings, with a k_chunk=0 baseline",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("perplexity")
    ax.set_title(f"{title}{note}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "pareto_perplexity_vs_slowdown.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


def write_report(rows: list[dict], sweep_dir: Path, show: bool = True, plots: bool = True) -> dict:
    """Write report.csv, report.md and plots/ into ``sweep_dir`` (and print the rich table when
    ``show``); returns ``{"csv": path, "markdown": path, "plots": [paths]}``."""
    sweep_dir = Path(sweep_dir)
    csv_path, md_path = sweep_dir / "report.csv", sweep_dir / "report.md"
    write_csv(rows, csv_path)
    counts = ", ".join(f"{n} {s}" for s, n in ((s, sum(r["status"] == s for r in rows)) for s in STATUS_RANK) if n)
    md_path.write_text(f"# Sweep report: {sweep_dir}\n\n{len(rows)} jobs: {counts}\n\n" + markdown_table(rows))
    out = {"csv": csv_path, "markdown": md_path, "plots": []}
    if plots:
        out["plots"] = plot(rows, sweep_dir / "plots", title=sweep_dir.name)
    if show:
        print_rich(rows, title=f"sweep {sweep_dir}: {len(rows)} jobs, {counts}")
    return out
