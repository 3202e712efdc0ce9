"""Small DEC / fused / GEMV calls (and the binary-tensor-core GEMV) for compute-sanitizer (memcheck, racecheck); see
sanitize_dec.sh.

Shapes are small (ragged last chunk, out not a multiple of 32 for the scalar-load path) so the
sanitizers finish in seconds. Exits non-zero if a result is wrong.
"""

from __future__ import annotations

import sys

import torch

from decdec import formats, ops, reference


def main() -> int:
    ops.load_cuda_kernels()
    from decdec import _C

    torch.manual_seed(0)
    dev = torch.device("cuda")
    bad = 0
    for n, out, k_chunk, n_tb in [(2048 + 576, 512, 8, 4), (1024 + 96, 264, 100, 3), (576, 960, 32, 2)]:
        x = (torch.randn(2, n, device=dev) * 2).half()
        q = formats.pack_residual(torch.randint(-7, 8, (out, n)))
        qr = ops.place_residual(q, dev)
        scales = (torch.rand(out, device=dev) * 0.01).half()
        thr = x.float().abs().amax(0).sort(descending=True).values
        bounds = reference.bounds_from_thresholds(thr, k_chunk).to(dev)
        y = torch.ops.decdec.dec(x, qr, scales, bounds, k_chunk, n_tb)
        mask = _C.dec_select(x, bounds, k_chunk)
        ref = (x.float() * mask) @ (formats.unpack_residual(q).float().to(dev) * scales.float()[:, None]).t()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        codes = torch.randint(0, 8, (out, n), device=dev)
        qw = formats.pack_bitplanes(codes, 3)
        lut = torch.randn(out, 8, device=dev).half() * 0.05
        yf = torch.ops.decdec.ap_gemv_dec(x, qw, lut, qr, scales, bounds, k_chunk, n_tb)
        reff = x.float() @ reference.ap_dequant(qw, lut.float()).t() + ref
        errf = ((yf.float() - reff).norm() / reff.norm()).item()
        group = next(g for g in (128, 64, 32) if n % g == 0)
        b = formats.pack_bcq(torch.randint(0, 2, (3, out, n), device=dev))
        a = (torch.rand(n // group, 3, out, device=dev) * 0.03).half()
        qb = (torch.randn(n // group, out, device=dev) * 0.01).half()
        yl = torch.ops.decdec.lutgemm_gemv_dec(x, b, a, qb, qr, scales, bounds, k_chunk, n_tb)
        refl = x.float() @ reference.lutgemm_dequant(b, a.float(), qb.float()).t() + ref
        errl = ((yl.float() - refl).norm() / refl.norm()).item()
        torch.cuda.synchronize()
        ok = err < 2e-3 and errf < 2e-3 and errl < 2e-3
        bad += not ok
        print(f"{n}x{out} k={k_chunk} n_tb={n_tb}: dec err {err:.1e}, ap fused {errf:.1e}, "
              f"lutgemm fused {errl:.1e} {'ok' if ok else 'WRONG'}")
    # chain mode (DEC, then the GEMV as its programmatic dependent; csrc/kernels.h Fused::chain): the tensor-core
    # GEMV (in 2048: warps without k-slices, fixed share; 5120x2000 at n_tb 16, 125 one-block-per-SM groups on a
    # 132-SM card: equal shares, groups split over two blocks; plain and add + norm) and the streaming GEMV (in 4096:
    # plain, add + norm, GLU), kernel layout, M = 2
    for n, out, k_chunk, n_tb in [(2048, 512, 8, 4), (5120, 2000, 8, 16), (4096, 264, 16, 3)]:
        x = (torch.randn(2, n, device=dev) * 2).half()
        q = formats.pack_residual(torch.randint(-7, 8, (out, n)))
        qr = ops.place_residual(q, dev)
        scales = (torch.rand(out, device=dev) * 0.01).half()
        bounds = reference.bounds_from_thresholds(x.float().abs().amax(0).sort(descending=True).values, k_chunk).to(dev)
        qw = formats.pack_bitplanes(torch.randint(0, 8, (out, n), device=dev), 3)
        lut = torch.randn(out, 8, device=dev).half() * 0.05
        pk = formats.pack_ap3_kernel(qw)
        ref = reference.ap_gemv_dec(x, qw, lut, q.to(dev), scales, bounds, k_chunk).float()
        yc = torch.ops.decdec.ap_gemv_dec_chain(x, pk, lut, qr, scales, bounds, k_chunk, n_tb)
        errs = [((yc.float() - ref).norm() / ref.norm()).item()]
        if n >= 4096:
            b = (torch.randn(2, n, device=dev)).half()
            gamma = (torch.rand(n, device=dev) + 0.5).half()
            ya, _ = torch.ops.decdec.ap_gemv_addnorm_dec_chain(x, b, gamma, 1e-5, pk, lut, qr, scales, bounds, k_chunk, n_tb)
            refa, _ = reference.ap_gemv_addnorm_dec(x, b, gamma, 1e-5, qw, lut, q.to(dev), scales, bounds, k_chunk)
            errs.append(((ya.float() - refa.float()).norm() / refa.float().norm()).item())
        if n == 4096:
            yg, _ = torch.ops.decdec.ap_gemv_addnorm_glu_dec_chain(x, b, gamma, 1e-5, pk, lut, qr, scales, bounds,
                                                                   k_chunk, n_tb)
            refg, _ = reference.ap_gemv_addnorm_glu_dec(x, b, gamma, 1e-5, qw, lut, q.to(dev), scales, bounds, k_chunk)
            errs.append(((yg.float() - refg.float()).norm() / refg.float().norm()).item())
        torch.cuda.synchronize()
        ok = all(e < 4e-3 for e in errs)
        bad += not ok
        print(f"chain {n}x{out} k={k_chunk} n_tb={n_tb}: errors {', '.join(f'{e:.1e}' for e in errs)} "
              f"{'ok' if ok else 'WRONG'}")
    # the binary-tensor-core GEMV (csrc/ap_bmma.cu: planes kernel, cp.async rings, shared-memory planes), both dtypes,
    # tokens one after another
    for n, out, dt, m in [(1024, 48, torch.float16, 2), (512, 16, torch.bfloat16, 1)]:
        x = (torch.randn(m, n, device=dev) * 2).to(dt)
        qw = formats.pack_bitplanes(torch.randint(0, 8, (out, n), device=dev), 3)
        lut = (torch.randn(out, 8, device=dev) * 0.05).to(dt)
        y = torch.ops.decdec.ap_gemv(x, formats.pack_ap3_bmma(qw), lut)
        ref = x.float() @ reference.ap_dequant(qw, lut.float()).t()
        torch.cuda.synchronize()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        ok = err < 8e-3
        bad += not ok
        print(f"bmma {n}x{out} {dt} M={m}: error {err:.1e} {'ok' if ok else 'WRONG'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
