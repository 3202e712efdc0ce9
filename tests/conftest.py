"""Shared fixtures: one DECDEC_CACHE per session (the tiny checkpoints are prepared once), Hydra
composition with the real ``conf/``, and runners for ``run.py`` in-process or as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from decdec.config import Config, register_configs

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
RUN_PY = REPO / "run.py"

# Tiny runs stay tiny and never touch W&B unless a test asks for it.
TINY = ["model=tiny", "task.num_samples=2", "task.max_new_tokens=4", "task.print_result=false", "logger=yaml"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """DECDEC_CACHE for the whole session: the tiny original + quantized checkpoints are built once."""
    path = tmp_path_factory.mktemp("decdec_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("DECDEC_CACHE", str(path))
    mp.setenv("WANDB_SILENT", "true")
    yield path
    mp.undo()


def compose_cfg(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose ``conf/config.yaml`` with ``overrides`` exactly as ``run.py`` would (DictConfig)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides or []), return_hydra_config=return_hydra_config)


def typed(cfg) -> Config:
    """DictConfig -> the typed dataclass the code receives."""
    return OmegaConf.to_object(cfg)


def run_inprocess(overrides: list[str], run_dir: Path, cache: Path) -> dict:
    """Compose + ``decdec.run.Run`` in this process (no Hydra job machinery); returns the summary."""
    from decdec.run import Run

    cfg = compose_cfg([f"cache_dir={cache}", *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    with Run(typed(cfg), Path(run_dir), resolved, overrides=list(overrides)) as run:
        return run.execute()


def run_cli(args: list[str], cwd: Path, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python run.py args...`` in a subprocess (the real CLI); raises with its output on failure."""
    env = {**os.environ, "DECDEC_CACHE": str(cache), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(RUN_PY), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_checkpoint(cache_dir):
    """``tiny_checkpoint("ap", "w3")`` -> the prepared tiny checkpoint dir (cached per session)."""
    from decdec.run import resolve_checkpoint

    made: dict[tuple, Path] = {}

    def get(backend: str = "ap", precision: str = "w3") -> Path:
        key = (backend, precision)
        if key not in made:
            cfg = typed(compose_cfg([f"cache_dir={cache_dir}", "model=tiny", f"backend={backend}",
                                     f"precision={precision}"]))
            made[key] = resolve_checkpoint(cfg)
        return made[key]

    return get
