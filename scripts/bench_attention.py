"""Decode attention per call on the GPU: decdec.decode_attention (one kernel, rows <= pos) against the
SDPA path the model takes otherwise (causal-mask row, grouped query rows, F.scaled_dot_product_attention
over the whole cache), and decdec.decode_attention_rope (the same kernel taking the qkv row unrotated: RoPE of q
and k and the KV-cache write inside it), all replayed from CUDA graphs (decdec.timing.graph_seconds), 32 layers'
caches rotated so the L2 does not hold them. Checks each against decdec.reference first.

    python scripts/bench_attention.py [--heads 32 8 128] [--lengths 88 512 2048 8192] [--out DIR]

Prints a table (us per call, the op's speed-up over SDPA, bytes of K/V rows read / time, the rope op) and writes it
as CSV.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import decdec.ops as ops
from decdec import reference
from decdec.model import gqa_attention
from decdec.sinks import write_stamped_csv
from decdec.timing import graph_seconds

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, nargs=3, default=[32, 8, 128], metavar=("H", "HKV", "DH"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[88, 512, 2048, 8192], help="KV cache rows (L)")
    ap.add_argument("--layers", type=int, default=32, help="caches to rotate over")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_attention")
    a = ap.parse_args()
    ops.load_cuda_kernels()
    dev, dt16 = torch.device("cuda"), torch.float16
    H, Hkv, Dh = a.heads
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for L in a.lengths:
        kv = [torch.randn(2, 1, Hkv, L, Dh, generator=g, device=dev, dtype=dt16) for _ in range(a.layers)]
        q = torch.randn(1, H, Dh, generator=g, device=dev, dtype=dt16)
        qkv = torch.randn(1, (H + 2 * Hkv) * Dh, generator=g, device=dev, dtype=dt16)
        ang = torch.rand(1, Dh // 2, generator=g, device=dev) * 6.0
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
        causal = torch.ones(L, L, device=dev, dtype=torch.bool).tril()
        for p in sorted({L // 2, L - 1}):
            pos = torch.tensor([p], device=dev)

            def op(i, pos=pos):
                return torch.ops.decdec.decode_attention(q, kv[i % a.layers][0], kv[i % a.layers][1], pos, 0)

            def sdpa(i, pos=pos):
                mask = causal[pos][None, None]  # [1, 1, 1, L], as Transformer.forward builds it
                return gqa_attention(q.view(1, H, 1, Dh), kv[i % a.layers][0], kv[i % a.layers][1], mask).view(1, -1)

            def rope(i, pos=pos):  # kv[i] is [2, 1, Hkv, L, Dh]: K and V caches, row pos written in place
                return torch.ops.decdec.decode_attention_rope(qkv, cos, sin, kv[i % a.layers], pos, H, 0)

            ref = reference.decode_attention(q.float(), kv[0][0].float(), kv[0][1].float(), pos, 0)
            ref_rope = reference.decode_attention_rope(qkv.float().cpu(), cos.cpu(), sin.cpu(), kv[0].float().cpu(),
                                                       pos.cpu(), H, 0)
            for name, fn, want in (("decode_attention", op, ref), ("sdpa", sdpa, ref),
                                   ("decode_attention_rope", rope, ref_rope.to(dev))):
                err = (fn(0).float() - want).abs().max().item()
                if err > 1e-2:
                    raise SystemExit(f"{name} differs from the reference at L={L}, pos={p}: max error {err:.3e}")
            t_op, t_sdpa = graph_seconds(op, 4 * a.layers), graph_seconds(sdpa, 4 * a.layers)
            t_rope = graph_seconds(rope, 4 * a.layers)
            kv_bytes = 2 * Hkv * (p + 1) * Dh * 2
            rows.append({"L": L, "pos": p, "op_us": t_op * 1e6, "sdpa_us": t_sdpa * 1e6, "speedup": t_sdpa / t_op,
                         "op_GBps": kv_bytes / t_op / 1e9, "rope_us": t_rope * 1e6})
            r = rows[-1]
            print(f"H={H} Hkv={Hkv} Dh={Dh} L={L:6d} pos={p:6d}: decode_attention {r['op_us']:7.2f} us "
                  f"({r['op_GBps']:6.1f} GB/s of K/V), sdpa {r['sdpa_us']:7.2f} us, x{r['speedup']:.2f}; "
                  f"decode_attention_rope {r['rope_us']:7.2f} us", flush=True)
    path = write_stamped_csv(a.out, "attention", rows)
    print(f"{torch.cuda.get_device_name()}: wrote {path}")


if __name__ == "__main__":
    main()
