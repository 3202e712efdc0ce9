"""Does a per-projection timing see what a decode step pays for chain DEC? (docs/PERF.md, GPU end to end, session 14)
Random Llama-3-8B-shaped 3-bit weights and 4-bit residuals; graph-timed (timing.graph_seconds), 4 weight copies rotated.
A: the projection alone + a consumer (gate_up as the parts op, as the tuner timed it before session 14).
B: the op the decode step runs (gate_up: addnorm GLU chain; base addnorm GLU) + consume.
C: B after the producer the decode step has (down: the gate_up addnorm-GLU GEMV; gate_up: the o GEMV; qkv: the down
GEMV, into the add + norm chain op; o: the qkv GEMV), as a PDL chain (qkv and o: C only).
extra = DEC - base, us per call. E2E (H200, this session): down k16 n33 ~12.9 us/layer, gate_up k8 n33 7.4-8.2,
down k4 n16 7.3."""
import argparse
import csv
from pathlib import Path

import torch
from decdec import formats, ops, reference, timing

ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap_.add_argument("--out", type=Path, default=Path("outputs/bench/step_context.csv"))
ap_.add_argument("--only", nargs="+", choices=["down", "gate_up", "qkv", "o"], default=["down", "gate_up", "qkv", "o"],
                 help="projections to time (default: all four)")
args = ap_.parse_args()
cuda = torch.cuda.is_available()
dev = torch.device("cuda" if cuda else "cpu")
if cuda:
    ops.load_cuda_kernels()
H = torch.float16
S = 1 if cuda else 16  # CPU smoke run: shapes / 16 (multiples of 256)
COPIES = 4 if cuda else 1
CALLS = 64 if cuda else 2
timer = timing.graph_seconds if cuda else timing.host_seconds


def ap(n, out):
    codes = torch.randint(0, 8, (out, n), device=dev)
    lut = (torch.randn(out, 8, device=dev) / n ** 0.5).sort(dim=1).values.to(H)
    qw = formats.pack_bitplanes(codes, 3)
    return (formats.pack_ap3_kernel(qw) if cuda else qw), lut


def res(n, out):
    q = formats.pack_residual(torch.randint(-7, 8, (out, n), device=dev)).cpu()
    return ops.place_residual(q, dev), (torch.rand(out, device=dev) * 0.01).to(H)


def bounds_for(x, k):
    t = (x.float().abs().amax(0) * 1.1).sort(descending=True).values
    return reference.bounds_from_thresholds(t, k).to(dev)


D, F = 4096 // S, 14336 // S
gamma = torch.ones(D, device=dev, dtype=H)
W_o = [ap(D, D) for _ in range(COPIES)]
R_o = [res(D, D) for _ in range(COPIES)]
W_qkv = [ap(D, D + D // 2) for _ in range(COPIES)]  # Llama-3-8B: 4096 -> 6144
R_qkv = [res(D, D + D // 2) for _ in range(COPIES)]
W_gu = [ap(D, 2 * F) for _ in range(COPIES)]
R_gu = [res(D, 2 * F) for _ in range(COPIES)]
W_dn = [ap(F, D) for _ in range(COPIES)]
R_dn = [res(F, D) for _ in range(COPIES)]
xs_d = [torch.randn(1, D, device=dev).to(H) for _ in range(4)]
xs_f = [torch.randn(1, F, device=dev).to(H) for _ in range(4)]
act0, _ = torch.ops.decdec.ap_gemv_addnorm_glu(xs_d[0], xs_d[1], gamma, 1e-5, *W_gu[0])
y0 = torch.ops.decdec.ap_gemv(xs_d[0], *W_o[0])
print(f"producer output std: glu act {act0.float().std():.3f}, o {y0.float().std():.3f}", flush=True)
op = torch.ops.decdec
rows = []


def run(name, fn):
    s = timer(fn, CALLS)
    rows.append((name, s * 1e6))
    print(f"{name:58s} {s * 1e6:8.2f} us", flush=True)
    return s * 1e6


for k, n_tb in [(16, 33), (4, 16)] if "down" in args.only else []:
    b_f = bounds_for(act0, k)  # x of down: the GLU producer's output statistics
    b_fr = bounds_for(xs_f[0], k)
    a = run(f"down k{k} n{n_tb} A base", lambda i: timing.consume(op.ap_gemv(xs_f[i % 4], *W_dn[i % COPIES])))
    b = run(f"down k{k} n{n_tb} A chain", lambda i: timing.consume(op.ap_gemv_dec_chain(
        xs_f[i % 4], *W_dn[i % COPIES], *R_dn[i % COPIES], b_fr, k, n_tb)))
    def prod(i):
        return op.ap_gemv_addnorm_glu(xs_d[i % 4], xs_d[(i + 1) % 4], gamma, 1e-5, *W_gu[i % COPIES])[0]
    p = run(f"down producer alone", lambda i: timing.consume(prod(i)))
    c = run(f"down k{k} n{n_tb} C producer+base", lambda i: timing.consume(op.ap_gemv(prod(i), *W_dn[i % COPIES])))
    d = run(f"down k{k} n{n_tb} C producer+chain", lambda i: timing.consume(op.ap_gemv_dec_chain(
        prod(i), *W_dn[i % COPIES], *R_dn[i % COPIES], b_f, k, n_tb)))
    print(f"## down k{k} n_tb {n_tb}: extra A {b - a:.2f} us, C {d - c:.2f} us", flush=True)

for k, n_tb in [(8, 33), (4, 16)] if "gate_up" in args.only else []:
    b_d = bounds_for(xs_d[0], k)
    a = run(f"gate_up k{k} n{n_tb} A base (plain)", lambda i: timing.consume(op.ap_gemv(xs_d[i % 4], *W_gu[i % COPIES])))
    b = run(f"gate_up k{k} n{n_tb} A parts", lambda i: timing.consume(op.ap_gemv_dec_parts(
        xs_d[i % 4], *W_gu[i % COPIES], R_gu[i % COPIES][0], b_d, k, n_tb)))
    def glu(i, bb):
        return op.ap_gemv_addnorm_glu(xs_d[i % 4], bb, gamma, 1e-5, *W_gu[i % COPIES])[0]
    def glu_dec(i, bb):
        return op.ap_gemv_addnorm_glu_dec_chain(xs_d[i % 4], bb, gamma, 1e-5, *W_gu[i % COPIES], *R_gu[i % COPIES],
                                                b_d, k, n_tb)[0]
    c = run(f"gate_up k{k} n{n_tb} B base addnorm-glu", lambda i: timing.consume(glu(i, xs_d[(i + 1) % 4])))
    d = run(f"gate_up k{k} n{n_tb} B addnorm-glu chain", lambda i: timing.consume(glu_dec(i, xs_d[(i + 1) % 4])))
    def o(i):
        return op.ap_gemv(xs_d[(i + 2) % 4], *W_o[i % COPIES])
    e = run(f"gate_up k{k} n{n_tb} C o+base", lambda i: timing.consume(glu(i, o(i))))
    f = run(f"gate_up k{k} n{n_tb} C o+chain", lambda i: timing.consume(glu_dec(i, o(i))))
    print(f"## gate_up k{k} n_tb {n_tb}: extra A {b - a:.2f} us, B {d - c:.2f} us, C {f - e:.2f} us", flush=True)

for k, n_tb in [(4, 16), (4, 33)] if "qkv" in args.only else []:
    b_d = bounds_for(xs_d[0], k)
    def down(i):  # the step's producer of qkv's input: the previous layer's down GEMV
        return op.ap_gemv(xs_f[i % 4], *W_dn[i % COPIES])
    c = run(f"qkv k{k} n{n_tb} C down+base addnorm", lambda i: timing.consume(op.ap_gemv_addnorm(
        down(i), xs_d[(i + 1) % 4], gamma, 1e-5, *W_qkv[i % COPIES])[0]))
    d = run(f"qkv k{k} n{n_tb} C down+addnorm chain", lambda i: timing.consume(op.ap_gemv_addnorm_dec_chain(
        down(i), xs_d[(i + 1) % 4], gamma, 1e-5, *W_qkv[i % COPIES], *R_qkv[i % COPIES], b_d, k, n_tb)[0]))
    print(f"## qkv k{k} n_tb {n_tb}: extra C {d - c:.2f} us", flush=True)

for k, n_tb in [(4, 16), (4, 33)] if "o" in args.only else []:
    b_d = bounds_for(xs_d[0], k)
    def qkv(i):  # stands in for attention, which ends the same way (an early trigger)
        return op.ap_gemv(xs_d[i % 4], *W_qkv[i % COPIES])[:, :D]
    c = run(f"o k{k} n{n_tb} C qkv+base", lambda i: timing.consume(op.ap_gemv(qkv(i), *W_o[i % COPIES])))
    d = run(f"o k{k} n{n_tb} C qkv+chain", lambda i: timing.consume(op.ap_gemv_dec_chain(
        qkv(i), *W_o[i % COPIES], *R_o[i % COPIES], b_d, k, n_tb)))
    print(f"## o k{k} n_tb {n_tb}: extra C {d - c:.2f} us", flush=True)

args.out.parent.mkdir(parents=True, exist_ok=True)
tmp = args.out.with_suffix(".tmp")
with tmp.open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["device", "case", "us_per_call"])
    for name, us in rows:
        w.writerow([torch.cuda.get_device_name() if cuda else "cpu (shapes / 16)", name, f"{us:.3f}"])
tmp.replace(args.out)
print(f"wrote {args.out}")
