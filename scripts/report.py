"""Compare the jobs of a sweep.

    python scripts/report.py outputs/sweeps/k_chunk [--no-plots] [--quiet]

Joins every job's summary.yaml and .hydra/ config into <sweep>/report.csv and <sweep>/report.md,
prints a rich table, and draws <sweep>/plots/*.png (tokens/s vs k_chunk, perplexity vs k_chunk,
perplexity-vs-slowdown Pareto fronts per backend and precision). Failed, interrupted and missing
jobs are listed as such. Exit status 1 when any job is not ok. See decdec/report.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from decdec import report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path, help="a Hydra multirun dir (hydra.sweep.dir)")
    ap.add_argument("--no-plots", action="store_true", help="CSV and tables only")
    ap.add_argument("--quiet", action="store_true", help="do not print the table")
    a = ap.parse_args()
    rows = report.collect(a.sweep_dir)
    if not rows:
        print(f"{a.sweep_dir}: no jobs found (no */.hydra/ and no multirun.yaml)", file=sys.stderr)
        return 1
    out = report.write_report(rows, a.sweep_dir, show=not a.quiet, plots=not a.no_plots)
    for p in (out["csv"], out["markdown"], *out["plots"]):
        print(f"wrote {p}")
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad:
        print(f"{r['status']}: job {report.short_job(r['job'])} {r['overrides']}" + (f": {r['error']}" if r.get("error") else ""),
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
