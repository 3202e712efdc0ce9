"""Does DEC run concurrently with the base GEMV? (GPU machine)

For each Llama-3-8B projection shape, graph-timed (decdec.timing.graph_seconds, weights rotating over
>= 4x the L2): the ap 3-bit GEMV alone, DEC alone and the fused DEC || GEMV op, for a few k_chunk and
n_tb. `hidden` = (GEMV + DEC - fused) / min(GEMV, DEC): 1 when the shorter one is fully hidden, 0 when
the two run one after the other. `parts`: the same two kernels without the in-kernel combine
(ap_gemv_dec_parts; the decode step adds them inside its next pointwise kernel).

    python scripts/fused_overlap.py [--k 1 4 8] [--n-tb 8 32 132] [--out DIR]
    DECDEC_PDL=0 python scripts/fused_overlap.py      # programmatic dependent launch off

Prints a table and writes it as CSV (the file name carries the PDL setting).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from decdec import formats, ops, reference
from decdec.sinks import write_stamped_csv
from decdec.timing import graph_seconds

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def words(shape, device="cuda"):
    return torch.randint(-(2**31), 2**31, shape, dtype=torch.int64, device=device).to(torch.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--n-tb", type=int, nargs="+", default=[8, 32, 132])
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "fused_overlap")
    a = ap.parse_args()
    ops.load_cuda_kernels()
    pdl = os.environ.get("DECDEC_PDL", "1") != "0"
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    dt16 = torch.float16
    rows = []
    for n, out in SHAPES:
        wbytes = 3 * out * n // 8 + out * 16
        c = max(4, -(-4 * l2 // wbytes))
        qws = [words((3, out, n // 32)) for _ in range(c)]
        if ops.ap3_kernel_layout(3, dt16, n):  # what a built model runs (QuantLinear.use_kernel_layout)
            qws = [formats.pack_ap3_kernel(q) for q in qws]
        luts = [torch.randn(out, 8, device="cuda", dtype=dt16) * 0.05 for _ in range(c)]
        xs = [torch.randn(1, n, device="cuda", dtype=dt16) for _ in range(8)]
        q_res = ops.place_residual(words((n, out // 8), device="cpu"), torch.device("cuda"))
        scales = torch.rand(out, device="cuda", dtype=dt16) * 0.01
        thr = torch.cat(xs).float().abs().amax(0).sort(descending=True).values

        def us(fn):
            return graph_seconds(fn, 24, reps=11) * 1e6

        t_gemv = us(lambda i: torch.ops.decdec.ap_gemv(xs[i % 8], qws[i % c], luts[i % c]))
        for k in a.k:
            bounds = reference.bounds_from_thresholds(thr, k).cuda()
            for ntb in a.n_tb:
                t_dec = us(lambda i: torch.ops.decdec.dec(xs[i % 8], q_res, scales, bounds, k, ntb))
                t_fused = us(lambda i: torch.ops.decdec.ap_gemv_dec(xs[i % 8], qws[i % c], luts[i % c], q_res, scales,
                                                                   bounds, k, ntb))
                t_parts = us(lambda i: torch.ops.decdec.ap_gemv_dec_parts(xs[i % 8], qws[i % c], luts[i % c], q_res,
                                                                         bounds, k, ntb))
                hidden = (t_gemv + t_dec - t_fused) / min(t_gemv, t_dec)
                rows.append({"shape": f"{n}x{out}", "k_chunk": k, "n_tb": ntb, "pdl": int(pdl), "gemv_us": t_gemv,
                             "dec_us": t_dec, "fused_us": t_fused, "slowdown_pct": (t_fused / t_gemv - 1) * 100,
                             "hidden": hidden, "parts_us": t_parts, "parts_slowdown_pct": (t_parts / t_gemv - 1) * 100})
                r = rows[-1]
                print(f"pdl={int(pdl)} {r['shape']:>10} k={k:2d} n_tb={ntb:3d}: gemv {t_gemv:6.2f} us, dec {t_dec:6.2f}, "
                      f"fused {t_fused:6.2f} ({r['slowdown_pct']:+6.1f} %), hidden {hidden:5.2f}; "
                      f"parts {t_parts:6.2f} ({r['parts_slowdown_pct']:+6.1f} %)", flush=True)
        del qws, luts, q_res
        torch.cuda.empty_cache()
    path = write_stamped_csv(a.out, f"fused_overlap-pdl{int(pdl)}", rows)
    print(f"{torch.cuda.get_device_name()}: wrote {path}")


if __name__ == "__main__":
    main()
