"""README.md stays true to the code: every DECDEC_* environment variable the code reads has a row in its
"Environment switches" table, and the table names none the code no longer reads."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READS = re.compile(r"""(?:environ\.get\(|environ\[|getenv\(|env_knob_on\()\s*["'](DECDEC_[A-Z0-9_]+)["']"""
                   r"""|oc\.env:(DECDEC_[A-Z0-9_]+)""")


def read_in_code() -> set[str]:
    files = [*REPO.glob("decdec/*.py"), *REPO.glob("scripts/*.py"), REPO / "run.py", *REPO.glob("conf/**/*.yaml"),
             *(p for ext in ("cu", "cuh", "h", "cpp") for p in REPO.glob(f"csrc/*.{ext}"))]
    return {a or b for f in files for a, b in READS.findall(f.read_text())}


def readme_table() -> set[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Environment switches", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(DECDEC_[A-Z0-9_]+)` \|", section, flags=re.M))


def test_every_environment_switch_is_in_the_readme_table():
    code = read_in_code()
    assert {"DECDEC_BMMA", "DECDEC_PDL", "DECDEC_CACHE", "DECDEC_MMA_CHAIN"} <= code  # the scan finds each kind of read
    table = readme_table()
    assert not code - table, f"read by the code but missing from README's Environment switches: {sorted(code - table)}"
    assert not table - code, f"in README's Environment switches but read nowhere: {sorted(table - code)}"
