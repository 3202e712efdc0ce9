"""Build every standalone CUDA tool in scripts/*.cu with the nvcc line its own header documents, so those lines
cannot rot (CI runs this where nvcc exists; no GPU needed). The first comment line that starts with ``nvcc`` (with
its ``\\`` continuations) is the build line: bracketed options (``[-DFOO]``) are left out, everything from ``&&`` on
(the run) is dropped, and the ``-o`` target goes to a temp dir. Exits non-zero if any tool fails to build or has no
build line.

    python3 scripts/check_cu_tools.py [--jobs 2] [scripts/gemv_ab.cu ...]
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_line(source: Path) -> list[str] | None:
    """The header's nvcc command as argv (see the module docstring), or None when the header has none."""
    lines = source.read_text().splitlines()
    for i, line in enumerate(lines):
        text = line.lstrip("/").strip()
        if not line.startswith("//") or not text.startswith("nvcc "):
            continue
        cmd = text
        while cmd.endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd = cmd[:-1] + " " + lines[i].lstrip("/").strip()
        cmd = cmd.split("&&")[0]
        cmd = re.sub(r"\[[^\]]*\]", " ", cmd)
        return shlex.split(cmd)
    return None


def check(source: Path, out_dir: Path) -> tuple[bool, str]:
    argv = build_line(source)
    if argv is None:
        return False, "no `//   nvcc ...` build line in its header"
    if "-o" not in argv or argv.index("-o") + 1 >= len(argv):
        return False, f"its build line has no -o target: {' '.join(argv)}"
    argv[argv.index("-o") + 1] = str(out_dir / source.stem)
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        log = (res.stdout + res.stderr).splitlines()
        errors = [ln for ln in log if re.search(r"error|undefined|fatal", ln)] or log[-12:]
        return False, f"`{' '.join(argv)}` failed:\n    " + "\n    ".join(errors[:12])
    return True, ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="*", type=Path, help="default: every scripts/*.cu")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    sources = a.sources or sorted((REPO / "scripts").glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(lambda s: (s, *check(s, Path(tmp))), sources))
    status = 0
    for source, ok, why in results:
        print(f"{'ok  ' if ok else 'FAIL'} {source.name}" + ("" if ok else f": {why}"))
        status |= not ok
    return status


if __name__ == "__main__":
    sys.exit(main())
