"""prepare_checkpoint: complete output, mixed precision, resumable after an interruption."""

import json

import pytest
import torch

from decdec import checkpoint as ckpt
from decdec import prepare, reference, tiny

SHAPE = {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 256, "vocab_size": 320}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return tiny.tiny_original(tmp_path_factory.mktemp("cache"), SHAPE, seed=3)


def _spec(**kw):
    return prepare.PrepareSpec(**{"backend": "ap", "bits": 3, "calib_tokens": 512, "calib_seq_len": 128, **kw})


def test_resume_after_interruption_redoes_only_missing_layers(original, tmp_path, monkeypatch):
    out = tmp_path / "ap-w3"
    real = prepare._quantize_one
    calls = []

    def flaky(spec, w, bits, group, stats, x, fisher=None):
        calls.append(bits)
        if len(calls) == 9:  # first projection of layer 2
            raise KeyboardInterrupt("simulated interruption")
        return real(spec, w, bits, group, stats, x, fisher)

    monkeypatch.setattr(prepare, "_quantize_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_checkpoint(original, out, _spec(), tiny.tiny_calibration_text())
    assert not out.exists()  # nothing that looks complete
    work = tmp_path / ".ap-w3.partial"
    assert sorted(p.name for p in work.glob("layer-*.safetensors")) == ["layer-0.safetensors", "layer-1.safetensors"]
    assert (work / "calibration.safetensors").exists()

    before = len(calls)
    prepare.prepare_checkpoint(original, out, _spec(), tiny.tiny_calibration_text())
    assert len(calls) - before == 4  # only layer 2's four projections
    assert not work.exists()
    c = ckpt.Checkpoint.open(out)
    assert c.manifest["backend"] == "ap" and c.manifest["bits"] == 3
    w = c.load(ckpt.WEIGHTS)
    assert w["layers.2.feed_forward.w2.qweight"].shape == (3, 64, 256 // 32)


def test_changed_spec_starts_afresh(original, tmp_path, monkeypatch):
    out = tmp_path / "x"
    work = tmp_path / ".x.partial"
    work.mkdir()
    (work / "spec.json").write_text(json.dumps({"something": "else"}))
    (work / "layer-0.safetensors").write_bytes(b"stale")
    prepare.prepare_checkpoint(original, out, _spec(bits=4), tiny.tiny_calibration_text())
    assert ckpt.Checkpoint.open(out).manifest["bits"] == 4


def test_mixed_precision_map_and_residual_matches_error(original, tmp_path):
    out = tmp_path / "mixed"
    prepare.prepare_checkpoint(original, out, _spec(backend="lutgemm", mixed=True), tiny.tiny_calibration_text())
    c = ckpt.Checkpoint.open(out)
    bw = c.bitwidth_map()
    assert sorted(bw) == [0, 1, 2] and sorted(set(bw.values())) == [3, 4]
    assert list(bw.values()).count(4) == 1  # half of 3 layers, rounded down
    assert c.manifest["group_size"] == 64  # 128 does not divide dim 64
    # the stored residual approximates W - Wq of every projection
    from decdec.checkpoint import load_original_state_dict
    from decdec.model import ModelArgs, hf_to_decdec_state_dict

    args = ModelArgs.from_hf_config(c.hf_config)
    sd = hf_to_decdec_state_dict(load_original_state_dict(original), args)
    w, cheat = c.load(ckpt.WEIGHTS), c.load(ckpt.CHEATSHEET)
    name = "layers.1.attention.wqkv"
    wq = reference.lutgemm_dequant(w[f"{name}.binary"], w[f"{name}.alpha"].float(), w[f"{name}.q_bias"].float())
    err = sd[f"{name}.weight"].float() - wq
    rows = torch.arange(args.dim)
    approx = reference.residual_rows(cheat[f"{name}.q_residual"], cheat[f"{name}.scales"].float(), rows).t()
    assert (err - approx).norm() < 0.2 * err.norm()


def test_existing_output_is_not_overwritten(original, tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        prepare.prepare_checkpoint(original, out, _spec(), tiny.tiny_calibration_text())


def test_awq_fold_keeps_the_dense_model_function(original, tmp_path):
    from transformers import AutoTokenizer

    from decdec.checkpoint import load_original_state_dict
    from decdec.model import ModelArgs, Transformer, hf_to_decdec_state_dict

    c = ckpt.Checkpoint.open(original)
    args = ModelArgs.from_hf_config(c.hf_config)
    sd = {k: v.float() for k, v in hf_to_decdec_state_dict(load_original_state_dict(original), args).items()}
    spec = _spec(backend="lutgemm")
    stats, _ = prepare._calibration_stats(tmp_path, sd, args, AutoTokenizer.from_pretrained(original), spec,
                                          tiny.tiny_calibration_text())
    before = {k: v.clone() for k, v in sd.items()}
    ratios = prepare.awq_fold(sd, args, stats, spec, 64, tmp_path)
    assert set(ratios) == {f"{layer}.{p}" for layer in range(3) for p in ("qkv", "gate_up", "down")}  # GQA: no o
    changed = [k for k in sd if not torch.equal(sd[k], before[k])]
    assert changed  # something was scaled (some ratio > 0 on real activations)

    def logits(state):
        with torch.device("meta"):
            m = Transformer(args)
        m.load_state_dict(state, assign=True)
        m.setup_caches(1, 32, torch.float32, torch.device("cpu"))
        return m(torch.arange(1, 17).view(1, -1), torch.arange(16))

    torch.testing.assert_close(logits(sd), logits(before), rtol=1e-4, atol=1e-4)
    # a resumed prepare folds the very same scales
    sd2 = {k: v.clone() for k, v in before.items()}
    assert prepare.awq_fold(sd2, args, stats, spec, 64, tmp_path) == ratios
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)


def test_fisher_weights_drive_ap(original, tmp_path):
    from transformers import AutoTokenizer

    from decdec.model import ModelArgs

    c = ckpt.Checkpoint.open(original)
    args = ModelArgs.from_hf_config(c.hf_config)
    spec = _spec(fisher=True, fisher_tokens=256)
    f = prepare.fisher_weights(original, args, AutoTokenizer.from_pretrained(original), spec,
                               tiny.tiny_calibration_text(), tmp_path)
    w = f["layers.0.attention.wqkv"]
    assert w.shape == (SHAPE["dim"] + 2 * SHAPE["dim"] // 2, SHAPE["dim"]) and (w >= 0).all() and w.sum() > 0
    assert set(f) == {f"layers.{i}.{m}" for i in range(3) for m in ("attention.wqkv", "attention.wo",
                                                                    "feed_forward.w1w3", "feed_forward.w2")}
    out = tmp_path / "fisher-ap"
    prepare.prepare_checkpoint(original, out, spec, tiny.tiny_calibration_text())
    assert ckpt.Checkpoint.open(out).manifest["ap_sensitivity"] == "fisher"
