"""Generation: small pure functions (``prefill``, ``decode_one_token``, ``sample``) that can each
be compiled, and a ``Generator`` that owns the compiled callables (never module globals).

Sampling never syncs with the host inside a step: greedy is an argmax, sampling draws with the
exponential trick (``argmax(p / q), q ~ Exp(1)``) instead of ``torch.multinomial``.
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


class Generator:
    """Runs prefill + token-by-token decode with a static KV cache of ``max_seq_length``.

    ``compile_mode``: ``none`` (eager), ``inductor`` (``torch.compile`` default mode) or
    ``cudagraphs`` (``reduce-overhead``; CUDA graphs are recorded on the first call, so the first
    sample is the warm-up).
    """

    def __init__(self, model: Transformer, device: torch.device, dtype: torch.dtype, max_seq_length: int,
                 compile_mode: str = "none"):
        self.model, self.device, self.max_seq_length = model, device, max_seq_length
        self.compile_mode = compile_mode
        model.setup_caches(1, max_seq_length, dtype, device)
        self._prefill: Callable = prefill
        self._decode: Callable = decode_one_token
        if compile_mode == "inductor":
            self._decode = torch.compile(decode_one_token, mode="default", fullgraph=True)
        elif compile_mode == "cudagraphs":
            if device.type != "cuda":
                raise ValueError("compile=cudagraphs needs a CUDA device; use compile=inductor or compile=none on CPU")
            self._decode = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        elif compile_mode != "none":
            raise ValueError(f"unknown compile mode {compile_mode!r}; choose none, inductor or cudagraphs")

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None) -> torch.Tensor:
        """prompt [S] int64 -> all tokens [S + max_new_tokens] (on the device; caller syncs)."""
        s = prompt.numel()
        if s + max_new_tokens > self.max_seq_length:
            raise ValueError(f"prompt ({s}) + max_new_tokens ({max_new_tokens}) exceeds the KV cache ({self.max_seq_length})")
        out = torch.empty(s + max_new_tokens, dtype=torch.long, device=self.device)
        out[:s] = prompt
        input_pos = torch.arange(s, device=self.device)
        token = self._prefill(self.model, prompt.view(1, -1).to(self.device), input_pos, temperature, top_k)
        out[s] = token[0, 0]
        pos = torch.tensor([s], device=self.device)
        for i in range(1, max_new_tokens):
            token = self._decode(self.model, token.clone(), pos, temperature, top_k)
            out[s + i] = token[0, 0]
            pos += 1
        return out
