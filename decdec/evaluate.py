"""Teacher-forced perplexity with DEC applied at every position.

In decoding, DEC sees one token at a time. Here a whole window goes through the model at once
(prefill shapes), and every ``QuantLinear`` adds the DEC term row by row with exactly the
kernel's bucket selection (``reference.select_channels``, vectorized over the window) -- or an
ablation (``exact_topk``, ``static``, ``random``). Same selection, no per-token Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from decdec.linear import QuantLinear
from decdec.model import Transformer


def set_teacher_forced(model: Transformer, selection: str = "dynamic", seed: int = 0) -> None:
    """Make every DEC-carrying linear apply DEC to all rows of a prefill, with ``selection``."""
    gen = torch.Generator().manual_seed(seed)
    for _, _, mod in model.linears():
        if isinstance(mod, QuantLinear) and mod.dec is not None:
            mod.dec.teacher_forced = True
            mod.dec.selection = selection
            mod.dec.generator = gen


@dataclass
class WindowResult:
    index: int
    start: int  # first token of the window in the text
    tokens: int  # target tokens scored in this window
    nll_sum: float  # summed negative log-likelihood (nats)

    def to_dict(self) -> dict:
        return {"index": self.index, "start": self.start, "tokens": self.tokens, "nll": self.nll_sum / self.tokens,
                "ppl": math.exp(self.nll_sum / self.tokens)}


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) for a sliding-window evaluation over ``n_tokens``.

    Each window scores only targets that no earlier window scored, and never its own first token
    (it has no context there). With ``stride < window`` every target 1..n-1 is scored exactly
    once; with ``stride == window`` (non-overlapping windows, the usual protocol of quantization
    papers) the first token of each window is context only, so ``n - n_windows`` are scored.
    """
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window} stride={stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + window, n_tokens)
        scored = end - max(prev_end, begin + 1)
        if scored > 0:
            out.append((begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(model: Transformer, tokens: torch.Tensor, window: int, stride: int, device: torch.device,
               dtype: torch.dtype, bos_id: int | None = None, on_window=None, progress: bool = True) -> dict:
    """Token-level perplexity of ``tokens`` [N] (int64).

    ``bos_id``: when given, every window is prefixed with BOS (not scored). ``on_window`` is
    called with each ``WindowResult``. Returns perplexity, mean NLL, tokens scored, windows.
    """
    spans = windows(tokens.numel(), window, stride)
    model.setup_caches(1, window + (bos_id is not None), dtype, device)
    nll_total, scored_total = 0.0, 0
    bar = Progress(TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress)
    with bar:
        task = bar.add_task("windows", total=len(spans))
        for i, (begin, end, scored) in enumerate(spans):
            ids = tokens[begin:end].to(device)
            if bos_id is not None:
                ids = torch.cat([torch.tensor([bos_id], device=device), ids])
            logits = model(ids.view(1, -1), torch.arange(ids.numel(), device=device))[0].float()  # [L, V]
            targets = ids[1:]
            nll = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none")  # [L-1]
            nll_sum = float(nll[-scored:].sum())
            nll_total += nll_sum
            scored_total += scored
            if on_window is not None:
                on_window(WindowResult(i, begin, scored, nll_sum))
            bar.advance(task)
    mean = nll_total / scored_total
    return {"perplexity": math.exp(mean), "nll": mean, "tokens_evaluated": scored_total, "windows": len(spans)}
