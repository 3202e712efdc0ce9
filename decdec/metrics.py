"""Per-sample records of a generation run and their summary.

A ``SampleRecord`` is one generated sample (one prompt): how many tokens went in and came out,
its wall-clock latency in seconds and its decode throughput in tokens/s. The first samples of a
run are usually warm-up (compilation, CUDA-graph capture, caches) and are flagged so that the
summary leaves them out.

Sinks (``decdec.sinks``) take plain dicts, so other tasks (perplexity) bring their own record
kind; ``SampleRecord`` is the generation one.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass
class SampleRecord:
    """One generation sample.

    ``latency_s`` is the wall-clock time of the whole sample (prefill + decode) in seconds;
    ``tokens_per_s`` is ``new_tokens / latency_s`` unless the caller measured it otherwise
    (e.g. decode only). ``text`` is the decoded output, when the run keeps it.
    """

    index: int
    prompt_tokens: int
    new_tokens: int
    latency_s: float
    tokens_per_s: float
    warmup: bool
    text: str | None = None

    @classmethod
    def from_timing(
        cls,
        index: int,
        prompt_tokens: int,
        new_tokens: int,
        latency_s: float,
        warmup: bool,
        text: str | None = None,
    ) -> SampleRecord:
        """Build a record whose ``tokens_per_s`` is ``new_tokens / latency_s``."""
        if latency_s <= 0:
            raise ValueError(f"latency_s must be > 0, got {latency_s}")
        return cls(
            index=index,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            latency_s=latency_s,
            tokens_per_s=new_tokens / latency_s,
            warmup=warmup,
            text=text,
        )

    def to_dict(self) -> dict:
        """Plain Python types only (int/float/bool/str/None), ready for YAML and W&B."""
        d = asdict(self)
        d["index"] = int(d["index"])
        d["prompt_tokens"] = int(d["prompt_tokens"])
        d["new_tokens"] = int(d["new_tokens"])
        d["latency_s"] = float(d["latency_s"])
        d["tokens_per_s"] = float(d["tokens_per_s"])
        d["warmup"] = bool(d["warmup"])
        return d


def _stats(name: str, values: list[float]) -> dict:
    return {
        f"mean_{name}": float(statistics.fmean(values)),
        f"median_{name}": float(statistics.median(values)),
        f"min_{name}": float(min(values)),
        f"max_{name}": float(max(values)),
    }


def summarize(records: list[SampleRecord]) -> dict:
    """Summary of a generation run.

    Keys: ``num_samples``, ``num_measured`` (non-warm-up samples), ``mean_/median_/min_/max_``
    of ``tokens_per_s`` (tokens/s) and ``latency_s`` (seconds) over the non-warm-up samples --
    over all samples if every one is warm-up (then ``num_measured`` is 0, which says so) -- and
    ``total_new_tokens`` over all samples. Values are plain ints and floats.
    """
    if not records:
        raise ValueError("summarize() needs at least one SampleRecord, got none")
    measured = [r for r in records if not r.warmup]
    pool = measured or list(records)
    return {
        "num_samples": len(records),
        "num_measured": len(measured),
        **_stats("tokens_per_s", [float(r.tokens_per_s) for r in pool]),
        **_stats("latency_s", [float(r.latency_s) for r in pool]),
        "total_new_tokens": int(sum(int(r.new_tokens) for r in records)),
    }
