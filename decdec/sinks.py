"""Where a run's per-sample records and summary go: YAML files in the run dir, and W&B.

Every sink gets the same calls: ``start(config, info)`` once, ``log(record, step)`` once per
sample (records are plain dicts, so any task's record kind fits), ``finish(summary)`` once.
Compose several with ``make_sinks(["yaml", "wandb"], ...)``.

W&B runs offline by default (no network, no login): each run is written to
``<run_dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``. Upload later from a machine with
network access and a W&B login::

    wandb sync <run_dir>/wandb/offline-run-*

or every job of a sweep at once::

    wandb sync outputs/multirun/<date>/<time>/*/wandb/offline-run-*

``read_offline_run`` reads such a run back here, without network (tests and
``scripts/report.py`` use it).
"""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import tempfile
import time
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

SINK_NAMES = ("yaml", "wandb")


@runtime_checkable
class Sink(Protocol):
    def start(self, config: dict, info: dict) -> None:
        """``config``: the resolved config as a plain dict; ``info``: run ``name``, ``group``,
        ``tags``, ``run_dir``."""

    def log(self, record: dict, step: int) -> None:
        """One record (one sample); ``step`` is its index, increasing."""

    def finish(self, summary: dict) -> None:
        """Summary of the run (``decdec.metrics.summarize`` for generation)."""


def _plain(value: Any, where: str = "record") -> Any:
    """``value`` as plain YAML/JSON types; numpy/torch scalars become Python numbers."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy / torch 0-d scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return _plain(item(), where)
    raise TypeError(f"{where}: cannot write a {type(value).__name__} ({value!r}) to a sink")


def _atomic_write(path: Path, dump) -> None:
    """Write a file so that a reader never sees it half-written: ``dump(f)`` writes a temp file in the
    same directory (same filesystem), fsync, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            dump(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class YamlSink:
    """``samples.yaml`` (a YAML list, one mapping per record) and ``summary.yaml`` in the run dir.

    The records file is rewritten atomically after every record, so an interrupted run leaves
    a valid list of the samples done so far. O(n^2) bytes written over a run, which is nothing
    for the hundreds of samples a run has.
    """

    def __init__(
        self,
        run_dir: Path,
        records_file: str = "samples.yaml",
        summary_file: str = "summary.yaml",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.records_path = self.run_dir / records_file
        self.summary_path = self.run_dir / summary_file
        self.records: list[dict] = []

    def start(self, config: dict, info: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.records = []
        _atomic_write_yaml(self.records_path, self.records)

    def log(self, record: dict, step: int) -> None:
        self.records.append(_plain(record))
        _atomic_write_yaml(self.records_path, self.records)

    def finish(self, summary: dict) -> None:
        _atomic_write_yaml(self.summary_path, _plain(summary, "summary"))


class WandbSink:
    """One W&B run per ``start``/``finish``; offline by default.

    Several runs per process work (a Hydra multirun runs its jobs in one process): every
    ``start`` creates a new run (``reinit="create_new"``) and never touches the global
    ``wandb.run``. In offline mode nothing contacts the network or asks for a login.
    ``name``/``group``/``tags``/``run_dir`` given here win over those in ``start``'s ``info``.
    After ``start``, ``run_path`` is the offline run directory
    (``<run_dir>/wandb/offline-run-*``; see the module docstring for ``wandb sync``), the local
    ``run-*`` directory online, None when ``mode="disabled"``.
    """

    def __init__(
        self,
        project: str,
        mode: str = "offline",
        run_dir: Path | None = None,
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        job_type: str | None = None,
        flush_timeout_s: float = 30.0,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb mode must be offline, online or disabled, got {mode!r}")
        self.project = project
        self.mode = mode
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.entity = entity
        self.name = name
        self.group = group
        self.tags = tuple(tags)
        self.job_type = job_type
        self.flush_timeout_s = flush_timeout_s
        self.run = None
        self.run_path: Path | None = None

    def start(self, config: dict, info: dict) -> None:
        import wandb  # imported here: importing decdec must stay cheap and side-effect free

        if self.run is not None:
            raise RuntimeError("WandbSink.start() called twice; call finish() first")
        run_dir = self.run_dir or info.get("run_dir")
        if run_dir is None:
            raise ValueError("WandbSink needs a run_dir (argument or info['run_dir'])")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            silent=True,
            console="off",  # leave stdout/stderr alone (pytest, Hydra's job logging)
            x_disable_stats=True,  # no system-metrics sampler thread
            x_disable_machine_info=True,
            disable_git=True,  # env.yaml records the git SHA
            save_code=False,
        )
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            dir=str(run_dir),
            config=_plain(config, "config"),
            name=self.name or info.get("name"),
            group=self.group or info.get("group"),
            tags=list(self.tags or info.get("tags") or ()),
            job_type=self.job_type,
            reinit="create_new",
            settings=settings,
        )
        # disabled mode writes nothing; its settings still name a (nonexistent) directory
        self.run_path = None if self.mode == "disabled" else Path(self.run.settings.sync_dir)

    def log(self, record: dict, step: int) -> None:
        if self.run is None:
            raise RuntimeError("WandbSink.log() before start()")
        self.run.log(_plain(record), step=step)

    def finish(self, summary: dict) -> None:
        if self.run is None:
            raise RuntimeError("WandbSink.finish() before start()")
        self.run.summary.update(_plain(summary, "summary"))
        self.run.finish()
        self.run = None
        if self.mode == "offline":
            self._wait_written()

    def _wait_written(self) -> None:
        # wandb 0.31's run.finish() can return before wandb-core has flushed the tail of the
        # offline .wandb file (observed: the last 32 KiB block missing for ~0.1 s). Wait until
        # the file holds the exit record, so that whoever reads the run next (a report, the
        # next multirun job, a test) sees all of it.
        assert self.run_path is not None
        deadline = time.monotonic() + self.flush_timeout_s
        while time.monotonic() < deadline:
            files = list(self.run_path.glob("*.wandb"))
            if len(files) == 1 and read_offline_run(files[0])["complete"]:
                return
            time.sleep(0.02)
        warnings.warn(
            f"W&B offline run {self.run_path} is not completely written "
            f"{self.flush_timeout_s} s after run.finish(); see its logs/debug-internal.log",
            RuntimeWarning,
            stacklevel=3,
        )


def make_sinks(
    names: Sequence[str],
    *,
    run_dir: Path,
    wandb_kwargs: dict | None = None,
    yaml_kwargs: dict | None = None,
) -> list[Sink]:
    """Sinks named in ``names`` (from ``SINK_NAMES``), in that order.

    ``wandb_kwargs`` go to ``WandbSink`` (``project`` at least; ``run_dir`` defaults to
    ``run_dir``); ``yaml_kwargs`` to ``YamlSink`` (file names).
    """
    unknown = [n for n in names if n not in SINK_NAMES]
    if unknown:
        raise ValueError(f"unknown sink(s) {unknown}; valid sinks are {list(SINK_NAMES)}")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise ValueError(f"sink(s) {dupes} named more than once in {list(names)}")
    sinks: list[Sink] = []
    for n in names:
        if n == "yaml":
            sinks.append(YamlSink(Path(run_dir), **(yaml_kwargs or {})))
        else:
            kwargs = {"run_dir": Path(run_dir), **(wandb_kwargs or {})}
            if "project" not in kwargs:
                raise ValueError("the wandb sink needs wandb_kwargs['project']")
            sinks.append(WandbSink(**kwargs))
    return sinks


# --- reading offline runs back ------------------------------------------------------------
#
# wandb >= 0.2x no longer ships ``wandb.sdk.internal.datastore`` (its writer moved to the Go
# ``wandb-core``), so the reader of the ``.wandb`` file is here. The format is unchanged: a
# 7-byte file header ``<4sHB`` = (b":W&B", 0xBEE1, version 0), then LevelDB-log framing in
# 32 KiB blocks: each chunk is ``<IHB`` = (crc32 of type byte + data, length, type) + data,
# type FULL/FIRST/MIDDLE/LAST; a block tail shorter than a chunk header is zero padding. Each
# assembled payload is a ``wandb.proto.wandb_internal_pb2.Record``.

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _read_payloads(data: bytes, path: Path) -> tuple[list[bytes], bool]:
    """Whole record payloads of a ``.wandb`` file's bytes, and whether the framing ended
    cleanly (False: a truncated tail, i.e. the writer has not flushed or was killed)."""
    if len(data) < _HEADER.size:
        raise ValueError(f"{path}: too short for a .wandb file ({len(data)} bytes)")
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a .wandb file (header {ident!r}, {magic:#x}, v{version})")
    payloads: list[bytes] = []
    pending: bytearray | None = None
    clean = True
    off = _HEADER.size
    while off < len(data):
        left = _BLOCK - off % _BLOCK
        if left < _CHUNK.size:  # block padding
            off += left
            continue
        if off + _CHUNK.size > len(data):
            clean = False  # truncated tail (run still writing or killed): stop there
            break
        crc, length, kind = _CHUNK.unpack_from(data, off)
        if crc == 0 and length == 0 and kind == 0:
            off += left  # zero-filled remainder of a block
            continue
        body = data[off + _CHUNK.size : off + _CHUNK.size + length]
        if len(body) < length:
            clean = False
            break
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {off}")
        off += _CHUNK.size + length
        if kind == _FULL:
            payloads.append(body)
        elif kind == _FIRST:
            pending = bytearray(body)
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += body
            if kind == _LAST:
                payloads.append(bytes(pending))
                pending = None
        else:
            raise ValueError(f"{path}: bad chunk type {kind} at byte {off - length - _CHUNK.size}")
    return payloads, clean and pending is None


def _item_path(item) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _set_path(d: dict, path: list[str], value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _del_path(d: dict, path: list[str]) -> None:
    for k in path[:-1]:
        d = d.get(k, {})
    d.pop(path[-1], None)


def _find_wandb_file(path: Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(path.glob("*.wandb"))
        if len(files) == 1:
            return files[0]
        runs = sorted(path.glob("wandb/offline-run-*/*.wandb"))  # a Hydra run dir
        if len(files) == 0 and len(runs) == 1:
            return runs[0]
        raise ValueError(
            f"{path}: expected exactly one run, found {[str(p) for p in files or runs]}"
        )
    raise FileNotFoundError(f"{path}: no such offline run (file or directory)")


def read_offline_run(path: Path) -> dict:
    """Read an offline W&B run without network.

    ``path``: the offline run directory (``.../wandb/offline-run-*``, i.e. ``WandbSink.run_path``),
    its ``run-*.wandb`` file, or a run dir holding exactly one offline run.
    Returns ``{"config": {...}, "history": [row, ...], "summary": {...}, "run": {...}}``:
    config without W&B's internal ``_wandb`` key; one history row per ``log`` call, in order,
    with W&B's ``_step``/``_runtime``/``_timestamp`` kept; the final summary (updates applied
    in order, ``_wandb`` dropped); ``run``: ``id``, ``project``, ``name``, ``group``, ``tags``,
    ``job_type``; ``complete``: the run finished (its exit record is there) and the file ends
    cleanly -- False for a crashed run or one still being written, whose records so far are
    returned.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    file = _find_wandb_file(path)
    config: dict = {}
    history: list[dict] = []
    summary: dict = {}
    run: dict = {}

    def apply_config(cfg) -> None:
        for item in cfg.update:
            _set_path(config, _item_path(item), json.loads(item.value_json))
        for item in cfg.remove:
            _del_path(config, _item_path(item))

    payloads, clean = _read_payloads(file.read_bytes(), file)
    exited = False
    for payload in payloads:
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "exit":
            exited = True
        elif kind == "run":
            r = rec.run
            run = {
                "id": r.run_id,
                "project": r.project,
                "name": r.display_name or None,
                "group": r.run_group or None,
                "tags": list(r.tags),
                "job_type": r.job_type or None,
            }
            apply_config(r.config)
        elif kind == "config":
            apply_config(rec.config)
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _set_path(row, _item_path(item), json.loads(item.value_json))
            history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _set_path(summary, _item_path(item), json.loads(item.value_json))
            for item in rec.summary.remove:
                _del_path(summary, _item_path(item))
    config.pop("_wandb", None)
    summary.pop("_wandb", None)
    return {
        "config": config,
        "history": history,
        "summary": summary,
        "run": run,
        "complete": exited and clean,
    }


def print_summary_table(summary: dict, title: str) -> None:
    """Print ``summary`` as a two-column rich table (floats to 4 significant digits)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, float) and math.isfinite(value):
            text = f"{value:.4g}"
        else:
            text = str(value)
        table.add_row(str(key), text)
    Console().print(table)


def _atomic_write_yaml(path: Path, data: Any) -> None:
    _atomic_write(path, lambda f: yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True))


def write_yaml(path: Path, data: Any, what: str = "data") -> None:
    """Write plain data (numbers, strings, lists, dicts) to ``path`` atomically."""
    _atomic_write_yaml(Path(path), _plain(data, what))


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` (dicts with the first row's keys) to ``path`` as CSV atomically; returns the path."""
    if not rows:
        raise ValueError(f"write_csv: no rows to write to {path}")
    path = Path(path)

    def dump(f) -> None:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    _atomic_write(path, dump)
    return path


def write_stamped_csv(out_dir: Path, prefix: str, rows: Sequence[dict]) -> Path:
    """``write_csv`` to ``out_dir/<prefix>-<YYYYmmdd-HHMMSS>.csv`` (the directory made if missing): a benchmark's
    result file that never overwrites an earlier run's. Returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_csv(out_dir / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.csv", rows)
