"""The DecDEC autotuner: how many residual channels can I afford for a given slowdown?

1. Time, on the device this runs on, every projection's decode GEMV alone and fused with DEC
   for each ``n_tb`` x ``k_chunk`` (on CUDA: calls replayed from a CUDA graph and timed with CUDA
   events, as compile=cudagraphs decodes; the calls cycle over all layers' weights so the L2 cache
   does not flatter). In chain mode each call is the projection as the decode step runs it (the add + norm and
   GLU ops on qkv and gate_up), after the kernel that produces its input there (``step_call``): DEC waits for that
   kernel to end, while the GEMV alone starts during its tail.
2. Time one whole decode step with DEC off; a decoder layer's budget is
   ``target_slowdown x step_time / n_layers``. Where the qkv and gate_up GEMVs perform the residual add and
   RMSNorm themselves (``ap_gemv_addnorm``), time a second step without that fusion: the difference per fused
   projection is what a DEC choice pays for each fusion it undoes (``fusions_lost``), which the projections
   timed alone do not see.
3. Choose one ``k_chunk`` per projection maximising the residual rows fetched per layer while the summed extra time
   of the four projections plus the fusions lost stays within the budget (at least one row on every projection when
   that fits), each projection at its own fastest ``n_tb`` (``task.per_projection_n_tb``, written as
   ``dec.n_tb_proj``) or one ``n_tb`` for all four (the best).
4. Verify end to end: decode tokens/s with the choice vs ``dec=off``. A choice measured over the target
   (the projections timed alone under-count what DEC costs inside a decode step) shrinks the budget by
   target / measured (``next_budget``) and is chosen and verified again, up to ``task.verify_rounds``
   times; if none fits, DEC stays off (k_chunk = 0 everywhere: the dec=off model itself, so its slowdown is 0 by
   definition and it is not measured again). Each choice is judged against the median of every dec=off reading of the
   tune (``reference_rate``: ``task.dec_off_readings`` before the first choice, one more after each verified choice).
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from decdec import timing
from decdec.config import PROJECTIONS
from decdec.reference import chunk_quotas


@dataclass
class Timing:
    proj: str
    bits: int
    n_tb: int
    k_chunk: int
    seconds: float  # median time of one call


def step_call(model, proj: str, layer: int, xs) -> Callable[[int], torch.Tensor]:
    """``f(i)``: projection ``proj`` of ``layer`` as a decode step runs it, after the kernel that produces its input
    there, which it follows as a programmatic dependent (the GEMVs and the decode attention kernel let the next
    kernel start during their tail): qkv = add + norm op (``forward_addnorm``) on the previous layer's down GEMV; o
    on the qkv GEMV's first ``in`` outputs (standing in for the attention kernel, which ends the same way); gate_up =
    add + norm (+ GLU where its rows are paired) op on the o GEMV; down on the gate_up GEMV's SiLU x up (its GLU
    op where paired). The producers run with DEC off. ``xs(width, i)``: the i-th rotating input of that width.
    Measured (H200, docs/PERF.md session 14): chain DEC's extra time per call timed this way 10.6 / 6.2 us (down
    k=16 n_tb 33 / k=4 n_tb 16) and 7.7 us (gate_up k=8 n_tb 33) against 12.9 / 7.3 / 7.4-8.2 us per layer end to
    end; timed without the producer and, for gate_up, as the parts op: 5.4 / 4.6 / 2.6 us."""
    from decdec.model import PROJECTIONS as PATHS  # proj -> submodule path in a decoder layer

    gemv = torch.ops.decdec.ap_gemv
    block, prev = model.layers[layer], model.layers[layer - 1]  # layer 0: the last layer's down stands in
    mod = block.get_submodule(PATHS[proj])
    if proj == "qkv":
        down = prev.get_submodule(PATHS["down"])
        return lambda i: mod.forward_addnorm(xs(mod.in_features, i), gemv(xs(down.in_features, i), down.qweight,
                                                                          down.lut), block.attention_norm)[0]
    if proj == "o":
        qkv = block.get_submodule(PATHS["qkv"])
        return lambda i: mod(gemv(xs(qkv.in_features, i), qkv.qweight, qkv.lut)[:, :mod.in_features])
    if proj == "gate_up":
        o = block.get_submodule(PATHS["o"])
        run = mod.forward_addnorm_glu if getattr(mod, "glu_pairs", False) else mod.forward_addnorm
        return lambda i: run(xs(mod.in_features, i), gemv(xs(o.in_features, i), o.qweight, o.lut), block.ffn_norm)[0]
    gate_up = block.get_submodule(PATHS["gate_up"])
    norm = block.ffn_norm

    def act(i: int) -> torch.Tensor:
        a, b = xs(gate_up.in_features, i), xs(gate_up.in_features, i + 1)
        if getattr(gate_up, "glu_pairs", False) and gate_up._addnorm_kernel(a, norm):
            return torch.ops.decdec.ap_gemv_addnorm_glu(a, b, norm.weight, norm.eps, gate_up.qweight, gate_up.lut)[0]
        y = gemv(a, gate_up.qweight, gate_up.lut)  # plain SiLU x up after it: the step's producer is that kernel
        gate, up = y[:, :mod.in_features], y[:, mod.in_features:2 * mod.in_features]
        return torch.nn.functional.silu(gate) * up

    return lambda i: mod(act(i))


@torch.no_grad()
def time_projections(model, bitwidths: dict[int, int], k_chunks: list[int], n_tbs: list[int], iters: int,
                     device: torch.device, dtype: torch.dtype, in_step: bool | None = None) -> list[Timing]:
    """Median per-call time of each projection (per bit-width) for every (n_tb, k_chunk), each call followed by a
    consumer kernel (``timing.consume``): on CUDA from a CUDA graph (as compile=cudagraphs decodes), on the CPU from a host
    loop. ``in_step`` (default: in chain mode, ``uses_dec_chain``): each call is ``step_call``'s, the projection as
    the decode step runs it after its producer; the GEMV alone (k_chunk = 0) is timed the same way, so the
    difference is what DEC adds to the step. Otherwise the projection's decode kernels alone."""
    timer = timing.graph_seconds if device.type == "cuda" else timing.host_seconds
    if in_step is None:
        in_step = uses_dec_chain(model)
    by_key: dict[tuple[str, int], list] = {}
    for proj, layer, mod in model.linears():
        by_key.setdefault((proj, bitwidths[layer]), []).append((layer, mod))
    if in_step and not all(getattr(m, "backend", None) == "ap" for _, _, m in model.linears()):
        raise ValueError("time_projections(in_step=True) times ap projections after their ap producers; "
                         "this model has other backends (use in_step=False)")
    inputs: dict[int, list[torch.Tensor]] = {}

    def xs(width: int, i: int) -> torch.Tensor:
        if width not in inputs:
            inputs[width] = [torch.randn(1, width, device=device, dtype=dtype) for _ in range(4)]
        return inputs[width][i % 4]

    out: list[Timing] = []
    for (proj, bits), entries in by_key.items():
        mods = [m for _, m in entries]
        saved = [(m.k_chunk, m.dec.n_tb if m.dec else 1) for m in mods]
        if in_step:
            steps = [step_call(model, proj, layer, xs) for layer, _ in entries]

            def call(i: int) -> None:  # cycles over every layer's weights, so the L2 does not hold them
                timing.consume(steps[i % len(steps)](i))
        else:
            def call(i: int) -> None:  # cycles over every layer's weights, so the L2 does not hold them
                # the decode kernels, then a consumer (DEC's combine runs inside that pointwise kernel in a compiled
                # step)
                timing.consume(mods[i % len(mods)].decode_kernels(xs(mods[0].in_features, i)))

        for n_tb in n_tbs:
            for k in k_chunks:
                if k == 0 and n_tb != n_tbs[0]:
                    out.append(Timing(proj, bits, n_tb, 0, next(t.seconds for t in out if t.proj == proj and t.bits == bits and t.k_chunk == 0)))
                    continue
                for m in mods:
                    m.set_dec(k, n_tb)
                out.append(Timing(proj, bits, n_tb, k, timer(call, iters)))
        for m, (k, n_tb) in zip(mods, saved):
            m.set_dec(k, n_tb)
    return out


def reference_rate(off_rates: list[float]) -> float:
    """The dec=off decode rate a choice is judged against: the median of every dec=off reading of the tune so far
    (each its own compile and graph capture; a reading varies by a few % between recompiles of the same model, and
    one slow reading taken first must not make a choice look faster than dec=off)."""
    if not off_rates:
        raise ValueError("reference_rate needs at least one dec=off reading")
    return statistics.median(off_rates)


def outcome(measured_slowdown: float, verified: bool) -> str:
    """How a target's result reads in the tuner's table, its dec_tuned yaml and the e2e benchmark."""
    return f"measured {measured_slowdown:+.2%}" if verified else "no DEC fits: DEC off"


def next_budget(budget_s: float, target: float, measured: float, margin: float = 0.9) -> float:
    """Per-layer budget for the next round after a choice measured ``measured`` slowdown end to end against
    ``target``: scaled by target / measured (how much the per-projection timings under-counted), less a margin."""
    return budget_s * margin * (min(1.0, target / measured) if measured > 0 else 1.0)


def fusions_lost(k_chunk: dict[str, int], glu: bool = False) -> int:
    """Fusions per decoder layer that a choice turns back into separate kernels (``model.add_norm_project``): qkv's
    add + norm when the previous layer's down runs DEC, gate_up's when o does (their combine is a pointwise op outside
    the kernels). DEC on qkv or gate_up itself keeps the add + norm fusion (``ap_gemv_addnorm_dec_parts``), but with
    the GLU epilogue in use (``glu``: ``uses_glu``) DEC on gate_up turns SiLU x up back into its own kernel."""
    return int(k_chunk["down"] > 0) + int(k_chunk["o"] > 0 or (glu and k_chunk["gate_up"] > 0))


def uses_dec_chain(model) -> bool:
    """Whether this model's DEC projections run in chain mode (``QuantLinear.dec_chain``): the ops return final outputs,
    so a DEC choice undoes no fusion (``fusions_lost`` does not apply) and the GLU epilogue stays. A projection in the
    binary-tensor-core layout (DEC off there) returns to the kernel layout when DEC turns on
    (``QuantLinear.place_decode_layout``)."""
    from decdec import formats, ops

    mods = [m for _, _, m in model.linears()]
    return bool(mods) and all(getattr(m, "backend", None) == "ap" and m.qweight.is_cuda
                              and (formats.is_ap3_kernel_layout(m.qweight, m.lut)
                                   or formats.is_ap3_bmma_layout(m.qweight, m.lut))
                              and ops.dec_chain_supported(m.bits, m.in_features, m.qweight.device) for m in mods)


def uses_glu(model) -> bool:
    """Whether the model's gate_up rows are in GLU pair order (``QuantLinear.use_glu_layout``)."""
    return any(getattr(m, "glu_pairs", False) for proj, _, m in model.linears() if proj == "gate_up")


def uses_fused_addnorm(model) -> bool:
    """Whether a decode step of this model runs the fused add + RMSNorm GEMV (QuantLinear._addnorm_kernel's
    conditions, DEC aside) on its qkv or gate_up projections."""
    from decdec import ops

    return any(getattr(m, "backend", None) == "ap" and m.lut.is_cuda and m.lut.dtype == torch.float16
               and ops.addnorm_supported(m.bits, m.in_features)
               for proj, _, m in model.linears() if proj in ("qkv", "gate_up"))


def fusion_seconds(step_fused_s: float, step_separate_s: float, n_layers: int) -> float:
    """Time one add + RMSNorm fusion saves, from a decode step with and without the fusions (2 per layer, less
    layer 0's qkv, whose input has nothing to add)."""
    return max(0.0, (step_separate_s - step_fused_s) / max(1, 2 * n_layers - 1))


def cheapest_dec(timings: list[Timing], in_features: dict[str, int], bits: int, fusion_s: float = 0.0,
                 glu: bool = False) -> dict | None:
    """The least extra time per layer that buys any DEC for one bit-width: one projection at its cheapest (n_tb,
    k_chunk > 0), the fusion it undoes charged (``fusions_lost``); ties go to more rows. What a tune that kept DEC
    off reports, so a user sees which target would admit DEC. None without DEC timings."""
    best = None
    for n_tb in sorted({t.n_tb for t in timings if t.bits == bits}):
        table = {(t.proj, t.k_chunk): t.seconds for t in timings if t.bits == bits and t.n_tb == n_tb}
        for (p, k), sec in sorted(table.items()):
            if k == 0 or (p, 0) not in table:
                continue
            kc = {q: 0 for q in PROJECTIONS}
            kc[p] = k
            extra = max(0.0, sec - table[(p, 0)]) + fusion_s * fusions_lost(kc, glu)
            rows = rows_per_token(k, in_features[p])
            if best is None or (extra, -rows) < (best["extra_s"], -best["rows_per_layer"]):
                best = {"proj": p, "n_tb": n_tb, "k_chunk": k, "extra_s": extra, "rows_per_layer": rows}
    return best


def rows_per_token(k_chunk: int, in_features: int) -> int:
    return sum(chunk_quotas(k_chunk, in_features))


def choose(timings: list[Timing], in_features: dict[str, int], budget_s: float, bits: int, dec: bool = True,
           fusion_s: float = 0.0, glu: bool = False, per_projection: bool = False) -> dict | None:
    """Best {proj: k_chunk} and n_tb for one bit-width within ``budget_s`` extra seconds per layer, each add + RMSNorm
    fusion the choice undoes charged ``fusion_s``; ``dec=False``: k_chunk = 0 everywhere (a zero budget alone could
    still admit a DEC setting timed at or under its GEMV). One n_tb for all four projections, or with
    ``per_projection`` each (projection, k_chunk) at its fastest n_tb (the extra times add up per projection, so that
    is the best per-projection choice). Returns ``n_tb`` (the DEC projections' most common n_tb) and ``n_tb_proj``
    (every projection's)."""
    n_tbs = sorted({t.n_tb for t in timings if t.bits == bits})
    plans = []  # each: {(proj, k_chunk): (seconds, n_tb)}
    if per_projection:
        fastest: dict[tuple[str, int], tuple[float, int]] = {}
        for t in timings:
            key = (t.proj, t.k_chunk)
            if t.bits == bits and (key not in fastest or (t.seconds, t.n_tb) < fastest[key]):
                fastest[key] = (t.seconds, t.n_tb)
        plans.append(fastest)
    else:
        plans += [{(t.proj, t.k_chunk): (t.seconds, n_tb) for t in timings if t.bits == bits and t.n_tb == n_tb}
                  for n_tb in n_tbs]
    best = None
    for table in plans:
        ks = sorted({k for (_, k) in table}) if dec else [0]
        base = {p: table[(p, 0)][0] for p in PROJECTIONS}
        for combo in itertools.product(ks, repeat=len(PROJECTIONS)):
            extra = sum(table[(p, k)][0] - base[p] for p, k in zip(PROJECTIONS, combo))
            extra += fusion_s * fusions_lost(dict(zip(PROJECTIONS, combo)), glu)
            if extra > budget_s:
                continue
            per = [rows_per_token(k, in_features[p]) for p, k in zip(PROJECTIONS, combo)]
            rows = sum(per)
            score = (all(r > 0 for r in per), rows, -extra)  # DEC on every projection first, then most rows
            if best is None or score > best["score"]:
                used = [table[(p, k)][1] for p, k in zip(PROJECTIONS, combo) if k > 0]
                main = max(sorted(set(used)), key=used.count) if used else table[(PROJECTIONS[0], 0)][1]
                n_tb_proj = {p: table[(p, k)][1] if k > 0 else main for p, k in zip(PROJECTIONS, combo)}
                best = {"score": score, "n_tb": main, "n_tb_proj": n_tb_proj, "k_chunk": dict(zip(PROJECTIONS, combo)),
                        "extra_s": extra, "rows_per_layer": rows, "base_s": sum(base.values())}
    return best
