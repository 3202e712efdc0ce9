"""The Run object end to end on the tiny model (in-process and via the real CLI), and every bad
input of issue 2 item 8: a clear error naming the fix, before long work, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import TINY, run_cli, run_inprocess
from decdec import checkpoint as ckpt
from decdec import ops
from decdec.reference import chunk_quotas
from decdec.sinks import read_offline_run

N = 3
RECORD_KEYS = {"index": int, "prompt_tokens": int, "new_tokens": int, "latency_s": float, "tokens_per_s": float,
               "warmup": bool}


def _load(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _check_outputs(run_dir: Path, n: int, new_tokens: int) -> tuple[list, dict, dict]:
    samples = _load(run_dir / "samples.yaml")
    assert isinstance(samples, list) and len(samples) == n
    for i, rec in enumerate(samples):
        for k, t in RECORD_KEYS.items():
            assert isinstance(rec[k], t), (k, rec[k])
        assert "text" in rec
        assert rec["index"] == i and rec["new_tokens"] == new_tokens and rec["prompt_tokens"] > 0
        assert rec["latency_s"] > 0 and rec["tokens_per_s"] == pytest.approx(new_tokens / rec["latency_s"])
        assert rec["warmup"] is False
    summary = _load(run_dir / "summary.yaml")
    assert summary["status"] == "ok" and summary["num_samples"] == n
    assert summary["total_new_tokens"] == n * new_tokens
    assert summary["mean_tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in samples) / n)
    env = _load(run_dir / "env.yaml")
    assert env["git_sha"] and env["git_sha"] != "unknown"
    assert env["torch"] == str(torch.__version__)
    assert "cpu" in env["kernel_path"] and env["device"] == "cpu"
    # no temp files of the atomic writers left behind
    assert not [p.name for p in run_dir.glob(".*.tmp")]
    return samples, summary, env


def _check_wandb(run_dir: Path, samples: list, summary: dict, overrides_in_config: dict) -> None:
    run = read_offline_run(run_dir)
    assert run["complete"]
    cfg = run["config"]
    for dotted, value in overrides_in_config.items():
        node = cfg
        for k in dotted.split("."):
            node = node[k]
        assert node == value, dotted
    assert "${" not in json.dumps(cfg)  # resolved, no interpolations
    hist = run["history"]
    assert len(hist) == len(samples)
    for row, rec in zip(hist, samples):
        assert row["latency_s"] == pytest.approx(rec["latency_s"])
        assert row["tokens_per_s"] == pytest.approx(rec["tokens_per_s"])
        assert row["new_tokens"] == rec["new_tokens"]
    for k in ("mean_tokens_per_s", "num_samples", "dec_rows_per_token", "status"):
        assert run["summary"][k] == pytest.approx(summary[k]) if isinstance(summary[k], float) else run["summary"][k] == summary[k]


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("tiny_run") / "job"
    overrides = [*TINY, f"task.num_samples={N}", "logger=[yaml,wandb]"]
    summary = run_inprocess(overrides, run_dir, cache_dir)
    return run_dir, summary


def test_inprocess_run_writes_records_summary_env(tiny_run):
    run_dir, summary = tiny_run
    samples, on_disk, env = _check_outputs(run_dir, N, 4)
    assert set(on_disk) == set(summary)
    for k, v in summary.items():
        assert on_disk[k] == (pytest.approx(v) if isinstance(v, float) else v), k
    assert env["manifest"]["backend"] == "ap" and env["manifest"]["bits"] == 3
    # DEC on with the tiny default (k_chunk 64): 64*64/1024 = 4 rows for in=64, 16 for down (in=256), 2 layers
    assert summary["dec_enabled"] and summary["dec_rows_per_token"] == 2 * (4 + 4 + 4 + 16)


def test_inprocess_run_wandb_offline_matches_yaml(tiny_run):
    run_dir, summary = tiny_run
    samples = _load(run_dir / "samples.yaml")
    _check_wandb(run_dir, samples, summary, {"model.name": "tiny", "task.num_samples": N, "dec.k_chunk.down": 64,
                                             "backend.name": "ap"})


def test_run_records_the_env_knobs(tmp_path, cache_dir, monkeypatch):
    """The DECDEC_* A/B switches of the process are in env.yaml (a mapping), in the summary (one string) and in the
    W&B run's summary, so two runs that differ only in a switch can be told apart; none set: an empty string."""
    from decdec.run import env_knobs, knobs_label

    monkeypatch.setenv("DECDEC_BMMA", "0")
    monkeypatch.setenv("DECDEC_PDL", "0")
    summary = run_inprocess([*TINY, "logger=[yaml,wandb]"], tmp_path / "job", cache_dir)
    _, on_disk, env = _check_outputs(tmp_path / "job", 2, 4)
    assert env["knobs"]["DECDEC_BMMA"] == "0" and env["knobs"]["DECDEC_PDL"] == "0"
    assert {"DECDEC_BMMA=0", "DECDEC_PDL=0"} <= set(summary["knobs"].split()) and on_disk["knobs"] == summary["knobs"]
    assert read_offline_run(tmp_path / "job")["summary"]["knobs"] == summary["knobs"]
    for k in list(env_knobs()):
        monkeypatch.delenv(k)
    assert env_knobs() == {} and knobs_label() == ""
    assert knobs_label({"DECDEC_A": "1", "DECDEC_B": "x"}) == "DECDEC_A=1 DECDEC_B=x"


@pytest.mark.parametrize("overrides,rows", [
    (["backend=lutgemm"], 2 * (4 + 4 + 4 + 16)),
    (["backend=fp16"], 0),
    (["precision=w4"], 2 * (4 + 4 + 4 + 16)),
    (["dec=off"], 0),
    (["dec.k_chunk.down=0", "dec.k_chunk.qkv=1024"], 2 * (64 + 4 + 4)),
    (["attention=kernel"], 2 * (4 + 4 + 4 + 16)),
])
def test_backends_precisions_dec(tmp_path, cache_dir, overrides, rows):
    summary = run_inprocess([*TINY, *overrides], tmp_path / "job", cache_dir)
    _check_outputs(tmp_path / "job", 2, 4)
    assert summary["dec_rows_per_token"] == rows
    assert summary["dec_enabled"] == bool(rows)
    assert summary["attention"] == ("kernel" if "attention=kernel" in overrides else "sdpa")  # auto: SDPA on CPU
    env = _load(tmp_path / "job" / "env.yaml")
    if "backend=fp16" in overrides:
        assert env["manifest"] is None and "dense" in env["kernel_path"]
    else:
        assert env["manifest"]["backend"] == summary["backend"]
        assert env["manifest"]["bits"] == (4 if "precision=w4" in overrides else 3)


def test_mixed_precision_uses_per_bits(tmp_path, cache_dir, tiny_checkpoint):
    path = tiny_checkpoint("ap", "w3.5")
    bw = {int(k): v for k, v in json.loads((path / ckpt.BITWIDTH_MAP).read_text()).items()}
    assert sorted(bw) == [0, 1] and sorted(bw.values()) == [3, 4]
    k3, k4 = 40, 24
    summary = run_inprocess([*TINY, "precision=w3.5", f"dec.per_bits.3.k_chunk.down={k3}",
                             f"dec.per_bits.4.k_chunk.down={k4}"], tmp_path / "job", cache_dir)
    _check_outputs(tmp_path / "job", 2, 4)
    per = {3: {"qkv": 64, "o": 64, "gate_up": 64, "down": k3}, 4: {"qkv": 32, "o": 32, "gate_up": 32, "down": k4}}
    ins = {"qkv": 64, "o": 64, "gate_up": 64, "down": 256}
    want = sum(sum(chunk_quotas(per[bw[layer]][p], ins[p])) for layer in bw for p in ins)
    assert summary["dec_rows_per_token"] == want
    assert summary["precision"] == "w3.5"


def test_mixed_precision_dec_off(tmp_path, cache_dir, tiny_checkpoint):
    tiny_checkpoint("ap", "w3.5")
    summary = run_inprocess([*TINY, "precision=w3.5", "dec=off"], tmp_path / "job", cache_dir)
    assert summary["dec_rows_per_token"] == 0


@pytest.mark.slow
def test_compile_inductor_on_cpu(tmp_path, cache_dir):
    summary = run_inprocess([*TINY, "compile=inductor"], tmp_path / "job", cache_dir)
    samples = _load(tmp_path / "job" / "samples.yaml")
    assert [r["warmup"] for r in samples] == [True, False]  # the compiling sample is flagged
    assert summary["num_measured"] == 1 and summary["compile"] == "inductor"


def test_cli_multirun(tmp_path, cache_dir):
    """The real CLI (`python run.py -m ...`, one process, two jobs): every job writes its own outputs,
    .hydra/ and a complete W&B offline run."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "dec.k_chunk.down=0,16", "model=tiny", "task.num_samples=2", "task.max_new_tokens=3",
                    "task.print_result=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, cache=cache_dir)
    assert proc.stdout.count("Time for inference") == 4 and proc.stdout.count("Average tokens/sec") == 2
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    assert jobs[0].name.startswith("0_dec.k_chunk.down=0,") and jobs[1].name.startswith("1_dec.k_chunk.down=16,")
    rows = []
    for job, down in zip(jobs, (0, 16)):
        samples, summary, env = _check_outputs(job, 2, 3)
        rows.append(summary["dec_rows_per_token"])
        assert f"dec.k_chunk.down={down}" in env["overrides"]
        assert _load(job / ".hydra" / "config.yaml")["dec"]["k_chunk"]["down"] == down
        assert f"dec.k_chunk.down={down}" in _load(job / ".hydra" / "overrides.yaml")
        _check_wandb(job, samples, summary, {"dec.k_chunk.down": down, "model.name": "tiny"})
    # down (in=256) selects floor(k * 256 / 1024) rows per layer; the other three 4 each (k=64, in=64)
    assert rows == [2 * (4 + 4 + 4), 2 * (4 + 4 + 4 + 4)]
    assert not (tmp_path / "outputs").exists()  # everything went where hydra.sweep.dir said


# ---------------------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fails(tmp_path, cache: Path, overrides: list[str], exc=Exception, *fragments: str) -> str:
    run_dir = tmp_path / "job"
    with pytest.raises(exc) as e:
        run_inprocess([*TINY, *overrides], run_dir, cache)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    # nothing half-written: the run dir holds no results
    assert not run_dir.exists() or not any(run_dir.iterdir())
    return msg


@pytest.mark.parametrize("overrides,fragments", [
    (["dec.k_chunk.down=2000"], ["dec.k_chunk.down=2000", "0..1024"]),
    (["dec.k_chunk.qkv=-1"], ["dec.k_chunk.qkv=-1", "0..1024"]),
    (["dec.n_tb=0"], ["dec.n_tb", ">= 1"]),
    (["dec.n_tb_proj.down=0"], ["dec.n_tb_proj.down", ">= 1"]),
    (["precision.bits=5"], ["precision.bits=5", "w3, w4 or w3.5"]),
    (["device=cuda"], ["device=cuda", "device=cpu"]),
    (["device=tpu"], ["device=", "cpu"]),
    (["compile=cudagraphs"], ["cudagraphs", "compile=inductor"]),
    (["compile=reduce-overhead"], ["compile=reduce-overhead", "CUDA GPU", "compile=inductor"]),
    (["compile.mode=fast"], ["compile.mode='fast'", "inductor"]),
    (["attention=flash"], ["attention='flash'", "sdpa", "kernel"]),
    (["backend.name=int8"], ["backend='int8'", "lutgemm"]),
    (["precision.dtype=fp8"], ["precision.dtype='fp8'", "bfloat16"]),
    (["precision=w3.5", "~dec.per_bits.4"], ["dec.per_bits gives [3]", "[3, 4]", "dec.per_bits.3.k_chunk"]),
    (["precision=w3.5", "~dec.per_bits.3", "~dec.per_bits.4"], ["dec.per_bits gives []", "dec.per_bits.3.k_chunk"]),
    (["precision=w3.5", "dec.per_bits.4.k_chunk.o=4096"], ["dec.per_bits.4.k_chunk.o=4096", "0..1024"]),
    (["precision=w3.5", "backend=fp16"], ["backend=fp16", "backend=ap"]),
    (["model=llama3"], ["model=llama3", "model.checkpoint_path="]),
    (["model=phi3"], ["model=phi3", "model.checkpoint_path="]),
])
def test_config_errors_before_any_work(tmp_path, overrides, fragments):
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    _fails(tmp_path, empty_cache, overrides, ValueError, *fragments)
    assert not any(empty_cache.iterdir())  # nothing prepared, downloaded or converted


def test_cuda_backend_without_kernels(tmp_path, monkeypatch):
    """Reach the kernel check as if a GPU were there: ap on cuda without decdec._C says how to build."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    msg = _fails(tmp_path, tmp_path, ["device=cuda"], ValueError, "backend=ap", "build the CUDA kernels")
    assert "pip install -e ." in msg or "build_kernels" in msg
    with pytest.raises(ops.KernelsUnavailable, match="build the CUDA kernels"):
        ops.load_cuda_kernels()


def test_missing_checkpoint_dir(tmp_path, cache_dir):
    _fails(tmp_path, cache_dir, [f"model.checkpoint_path={tmp_path / 'nope'}"], ckpt.CheckpointError,
           "does not exist", "model.checkpoint_path")


@pytest.mark.parametrize("drop", [ckpt.CHEATSHEET, ckpt.THRESHOLDS, ckpt.WEIGHTS])
def test_checkpoint_missing_file(tmp_path, cache_dir, tiny_checkpoint, drop):
    bad = _copy(tiny_checkpoint("ap", "w3"), tmp_path / "ckpt")
    (bad / drop).unlink()
    _fails(tmp_path, cache_dir, [f"model.checkpoint_path={bad}"], ckpt.CheckpointError, drop, "prepare_checkpoint")


def test_checkpoint_missing_manifest(tmp_path, cache_dir, tiny_checkpoint):
    bad = _copy(tiny_checkpoint("ap", "w3"), tmp_path / "ckpt")
    (bad / ckpt.MANIFEST).unlink()
    _fails(tmp_path, cache_dir, [f"model.checkpoint_path={bad}"], ckpt.CheckpointError,
           "original (dense) checkpoint", "prepare_checkpoint.py --backend ap", "backend=fp16")


def test_checkpoint_missing_bitwidth_map(tmp_path, cache_dir, tiny_checkpoint):
    bad = _copy(tiny_checkpoint("ap", "w3.5"), tmp_path / "ckpt")
    (bad / ckpt.BITWIDTH_MAP).unlink()
    _fails(tmp_path, cache_dir, ["precision=w3.5", f"model.checkpoint_path={bad}"], ckpt.CheckpointError,
           ckpt.BITWIDTH_MAP, "prepare_checkpoint")


def test_checkpoint_unknown_format_version(tmp_path, cache_dir, tiny_checkpoint):
    bad = _copy(tiny_checkpoint("ap", "w3"), tmp_path / "ckpt")
    m = json.loads((bad / ckpt.MANIFEST).read_text())
    m["format_version"] = 99
    (bad / ckpt.MANIFEST).write_text(json.dumps(m))
    _fails(tmp_path, cache_dir, [f"model.checkpoint_path={bad}"], ckpt.CheckpointError,
           "format version 99", f"version {ckpt.FORMAT_VERSION}", "re-create")


def test_checkpoint_for_another_model(tmp_path, cache_dir, tiny_checkpoint):
    path = tiny_checkpoint("ap", "w3")
    msg = _fails(tmp_path, cache_dir, ["model=llama3", f"model.checkpoint_path={path}"], ckpt.CheckpointError,
                 "not a llama3 checkpoint", "dim: model=llama3 expects 4096, checkpoint has 64", "pick the matching model=")
    assert "n_layers" in msg and "vocab_size" in msg


@pytest.mark.parametrize("request_,fragments", [
    (["backend=lutgemm"], ["quantized for backend=ap", "not backend=lutgemm"]),
    (["precision=w4"], ["3-bit", "4-bit"]),
    (["precision=w3.5"], ["precision=w3", "choose that precision"]),
    (["backend=fp16"], ["backend=fp16", "original HF directory"]),
])
def test_checkpoint_does_not_serve_request(tmp_path, cache_dir, tiny_checkpoint, request_, fragments):
    path = tiny_checkpoint("ap", "w3")
    _fails(tmp_path, cache_dir, [*request_, f"model.checkpoint_path={path}"], ckpt.CheckpointError, *fragments)


def test_checkpoint_tensor_shape_mismatch(tmp_path, cache_dir, tiny_checkpoint):
    bad = _copy(tiny_checkpoint("ap", "w3"), tmp_path / "ckpt")
    sd = load_file(bad / ckpt.WEIGHTS)
    name = "layers.1.feed_forward.w2.lut"
    assert name in sd, sorted(sd)[:8]
    sd[name] = sd[name][:-8].clone()  # 8 output rows short
    save_file(sd, bad / ckpt.WEIGHTS)
    _fails(tmp_path, cache_dir, [f"model.checkpoint_path={bad}"], ckpt.CheckpointError,
           "mismatches", f"{name}: checkpoint (56, 8) vs model (64, 8)", "re-create the checkpoint")


def test_checkpoint_tensor_dtype_mismatch(tmp_path, cache_dir, tiny_checkpoint):
    bad = _copy(tiny_checkpoint("ap", "w3"), tmp_path / "ckpt")
    sd = load_file(bad / ckpt.WEIGHTS)
    name = "layers.0.attention.wqkv.qweight"
    sd[name] = sd[name].to(torch.int64)  # packed words must stay int32
    save_file(sd, bad / ckpt.WEIGHTS)
    _fails(tmp_path, cache_dir, [f"model.checkpoint_path={bad}"], ckpt.CheckpointError,
           "mismatches", f"{name}: checkpoint torch.int64 vs model torch.int32", "re-create the checkpoint")


def test_checkpoint_residual_shape_mismatch(tmp_path, cache_dir, tiny_checkpoint):
    bad = _copy(tiny_checkpoint("ap", "w3"), tmp_path / "ckpt")
    sd = load_file(bad / ckpt.CHEATSHEET)
    name = "layers.0.attention.wo.q_residual"
    sd[name] = sd[name][:, :-1].clone()
    save_file(sd, bad / ckpt.CHEATSHEET)
    _fails(tmp_path, cache_dir, [f"model.checkpoint_path={bad}"], ValueError, "q_residual must be")
