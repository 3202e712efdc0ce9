"""A few eager calls of one projection's kernels, for ncu (GPU machine): the ap 3-bit GEMV, a
standalone DEC and the fused DEC || GEMV op at one shape, k_chunk and n_tb.

    ncu --clock-control none --set full -k regex:"ap3_gemv|dec_kernel" -c 4 \
        python scripts/kernel_profile.py --shape 4096 28672 --k 4 --n-tb 32
"""

from __future__ import annotations

import argparse

import torch

from decdec import formats, ops, reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 28672], metavar=("IN", "OUT"))
    ap.add_argument("--k", type=int, default=4, help="k_chunk")
    ap.add_argument("--n-tb", type=int, default=16)
    ap.add_argument("--calls", type=int, default=2, help="calls of each op")
    a = ap.parse_args()
    ops.load_cuda_kernels()
    n, out = a.shape
    dt = torch.float16
    x = torch.randn(1, n, device="cuda", dtype=dt)
    qw = torch.randint(-(2**31), 2**31 - 1, (3, out, n // 32), dtype=torch.int32, device="cuda")
    if ops.ap3_kernel_layout(3, dt, n):  # what a built model runs (QuantLinear.use_kernel_layout)
        qw = formats.pack_ap3_kernel(qw)
    lut = torch.randn(out, 8, device="cuda", dtype=dt) * 0.05
    qr = ops.place_residual(torch.randint(-(2**31), 2**31 - 1, (n, out // 8), dtype=torch.int32), torch.device("cuda"))
    scales = torch.rand(out, device="cuda", dtype=dt) * 0.01
    thr = x.float().abs()[0].sort(descending=True).values * 1.1
    bounds = reference.bounds_from_thresholds(thr, a.k).cuda()
    for _ in range(a.calls):
        torch.ops.decdec.ap_gemv(x, qw, lut)
        torch.ops.decdec.dec(x, qr, scales, bounds, a.k, a.n_tb)
        torch.ops.decdec.ap_gemv_dec(x, qw, lut, qr, scales, bounds, a.k, a.n_tb)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
