"""scripts/bench_kernels.py's report (no GPU needed): the graph table carries the binary-tensor-core GEMV's column
where the shape has it and a dash elsewhere, with its share of HBM copy."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "scripts" / "bench_kernels.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _summary_row(bmma: tuple[float, float] | None) -> dict:
    r = {k: (10.0, 1000.0) for k in ("ap3", "ap4", "lg3", "lg4", "fp16", "ap3_graph", "ap4_graph", "lg3_graph",
                                      "lg4_graph", "fp16_graph")}
    r["fp16_graph"] = (25.0, 0.0)
    r["dec"] = r["dec_graph"] = {k: (9.0, 20.0, 16) for k in bench.K_CHUNKS}
    if bmma:
        r["ap3_bmma_graph"] = bmma
    return r


def test_graph_table_has_the_bmma_column():
    md = bench.markdown({"4096x4096": _summary_row(None), "4096x28672": _summary_row((14.8, 3000.0))},
                        {"hbm_copy_GBps": 4200.0, "pinned_h2d_GBps": 55.0}, "card")
    head = next(line for line in md.splitlines() if line.startswith("| shape") and "ap 3-bit bmma" in line)
    assert head.split("|")[2].strip() == "ap 3-bit" and head.split("|")[3].strip() == "ap 3-bit bmma"
    rows = {line.split("|")[1].strip(): line.split("|") for line in md.splitlines()
            if line.startswith("| 4096x") and "2.50x" in line}
    assert rows["4096x28672"][3].strip() == "14.8 us (3000 GB/s, 71%)"
    assert rows["4096x4096"][3].strip() == "-"


def test_bench_bmma_ops_runs_on_the_cpu_with_both_layouts_agreeing(monkeypatch):
    """scripts/bench_bmma_ops.py's projections, per-op comparison and layer chain on small shapes on the CPU (the ops'
    reference kernels, a host timer): every op runs in both layouts with the same results, every plan of the chain
    runs."""
    from decdec.timing import host_seconds

    spec_ops = importlib.util.spec_from_file_location("bench_bmma_ops", REPO / "scripts" / "bench_bmma_ops.py")
    mod = importlib.util.module_from_spec(spec_ops)
    spec_ops.loader.exec_module(mod)
    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "TIMER", lambda fn, calls: host_seconds(fn, 2, reps=1))
    kinds = mod.projections(512, 768, 1024)
    assert [(k, n, o) for k, n, o in kinds] == [("qkv", 512, 768), ("o", 512, 512), ("gate_up", 512, 2048),
                                                ("down", 1024, 512)]
    projs = {kind: mod.Projection(kind, n, out, l2=1, seed=n + out) for kind, n, out in kinds}
    for proj in projs.values():
        assert proj.copies == 2
        r = mod.bench_projection(proj, seed=3)
        # the CPU ops are one reference; gate_up's kernel-layout path at in = 512 (no GLU op there) takes SiLU x up
        # in fp16 after the GEMV, the GLU op in fp32 on the rounded pair
        assert r["err"] < (4e-3 if proj.kind == "gate_up" else 1e-9) and r["kernel"] > 0 and r["bmma"] > 0, proj.kind
    kernel = dict.fromkeys(projs, "kernel")
    times = mod.bench_chain(projs, {"kernel": kernel, "gate_up": {**kernel, "gate_up": "bmma"}}, seed=4)
    assert set(times) == {"kernel", "gate_up"} and all(t > 0 for t in times.values())
