"""GPU end to end (marked cuda; skipped without a GPU and built kernels): compiled decode equals
eager decode, the DEC op path runs inside CUDA graphs, and the tuner runs on a small model."""

import pytest
import torch

from decdec import ops

pytestmark = pytest.mark.cuda


def _kernels_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    try:
        ops.load_cuda_kernels()
    except ops.KernelsUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("backend", ["ap", "lutgemm"])
@pytest.mark.parametrize("mode", ["inductor", "cudagraphs"])
@pytest.mark.parametrize("k", [0, 64])
def test_compiled_decode_equals_eager(backend, mode, k):
    """Teacher-forced on eager's greedy tokens, the compiled decode step gives the same logits at
    every step, and the same greedy token wherever eager's top-2 margin is clear.

    dec=off (k=0): fp16 tolerance (2 % of the largest logit). With DEC (k=64) inductor's fused
    RMSNorm rounds x differently from eager, and DEC's bucket selection is discontinuous in |x|:
    a channel on a bucket boundary can be selected in one and not the other (seen on an H200,
    2026-11-27: 2.6 % on random synthetic weights), so the logits bound is 10 %. Bitwise equality
    of the DEC ops under CUDA-graph capture is tests/test_cuda_kernels.py's job."""
    _kernels_or_skip()
    from decdec.config import DecConfig, KChunk
    from decdec.generate import Generator
    from decdec.synthetic import build_synthetic

    dev = torch.device("cuda")
    dec = DecConfig(name="t", n_tb=8, k_chunk=KChunk(qkv=k, o=k, gate_up=k, down=k))
    built = build_synthetic("smollm2-4l", backend, 3, False, torch.float16, dev, dec, seed=1)  # SmolLM2 shapes
    model = built.model
    prompt = torch.arange(5, 21)
    torch._dynamo.reset()
    tokens = Generator(model, dev, torch.float16, 64, "none").generate(prompt, 24)  # eager greedy chain

    def step(m, tok, pos):
        return m(tok, pos)

    compiled = torch.compile(step, mode="reduce-overhead" if mode == "cudagraphs" else "default",
                             fullgraph=True)
    for fn in (step, compiled):  # prefill the cache identically, then step through eager's tokens
        model.setup_caches(1, 64, torch.float16, dev)
        with torch.no_grad():
            model(tokens[:16].view(1, -1).to(dev), torch.arange(16, device=dev))
            out = []
            for i in range(16, 39):
                logits = fn(model, tokens[i:i + 1].view(1, 1).clone(), torch.tensor([i], device=dev))
                out.append(logits[0, -1].float().clone())
        if fn is step:
            eager_logits = torch.stack(out)
        else:
            comp_logits = torch.stack(out)
    scale = eager_logits.abs().max()
    err = (comp_logits - eager_logits).abs().max()
    bound = (2e-2 if k == 0 else 1e-1) * scale
    assert err <= bound, f"compiled logits differ from eager by {err:.4g} (scale {scale:.4g}, k_chunk {k})"
    top2 = eager_logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert torch.equal(comp_logits.argmax(-1)[clear], eager_logits.argmax(-1)[clear])
    assert torch.equal(eager_logits.argmax(-1).cpu(), tokens[17:40].cpu())  # eager logits = eager greedy chain


def test_no_cudagraph_skips():
    _kernels_or_skip()
    from torch._inductor import config as inductor_config  # noqa: F401
    from torch._dynamo.utils import counters

    from decdec.config import DecConfig, KChunk
    from decdec.generate import Generator
    from decdec.synthetic import build_synthetic

    dev = torch.device("cuda")
    built = build_synthetic("tiny", "ap", 3, False, torch.float16, dev,
                            DecConfig(name="t", n_tb=4, k_chunk=KChunk(qkv=128, o=128, gate_up=128, down=128)))
    torch._dynamo.reset()
    counters.clear()
    gen = Generator(built.model, dev, torch.float16, 48, "reduce-overhead")  # torch's CUDA-graph trees
    gen.generate(torch.arange(1, 9), 16)
    gen.generate(torch.arange(1, 9), 16)
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph_skips" in k}
    assert not any(skips.values()), skips


@pytest.mark.parametrize("k,own_n_tb", [(0, False), (16, False), (16, True)])
def test_graphed_decode_equals_inductor_decode(k, own_n_tb):
    """compile=cudagraphs replays one CUDA graph per step of the same inductor-compiled step that
    compile=inductor runs without graphs: greedy tokens must be identical, the graph recorded once
    and replayed every step; sampling inside the graph draws fresh noise each step and call.
    own_n_tb: qkv and down with their own DEC thread blocks (dec.n_tb_proj).
    The tiny model keeps its three inductor compiles short (smollm2's 30 layers took minutes)."""
    _kernels_or_skip()
    from decdec.config import DecConfig, KChunk, NTbProj
    from decdec.generate import Generator
    from decdec.synthetic import build_synthetic

    dev = torch.device("cuda")
    own = NTbProj(qkv=2, down=33) if own_n_tb else NTbProj()
    built = build_synthetic("tiny", "ap", 3, False, torch.float16, dev,
                            DecConfig(name="t", n_tb=8, n_tb_proj=own, k_chunk=KChunk(qkv=k, o=k, gate_up=k, down=k)),
                            seed=2)
    if own_n_tb:
        assert {p: m.dec.n_tb for p, _, m in built.model.linears()} == {"qkv": 2, "o": 8, "gate_up": 8, "down": 33}
    prompt = torch.arange(3, 19)
    torch._dynamo.reset()
    want = Generator(built.model, dev, torch.float16, 64, "inductor").generate(prompt, 40)
    torch._dynamo.reset()
    gen = Generator(built.model, dev, torch.float16, 64, "cudagraphs")
    first = gen.generate(prompt, 40)
    again = gen.generate(prompt, 40)
    assert torch.equal(first, want) and torch.equal(again, want)
    assert len(gen._decode.graphs) == 1 and gen._decode.replays == 2 * 39
    a = gen.generate(prompt, 40, temperature=1.0, top_k=50)
    b = gen.generate(prompt, 40, temperature=1.0, top_k=50)
    assert len(gen._decode.graphs) == 2
    assert not torch.equal(a, b) and int(a.max()) < built.args.vocab_size and int(a.min()) >= 0


def test_peak_memory_with_dec_matches_dec_off():
    _kernels_or_skip()
    from decdec.config import DecConfig, KChunk
    from decdec.generate import Generator
    from decdec.synthetic import build_synthetic

    dev = torch.device("cuda")
    peaks = []
    # dec=off twice around DEC, and DEC compared with the second: run first in a fresh process (`-k`, H200,
    # 2026-11-27) the test failed the 1 % bound, after other tests it never did -- the suspected cause, first-use
    # temporaries in the process's first run, is not yet confirmed on a GPU
    for k in (0, 64, 0):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        built = build_synthetic("smollm2-135m", "ap", 3, False, torch.float16, dev,
                                DecConfig(name="t", n_tb=8, k_chunk=KChunk(qkv=k, o=k, gate_up=k, down=k)))
        Generator(built.model, dev, torch.float16, 64, "none").generate(torch.arange(1, 17), 16)
        peaks.append(torch.cuda.max_memory_allocated())
        del built
    assert abs(peaks[1] - peaks[2]) <= 0.01 * peaks[2], peaks  # residuals stay in host memory


def test_graphed_decoders_leave_no_memory_behind():
    """A compile=cudagraphs Generator, once dropped, leaves the allocated memory where it found it: each capture warms up
    on the device's one warm-up stream (a fresh stream per capture left a 32-MiB cuBLAS workspace behind each time, and
    the tuner's peak readings grew by that much per round; H200, docs/PERF.md GPU end to end, session 16)."""
    _kernels_or_skip()
    import gc

    from decdec.config import DecConfig
    from decdec.generate import Generator, warmup_stream
    from decdec.synthetic import build_synthetic

    dev = torch.device("cuda")
    built = build_synthetic("tiny", "ap", 3, False, torch.float16, dev, DecConfig(name="t", n_tb=8))

    def decode_and_drop() -> int:
        Generator(built.model, dev, torch.float16, 40, "cudagraphs").generate(torch.arange(1, 9), 8)
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(dev)

    decode_and_drop()  # first use: compilation, the warm-up stream's workspace
    after = [decode_and_drop() for _ in range(3)]
    assert max(after) - min(after) <= 1 << 20, after
    assert warmup_stream(dev) is warmup_stream(torch.device("cuda", torch.cuda.current_device()))


def test_tune_on_gpu_small_model(tmp_path, cache_dir):
    """task=tune on the GPU (CUDA-event timings, end-to-end verification) on a tiny synthetic model."""
    _kernels_or_skip()
    import yaml

    from conftest import run_inprocess

    summary = run_inprocess(["model=tiny", "model.source=synthetic", "device=cuda", "task=tune", "task.iters=5",
                             "task.verify_tokens=8", "task.verify_samples=2", "task.k_chunks=[0,8,64]",
                             "task.target_slowdown=0.5", "logger=yaml"], tmp_path / "run", cache_dir)
    assert summary["task"] == "tune"
    assert summary["base_tokens_per_s"] > 0 and summary["tuned_tokens_per_s"] > 0
    assert abs(summary["measured_slowdown"]) < 10
    dec = yaml.safe_load((tmp_path / "run" / "dec_tuned.yaml").read_text())
    assert set(dec["k_chunk"]) == {"qkv", "o", "gate_up", "down"}
    assert all(v in (0, 8, 64) for v in dec["k_chunk"].values())


def test_tune_on_gpu_serves_several_targets(tmp_path, cache_dir):
    """task.target_slowdowns on the GPU: one set of timings, each target verified end to end and written on its own."""
    _kernels_or_skip()
    import yaml

    from conftest import run_inprocess

    summary = run_inprocess(["model=tiny", "model.source=synthetic", "device=cuda", "task=tune", "task.iters=5",
                             "task.verify_tokens=8", "task.verify_samples=2", "task.k_chunks=[0,8,64]",
                             "task.target_slowdowns=[0.3,0.6]", "logger=yaml"], tmp_path / "run", cache_dir)
    assert [s["target_slowdown"] for s in summary["targets"]] == [0.3, 0.6]
    for s in summary["targets"]:
        assert s["tuned_tokens_per_s"] > 0 and abs(s["measured_slowdown"]) < 10
        dec = yaml.safe_load((tmp_path / "run" / s["dec_file"]).read_text())
        assert dec["k_chunk"] == s["choice"]["3"]["k_chunk"]


def test_tuner_times_chain_projections_in_their_step_context():
    """On a Llama-3-shaped chain-mode model the tuner times each projection as the decode step runs it after its
    producer (tune.step_call; docs/PERF.md GPU end to end, session 14): the step calls run inside CUDA-graph capture
    with DEC off and on, and with DEC off each gives what the model's own ops give (down after the gate_up GEMV's
    GLU epilogue, gate_up's add + norm + GLU op on the o GEMV, qkv's add + norm op on the previous down GEMV)."""
    _kernels_or_skip()
    from decdec import tune
    from decdec.config import DecConfig, KChunk
    from decdec.model import PROJECTIONS as PATHS
    from decdec.synthetic import build_synthetic

    dev = torch.device("cuda")
    dec = DecConfig(name="t", n_tb=16, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=0))
    model = build_synthetic("llama3-2l", "ap", 3, False, torch.float16, dev, dec, seed=7).model
    assert tune.uses_dec_chain(model) and tune.uses_glu(model)
    for _, _, m in model.linears():
        m.set_dec(0, 16)
    gen = torch.Generator(device=dev).manual_seed(8)
    pool = {}

    def xs(width, i):
        pool.setdefault(width, [torch.randn(1, width, generator=gen, device=dev).half() for _ in range(4)])
        return pool[width][i % 4]

    blk, prev = model.layers[1], model.layers[0]
    get = {p: blk.get_submodule(path) for p, path in PATHS.items()}
    down0 = prev.get_submodule(PATHS["down"])
    with torch.no_grad():
        h = xs(4096, 3) + get["o"](xs(get["o"].in_features, 3))
        g, u = get["gate_up"](blk.ffn_norm(h)).chunk(2, dim=-1)
        a = xs(4096, 3)
        g2, u2 = get["gate_up"](blk.ffn_norm(a + xs(4096, 4))).chunk(2, dim=-1)
        want = {
            "qkv": get["qkv"](blk.attention_norm(a + down0(xs(down0.in_features, 3)))),
            "o": get["o"](get["qkv"](xs(4096, 3))[:, :get["o"].in_features]),
            "gate_up": torch.nn.functional.silu(g) * u,
            "down": get["down"](torch.nn.functional.silu(g2) * u2),
        }
        for p, w in want.items():
            got = tune.step_call(model, p, 1, xs)(3)
            torch.testing.assert_close(got.float(), w.float(), rtol=3e-2, atol=3e-2, msg=lambda e: f"{p}: {e}")
    timings = tune.time_projections(model, {0: 3, 1: 3}, [0, 4], [16], 4, dev, torch.float16)  # chain: in step
    assert {(t.proj, t.k_chunk) for t in timings} == {(p, k) for p in PATHS for k in (0, 4)}
    assert all(t.seconds > 0 for t in timings)


def test_addnorm_decode_equals_separate_ops(monkeypatch):
    """Llama-3-8B layer shapes (2 layers): decode steps whose qkv and gate_up GEMVs perform the residual add and
    RMSNorm themselves (ap_gemv_addnorm) give the logits of the same model with separate add / norm ops, eager and
    compiled (one CUDA graph per step)."""
    _kernels_or_skip()
    from decdec.config import DecConfig, KChunk
    from decdec.synthetic import build_synthetic

    dev = torch.device("cuda")
    dec = DecConfig(name="t", n_tb=8, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=0))
    model = build_synthetic("llama3-2l", "ap", 3, False, torch.float16, dev, dec, seed=3).model
    lin, norm = model.layers[1].attention.wqkv, model.layers[1].attention_norm
    assert lin._addnorm_kernel(torch.zeros(1, 1, 4096, device=dev, dtype=torch.float16), norm)
    tokens = torch.randint(0, 1024, (24,), generator=torch.Generator().manual_seed(4))

    def step(m, tok, pos):
        return m(tok, pos)

    def run(fn):
        model.setup_caches(1, 32, torch.float16, dev)
        with torch.no_grad():
            model(tokens[:8].view(1, -1).to(dev), torch.arange(8, device=dev))
            return torch.stack([fn(model, tokens[i:i + 1].view(1, 1).to(dev), torch.tensor([i], device=dev))[0, -1].float()
                                for i in range(8, 24)])

    fused = run(step)
    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True))
    with monkeypatch.context() as mp:
        mp.setattr(ops, "addnorm_supported", lambda bits, n: False)
        assert not lin._addnorm_kernel(torch.zeros(1, 1, 4096, device=dev, dtype=torch.float16), norm)
        separate = run(step)
    scale = separate.abs().max()
    assert (fused - separate).abs().max() / scale < 0.02, "fused add + RMSNorm GEMV differs from separate ops"
    assert (compiled - fused).abs().max() / scale < 0.02, "compiled fused decode differs from eager"


def _decode_logits(model, tokens: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Prefill tokens[:8], then decode tokens[8:16] one at a time (eager): the last-position logits of each step."""
    model.setup_caches(1, 32, torch.float16, dev)
    with torch.no_grad():
        model(tokens[:8].view(1, -1).to(dev), torch.arange(8, device=dev))
        return torch.stack([model(tokens[i:i + 1].view(1, 1).to(dev), torch.tensor([i], device=dev))[0, -1]
                            for i in range(8, 16)])


def test_kernel_layout_model_equals_bitplanes(monkeypatch):
    """A model built on CUDA holds its 3-bit fp16 ap weights in the kernels' layout (QuantLinear.use_kernel_layout),
    and decodes to the same logits, bit for bit, as with the checkpoint's bit-planes (DEC in parts mode for both: the
    chain ops serve the kernel layout only). In chain mode (the default for the kernel layout) the logits match the
    parts mode's up to rounding: the combine's fma and the add + norm fusion it keeps round differently."""
    _kernels_or_skip()
    from decdec import formats
    from decdec.config import DecConfig, KChunk
    from decdec.synthetic import build_synthetic

    monkeypatch.setenv("DECDEC_BMMA", "0")  # gate_up (DEC off) would take the binary-tensor-core layout: see below
    dev = torch.device("cuda")
    dec = DecConfig(name="t", n_tb=8, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=4))
    model = build_synthetic("llama3-2l", "ap", 3, False, torch.float16, dev, dec, seed=5).model
    lins = [mod for _, _, mod in model.linears()]
    assert all(formats.is_ap3_kernel_layout(m.qweight, m.lut) for m in lins)
    tokens = torch.randint(0, 1024, (16,), generator=torch.Generator().manual_seed(6))

    def run():
        return _decode_logits(model, tokens, dev)

    assert [m.dec_chain for m in lins] == [m.k_chunk > 0 for m in lins] and any(m.dec_chain for m in lins)
    chain = run()
    monkeypatch.setenv("DECDEC_DEC_CHAIN", "0")
    assert not any(m.dec_chain for m in lins)
    packed = run()
    torch.testing.assert_close(chain.float(), packed.float(), rtol=2e-2, atol=2e-2)
    for m in lins:
        m.qweight = formats.unpack_ap3_kernel(m.qweight)
    assert not any(formats.is_ap3_kernel_layout(m.qweight, m.lut) for m in lins)
    assert torch.equal(run(), packed), "decode logits differ between the weight layouts"


def test_bmma_layout_model_matches_the_kernel_layout(monkeypatch):
    """Built on CUDA, a Llama-3-8B-shaped model holds gate_up (DEC off there; ops.bmma_preferred) in the
    binary-tensor-core layout and the rest in the kernel layout; its decode logits (GLU epilogue on the bmma GEMV)
    match the same model with gate_up back in the kernel layout up to fp16 rounding, with the same greedy tokens where
    the top-2 margin is clear; DEC on gate_up moves it to the kernel layout."""
    _kernels_or_skip()
    from decdec import formats, ops
    from decdec.config import DecConfig, KChunk
    from decdec.synthetic import build_synthetic

    dev = torch.device("cuda")
    dec = DecConfig(name="t", n_tb=8, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=4))
    model = build_synthetic("llama3-2l", "ap", 3, False, torch.float16, dev, dec, seed=7).model
    bmma = [(proj, m) for proj, _, m in model.linears() if formats.is_ap3_bmma_layout(m.qweight, m.lut)]
    assert bmma and all(proj == "gate_up" and m.glu_pairs for proj, m in bmma), [p for p, _ in bmma]
    assert all(ops.bmma_preferred(3, torch.float16, m.in_features, m.out_features, dev) for _, m in bmma)
    tokens = torch.randint(0, 1024, (16,), generator=torch.Generator().manual_seed(8))

    def run():
        return _decode_logits(model, tokens, dev)

    on_bmma = run()
    monkeypatch.setenv("DECDEC_BMMA", "0")
    for _, m in bmma:
        assert m.place_decode_layout() and formats.is_ap3_kernel_layout(m.qweight, m.lut)
    on_kernel = run()
    # two fp16 GEMV roundings apart per gate_up (H200: 5 of 8192 logits beyond 2e-2, the largest 0.029)
    rel = (on_bmma.float() - on_kernel.float()).norm() / on_kernel.float().norm()
    assert rel < 1e-2, f"logits differ by {rel:.2e} (norm-wise)"
    torch.testing.assert_close(on_bmma.float(), on_kernel.float(), rtol=2e-2, atol=5e-2)
    top2 = on_kernel.float().topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05  # the greedy token wherever the top-2 margin is clear
    assert torch.equal(on_bmma.argmax(-1)[clear], on_kernel.argmax(-1)[clear])
    monkeypatch.delenv("DECDEC_BMMA")
    for _, m in bmma:
        assert m.place_decode_layout() and formats.is_ap3_bmma_layout(m.qweight, m.lut)
        m.set_dec(4, 8)
        assert formats.is_ap3_kernel_layout(m.qweight, m.lut) and m.dec_chain


@pytest.mark.parametrize("mode", ["none", "cudagraphs"])
def test_decode_attention_rope_equals_the_unfused_decode(mode):
    """Decode attention with RoPE and the KV-cache write inside its kernel (decode_attention_rope), eager or compiled
    with CUDA graphs, teacher-forced on the unfused eager path's greedy tokens: the same logits (fp16 tolerance) and
    the same greedy token wherever the top-2 margin is clear, and the same caches."""
    _kernels_or_skip()
    from decdec.config import DecConfig, KChunk
    from decdec.generate import Generator
    from decdec.synthetic import build_synthetic

    dev = torch.device("cuda")
    off = DecConfig(name="off", n_tb=8, k_chunk=KChunk(qkv=0, o=0, gate_up=0, down=0))
    model = build_synthetic("smollm2-4l", "ap", 3, False, torch.float16, dev, off, seed=2).model
    prompt = torch.arange(7, 23)
    torch._dynamo.reset()
    model.use_decode_attention(True, rope=False)
    tokens = Generator(model, dev, torch.float16, 64, "none").generate(prompt, 24)

    def step(m, tok, pos):
        return m(tok, pos)

    runs = {}
    for rope in (False, True):
        model.use_decode_attention(True, rope=rope)
        fn = step if (mode == "none" or not rope) else torch.compile(step, mode="reduce-overhead", fullgraph=True)
        model.setup_caches(1, 64, torch.float16, dev)
        with torch.no_grad():
            model(tokens[:16].view(1, -1).to(dev), torch.arange(16, device=dev))
            out = [fn(model, tokens[i:i + 1].view(1, 1).clone(), torch.tensor([i], device=dev))[0, -1].float().clone()
                   for i in range(16, 39)]
        runs[rope] = (torch.stack(out), [layer.attention.kv_cache.kv[:, :, :, :39].float().clone()
                                         for layer in model.layers])
    (base, base_kv), (got, got_kv) = runs[False], runs[True]
    err, scale = (got - base).abs().max(), base.abs().max()
    assert err <= 2e-2 * scale, f"decode_attention_rope logits differ by {err:.4g} (scale {scale:.4g}, {mode})"
    top2 = base.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert torch.equal(got.argmax(-1)[clear], base.argmax(-1)[clear])
    for a, b in zip(base_kv, got_kv):
        assert (a - b).abs().max() <= 2e-2 * a.abs().max()
