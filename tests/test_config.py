"""Hydra composition: every option of every group composes into the typed Config; typos and
wrong types fail at compose time; the defaults list does what README.md says."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF, compose_cfg, typed
from decdec.config import BACKENDS, COMPILE_MODES, PROJECTIONS, Config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_groups_found():
    # the test below iterates over the files, so make sure it is not iterating over nothing
    assert {"model", "backend", "precision", "compile", "dec", "task", "logger", "experiment"} <= set(GROUPS)
    assert len(OPTIONS) >= 20


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_converts(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    c = typed(cfg)
    assert isinstance(c, Config)
    if group in ("model", "backend", "precision", "dec"):
        assert getattr(c, group).name == option
    elif group == "compile":
        assert c.compile.mode == option and option in COMPILE_MODES
    elif group == "task":
        assert c.task.name == option
    elif group == "logger":
        assert getattr(c.logger, option) is not None
        others = [n for n in ("yaml", "wandb") if n != option]
        assert all(getattr(c.logger, n) is None for n in others)
    if group == "backend":
        assert option in BACKENDS
    if group == "dec" and option != "off":
        assert c.dec.enabled and c.dec.n_tb >= 1
        assert all(0 <= getattr(c.dec.k_chunk, p) <= 1024 for p in PROJECTIONS)
        assert set(c.dec.per_bits) == {"3", "4"}  # w3.5 works with every model's default


def test_defaults():
    c = typed(compose_cfg([]))
    assert (c.model.name, c.backend.name, c.precision.name, c.compile.mode, c.dec.name) == ("smollm2", "ap", "w3", "none", "smollm2")
    assert c.logger.yaml is not None and c.logger.wandb is not None
    assert c.logger.wandb.mode == "offline"  # no network here: offline unless the user says otherwise


def test_typo_key_fails_at_compose():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["dec.k_chunk.dwn=3"])
    assert "dwn" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override,key", [("dec.n_tb=abc", "n_tb"), ("task.num_samples=many", "num_samples"),
                                          ("dec.k_chunk.down=1.5", "down"), ("precision.mixed=maybe", "mixed")])
def test_wrong_type_fails_at_compose(override, key):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg([override])
    cause = e.value.__cause__
    assert isinstance(cause, (ValidationError, ConfigKeyError)) or key in str(e.value)
    assert key in str(e.value) + str(cause)


def test_unknown_top_level_key_fails():
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["devcie=cpu"])


@pytest.mark.parametrize("model", ["tiny", "llama3", "phi3", "smollm2"])
def test_dec_follows_model(model):
    c = typed(compose_cfg([f"model={model}"]))
    assert c.dec.name == model


def test_dec_override_beats_model_default():
    c = typed(compose_cfg(["model=tiny", "dec=off"]))
    assert c.dec.name == "off" and not c.dec.enabled
    c = typed(compose_cfg(["model=tiny", "dec.k_chunk.down=16"]))
    assert c.dec.name == "tiny" and c.dec.k_chunk.down == 16 and c.dec.k_chunk.qkv == 64


def test_mixed_per_bits_override():
    c = typed(compose_cfg(["model=tiny", "precision=w3.5", "dec.per_bits.4.k_chunk.down=7", "dec.per_bits.3.n_tb=3"]))
    assert c.precision.mixed
    # README documents exactly this form (`dec.per_bits.3.n_tb=N`): it must be addressable
    assert c.dec.per_bits["4"].k_chunk.down == 7 and c.dec.per_bits["3"].n_tb == 3
    assert c.dec.per_bits["4"].k_chunk.qkv == 32  # the rest of the model default stays


def test_experiment_applies():
    c = typed(compose_cfg(["experiment=smollm2_greedy", "backend=lutgemm"]))
    assert c.task.num_samples == 3 and c.task.max_new_tokens == 48 and c.task.temperature == 0.0
    assert c.model.name == "smollm2" and c.dec.name == "smollm2" and c.precision.name == "w3"
    # a group chosen on the command line beats the experiment's `override /backend`
    assert c.backend.name == "lutgemm"
    # and a plain key on the command line beats the experiment's value
    c = typed(compose_cfg(["experiment=smollm2_greedy", "task.num_samples=1"]))
    assert c.task.num_samples == 1 and c.task.max_new_tokens == 48


def test_logger_yaml_has_no_wandb():
    c = typed(compose_cfg(["logger=yaml"]))
    assert c.logger.wandb is None and c.logger.yaml is not None
    c = typed(compose_cfg(["logger=[yaml,wandb]", "logger.wandb.mode=disabled"]))
    assert c.logger.wandb.mode == "disabled"


def test_hydra_dirs_under_outputs():
    cfg = compose_cfg(["model=tiny"], return_hydra_config=True)
    assert str(cfg.hydra.run.dir).startswith("outputs/")
    assert str(cfg.hydra.sweep.dir).startswith("outputs/multirun")
