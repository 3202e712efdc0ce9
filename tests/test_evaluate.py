"""Teacher-forced perplexity with DEC (task=perplexity) on the tiny model."""

import math

import pytest
import torch
import yaml

from decdec import evaluate, reference
from decdec.linear import QuantLinear


def test_windows_score_every_target_once():
    for n, w, s in [(10, 4, 4), (10, 4, 2), (9, 9, 9), (100, 16, 5), (5, 8, 8), (4096, 2048, 2048)]:
        spans = evaluate.windows(n, w, s)
        assert all(e - b <= w and k <= e - b - 1 for b, e, k in spans)  # never a window's own first token
        scored = [t for b, e, k in spans for t in range(e - k, e)]
        assert len(scored) == len(set(scored))  # at most once
        if s < w:
            assert sorted(scored) == list(range(1, n))  # overlapping windows: every target exactly once
        else:
            starts = {b for b, _, _ in spans}
            assert sorted(scored) == [t for t in range(1, n) if t not in starts]
    with pytest.raises(ValueError):
        evaluate.windows(10, 4, 5)


def test_perplexity_equals_manual_cross_entropy(cache_dir):
    from conftest import compose_cfg, typed

    from decdec import checkpoint as ckpt
    from decdec.builder import build_model
    from decdec.run import resolve_checkpoint

    cfg = typed(compose_cfg(["model=tiny", "dec=off", f"cache_dir={cache_dir}"]))
    path = resolve_checkpoint(cfg)
    built = build_model(ckpt.Checkpoint.open(path), "ap", 3, False, torch.float32, torch.device("cpu"), cfg.dec)
    ids = torch.randint(3, 320, (50,), generator=torch.Generator().manual_seed(0))
    res = evaluate.perplexity(built.model, ids, 50, 50, torch.device("cpu"), torch.float32, bos_id=None, progress=False)
    built.model.setup_caches(1, 50, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        logits = built.model(ids.view(1, -1), torch.arange(50))[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    assert res["tokens_evaluated"] == 49 and res["windows"] == 1
    assert math.isclose(res["perplexity"], math.exp(float(nll)), rel_tol=1e-5)


def test_teacher_forced_dec_equals_token_by_token_dec(cache_dir):
    """Prefill with teacher-forced DEC == each row through the decode (M=1) DEC op."""
    from conftest import compose_cfg, typed

    from decdec import checkpoint as ckpt
    from decdec.builder import build_model
    from decdec.run import resolve_checkpoint

    cfg = typed(compose_cfg(["model=tiny", f"cache_dir={cache_dir}"]))
    built = build_model(ckpt.Checkpoint.open(resolve_checkpoint(cfg)), "ap", 3, False, torch.float32,
                        torch.device("cpu"), cfg.dec)
    evaluate.set_teacher_forced(built.model)
    mod = next(m for p, _, m in built.model.linears() if p == "down")
    assert isinstance(mod, QuantLinear) and mod.k_chunk > 0
    x = torch.randn(7, mod.in_features)
    rows = torch.cat([mod(x[i:i + 1]) for i in range(7)])
    torch.testing.assert_close(mod(x), rows, rtol=1e-4, atol=1e-5)
    # and it differs from no DEC
    assert not torch.allclose(mod(x), x @ mod.dequantize().t(), atol=1e-6)


@pytest.mark.parametrize("selection", ["exact_topk", "static", "random"])
def test_selection_ablations_select_the_same_count(selection):
    x = torch.randn(5, 2304)
    k = 16
    quota = sum(reference.chunk_quotas(k, 2304))
    if selection == "exact_topk":
        m = reference.select_exact_topk(x, k)
        top = x.abs()[:, :1024].topk(16, dim=1).indices
        assert m[:, :1024].gather(1, top).all()
    elif selection == "static":
        hits = torch.arange(2304).flip(0)
        m = reference.select_static(hits, 5, k)
        assert m[:, :16].all() and not m[:, 16:1024].any()
    else:
        m = reference.select_random(5, 2304, k, torch.Generator().manual_seed(0))
    assert (m.sum(1) == quota).all()


def test_perplexity_task_end_to_end(tmp_path, cache_dir):
    from conftest import run_inprocess

    base = run_inprocess(["model=tiny", "task=perplexity", "task.text=builtin", "task.window=128", "dec=off",
                          "logger=yaml"], tmp_path / "off", cache_dir)
    dec = run_inprocess(["model=tiny", "task=perplexity", "task.text=builtin", "task.window=128", "logger=yaml",
                         "dec.selection=exact_topk"], tmp_path / "on", cache_dir)
    for s in (base, dec):
        assert s["task"] == "perplexity" and s["window"] == 128 and s["stride"] == 128 and s["bos"] is True
        assert s["tokens_evaluated"] > 1000 and math.isfinite(s["perplexity"])
    assert base["dec_rows_per_token"] == 0 and dec["dec_rows_per_token"] > 0
    assert dec["selection"] == "exact_topk" and dec["perplexity"] != base["perplexity"]
    windows = yaml.safe_load((tmp_path / "on" / "samples.yaml").read_text())
    assert len(windows) == dec["windows"] and sum(w["tokens"] for w in windows) == dec["tokens_evaluated"]
    nll = sum(w["nll"] * w["tokens"] for w in windows) / dec["tokens_evaluated"]
    assert math.isclose(math.exp(nll), dec["perplexity"], rel_tol=1e-9)


def test_bad_text_is_a_clear_error(tmp_path, cache_dir):
    from conftest import run_inprocess

    from decdec.run import ConfigError

    with pytest.raises(ConfigError, match="task.text"):
        run_inprocess(["model=tiny", "task=perplexity", "task.text=/no/such/file.txt", "logger=yaml"], tmp_path / "x",
                      cache_dir)
