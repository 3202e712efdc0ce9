"""Generation: small pure functions (``prefill``, ``decode_one_token``, ``sample``) that can each
be compiled, and a ``Generator`` that owns the compiled callables (never module globals).

Sampling never syncs with the host inside a step: greedy is an argmax, sampling draws with the
exponential trick (``argmax(p / q), q ~ Exp(1)``) instead of ``torch.multinomial``.

Every mode decodes on static device buffers (``StaticDecode``: the last token, its position and
the output tokens), so a step is device work only. ``compile=cudagraphs`` compiles the step with
inductor and captures it, bookkeeping included, once per (temperature, top_k) into one
``torch.cuda.CUDAGraph`` (``GraphedDecode``): a step costs the host one graph launch.
``compile=reduce-overhead`` goes through ``torch.compile(mode="reduce-overhead")`` (CUDA-graph trees:
dynamo guards and input checks on every call). H200, synthetic Llama-3-8B ap w3: 349.6 against 340.0
tokens/s; SmolLM2-135M fp16, where the host matters more: 1723 against 1944 us per step (docs/PERF.md,
session 5).
"""

from __future__ import annotations

from typing import Callable

import torch

from decdec.model import Transformer


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """logits [V] -> probabilities [V] after temperature and top-k."""
    logits = logits / max(temperature, 1e-5)
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[..., -1:], -float("inf"), logits)
    return torch.softmax(logits, dim=-1)


def argmax_last(v: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """v [B, V] -> [B, 1] int64, the first index of the maximum (as torch.argmax), in two stages:
    per chunk of ``chunk`` entries, then over the chunk maxima. A vocabulary-sized argmax compiled as
    one reduction runs on one block (H200: 28.7 us per token for V = 128256); this one is two short
    kernels. NaN-free inputs assumed (logits)."""
    B, V = v.shape
    n = -(-V // chunk)
    if n <= 1:
        return torch.argmax(v, dim=-1, keepdim=True)
    vp = torch.nn.functional.pad(v, (0, n * chunk - V), value=-float("inf")).view(B, n, chunk)
    local = torch.argmax(vp, dim=-1, keepdim=True)  # [B, n, 1], first max inside each chunk
    best = torch.argmax(vp.gather(-1, local).squeeze(-1), dim=-1, keepdim=True)  # [B, 1], first chunk
    return best * chunk + local.squeeze(-1).gather(-1, best)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """logits [B, S, V] -> next token [B, 1] (int64) from the last position."""
    last = logits[:, -1].float()
    if temperature <= 0:
        return argmax_last(last)
    probs = logits_to_probs(last, temperature, top_k)
    q = torch.empty_like(probs).exponential_(1)
    return argmax_last(probs / q)


def prefill(model: Transformer, idx: torch.Tensor, input_pos: torch.Tensor, temperature: float,
            top_k: int | None) -> torch.Tensor:
    """idx [B, S], input_pos [S] -> next token [B, 1]."""
    return sample(model(idx, input_pos), temperature, top_k)


def decode_one_token(model: Transformer, cur_token: torch.Tensor, input_pos: torch.Tensor, temperature: float,
                     top_k: int | None) -> torch.Tensor:
    """cur_token [B, 1], input_pos [1] -> next token [B, 1]."""
    return sample(model(cur_token, input_pos), temperature, top_k)


class StaticDecode:
    """One decode step on static device buffers: ``tok`` [1, 1] (the last token), ``pos`` [1] (its
    position) and ``out`` [max_seq] (all tokens). ``step`` computes the next token with ``fn``
    (``decode_one_token`` or its compiled form), writes it to ``out[pos + 1]`` and advances ``tok`` and
    ``pos`` -- all device ops with no host sync, so the whole step can be captured in a CUDA graph.
    Batch size 1 (what ``Generator`` decodes)."""

    def __init__(self, model: Transformer, fn: Callable, device: torch.device, max_seq_length: int):
        self.model, self.fn = model, fn
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(max_seq_length, dtype=torch.long, device=device)

    def refresh(self) -> None:
        """Called before each generation; nothing is recorded here."""

    def step(self, temperature: float, top_k: int | None) -> None:
        nxt = self.fn(self.model, self.tok, self.pos, temperature, top_k)  # [1, 1]
        self.out.index_copy_(0, self.pos + 1, nxt.view(1))
        self.tok.copy_(nxt)
        self.pos.add_(1)


def graph_signature(model: Transformer) -> tuple:
    """What a recorded decode graph bakes in besides weights: every projection's DEC setting (k_chunk and
    n_tb are launch arguments), the addresses of the KV caches and RoPE tables (``setup_caches``
    reallocates them) and which attention decode steps use (``use_decode_attention``)."""
    dec = tuple((m.k_chunk, m.dec.n_tb if getattr(m, "dec", None) is not None else 0) for _, _, m in model.linears())
    k_cache = model.layers[0].attention.kv_cache.k_cache
    return (dec, k_cache.data_ptr(), tuple(k_cache.shape), model.rope_cos.data_ptr(),
            model.layers[0].attention.decode_op)


# cuBLAS keeps a workspace (32 MiB on Hopper) for every stream it has run on, for the life of the process (torch's
# handle pool; pytorch/pytorch#99196): a fresh side stream per capture left one more workspace behind at every
# recording -- +32 MiB per verification round in the autotuner (H200, docs/PERF.md GPU end to end, session 16).
# Every capture warms up on the same stream of its device instead.
_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per CUDA device on which ``GraphedDecode`` warms up before capturing."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[index] = torch.cuda.Stream(index)
    return _WARMUP_STREAMS[index]


class GraphedDecode(StaticDecode):
    """``StaticDecode`` whose step is captured into a CUDA graph per (temperature, top_k) on first use
    (after two warm-up steps on a side stream, which compile the step; the state they advance is put
    back, and the KV-cache rows they write are rewritten by the real steps before anything reads them)."""

    def __init__(self, model: Transformer, fn: Callable, device: torch.device, max_seq_length: int):
        super().__init__(model, fn, device, max_seq_length)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.replays = 0
        self.signature: tuple | None = None

    def refresh(self) -> None:
        """Drop the recorded graphs if the model's DEC settings or caches changed since they were recorded
        (they are recorded again on the next step)."""
        sig = graph_signature(self.model)
        if sig != self.signature:
            self.graphs.clear()
            self.signature = sig

    def step(self, temperature: float, top_k: int | None) -> None:
        key = (float(temperature), top_k)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(temperature, top_k)
        g.replay()
        self.replays += 1

    def _capture(self, temperature: float, top_k: int | None) -> torch.cuda.CUDAGraph:
        saved = self.tok.clone(), self.pos.clone(), self.out.clone()
        side = warmup_stream(self.out.device)
        side.wait_stream(torch.cuda.current_stream(self.out.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                super().step(temperature, top_k)
        torch.cuda.current_stream(self.out.device).wait_stream(side)
        for buf, val in zip((self.tok, self.pos, self.out), saved):
            buf.copy_(val)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            super().step(temperature, top_k)
        return g


# Inductor keeps a pointwise result in registers (recomputed in each consumer kernel) unless it reads more than
# realize_reads_threshold inputs (default 4). DEC's combine, GEMV + scale * (up to 4 chunk partials), reads 6, so with
# DEC on qkv the compiled step stored it in two kernels of its own before the RoPE / KV-cache kernels; at 8 it fuses
# into them (one kernel fewer per layer in the profile trace). H200, synthetic Llama-3-8B ap w3, same run: DEC k=4 on
# qkv only 404.4 -> 412.7 tokens/s, dec=off 461.7 -> 463.0 / 463.2; across runs qkv-only varies 404-411, so the gain
# is at the noise level (docs/PERF.md, GPU end to end, session 11).
# combo_kernels: inductor launches independent pointwise kernels of the step as one kernel. Between the qkv GEMV and
# the decode attention a layer had two (RoPE of q for the attention op; RoPE of k + the KV-cache write), each ~1.2 us
# plus ~0.4 us idle before it; with it one. H200, synthetic Llama-3-8B ap w3 dec=off, alternating processes:
# 457.3 / 459.5 -> 464.6 / 471.4 tokens/s (docs/PERF.md, GPU end to end, session 17). CPU code is unaffected.
INDUCTOR_OPTIONS = {"realize_reads_threshold": 8, "combo_kernels": True}


def inductor_options(mode: str) -> dict:
    """torch.compile options for ``mode`` (torch takes either a mode or options): the mode's own plus ours."""
    return {**torch._inductor.list_mode_options(mode), **INDUCTOR_OPTIONS}


class Generator:
    """Runs prefill + token-by-token decode with a static KV cache of ``max_seq_length``.

    ``compile_mode``: ``none`` (eager), ``inductor`` (``torch.compile`` default mode), ``cudagraphs``
    (inductor + one CUDA graph per decode step, see the module docstring) or ``reduce-overhead``
    (``torch.compile``'s CUDA-graph trees). The last two record graphs on the first call, so the first
    sample is the warm-up. ``cudagraphs`` records again when a projection's DEC setting or the caches
    changed (``graph_signature``);
    the weights themselves are read in place, so loading new values into them needs nothing.
    """

    def __init__(self, model: Transformer, device: torch.device, dtype: torch.dtype, max_seq_length: int,
                 compile_mode: str = "none"):
        self.model, self.device, self.max_seq_length = model, device, max_seq_length
        self.compile_mode = compile_mode
        model.setup_caches(1, max_seq_length, dtype, device)
        self._prefill: Callable = prefill
        torch_modes = {"none": None, "inductor": "default", "cudagraphs": "default", "reduce-overhead": "reduce-overhead"}
        if compile_mode not in torch_modes:
            raise ValueError(f"unknown compile mode {compile_mode!r}; choose none, inductor, cudagraphs or reduce-overhead")
        if compile_mode in ("cudagraphs", "reduce-overhead") and device.type != "cuda":
            raise ValueError(f"compile={compile_mode} needs a CUDA device; use compile=inductor or compile=none on CPU")
        mode = torch_modes[compile_mode]
        fn = decode_one_token if mode is None else torch.compile(decode_one_token, fullgraph=True,
                                                                 options=inductor_options(mode))
        self._decode = (GraphedDecode if compile_mode == "cudagraphs" else StaticDecode)(model, fn, device, max_seq_length)
        self._steps_left = 0  # decode steps the generation under way may still take (start)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None) -> torch.Tensor:
        """prompt [S] int64 -> all tokens [S + max_new_tokens] (on the device; caller syncs): ``start``, then
        ``decode`` of the other max_new_tokens - 1."""
        self.start(prompt, max_new_tokens, temperature, top_k)
        self.decode(max_new_tokens - 1, temperature, top_k)
        return self._decode.out[: prompt.numel() + max_new_tokens].clone()

    @torch.no_grad()
    def start(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
              top_k: int | None = None) -> None:
        """Prefill ``prompt`` [S] and pick the first of ``max_new_tokens`` new tokens; ``decode`` takes the others.
        Apart, so that a timer can sync between them and time decode steps alone (``Run._decode_rate``)."""
        s = prompt.numel()
        if s + max_new_tokens > self.max_seq_length:
            raise ValueError(f"prompt ({s}) + max_new_tokens ({max_new_tokens}) exceeds the KV cache ({self.max_seq_length})")
        d = self._decode
        d.refresh()
        d.out[:s] = prompt
        input_pos = torch.arange(s, device=self.device)
        token = self._prefill(self.model, prompt.view(1, -1).to(self.device), input_pos, temperature, top_k)
        d.out[s] = token[0, 0]
        d.tok.copy_(token)
        d.pos.fill_(s)
        self._steps_left = max_new_tokens - 1

    @torch.no_grad()
    def decode(self, steps: int, temperature: float = 0.0, top_k: int | None = None) -> None:
        """``steps`` more decode steps of the generation ``start`` began (at most the max_new_tokens - 1 it allowed)."""
        if not 0 <= steps <= self._steps_left:
            raise ValueError(f"{steps} decode steps asked, {self._steps_left} left of this generation (start one with "
                             "Generator.start and a larger max_new_tokens)")
        for _ in range(steps):
            self._decode.step(temperature, top_k)
        self._steps_left -= steps
