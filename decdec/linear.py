"""One quantized linear per backend, and the DEC state it owns.

``QuantLinear`` replaces a projection (``wqkv``, ``wo``, ``w1w3``, ``w2``) of the model:

* prefill (more than one token): dequantize + matmul, no DEC (DESIGN.md §1);
* decode (one token): the backend's GEMV, with DEC beside it when ``k_chunk > 0``
  (``torch.ops.decdec.{ap,lutgemm}_gemv_dec_parts``: DEC runs concurrently with the GEMV on the GPU; the
  combine GEMV + scale * DEC is a pointwise op the compiled step fuses into the next kernel).

DEC state (residual, scales, thresholds, ``k_chunk``, ``n_tb``, bucket bounds) lives in one
``DecState`` per linear. The residual is *not* a buffer: ``.to(device)`` never moves it to the
GPU; ``ops.place_residual`` puts it in pinned host memory that the DEC kernel reads zero-copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from decdec import formats, ops, reference


@dataclass
class DecState:
    q_residual: torch.Tensor  # [in, out/8] int32, where DEC reads it (CPU, or mapped pinned host memory)
    scales: torch.Tensor  # [out], compute dtype, on the device
    thresholds: torch.Tensor  # [in] fp32, CPU (calibrated |x| order statistics)
    bounds: torch.Tensor  # [2] fp32 on the device: a, b of the bucket boundaries for k_chunk
    k_chunk: int = 0
    n_tb: int = 1
    # Teacher-forced evaluation (task=perplexity) applies DEC to every position of a prefill,
    # with the kernel's selection ("dynamic") or an ablation; decoding ignores these.
    teacher_forced: bool = False
    selection: str = "dynamic"  # dynamic | exact_topk | static | random
    channel_hits: torch.Tensor | None = None  # [in] calibration top-set counts (static selection)
    generator: torch.Generator | None = None  # random selection


class QuantLinear(nn.Module):
    """y = W x for one backend. x [..., in] -> y [..., out] in x.dtype."""

    def __init__(self, backend: str, in_features: int, out_features: int, bits: int = 3,
                 group_size: int = 128, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.backend, self.in_features, self.out_features, self.bits = backend, in_features, out_features, bits
        if backend == "ap":
            if in_features % 32:
                raise ValueError(f"ap needs in_features % 32 == 0, got {in_features}")
            self.register_buffer("qweight", torch.empty(bits, out_features, in_features // 32, dtype=torch.int32))
            self.register_buffer("lut", torch.empty(out_features, 2**bits, dtype=dtype))
        elif backend == "lutgemm":
            if in_features % group_size or group_size % 32:
                raise ValueError(
                    f"lutgemm group_size={group_size} must divide in_features={in_features} and be a multiple of 32"
                )
            groups = in_features // group_size
            self.register_buffer("binary", torch.empty(in_features // 32, bits, out_features, dtype=torch.int32))
            self.register_buffer("alpha", torch.empty(groups, bits, out_features, dtype=dtype))
            self.register_buffer("q_bias", torch.empty(groups, out_features, dtype=dtype))
        elif backend == "fp16":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype))
        else:
            raise ValueError(f"unknown backend {backend!r}; choose ap, lutgemm or fp16")
        self.dec: DecState | None = None
        self.glu_pairs = False  # rows in GLU pair order (use_glu_layout): the GEMV's raw outputs are paired

    def extra_repr(self) -> str:
        k = self.dec.k_chunk if self.dec else 0
        return f"{self.backend}, in={self.in_features}, out={self.out_features}, bits={self.bits}, k_chunk={k}"

    def use_kernel_layout(self) -> bool:
        """Re-lay 3-bit fp16 ap weights on CUDA in the kernels' own layout (``formats.pack_ap3_kernel``: fewer
        integer instructions per weight in the GEMV, same bytes) where ``ops.ap3_kernel_layout`` says the kernels read
        it. Call once the weights are on their device; every op accepts either layout. Returns whether it did."""
        if not (self.backend == "ap" and self.qweight.is_cuda and self.qweight.dim() == 3 and self.qweight.shape[0] == 3
                and not formats.is_ap3_kernel_layout(self.qweight, self.lut)
                and ops.ap3_kernel_layout(self.bits, self.lut.dtype, self.in_features)):
            return False
        self.qweight = formats.pack_ap3_kernel(self.qweight)
        ops.has_pdl(self.qweight.device)  # cached now, outside any compiled step (dec_chain reads it)
        return True

    def use_glu_layout(self, force: bool = False) -> bool:
        """For a gate_up projection ([gate; up] rows): re-lay the rows in GLU pair order (gate_i, up_i)
        (``formats.glu_pair_order``), so that a one-token decode step runs SiLU x up in the GEMV's epilogue
        (``forward_addnorm_glu``; the down projection's GEMV then chains directly behind it). Only the GEMV's raw
        outputs are paired: ``forward``, ``forward_addnorm`` and ``dequantize`` return the original order, and DEC keeps
        its residual in the original order. Where ``ops.glu_supported`` on CUDA (3-bit fp16 ap on the streaming GEMV),
        or anywhere with ``force`` (tests). Call before ``use_kernel_layout``; returns whether it did."""
        if self.glu_pairs or self.backend != "ap" or self.qweight.dim() != 3 or self.qweight.shape[0] != self.bits:
            return False
        if not force and not (self.qweight.is_cuda and self.lut.dtype == torch.float16
                              and ops.glu_supported(self.bits, self.in_features)):
            return False
        order = formats.glu_pair_order(self.out_features).to(self.qweight.device)
        self.qweight = self.qweight[:, order].contiguous()
        self.lut = self.lut[order].contiguous()
        self.glu_pairs = True
        return True

    @property
    def dec_chain(self) -> bool:
        """Whether a one-token fp16 CUDA decode of this linear with DEC on runs in chain mode (``ops.dec_chain_supported``:
        DEC, then the GEMV as its programmatic dependent, one stream): the op returns the final output, so no combine is
        left to the next kernel and the add + norm and GLU fusions around this projection stay. Elsewhere DEC runs
        beside the GEMV and returns parts (``decode_kernels``)."""
        return (self.k_chunk > 0 and self.backend == "ap" and self.qweight.is_cuda
                and formats.is_ap3_kernel_layout(self.qweight, self.lut)
                and ops.dec_chain_supported(self.bits, self.in_features, self.qweight.device))

    def _unpair(self, y: torch.Tensor) -> torch.Tensor:
        return formats.glu_unpair(y) if self.glu_pairs else y

    # ------------------------------------------------------------------ DEC
    def attach_dec(self, q_residual: torch.Tensor, scales: torch.Tensor, thresholds: torch.Tensor,
                   device: torch.device, channel_hits: torch.Tensor | None = None) -> None:
        """Give this linear its residual ("cheatsheet") and thresholds; DEC stays off until set_dec."""
        if self.backend == "fp16":
            raise ValueError("backend=fp16 has no quantization error to compensate; use dec=off")
        want = (self.in_features, self.out_features // 8)
        if tuple(q_residual.shape) != want or q_residual.dtype != torch.int32:
            raise ValueError(f"q_residual must be {list(want)} int32, got {list(q_residual.shape)} {q_residual.dtype}")
        if scales.numel() != self.out_features or thresholds.numel() != self.in_features:
            raise ValueError(
                f"scales must have {self.out_features} and thresholds {self.in_features} entries, "
                f"got {scales.numel()} and {thresholds.numel()}"
            )
        dtype = self.lut.dtype if self.backend == "ap" else self.alpha.dtype
        self.dec = DecState(
            q_residual=ops.place_residual(q_residual.contiguous(), device),
            scales=scales.to(device=device, dtype=dtype),
            thresholds=thresholds.to(torch.float32).cpu(),
            bounds=torch.zeros(2, dtype=torch.float32, device=device),
            channel_hits=None if channel_hits is None else channel_hits.cpu(),
        )
        if device.type == "cuda":
            # DEC state is not a buffer (so .to() never copies the residual into GPU memory); tell
            # torch.compile its addresses are fixed, or CUDA-graph replays would copy it every step.
            for t in (self.dec.q_residual, self.dec.scales, self.dec.bounds):
                torch._dynamo.mark_static_address(t)

    def set_dec(self, k_chunk: int, n_tb: int) -> None:
        """Choose how many residual rows per 1024 input channels DEC fetches (0 = off)."""
        if not 0 <= k_chunk <= 1024:
            raise ValueError(f"k_chunk must be in 0..1024, got {k_chunk}")
        if n_tb < 1:
            raise ValueError(f"n_tb must be >= 1, got {n_tb}")
        if k_chunk and self.dec is None:
            raise ValueError("this linear has no residual attached; the checkpoint lacks a cheatsheet or use dec=off")
        if self.dec is not None:
            self.dec.k_chunk, self.dec.n_tb = k_chunk, n_tb
            self.dec.bounds.copy_(reference.bounds_from_thresholds(self.dec.thresholds, k_chunk))
        self.place_decode_layout()

    def place_decode_layout(self) -> bool:
        """Hold 3-bit ap weights on CUDA in the decode layout that serves this linear now: the binary-tensor-core layout
        (``formats.pack_ap3_bmma``) where ``ops.bmma_preferred`` and DEC is off here (it has no DEC kernels), else the
        kernel layout (``use_kernel_layout``, where the kernels read it). ``set_dec`` calls it, so the layout follows
        k_chunk; rows keep their order (GLU pairs stay pairs). Returns whether it re-laid the weights."""
        if self.backend != "ap" or self.bits != 3:
            return False
        want = self.k_chunk == 0 and ops.bmma_preferred(self.bits, self.lut.dtype, self.in_features,
                                                        self.out_features, self.qweight.device)
        is_bmma = formats.is_ap3_bmma_layout(self.qweight, self.lut)
        if want == is_bmma:
            return False
        if is_bmma:
            self.qweight = formats.unpack_ap3_bmma(self.qweight)
            self.use_kernel_layout()
            return True
        planes = self.qweight
        if formats.is_ap3_kernel_layout(planes, self.lut):
            planes = formats.unpack_ap3_kernel(planes)
        self.qweight = formats.pack_ap3_bmma(planes)
        return True

    @property
    def k_chunk(self) -> int:
        return self.dec.k_chunk if self.dec is not None else 0

    # ------------------------------------------------------------------ compute
    def dequantize(self) -> torch.Tensor:
        """The quantized weight W_q [out, in] in the compute dtype (original row order)."""
        if self.backend == "ap":
            w = torch.ops.decdec.ap_dequant(self.qweight, self.lut)
            return formats.glu_unpair(w.t()).t() if self.glu_pairs else w
        if self.backend == "lutgemm":
            return torch.ops.decdec.lutgemm_dequant(self.binary, self.alpha, self.q_bias)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        if self.backend == "fp16":
            y = torch.nn.functional.linear(x2, self.weight)
        elif x2.shape[0] > 1:  # prefill: dequantize + matmul, no DEC (unless teacher-forced evaluation)
            w = torch.ops.decdec.ap_dequant(self.qweight, self.lut) if self.backend == "ap" else self.dequantize()
            y = self._unpair(x2 @ w.t())  # the output, not the weight, back in the original order
            d = self.dec
            if d is not None and d.teacher_forced and d.k_chunk:
                y = (y.float() + self._dec_teacher_forced(x2, d)).to(y.dtype)
        else:
            y = self._gemv(x2)
        return y.view(*lead, self.out_features)

    def forward_addnorm(self, a: torch.Tensor, b: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(h)), h) with h = a + b (a alone when b is None): the residual add and RMSNorm before this
        projection. A one-token CUDA decode step with ap 3-bit fp16 weights runs it as one kernel
        (``torch.ops.decdec.ap_gemv_addnorm``: the GEMV forms h and the norm while staging x; with DEC on,
        ``ap_gemv_addnorm_dec_parts``, DEC forming the same x beside it); anything else is the same math as separate
        ops."""
        if b is not None and self._addnorm_kernel(a, norm):
            a2, b2, d = a.reshape(1, self.in_features), b.reshape(1, self.in_features), self.dec
            if self.k_chunk > 0 and self.dec_chain and not self.glu_pairs:  # DEC, then the GEMV; final output
                y, h = torch.ops.decdec.ap_gemv_addnorm_dec_chain(a2, b2, norm.weight, norm.eps, self.qweight, self.lut,
                                                                  d.q_residual, d.scales, d.bounds, d.k_chunk, d.n_tb)
            elif self.k_chunk > 0:  # DEC beside the fused GEMV; it forms the same x from a and b itself
                parts, h = torch.ops.decdec.ap_gemv_addnorm_dec_parts(a2, b2, norm.weight, norm.eps, self.qweight,
                                                                      self.lut, d.q_residual, d.bounds, d.k_chunk,
                                                                      d.n_tb)
                if self.glu_pairs:  # the GEMV's row back in the original order; DEC's rows already are
                    parts = torch.cat([formats.glu_unpair(parts[:1]), parts[1:]])
                y = reference.combine_dec_parts(parts, d.scales, a.dtype)
            else:
                y, h = torch.ops.decdec.ap_gemv_addnorm(a2, b2, norm.weight, norm.eps, self.qweight, self.lut)
                y = self._unpair(y)
            return y.view(*a.shape[:-1], self.out_features), h.view(a.shape)
        h = a if b is None else a + b
        return self(norm(h)), h

    def forward_addnorm_glu(self, a: torch.Tensor, b: torch.Tensor | None, norm: nn.Module,
                            fuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(silu(gate) * up, h) for this gate_up projection on norm(h), h = a + b. One kernel where the rows are in GLU
        pair order (``use_glu_layout``), ``fuse`` and the add + norm GEMV serves with DEC off here
        (``torch.ops.decdec.ap_gemv_addnorm_glu``); otherwise ``forward_addnorm`` (``fuse``) or separate ops, then
        SiLU x up as the model computes it. ``fuse=False``: b is a combine left to the compiled step (the rule of
        ``model.add_norm_project``)."""
        if fuse and self.glu_pairs and b is not None and self.dec_chain and self._addnorm_kernel(a, norm):
            d = self.dec
            act, h = torch.ops.decdec.ap_gemv_addnorm_glu_dec_chain(a.reshape(1, self.in_features),
                                                                    b.reshape(1, self.in_features), norm.weight,
                                                                    norm.eps, self.qweight, self.lut, d.q_residual,
                                                                    d.scales, d.bounds, d.k_chunk, d.n_tb)
            return act.view(*a.shape[:-1], self.out_features // 2), h.view(a.shape)
        if fuse and self.glu_pairs and b is not None and self.k_chunk == 0 and self._addnorm_kernel(a, norm):
            act, h = torch.ops.decdec.ap_gemv_addnorm_glu(a.reshape(1, self.in_features),
                                                          b.reshape(1, self.in_features), norm.weight, norm.eps,
                                                          self.qweight, self.lut)
            return act.view(*a.shape[:-1], self.out_features // 2), h.view(a.shape)
        if fuse:
            y, h = self.forward_addnorm(a, b, norm)
        else:
            h = a if b is None else a + b
            y = self(norm(h))
        gate, up = y.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up, h

    def _addnorm_kernel(self, a: torch.Tensor, norm: nn.Module) -> bool:
        return (self.backend == "ap" and a.is_cuda and a.dtype == torch.float16 and a.numel() == self.in_features
                and norm.weight.dtype == torch.float16
                and ops.addnorm_supported(self.bits, self.in_features))

    def _dec_teacher_forced(self, x: torch.Tensor, d: DecState) -> torch.Tensor:
        """DEC at every row of x [M, in] -> [M, out] fp32, with d.selection choosing the channels."""
        if d.selection == "dynamic":  # the kernel's bucket selection, per token
            mask = reference.select_channels(x, d.bounds, d.k_chunk)
        elif d.selection == "exact_topk":
            mask = reference.select_exact_topk(x, d.k_chunk)
        elif d.selection == "static":
            if d.channel_hits is None:
                raise ValueError("dec.selection=static needs channel_hits in thresholds.safetensors; re-create the checkpoint")
            mask = reference.select_static(d.channel_hits.to(x.device), x.shape[0], d.k_chunk)
        elif d.selection == "random":
            mask = reference.select_random(x.shape[0], x.shape[1], d.k_chunk, d.generator).to(x.device)
        else:
            raise ValueError(f"unknown dec.selection {d.selection!r}; choose dynamic, exact_topk, static or random")
        q_res = d.q_residual if d.q_residual.device == x.device else d.q_residual.to(x.device)
        return reference.dec_residual_masked(x, mask, q_res, d.scales)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dec
        if d is None or d.k_chunk == 0:
            return self._unpair(self.decode_kernels(x))
        if self.dec_chain and not self.glu_pairs and x.dtype == torch.float16:
            return self.decode_kernels(x)  # the chain op's output is final
        if self.glu_pairs:  # the GEMV's row back in the original order; DEC's rows already are
            parts = self.decode_kernels(x)
            return reference.combine_dec_parts(torch.cat([formats.glu_unpair(parts[:1]), parts[1:]]), d.scales,
                                               x.dtype)
        # DEC beside the GEMV; the combine (GEMV + scale * DEC) is a pointwise op that a compiled step fuses into
        # the kernel consuming this projection's output (RoPE, the residual add, SiLU x up), so neither kernel
        # pays the in-kernel combine's atomics and L2 round trips (docs/PERF.md, session 7)
        return reference.combine_dec_parts(self.decode_kernels(x), d.scales, x.dtype)

    def decode_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The decode op of this linear for x [M, in]: the GEMV ([M, out], DEC off), or GEMV || DEC as parts
        ([1 + P', M, out] fp32: GEMV and DEC's unscaled sums, before the combine). What the tuner times: in a compiled decode step the combine
        runs inside the next pointwise kernel."""
        d = self.dec
        on = d is not None and d.k_chunk > 0
        if self.backend == "ap":
            if not on:
                return torch.ops.decdec.ap_gemv(x, self.qweight, self.lut)
            if self.dec_chain and not self.glu_pairs and x.dtype == torch.float16:
                return torch.ops.decdec.ap_gemv_dec_chain(x, self.qweight, self.lut, d.q_residual, d.scales, d.bounds,
                                                          d.k_chunk, d.n_tb)
            return torch.ops.decdec.ap_gemv_dec_parts(x, self.qweight, self.lut, d.q_residual, d.bounds, d.k_chunk,
                                                      d.n_tb)
        if not on:
            return torch.ops.decdec.lutgemm_gemv(x, self.binary, self.alpha, self.q_bias)
        return torch.ops.decdec.lutgemm_gemv_dec_parts(x, self.binary, self.alpha, self.q_bias, d.q_residual,
                                                       d.bounds, d.k_chunk, d.n_tb)
