"""Synthetic models of real shapes (speed measurements without weights)."""

import pytest
import torch

from decdec import formats, synthetic
from decdec.config import DecConfig, KChunk
from decdec.model import ModelArgs


@pytest.mark.parametrize("backend", ["ap", "lutgemm", "fp16"])
def test_build_tiny_synthetic(backend):
    dec = DecConfig(name="t", n_tb=2, k_chunk=KChunk(qkv=64, o=64, gate_up=64, down=128))
    built = synthetic.build_synthetic("tiny", backend, 3, False, torch.float32, torch.device("cpu"), dec)
    assert built.checkpoint is None
    model = built.model
    model.setup_caches(1, 16, torch.float32, torch.device("cpu"))
    logits = model(torch.tensor([[1, 2, 3]]), torch.arange(3))
    assert logits.shape == (1, 3, 320) and torch.isfinite(logits).all()
    if backend == "fp16":
        assert built.dec_rows_per_token() == 0
        return
    assert built.dec_rows_per_token() > 0
    for _, _, m in model.linears():
        levels = formats.unpack_residual(m.dec.q_residual)
        assert levels.min() >= -7 and levels.max() <= 7
        thr = m.dec.thresholds
        assert (thr[:-1] >= thr[1:]).all()
        if backend == "ap":
            assert (m.lut[:, 1:] >= m.lut[:, :-1]).all()


def test_n_tb_per_projection():
    """dec.n_tb_proj gives a projection its own DEC thread blocks; the others keep dec.n_tb; a bad one names its key."""
    from decdec.config import NTbProj

    dec = DecConfig(name="t", n_tb=2, n_tb_proj=NTbProj(down=5, qkv=3), k_chunk=KChunk(qkv=64, o=64, gate_up=64, down=128))
    built = synthetic.build_synthetic("tiny", "ap", 3, False, torch.float32, torch.device("cpu"), dec)
    got = {proj: m.dec.n_tb for proj, _, m in built.model.linears()}
    assert got == {"qkv": 3, "o": 2, "gate_up": 2, "down": 5}
    with pytest.raises(ValueError, match=r"dec.n_tb_proj.o must be >= 1"):
        synthetic.build_synthetic("tiny", "ap", 3, False, torch.float32, torch.device("cpu"),
                                  DecConfig(name="t", n_tb=2, n_tb_proj=NTbProj(o=0)))


def test_real_shapes_are_the_published_ones():
    a = ModelArgs.from_hf_config(synthetic.SHAPES["llama3-8b"]).projection_shapes()
    assert a == {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
    p = ModelArgs.from_hf_config(synthetic.SHAPES["phi3-medium"]).projection_shapes()
    assert p == {"qkv": (5120, 7680), "o": (5120, 5120), "gate_up": (5120, 35840), "down": (17920, 5120)}


def test_unknown_shape_is_an_error():
    with pytest.raises(ValueError, match="unknown synthetic shape"):
        synthetic.build_synthetic("gpt5", "ap", 3, False, torch.float32, torch.device("cpu"), DecConfig(name="x"))


def test_synthetic_run_is_labelled(tmp_path, cache_dir):
    from conftest import run_inprocess

    summary = run_inprocess(["model=tiny", "model.source=synthetic", "task.num_samples=2", "task.max_new_tokens=4",
                             "logger=yaml"], tmp_path / "run", cache_dir)
    assert summary["synthetic"] is True and summary["num_samples"] == 2
    import yaml

    env = yaml.safe_load((tmp_path / "run" / "env.yaml").read_text())
    assert env["synthetic"] is True and env["checkpoint"].startswith("SYNTHETIC")


def test_synthetic_perplexity_is_refused(tmp_path, cache_dir):
    from conftest import run_inprocess

    from decdec.run import ConfigError

    with pytest.raises(ConfigError, match="synthetic"):
        run_inprocess(["model=tiny", "model.source=synthetic", "task=perplexity", "logger=yaml"], tmp_path / "r", cache_dir)
