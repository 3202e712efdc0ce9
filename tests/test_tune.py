"""The autotuner: choice under a budget (pure), and task=tune end to end on the tiny model."""

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from decdec import tune
from decdec.config import DecConfig

IN = {"qkv": 4096, "o": 4096, "gate_up": 4096, "down": 14336}


def _table(n_tb, cost_per_k):
    """Synthetic timings: base 10 us per projection, +cost_per_k[p] us per unit of k_chunk."""
    rows = []
    for p in IN:
        for k in (0, 1, 2, 4, 8, 16):
            rows.append(tune.Timing(p, 3, n_tb, k, (10 + cost_per_k[p] * k) * 1e-6))
    return rows


def test_choose_respects_budget_and_maximises_rows():
    t = _table(16, {"qkv": 0.1, "o": 0.1, "gate_up": 0.4, "down": 0.1})
    c = tune.choose(t, IN, budget_s=2.05e-6, bits=3)
    assert c["extra_s"] <= 2.05e-6
    assert all(k > 0 for k in c["k_chunk"].values())
    # exhaustive check: nothing within budget has more rows
    import itertools

    best = 0
    for combo in itertools.product((0, 1, 2, 4, 8, 16), repeat=4):
        cost = sum({"qkv": 0.1, "o": 0.1, "gate_up": 0.4, "down": 0.1}[p] * k for p, k in zip(IN, combo)) * 1e-6
        if cost <= 2.05e-6 and all(tune.rows_per_token(k, IN[p]) > 0 for p, k in zip(IN, combo)):
            best = max(best, sum(tune.rows_per_token(k, IN[p]) for p, k in zip(IN, combo)))
    assert c["rows_per_layer"] == best


def test_choose_picks_the_cheaper_n_tb():
    t = _table(8, {p: 0.5 for p in IN}) + _table(32, {p: 0.1 for p in IN})
    c = tune.choose(t, IN, budget_s=3e-6, bits=3)
    assert c["n_tb"] == 32


def test_choose_per_projection_takes_each_projections_fastest_n_tb():
    """qkv / o are cheaper at n_tb 8, gate_up / down at 32: one n_tb for all pays one of the two; per projection the
    choice fetches more rows within the same budget and names each projection's n_tb."""
    t = (_table(8, {"qkv": 0.1, "o": 0.1, "gate_up": 0.5, "down": 0.5})
         + _table(32, {"qkv": 0.5, "o": 0.5, "gate_up": 0.1, "down": 0.1}))
    one = tune.choose(t, IN, budget_s=3.3e-6, bits=3)
    per = tune.choose(t, IN, budget_s=3.3e-6, bits=3, per_projection=True)
    assert per["extra_s"] <= 3.3e-6 and all(k > 0 for k in per["k_chunk"].values())
    assert per["rows_per_layer"] > one["rows_per_layer"]
    assert per["n_tb_proj"] == {"qkv": 8, "o": 8, "gate_up": 32, "down": 32}
    assert per["n_tb"] in (8, 32) and set(one["n_tb_proj"].values()) == {one["n_tb"]}
    # the extra time is what the timings of those (projection, n_tb, k_chunk) say
    want = sum((0.1 * per["k_chunk"][p]) * 1e-6 for p in IN)
    assert per["extra_s"] == pytest.approx(want)


def test_zero_budget_means_no_dec():
    c = tune.choose(_table(8, {p: 0.5 for p in IN}), IN, budget_s=0.0, bits=3)
    assert set(c["k_chunk"].values()) == {0}


def test_tune_task_on_tiny_writes_usable_dec_config(tmp_path, cache_dir):
    from conftest import run_inprocess

    summary = run_inprocess(["model=tiny", "task=tune", "task.verify_tokens=4", "task.verify_samples=1", "task.iters=2",
                             "task.k_chunks=[0,64,256]", "task.target_slowdown=0.5", "logger=yaml"],
                            tmp_path / "run", cache_dir)
    assert summary["task"] == "tune" and "measured_slowdown" in summary
    dec = yaml.safe_load((tmp_path / "run" / "dec_tuned.yaml").read_text())
    cfg = OmegaConf.merge(OmegaConf.structured(DecConfig), dec)  # the schema accepts it
    assert set(cfg.k_chunk.keys()) == {"qkv", "o", "gate_up", "down"}
    assert set(cfg.n_tb_proj.keys()) == {"qkv", "o", "gate_up", "down"}
    assert set(summary["choice"]["3"]["n_tb_proj"]) == {"qkv", "o", "gate_up", "down"}
    assert all(v in (0, 64, 256) for v in cfg.k_chunk.values())


def test_tune_rejects_bad_settings(tmp_path, cache_dir):
    from conftest import run_inprocess

    from decdec.run import ConfigError

    with pytest.raises(ConfigError, match="target_slowdown"):
        run_inprocess(["model=tiny", "task=tune", "task.target_slowdown=2", "logger=yaml"], tmp_path / "a", cache_dir)
    with pytest.raises(ConfigError, match="k_chunks"):
        run_inprocess(["model=tiny", "task=tune", "task.k_chunks=[4,8]", "logger=yaml"], tmp_path / "b", cache_dir)


def test_host_seconds_passes_call_indices_and_returns_per_call_time():
    from decdec import timing

    seen = []
    t = timing.host_seconds(seen.append, calls=4, reps=3, warmup=2)
    assert seen == [0, 1] + [0, 1, 2, 3] * 3  # warm-up calls, then each rep's calls in order (inputs rotate on i)
    assert 0 < t < 1e-3


def test_next_budget_scales_by_target_over_measured():
    assert tune.next_budget(10e-6, 0.05, 0.10) == pytest.approx(10e-6 * 0.9 * 0.5)
    assert tune.next_budget(10e-6, 0.05, 0.02) == pytest.approx(10e-6 * 0.9)  # under target: only the margin
    assert tune.next_budget(10e-6, 0.05, 0.0) == pytest.approx(10e-6 * 0.9)


def _fake_rates(monkeypatch, rates):
    """Run._decode_rate returns `rates` in order (the first is dec=off) and records each call's k_chunks."""
    from decdec.run import Run

    seen = []

    def fake(self, built, prompt, tokens, samples):
        seen.append(sorted({m.k_chunk for _, _, m in built.model.linears()}))
        return rates[len(seen) - 1]

    monkeypatch.setattr(Run, "_decode_rate", fake)
    return seen


TUNE = ["model=tiny", "task=tune", "task.verify_tokens=4", "task.verify_samples=1", "task.iters=2",
        "task.k_chunks=[0,16,64,256]", "task.target_slowdown=0.5", "task.dec_off_readings=1", "logger=yaml"]


def test_tune_shrinks_the_budget_when_the_choice_measures_over_target(tmp_path, cache_dir, monkeypatch):
    from conftest import run_inprocess

    # dec=off, round 1 (+150 %) and dec=off after it, round 2 (+11 %) and dec=off after it
    seen = _fake_rates(monkeypatch, [100.0, 40.0, 100.0, 90.0, 100.0])
    summary = run_inprocess(TUNE, tmp_path / "run", cache_dir)
    rounds = summary["rounds"]
    assert len(rounds) == 2 and len(seen) == 5 and seen[2] == seen[4] == [0]
    assert rounds[0]["measured_slowdown"] == pytest.approx(1.5) and rounds[1]["measured_slowdown"] == pytest.approx(1 / 9)
    assert [r["dec_off_tokens_per_s"] for r in rounds] == [[100.0, 100.0], [100.0, 100.0, 100.0]]  # every reading so far
    assert rounds[1]["budget_us_per_layer"] == pytest.approx(rounds[0]["budget_us_per_layer"] * 0.9 * 0.5 / 1.5)
    assert summary["measured_slowdown"] == pytest.approx(1 / 9)
    assert summary["choice"] == {b: {**c, "rows_per_layer": summary["choice"][b]["rows_per_layer"]}
                                 for b, c in rounds[1]["choice"].items()}
    assert "measured +11.11%" in (tmp_path / "run" / "dec_tuned.yaml").read_text()


def test_tune_turns_dec_off_when_no_choice_fits(tmp_path, cache_dir, monkeypatch):
    from conftest import run_inprocess

    seen = _fake_rates(monkeypatch, [100.0, 10.0, 100.0, 10.0, 100.0, 100.0])  # every choice with DEC: +900 %
    summary = run_inprocess([*TUNE, "task.verify_rounds=2"], tmp_path / "run", cache_dir)
    rounds = summary["rounds"]
    # each DEC round measures dec=off again after it; the last round (DEC off: the dec=off model) is not measured
    assert 2 <= len(rounds) <= 3 and len(seen) == 1 + 2 * (len(rounds) - 1)
    assert all(k == 0 for k in rounds[-1]["choice"]["3"]["k_chunk"].values())
    assert not rounds[-1]["verified"] and rounds[-1]["measured_slowdown"] == 0.0 and rounds[-1]["tokens_per_s"] == 100.0
    assert not summary["verified"] and summary["measured_slowdown"] == 0.0
    assert "no DEC fits: DEC off (100.00 tokens/s" in (tmp_path / "run" / "dec_tuned.yaml").read_text()
    assert any(k > 0 for k in rounds[0]["choice"]["3"]["k_chunk"].values())
    assert seen[-1] == [0]
    cheap = summary["cheapest_dec"]["3"]  # what it would take: the least extra time that buys any DEC
    assert cheap["proj"] in IN and cheap["k_chunk"] > 0 and cheap["rows_per_layer"] > 0
    assert cheap["slowdown_estimate"] == pytest.approx(cheap["extra_s"] * 2 * 100.0)  # tiny: 2 layers, 100 tokens/s


def test_cheapest_dec_is_the_least_extra_time_with_its_fusion_charge():
    t = _table(16, {"qkv": 0.3, "o": 0.1, "gate_up": 0.2, "down": 0.05}) + _table(8, {p: 1.0 for p in IN})
    c = tune.cheapest_dec(t, IN, 3)
    assert (c["proj"], c["k_chunk"], c["n_tb"]) == ("down", 1, 16)
    assert c["extra_s"] == pytest.approx(0.05e-6) and c["rows_per_layer"] == tune.rows_per_token(1, IN["down"])
    charged = tune.cheapest_dec(t, IN, 3, fusion_s=1e-6)  # DEC on down or o undoes a fusion; on gate_up not
    assert (charged["proj"], charged["k_chunk"]) == ("gate_up", 1)
    assert charged["extra_s"] == pytest.approx(0.2e-6)
    assert tune.cheapest_dec(t, IN, 4) is None


def test_choose_without_dec_ignores_timings_under_the_gemv():
    """Timing noise can put a DEC setting at or under its GEMV: a zero budget would admit it, dec=False does not."""
    from decdec.tune import PROJECTIONS, Timing, choose

    t = [Timing(p, 3, 8, 0, 10e-6) for p in PROJECTIONS] + [Timing(p, 3, 8, 16, 9.9e-6) for p in PROJECTIONS]
    ins = {p: 4096 for p in PROJECTIONS}
    assert all(k == 16 for k in choose(t, ins, 0.0, 3)["k_chunk"].values())
    assert all(k == 0 for k in choose(t, ins, 0.0, 3, dec=False)["k_chunk"].values())


def test_fusions_lost_follows_the_model_rule():
    """qkv's add + norm fusion goes when (the previous layer's) down runs DEC, gate_up's when o does
    (model.add_norm_project); DEC on qkv or gate_up itself keeps it (ap_gemv_addnorm_dec_parts)."""
    z = dict.fromkeys(IN, 0)
    assert tune.fusions_lost(z) == 0
    assert tune.fusions_lost({**z, "down": 4}) == 1 and tune.fusions_lost({**z, "qkv": 1, "down": 4}) == 1
    assert tune.fusions_lost({**z, "o": 1}) == 1 and tune.fusions_lost({**z, "gate_up": 8, "o": 1}) == 1
    assert tune.fusions_lost({**z, "qkv": 1, "gate_up": 1}) == 0
    assert tune.fusions_lost(dict.fromkeys(IN, 2)) == 2
    # with the GLU epilogue, DEC on gate_up turns SiLU x up back into its own kernel
    assert tune.fusions_lost({**z, "qkv": 1, "gate_up": 1}, glu=True) == 1
    assert tune.fusions_lost({**z, "gate_up": 1, "o": 1}, glu=True) == 1
    assert tune.fusions_lost(dict.fromkeys(IN, 2), glu=True) == 2
    assert tune.fusion_seconds(1.0e-3, 1.1e-3, 32) == pytest.approx(1e-4 / 63)
    assert tune.fusion_seconds(1.1e-3, 1.0e-3, 32) == 0.0  # noise: never a credit


def test_choose_charges_the_fusions_a_choice_undoes():
    """A fusion charge enters the budget: with 1.5 us per fusion and 3 us per layer, DEC on all four projections (two
    fusions) no longer fits, and the choice undoes at most one fusion (DEC on o or down); under the charge alone,
    DEC stays on qkv and gate_up, whose own DEC keeps their fusion."""
    t = _table(16, {p: 0.1 for p in IN})
    free = tune.choose(t, IN, budget_s=3.0e-6, bits=3)
    assert all(k > 0 for k in free["k_chunk"].values())
    charged = tune.choose(t, IN, budget_s=3.0e-6, bits=3, fusion_s=1.5e-6)
    k = charged["k_chunk"]
    assert charged["extra_s"] <= 3.0e-6 and tune.fusions_lost(k) <= 1 and not all(v > 0 for v in k.values())
    assert charged["extra_s"] == pytest.approx(1.5e-6 * tune.fusions_lost(k) + sum(0.1e-6 * v for v in k.values()))
    small = tune.choose(t, IN, budget_s=1.4e-6, bits=3, fusion_s=1.5e-6)["k_chunk"]
    assert small["o"] == small["down"] == 0 and small["qkv"] > 0 and small["gate_up"] > 0


def test_uses_fused_addnorm_is_false_on_cpu():
    from decdec.synthetic import build_synthetic
    import torch

    dec = DecConfig(name="t", n_tb=1)
    model = build_synthetic("tiny", "ap", 3, False, torch.float16, torch.device("cpu"), dec).model
    assert not tune.uses_fused_addnorm(model)


def test_tune_measures_the_fusion_charge_without_the_fused_gemvs(tmp_path, cache_dir, monkeypatch):
    """Where the model runs fused add + norm GEMVs, the tune task times a second dec=off step with DECDEC_ADDNORM=0
    (restored afterwards) and reports the difference per fusion; the choice is charged it."""
    import os

    from conftest import run_inprocess

    monkeypatch.delenv("DECDEC_ADDNORM", raising=False)
    monkeypatch.setattr(tune, "uses_fused_addnorm", lambda model: True)
    env_seen = []
    from decdec.run import Run

    rates = [100.0, 90.0, 99.0, 100.0]  # dec=off, dec=off without the fusions, round 1, dec=off after it

    def fake(self, built, prompt, tokens, samples):
        env_seen.append(os.environ.get("DECDEC_ADDNORM"))
        return rates[len(env_seen) - 1]

    monkeypatch.setattr(Run, "_decode_rate", fake)
    summary = run_inprocess(TUNE, tmp_path / "run", cache_dir)
    assert env_seen[:3] == [None, "0", None] and set(env_seen[3:]) <= {None} and "DECDEC_ADDNORM" not in os.environ
    n_layers = 2  # model=tiny
    assert summary["fusion_us"] == pytest.approx((1 / 90 - 1 / 100) / (2 * n_layers - 1) * 1e6)


def test_reference_rate_is_the_median_of_the_dec_off_readings():
    assert tune.reference_rate([100.0]) == 100.0
    assert tune.reference_rate([442.0, 461.0, 473.0]) == 461.0  # one slow compile does not drag the reference down
    assert tune.reference_rate([80.0, 100.0]) == 90.0
    with pytest.raises(ValueError, match="at least one"):
        tune.reference_rate([])


def test_tune_judges_a_choice_against_the_median_of_every_dec_off_reading(tmp_path, cache_dir, monkeypatch):
    """A slow first dec=off reading (80 tokens/s; then 100, 100) must not make a choice at 90 look as fast as dec=off:
    by default two readings come before the first choice and one after it, and the choice is judged against their
    median. verify_bracket=false: only the readings before it."""
    from conftest import run_inprocess

    default = [a for a in TUNE if not a.startswith("task.dec_off_readings")]
    seen = _fake_rates(monkeypatch, [80.0, 100.0, 90.0, 100.0])
    summary = run_inprocess(default, tmp_path / "a", cache_dir)
    r = summary["rounds"][0]
    assert len(seen) == 4 and seen[:2] == [[0], [0]] and seen[3] == [0]
    assert any(k > 0 for k in r["choice"]["3"]["k_chunk"].values()) and r["verified"]
    assert r["dec_off_tokens_per_s"] == [80.0, 100.0, 100.0]
    assert r["measured_slowdown"] == pytest.approx(100.0 / 90.0 - 1)
    assert summary["base_tokens_per_s"] == 100.0

    seen = _fake_rates(monkeypatch, [80.0, 100.0, 90.0])
    summary = run_inprocess([*default, "task.verify_bracket=false"], tmp_path / "b", cache_dir)
    assert len(seen) == 3 and summary["rounds"][0]["dec_off_tokens_per_s"] == [80.0, 100.0]
    assert summary["measured_slowdown"] == pytest.approx(90.0 / 90.0 - 1)


def test_tune_does_not_measure_a_choice_without_dec(tmp_path, cache_dir, monkeypatch):
    """A choice with k_chunk = 0 everywhere is the dec=off model: its slowdown is 0 and it is not decoded again (a
    reading would only measure recompile noise: the H200 tuner once printed -4.36 % for it)."""
    from conftest import run_inprocess

    seen = _fake_rates(monkeypatch, [100.0])
    summary = run_inprocess([*TUNE, "task.k_chunks=[0]", "task.target_slowdowns=[0.05,0.1]"], tmp_path / "run", cache_dir)
    assert len(seen) == 1  # dec=off only
    for s in summary["targets"]:
        assert len(s["rounds"]) == 1 and not s["verified"] and s["measured_slowdown"] == 0.0
        assert s["tuned_tokens_per_s"] == 100.0 and set(s["choice"]["3"]["k_chunk"].values()) == {0}
        assert "no DEC fits: DEC off" in (tmp_path / "run" / s["dec_file"]).read_text()


def test_tune_rejects_no_dec_off_readings(tmp_path, cache_dir):
    from conftest import run_inprocess

    from decdec.run import ConfigError

    with pytest.raises(ConfigError, match="dec_off_readings"):
        run_inprocess([*TUNE, "task.dec_off_readings=0"], tmp_path / "a", cache_dir)


def test_time_projections_follows_every_call_with_a_consumer(monkeypatch):
    """Each timed decode call is followed by a consumer of its output (timing.consume), with DEC and without, so the
    DEC cost is measured as a decode step pays it, not against GEMVs chained back to back."""
    from tests.test_linear import attach_random_dec, make_linear

    class Layers:  # the one thing time_projections asks of a model
        def __init__(self):
            self.mods = {}
            for i, p in enumerate(tune.PROJECTIONS):
                lin, _ = make_linear("ap", seed=i)
                attach_random_dec(lin, seed=10 + i)
                self.mods[p] = lin

        def linears(self):
            return ((p, 0, m) for p, m in self.mods.items())

    from decdec import timing

    model = Layers()
    seen = []
    real = timing.consume

    def spy(y):
        seen.append(tuple(y.shape))
        return real(y)

    monkeypatch.setattr(timing, "consume", spy)
    timings = tune.time_projections(model, {0: 3}, [0, 8], [1], 2,
                                    torch.device("cpu"), torch.float32)
    assert {(t.proj, t.k_chunk) for t in timings} >= {("qkv", 0), ("qkv", 8), ("down", 8)}
    assert seen and all(len(s) in (2, 3) for s in seen)  # GEMV outputs [M, out] and DEC parts [1 + P', M, out]
    assert any(len(s) == 3 for s in seen) and any(len(s) == 2 for s in seen)


def test_uses_glu_follows_the_gate_up_layout():
    from decdec.synthetic import build_synthetic

    model = build_synthetic("tiny", "ap", 3, False, torch.float32, torch.device("cpu"), DecConfig(name="t", n_tb=1)).model
    assert not tune.uses_glu(model)  # CPU: the layout is never chosen
    assert all(m.use_glu_layout(force=True) for p, _, m in model.linears() if p == "gate_up")
    assert tune.uses_glu(model)


def test_chain_mode_skips_the_fusion_charge(tmp_path, cache_dir, monkeypatch):
    """With the DEC projections in chain mode (their outputs final, every fusion kept), the tune task times no step
    without the fused GEMVs and charges nothing for fusions; uses_dec_chain is False on the CPU."""
    import os

    from conftest import run_inprocess
    from decdec.run import Run
    from decdec.synthetic import build_synthetic

    model = build_synthetic("tiny", "ap", 3, False, torch.float16, torch.device("cpu"), DecConfig(name="t", n_tb=1)).model
    assert not tune.uses_dec_chain(model)
    monkeypatch.setattr(tune, "uses_dec_chain", lambda model: True)
    monkeypatch.setattr(tune, "uses_fused_addnorm", lambda model: True)
    env_seen = []

    def fake(self, built, prompt, tokens, samples):
        env_seen.append(os.environ.get("DECDEC_ADDNORM"))
        return 100.0

    monkeypatch.setattr(Run, "_decode_rate", fake)
    summary = run_inprocess(TUNE, tmp_path / "run", cache_dir)
    assert "0" not in env_seen, "chain mode must not time a step without the fusions"
    assert summary["fusion_us"] == 0.0


def test_step_call_runs_each_projection_after_its_producer_as_the_decode_step_does(tiny_checkpoint):
    """In chain mode the tuner times each projection as the decode step runs it, after the kernel that produces its
    input there (tune.step_call): qkv = norm(a + previous down(x)) -> qkv, o on the qkv GEMV's first outputs,
    gate_up = norm(a + o(x)) -> gate_up, down on SiLU(gate) x up. Checked here on the tiny model against the same
    math by hand (DEC off); with DEC on the projection's own DEC state is what runs; the timings cover every
    projection and k_chunk."""
    from conftest import compose_cfg, typed

    from decdec import checkpoint as ckpt
    from decdec.builder import build_model
    from decdec.model import PROJECTIONS as PATHS

    dec = typed(compose_cfg(["model=tiny"])).dec
    built = build_model(ckpt.Checkpoint.open(tiny_checkpoint("ap", "w3")), "ap", 3, False, torch.float32,
                        torch.device("cpu"), dec)
    model = built.model.eval()
    for _, _, m in model.linears():
        m.set_dec(0, 1)
    gen = torch.Generator().manual_seed(0)
    pool = {}

    def xs(width, i):
        pool.setdefault(width, [torch.randn(1, width, generator=gen) for _ in range(4)])
        return pool[width][i % 4]

    last = len(model.layers) - 1
    blk, prev = model.layers[1], model.layers[0]
    get = {p: blk.get_submodule(path) for p, path in PATHS.items()}
    down_prev = prev.get_submodule(PATHS["down"])
    with torch.no_grad():
        want = {
            "qkv": get["qkv"](blk.attention_norm(xs(get["qkv"].in_features, 5) + down_prev(xs(down_prev.in_features, 5)))),
            "o": get["o"](get["qkv"](xs(get["qkv"].in_features, 5))[:, :get["o"].in_features]),
            "gate_up": get["gate_up"](blk.ffn_norm(xs(get["gate_up"].in_features, 5) + get["o"](xs(get["o"].in_features, 5)))),
        }
        g, u = get["gate_up"](xs(get["gate_up"].in_features, 5)).chunk(2, dim=-1)
        want["down"] = get["down"](torch.nn.functional.silu(g) * u)
        for p, w in want.items():
            got = tune.step_call(model, p, 1, xs)(5)
            torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4, msg=lambda e: f"{p}: {e}")
        assert tune.step_call(model, "qkv", 0, xs)(1).shape == (1, get["qkv"].out_features)  # layer 0: last layer's down
        get["down"].set_dec(64, 1)  # the projection's own DEC runs inside the step call
        assert not torch.allclose(tune.step_call(model, "down", 1, xs)(5), want["down"])
        get["down"].set_dec(0, 1)
    assert last >= 1
    timings = tune.time_projections(model, {i: 3 for i in range(len(model.layers))}, [0, 64], [1], 1,
                                    torch.device("cpu"), torch.float32, in_step=True)
    assert {(t.proj, t.k_chunk) for t in timings} == {(p, k) for p in tune.PROJECTIONS for k in (0, 64)}
    assert all(t.seconds > 0 for t in timings)


def test_bench_step_context_runs_on_cpu_and_writes_every_case(tmp_path):
    """scripts/bench_step_context.py (the A/B behind tune.step_call) runs its CPU smoke path and writes a row per
    case: A / C for down, A / B / C for gate_up, C for qkv and o, each with and without DEC, at two (k_chunk, n_tb);
    --only keeps the projections named."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "ctx.csv"
    r = subprocess.run([sys.executable, str(repo / "scripts" / "bench_step_context.py"), "--out", str(out)],
                       capture_output=True, text=True, cwd=repo, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    cases = [row["case"] for row in rows]
    assert len(cases) == 2 * 5 + 2 * 6 + 2 * 2 + 2 * 2 and len(set(cases)) >= 26
    assert all(float(row["us_per_call"]) > 0 for row in rows)
    assert "## down k16 n_tb 33: extra A" in r.stdout and "## gate_up k8 n_tb 33: extra A" in r.stdout
    assert "## qkv k4 n_tb 33: extra C" in r.stdout and "## o k4 n_tb 16: extra C" in r.stdout
    r = subprocess.run([sys.executable, str(repo / "scripts" / "bench_step_context.py"), "--out", str(out), "--only",
                        "o"], capture_output=True, text=True, cwd=repo, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(row["case"] for row in csv.DictReader(out.open())) == sorted(
        f"o k4 n{n} C qkv+{what}" for n in (16, 33) for what in ("base", "chain"))


def test_tune_serves_several_targets_from_one_set_of_timings(tmp_path, cache_dir, monkeypatch):
    """task.target_slowdowns: the projections are timed once; each target is chosen, verified and written on its own."""
    from conftest import run_inprocess

    from decdec.run import ConfigError

    calls = []
    real = tune.time_projections
    monkeypatch.setattr(tune, "time_projections", lambda *a, **k: calls.append(1) or real(*a, **k))
    # dec=off; 50 %: its choice (+11 %) and dec=off after it; 90 %: its choice (+25 %) and dec=off after it
    seen = _fake_rates(monkeypatch, [100.0, 90.0, 100.0, 80.0, 100.0])
    summary = run_inprocess([*TUNE, "task.target_slowdowns=[0.5,0.9]"], tmp_path / "run", cache_dir)
    assert len(calls) == 1 and len(seen) == 5 and seen[2] == seen[4] == [0]
    first, second = summary["targets"]
    assert summary["target_slowdowns"] == [0.5, 0.9]
    assert first["target_slowdown"] == 0.5 and first["measured_slowdown"] == pytest.approx(1 / 9)
    assert second["target_slowdown"] == 0.9 and second["measured_slowdown"] == pytest.approx(0.25)
    assert second["budget_us_per_layer"] == pytest.approx(first["budget_us_per_layer"] * 0.9 / 0.5)
    assert second["rounds"][0]["dec_off_tokens_per_s"] == [100.0, 100.0, 100.0]  # the first target's readings too
    for s, name in ((first, "dec_tuned_500pm.yaml"), (second, "dec_tuned_900pm.yaml")):
        assert s["dec_file"] == name
        text = (tmp_path / "run" / name).read_text()
        assert f"target {s['target_slowdown']:.1%}, measured {s['measured_slowdown']:+.2%}" in text
        dec = yaml.safe_load(text)
        assert dec["k_chunk"] == s["choice"]["3"]["k_chunk"]
    assert not (tmp_path / "run" / "dec_tuned.yaml").exists()
    with pytest.raises(ConfigError, match=r"task.target_slowdowns must be in \(0, 1\), got 2.0"):
        run_inprocess([*TUNE, "task.target_slowdowns=[0.5,2]"], tmp_path / "bad", cache_dir)
