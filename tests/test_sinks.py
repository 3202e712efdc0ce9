"""Records, summary and sinks: YAML files that survive interruption; W&B offline runs read back."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from decdec.metrics import SampleRecord, summarize
from decdec.sinks import (
    Sink,
    WandbSink,
    YamlSink,
    make_sinks,
    print_summary_table,
    read_offline_run,
)


def _records() -> list[SampleRecord]:
    # two warm-up samples with absurd numbers that must not leak into the stats
    lat = [9.0, 8.0, 0.5, 0.25, 1.0, 0.2]
    new = [10, 10, 32, 32, 32, 16]
    return [
        SampleRecord.from_timing(i, prompt_tokens=5 + i, new_tokens=n, latency_s=t, warmup=i < 2)
        for i, (t, n) in enumerate(zip(lat, new))
    ]


CONFIG = {
    "model": {"name": "smollm2-135m", "hidden": 576},
    "dec": {"k_chunk": {"qkv": 8, "o": 8, "gate_up": 8, "down": 16}, "n_tb": 4},
    "backend": "ap",
    "prompts": ["a", "b"],
}


def test_summarize_excludes_warmup_and_takes_median():
    recs = _records()
    s = summarize(recs)
    # measured: tokens/s = 64, 128, 32, 80 -> median (64+80)/2 = 72
    assert s["num_samples"] == 6 and s["num_measured"] == 4
    assert s["median_tokens_per_s"] == pytest.approx(72.0)
    assert s["mean_tokens_per_s"] == pytest.approx((64 + 128 + 32 + 80) / 4)
    assert s["min_tokens_per_s"] == pytest.approx(32.0)
    assert s["max_tokens_per_s"] == pytest.approx(128.0)
    assert s["median_latency_s"] == pytest.approx((0.25 + 0.5) / 2)
    assert s["min_latency_s"] == pytest.approx(0.2) and s["max_latency_s"] == pytest.approx(1.0)
    assert s["mean_latency_s"] == pytest.approx((0.5 + 0.25 + 1.0 + 0.2) / 4)
    assert s["total_new_tokens"] == sum(r.new_tokens for r in recs)
    assert all(type(v) in (int, float) for v in s.values())
    # odd count: the middle value
    assert summarize(recs[:5])["median_tokens_per_s"] == pytest.approx(64.0)


def test_summarize_all_warmup_and_empty():
    recs = [r for r in _records() if r.warmup]
    s = summarize(recs)
    assert s["num_measured"] == 0 and s["num_samples"] == 2
    assert s["median_latency_s"] == pytest.approx(8.5)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        SampleRecord.from_timing(0, 1, 1, 0.0, False)


def test_sample_record_to_dict_is_plain():
    d = SampleRecord(3, 7, 16, 0.5, 32.0, False, text="hi").to_dict()
    assert d == {
        "index": 3,
        "prompt_tokens": 7,
        "new_tokens": 16,
        "latency_s": 0.5,
        "tokens_per_s": 32.0,
        "warmup": False,
        "text": "hi",
    }


def test_yaml_sink_valid_after_every_record(tmp_path: Path):
    sink = YamlSink(tmp_path / "run")
    assert isinstance(sink, Sink)
    sink.start(CONFIG, {"name": "x", "run_dir": tmp_path / "run"})
    assert yaml.safe_load(sink.records_path.read_text()) == []
    recs = _records()
    for i, r in enumerate(recs):
        sink.log(r.to_dict(), step=r.index)
        on_disk = yaml.safe_load(sink.records_path.read_text())
        assert on_disk == [x.to_dict() for x in recs[: i + 1]]
    summary = summarize(recs)
    sink.finish(summary)
    assert yaml.safe_load(sink.summary_path.read_text()) == summary
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["samples.yaml", "summary.yaml"]


def test_yaml_sink_interrupted_leaves_valid_files(tmp_path: Path, monkeypatch):
    import decdec.sinks as sinks_mod

    sink = YamlSink(tmp_path, records_file="r.yaml", summary_file="s.yaml")
    sink.start({}, {})
    recs = _records()
    for r in recs[:3]:
        sink.log(r.to_dict(), step=r.index)

    # The 4th write dies half-way through dumping: the file on disk must be the old list.
    real_dump = yaml.safe_dump

    def dying_dump(data, stream, **kw):
        stream.write("- index: 3\n  prompt_tok")  # half a record
        stream.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(sinks_mod.yaml, "safe_dump", dying_dump)
    with pytest.raises(KeyboardInterrupt):
        sink.log(recs[3].to_dict(), step=3)
    with pytest.raises(KeyboardInterrupt):
        sink.finish(summarize(recs))
    monkeypatch.setattr(sinks_mod.yaml, "safe_dump", real_dump)

    assert yaml.safe_load((tmp_path / "r.yaml").read_text()) == [r.to_dict() for r in recs[:3]]
    assert not (tmp_path / "s.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_yaml_sink_converts_scalars_and_rejects_objects(tmp_path: Path):
    np = pytest.importorskip("numpy")
    sink = YamlSink(tmp_path)
    sink.start({}, {})
    sink.log({"ppl": np.float32(9.5), "n": np.int64(3), "nested": {"t": (1, 2)}}, step=0)
    assert yaml.safe_load(sink.records_path.read_text()) == [
        {"ppl": 9.5, "n": 3, "nested": {"t": [1, 2]}}
    ]
    with pytest.raises(TypeError, match="record.bad"):
        sink.log({"bad": object()}, step=1)


def _run_wandb(run_dir: Path, name: str, records: list[SampleRecord], config: dict):
    sink = WandbSink(project="decdec-test", run_dir=run_dir, job_type="generate")
    assert isinstance(sink, Sink)
    sink.start(config, {"name": name, "group": "g1", "tags": ["t1", "t2"], "run_dir": run_dir})
    assert sink.run_path is not None and sink.run_path.is_dir()
    assert sink.run_path.parent == run_dir / "wandb"
    assert sink.run_path.name.startswith("offline-run-")
    for r in records:
        sink.log(r.to_dict(), step=r.index)
    summary = summarize(records)
    sink.finish(summary)
    return sink, summary


@pytest.fixture(scope="module")
def wandb_runs(tmp_path_factory):
    """Two offline runs, one after the other in this process (as in a Hydra multirun)."""
    base = tmp_path_factory.mktemp("wandb")
    recs = _records()[:3]
    a = _run_wandb(base / "job0", "job0", recs, CONFIG)
    cfg_b = {**CONFIG, "backend": "lutgemm"}
    b = _run_wandb(base / "job1", "job1", _records()[3:], cfg_b)
    return base, recs, a, b


def test_wandb_offline_round_trip(wandb_runs):
    base, recs, (sink, summary), _ = wandb_runs
    run = read_offline_run(sink.run_path)
    assert run["config"] == CONFIG
    assert run["run"]["name"] == "job0" and run["run"]["group"] == "g1"
    assert run["run"]["tags"] == ["t1", "t2"] and run["run"]["job_type"] == "generate"

    hist = run["history"]
    assert len(hist) == 3
    for row, r in zip(hist, recs):
        assert row["_step"] == r.index
        assert row["latency_s"] == pytest.approx(r.latency_s)
        assert row["tokens_per_s"] == pytest.approx(r.tokens_per_s)
        assert row["warmup"] is r.warmup and row["new_tokens"] == r.new_tokens

    for k, v in summary.items():
        assert run["summary"][k] == pytest.approx(v), k
    # the .wandb file and the Hydra run dir work as paths too
    assert read_offline_run(next(sink.run_path.glob("*.wandb")))["summary"] == run["summary"]
    assert read_offline_run(base / "job0")["config"] == CONFIG


def test_wandb_two_runs_in_one_process(wandb_runs):
    _, _, (sa, _), (sb, summary_b) = wandb_runs
    assert sa.run_path != sb.run_path
    ra, rb = read_offline_run(sa.run_path), read_offline_run(sb.run_path)
    assert ra["run"]["id"] != rb["run"]["id"]
    assert rb["config"]["backend"] == "lutgemm" and ra["config"]["backend"] == "ap"
    assert [row["_step"] for row in rb["history"]] == [3, 4, 5]
    assert rb["summary"]["num_samples"] == 3 and ra["summary"]["num_samples"] == 3
    assert rb["summary"]["median_tokens_per_s"] == pytest.approx(summary_b["median_tokens_per_s"])


def test_read_offline_run_large_records_span_blocks(tmp_path: Path):
    # > 32 KiB per record forces the FIRST/MIDDLE/LAST chunk framing and block padding.
    sink = WandbSink(project="decdec-test", run_dir=tmp_path)
    sink.start({"x": 1}, {"name": "big"})
    texts = ["%d" % i * 20000 for i in range(4)]
    for i, t in enumerate(texts):
        sink.log({"text": t, "latency_s": float(i)}, step=i)
    sink.finish({"done": True})
    run = read_offline_run(sink.run_path)
    assert [row["text"] for row in run["history"]] == texts
    assert run["summary"]["done"] is True


def test_read_offline_run_of_interrupted_run(wandb_runs, tmp_path: Path):
    # A run killed mid-write leaves a .wandb file cut anywhere: what was flushed still reads.
    _, recs, (sink, _), _ = wandb_runs
    data = next(sink.run_path.glob("*.wandb")).read_bytes()
    full = read_offline_run(sink.run_path)
    assert full["complete"]
    cut_sizes = [len(data) - 3, len(data) // 2, 200]
    n_rows = []
    for i, size in enumerate(cut_sizes):
        f = tmp_path / f"run-cut{i}.wandb"
        f.write_bytes(data[:size])
        part = read_offline_run(f)
        assert not part["complete"]
        assert part["history"] == full["history"][: len(part["history"])]
        n_rows.append(len(part["history"]))
    assert n_rows == sorted(n_rows, reverse=True) and n_rows[-1] == 0
    assert read_offline_run(tmp_path / "run-cut1.wandb")["config"] == CONFIG  # run record is early


def test_read_offline_run_rejects_garbage(tmp_path: Path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a wandb file at all")
    with pytest.raises(ValueError, match="not a .wandb file"):
        read_offline_run(bad)
    with pytest.raises(FileNotFoundError):
        read_offline_run(tmp_path / "missing")



def test_read_offline_run_detects_corruption(wandb_runs, tmp_path: Path):
    _, _, (sink, _), _ = wandb_runs
    data = bytearray(next(sink.run_path.glob("*.wandb")).read_bytes())
    data[40] ^= 0xFF  # inside the first record's payload
    f = tmp_path / "run-bad.wandb"
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_offline_run(f)


def test_wandb_disabled_writes_nothing(tmp_path: Path):
    sink = WandbSink(project="p", mode="disabled", run_dir=tmp_path / "d")
    sink.start({"a": 1}, {"name": "n"})
    sink.log({"latency_s": 1.0}, step=0)
    sink.finish({"num_samples": 1})
    assert sink.run_path is None
    assert not (tmp_path / "d" / "wandb").exists()
    with pytest.raises(ValueError, match="offline, online or disabled"):
        WandbSink(project="p", mode="dryrun")


def test_make_sinks(tmp_path: Path):
    sinks = make_sinks(["yaml", "wandb"], run_dir=tmp_path, wandb_kwargs={"project": "p"})
    assert isinstance(sinks[0], YamlSink) and isinstance(sinks[1], WandbSink)
    assert sinks[1].run_dir == tmp_path and sinks[1].mode == "offline"
    assert make_sinks([], run_dir=tmp_path, wandb_kwargs={}) == []
    with pytest.raises(ValueError, match=r"'yaml', 'wandb'") as e:
        make_sinks(["yaml", "tensorboard"], run_dir=tmp_path, wandb_kwargs={})
    assert "tensorboard" in str(e.value)
    with pytest.raises(ValueError, match="more than once"):
        make_sinks(["yaml", "yaml"], run_dir=tmp_path, wandb_kwargs={})
    with pytest.raises(ValueError, match="project"):
        make_sinks(["wandb"], run_dir=tmp_path, wandb_kwargs={})


def test_print_summary_table(capsys):
    print_summary_table({"mean_tokens_per_s": 123.456789, "num_samples": 4, "x": math.nan}, "gen")
    out = capsys.readouterr().out
    assert "gen" in out and "123.5" in out and "num_samples" in out and "nan" in out


def test_write_csv_round_trips_and_leaves_nothing_half_written(tmp_path):
    import csv as csv_mod

    from decdec.sinks import write_csv

    rows = [{"shape": "4096x4096", "us": 5.9}, {"shape": "4096x28672", "us": 23.7}]
    path = write_csv(tmp_path / "t.csv", rows)
    with open(path, newline="") as f:
        assert list(csv_mod.DictReader(f)) == [{"shape": "4096x4096", "us": "5.9"}, {"shape": "4096x28672", "us": "23.7"}]
    with pytest.raises(ValueError, match="no rows"):
        write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError):  # a key the header lacks: the writer fails mid-file
        write_csv(tmp_path / "bad.csv", [{"a": 1}, {"b": 2}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]  # no partial file, no temp file


def test_write_stamped_csv_makes_the_dir_and_a_timestamped_file(tmp_path):
    from decdec.sinks import write_stamped_csv

    path = write_stamped_csv(tmp_path / "new" / "dir", "bench", [{"a": 1, "b": 2.5}, {"a": 3, "b": 4.0}])
    assert path.parent == tmp_path / "new" / "dir" and path.suffix == ".csv"
    assert path.name.startswith("bench-") and len(path.stem) == len("bench-20261127-120000")
    assert path.read_text().splitlines() == ["a,b", "1,2.5", "3,4.0"]
    with pytest.raises(ValueError, match="no rows"):
        write_stamped_csv(tmp_path, "empty", [])
