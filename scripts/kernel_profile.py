"""One ap 3-bit GEMV (4096x28672), one standalone DEC and one fused call, for ncu (GPU machine):

    ncu --set full -k regex:"ap3_gemv_stream|dec_kernel" -c 4 python scripts/kernel_profile.py
"""

from __future__ import annotations

import torch

from decdec import ops, reference


def main() -> None:
    ops.load_cuda_kernels()
    n, out = 4096, 28672
    dt = torch.float16
    x = torch.randn(1, n, device="cuda", dtype=dt)
    qw = torch.randint(-(2**31), 2**31 - 1, (3, out, n // 32), dtype=torch.int32, device="cuda")
    lut = torch.randn(out, 8, device="cuda", dtype=dt) * 0.05
    qr = ops.place_residual(torch.randint(-(2**31), 2**31 - 1, (n, out // 8), dtype=torch.int32), torch.device("cuda"))
    scales = torch.rand(out, device="cuda", dtype=dt) * 0.01
    thr = x.float().abs()[0].sort(descending=True).values * 1.1
    bounds = reference.bounds_from_thresholds(thr, 4).cuda()
    for _ in range(2):
        torch.ops.decdec.ap_gemv(x, qw, lut)
        torch.ops.decdec.dec(x, qr, scales, bounds, 4, 16)
        torch.ops.decdec.ap_gemv_dec(x, qw, lut, qr, scales, bounds, 4, 16)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
