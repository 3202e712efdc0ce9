"""Checkpoint directories: atomic writes leave nothing half-written; opening validates; the
reference's .pt artifacts load with weights_only (nothing arbitrary is unpickled)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from decdec import checkpoint as ckpt


class Boom(RuntimeError):
    pass


def _quantized_dir(path: Path, **manifest) -> Path:
    """A minimal quantized checkpoint dir (the files Checkpoint.open checks for)."""
    path.mkdir()
    ckpt.write_json_atomic(path / "config.json", {"model_type": "llama"})
    m = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "backend": "ap", "bits": 3, "mixed": False}
    m.update(manifest)
    ckpt.write_json_atomic(path / ckpt.MANIFEST, m)
    for name in (ckpt.WEIGHTS, ckpt.CHEATSHEET, ckpt.THRESHOLDS):
        ckpt.save_tensors_atomic(path / name, {"x": torch.zeros(2)})
    return path


# ---------------------------------------------------------------------------- atomic writes
def test_staging_dir_success_renames_into_place(tmp_path):
    final = tmp_path / "out" / "ckpt"
    with ckpt.StagingDir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".ckpt.staging-")
        (tmp / "a.txt").write_text("a")
        assert not final.exists()  # never visible before it is complete
    assert (final / "a.txt").read_text() == "a"
    assert [p.name for p in final.parent.iterdir()] == ["ckpt"]


def test_staging_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(Boom):
        with ckpt.StagingDir(final) as tmp:
            (tmp / "weights.safetensors").write_bytes(b"half")
            raise Boom("interrupted")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_staging_dir_failure_keeps_previous_and_refuses_overwrite(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        with ckpt.StagingDir(final):
            pass
    with pytest.raises(Boom):
        with ckpt.StagingDir(final, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
            raise Boom()
    assert [p.name for p in final.iterdir()] == ["old"]  # a failed rebuild keeps the old one
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with ckpt.StagingDir(final, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]


def test_write_json_atomic_failure_leaves_no_temp_and_keeps_old(tmp_path):
    path = tmp_path / "manifest.json"
    ckpt.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        ckpt.write_json_atomic(path, {"a": object()})  # not JSON-serializable, fails mid-write
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_save_tensors_atomic_failure_leaves_no_temp(tmp_path):
    path = tmp_path / "weights.safetensors"
    a = torch.zeros(4)
    with pytest.raises(Exception):
        ckpt.save_tensors_atomic(path, {"a": a, "b": a})  # shared storage: safetensors refuses
    assert list(tmp_path.iterdir()) == []
    ckpt.save_tensors_atomic(path, {"a": torch.arange(3)}, metadata={"k": "v"})
    assert torch.equal(ckpt.Checkpoint(tmp_path, {}, None).load(path.name)["a"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


# ---------------------------------------------------------------------------- opening
def test_open_missing_dir(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist; set model.checkpoint_path"):
        ckpt.Checkpoint.open(tmp_path / "nope")


def test_open_missing_or_bad_config_json(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="config.json not found"):
        ckpt.Checkpoint.open(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.Checkpoint.open(tmp_path)


def test_open_valid_and_original(tmp_path):
    c = ckpt.Checkpoint.open(_quantized_dir(tmp_path / "q"))
    assert c.backend == "ap" and c.manifest["bits"] == 3
    orig = tmp_path / "orig"
    orig.mkdir()
    (orig / "config.json").write_text("{}")
    o = ckpt.Checkpoint.open(orig)
    assert o.manifest is None and o.backend == "fp16"
    with pytest.raises(ckpt.CheckpointError, match="no \\*.safetensors weights"):
        ckpt.load_original_state_dict(orig)
    (orig / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="convert them to safetensors"):
        ckpt.load_original_state_dict(orig)


@pytest.mark.parametrize("missing", [ckpt.WEIGHTS, ckpt.CHEATSHEET, ckpt.THRESHOLDS])
def test_open_missing_file(tmp_path, missing):
    path = _quantized_dir(tmp_path / "q")
    (path / missing).unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"lacks {missing}; re-create it"):
        ckpt.Checkpoint.open(path)


def test_open_mixed_needs_bitwidth_map(tmp_path):
    path = _quantized_dir(tmp_path / "q", mixed=True)
    with pytest.raises(ckpt.CheckpointError, match=ckpt.BITWIDTH_MAP):
        ckpt.Checkpoint.open(path)
    ckpt.write_json_atomic(path / ckpt.BITWIDTH_MAP, {"0": 3, "1": 5})
    c = ckpt.Checkpoint.open(path)
    with pytest.raises(ckpt.CheckpointError, match="unsupported bit-widths {1: 5}"):
        c.bitwidth_map()
    ckpt.write_json_atomic(path / ckpt.BITWIDTH_MAP, ["3", "4"])
    with pytest.raises(ckpt.CheckpointError, match="layer index -> 3 or 4"):
        c.bitwidth_map()
    ckpt.write_json_atomic(path / ckpt.BITWIDTH_MAP, {"0": 3, "1": 4})
    assert c.bitwidth_map() == {0: 3, 1: 4}


@pytest.mark.parametrize("change,message", [
    ({"format_version": 2}, "format version 2, this decdec reads version 1; re-create"),
    ({"format_version": None}, "format version None"),
    ({"format": "gptq"}, "is not a decdec-checkpoint manifest"),
])
def test_open_bad_manifest(tmp_path, change, message):
    path = _quantized_dir(tmp_path / "q", **change)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.Checkpoint.open(path)


def test_check_request(tmp_path):
    c = ckpt.Checkpoint.open(_quantized_dir(tmp_path / "q"))
    c.check_request("ap", 3, False)
    with pytest.raises(ckpt.CheckpointError, match="quantized for backend=ap, not backend=lutgemm"):
        c.check_request("lutgemm", 3, False)
    with pytest.raises(ckpt.CheckpointError, match="3-bit weights, precision asks for 4-bit"):
        c.check_request("ap", 4, False)
    with pytest.raises(ckpt.CheckpointError, match="precision=w3 weights"):
        c.check_request("ap", 3, True)


# ---------------------------------------------------------------------------- reference .pt files
def test_load_reference_pt_tensors(tmp_path):
    data = {"model.layers.0.self_attn.q_proj": {"q_residual": torch.arange(8, dtype=torch.int32), "scales": torch.ones(4)}}
    torch.save(data, tmp_path / "cheatsheet.pt")
    got = ckpt.load_reference_pt(tmp_path / "cheatsheet.pt")
    assert torch.equal(got["model.layers.0.self_attn.q_proj"]["q_residual"], torch.arange(8, dtype=torch.int32))


class Payload:
    """Unpickling this runs code (touches ``path``): weights_only must refuse it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_load_reference_pt_refuses_arbitrary_objects(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Payload(marker)}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        ckpt.load_reference_pt(tmp_path / "evil.pt")
    assert not marker.exists()
    with open(tmp_path / "evil.pt", "rb") as f:  # the payload is live: plain unpickling runs it
        pickle.load(f)
    assert marker.exists()
