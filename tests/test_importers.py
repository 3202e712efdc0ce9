"""Importing artifacts of the original DecDEC tools: files are built here, with torch.save, in
exactly their layouts (list of per-layer dicts keyed by HF module name; permuted scales;
LUT-GEMM state dict), from tensors whose natural-order result is known."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from decdec import checkpoint as ckpt
from decdec import importers, quantize
from decdec.builder import build_model
from decdec.config import DecConfig, KChunk
from decdec.model import PROJECTIONS, ModelArgs
from decdec.prepare import PrepareSpec, prepare_checkpoint
from decdec.tiny import tiny_calibration_text, tiny_original

SHAPE = {"dim": 64, "intermediate_size": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 320}
SPLIT = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
FUSED = {"qkv": "self_attn.qkv_proj", "gate_up": "mlp.gate_up_proj"}


# ---------------------------------------------------------------------------- the reference layouts
def to_reference_scales(scales: torch.Tensor) -> torch.Tensor:
    """Natural [out] -> the original tools' order: scale of output 8c+n at n*(out/8)+c (their loop)."""
    out = scales.numel()
    re = torch.empty_like(scales)
    for c in range(out // 8):
        for n in range(8):
            re[n * (out // 8) + c] = scales[8 * c + n]
    return re


def split_sizes(args: ModelArgs) -> dict[str, list[int]]:
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"qkv": [q, kv, kv], "o": [args.dim], "gate_up": [args.intermediate_size] * 2, "down": [args.dim]}


def export_reference(cheat: dict, thr: dict, args: ModelArgs, fused: bool = False) -> tuple[list, list]:
    """Our cheatsheet/thresholds tensors -> the original tools' per-layer lists."""
    cs, ts = [], []
    for i in range(args.n_layers):
        cl, tl = {}, {}
        for proj, path in PROJECTIONS.items():
            name = f"layers.{i}.{path}"
            q, s, t = cheat[f"{name}.q_residual"], cheat[f"{name}.scales"], thr[f"{name}.thresholds"]
            if fused and proj in FUSED:
                mods, sizes = (FUSED[proj],), [s.numel()]
            else:
                mods = SPLIT[proj]
                sizes = split_sizes(args)[proj] if len(mods) > 1 else [s.numel()]
            for m, qp, sp in zip(mods, q.split([n // 8 for n in sizes], 1), s.split(sizes)):
                cl[m] = {"cheatsheet": qp.contiguous(), "reordered_scales": to_reference_scales(sp)}
                tl[m] = t.clone()
        cs.append(cl)
        ts.append(tl)
    return cs, ts


def export_lutgemm(weights: dict, args: ModelArgs) -> dict:
    """Our lutgemm weights -> a LUT-GEMM state dict (model.layers.{i}.<module>.binary/alpha/q_bias)."""
    sd = {}
    for i in range(args.n_layers):
        for proj, path in PROJECTIONS.items():
            sizes = split_sizes(args)[proj]
            for s in ("binary", "alpha", "q_bias"):
                for m, part in zip(SPLIT[proj], weights[f"layers.{i}.{path}.{s}"].split(sizes, -1)):
                    sd[f"model.layers.{i}.{m}.{s}"] = part.contiguous()
    sd["model.embed_tokens.weight"] = weights["tok_embeddings.weight"]
    for i in range(args.n_layers):  # AWQ-folded norms travel with the codes
        sd[f"model.layers.{i}.input_layernorm.weight"] = weights[f"layers.{i}.attention_norm.weight"]
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = weights[f"layers.{i}.ffn_norm.weight"]
    return sd


# ---------------------------------------------------------------------------- unit: known results
def _random_layer(seed: int, outs: dict[str, list[int]], ins: dict[str, int]):
    """Per proj: the dense parts W and quantized parts Wq (W + noise, rounded), float32."""
    g = torch.Generator().manual_seed(seed)
    ws, wqs = {}, {}
    for proj, sizes in outs.items():
        ws[proj] = [torch.randn(o, ins[proj], generator=g) for o in sizes]
        wqs[proj] = [(w * 4).round() / 4 for w in ws[proj]]
    return ws, wqs


OUTS = {"qkv": [32, 16, 16], "o": [24], "gate_up": [40, 40], "down": [24]}
INS = {"qkv": 24, "o": 32, "gate_up": 24, "down": 40}


def test_cheatsheet_and_thresholds_import_known_result(tmp_path):
    cs, ts, expect_cheat, expect_thr = [], [], {}, {}
    g = torch.Generator().manual_seed(7)
    for i in range(2):
        ws, wqs = _random_layer(i, OUTS, INS)
        cl, tl = {}, {}
        for proj, path in PROJECTIONS.items():
            for m, w, wq in zip(SPLIT[proj], ws[proj], wqs[proj]):
                q, s = quantize.residual_cheatsheet(w, wq)
                cl[m] = {"cheatsheet": q, "reordered_scales": to_reference_scales(s.half())}
            # natural order expected = the residual of the fused matrix (rows are independent)
            q, s = quantize.residual_cheatsheet(torch.cat(ws[proj]), torch.cat(wqs[proj]))
            expect_cheat[f"layers.{i}.{path}.q_residual"], expect_cheat[f"layers.{i}.{path}.scales"] = q, s.half()
            vecs = [torch.rand(INS[proj], generator=g).sort(descending=True).values for _ in SPLIT[proj]]
            for m, v in zip(SPLIT[proj], vecs):
                tl[m] = v.to(torch.bfloat16)  # the original tools calibrate in bf16
            expect_thr[f"layers.{i}.{path}.thresholds"] = torch.stack(vecs).to(torch.bfloat16).float().amax(0)
        cs.append(cl)
        ts.append(tl)
    torch.save(cs, tmp_path / "cheatsheet.pt")
    torch.save(ts, tmp_path / "thresholds.pt")

    cheat = importers.import_reference_cheatsheet(tmp_path / "cheatsheet.pt")
    assert set(cheat) == set(expect_cheat)
    for k, v in expect_cheat.items():
        assert cheat[k].dtype == v.dtype and torch.equal(cheat[k], v), k
    # the permutation really is undone: a scale vector 0..out-1 comes back in order
    assert torch.equal(importers.reference_scales_to_natural(to_reference_scales(torch.arange(48.0))), torch.arange(48.0))
    thr = importers.import_reference_thresholds(tmp_path / "thresholds.pt")
    assert set(thr) == set(expect_thr)
    for k, v in expect_thr.items():
        assert thr[k].dtype == torch.float32 and torch.equal(thr[k], v), k


def test_phi3_fused_names_and_prefixed_keys(tmp_path):
    ws, wqs = _random_layer(3, OUTS, INS)
    layer, thr_layer, expect = {}, {}, {}
    for proj, path in PROJECTIONS.items():
        w, wq = torch.cat(ws[proj]), torch.cat(wqs[proj])
        q, s = quantize.residual_cheatsheet(w, wq)
        mod = FUSED.get(proj, SPLIT[proj][0])
        layer[f"model.layers.0.{mod}"] = {"cheatsheet": q, "reordered_scales": to_reference_scales(s)}
        thr_layer[mod] = torch.linspace(2, 0, INS[proj])
        expect[path] = (q, s)
    torch.save([layer], tmp_path / "cheatsheet.pt")
    torch.save([thr_layer], tmp_path / "thresholds.pt")
    cheat = importers.import_reference_cheatsheet(tmp_path / "cheatsheet.pt")
    for path, (q, s) in expect.items():
        assert torch.equal(cheat[f"layers.0.{path}.q_residual"], q) and torch.equal(cheat[f"layers.0.{path}.scales"], s)
    thr = importers.import_reference_thresholds(tmp_path / "thresholds.pt")
    assert torch.equal(thr["layers.0.attention.wqkv.thresholds"], torch.linspace(2, 0, INS["qkv"]))


def test_lutgemm_bin_known_result(tmp_path):
    sd, expect = {}, {}
    for i in range(2):
        ws, _ = _random_layer(10 + i, OUTS, {"qkv": 64, "o": 64, "gate_up": 64, "down": 64})
        for proj, path in PROJECTIONS.items():
            for m, w in zip(SPLIT[proj], ws[proj]):
                b, a, qb = quantize.quantize_lutgemm(w, 3, group_size=32)
                sd.update({f"model.layers.{i}.{m}.binary": b, f"model.layers.{i}.{m}.alpha": a.half(),
                           f"model.layers.{i}.{m}.q_bias": qb.half()})
            b, a, qb = quantize.quantize_lutgemm(torch.cat(ws[proj]), 3, group_size=32)  # RTN rows are independent
            expect.update({f"layers.{i}.{path}.binary": b, f"layers.{i}.{path}.alpha": a.half(),
                           f"layers.{i}.{path}.q_bias": qb.half()})
    sd["model.norm.weight"] = torch.ones(64)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    got = importers.import_lutgemm_bin(tmp_path / "pytorch_model.bin", n_layers=2)
    assert set(got) == set(expect)
    for k, v in expect.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k

    with pytest.raises(importers.ReferenceImportError, match="layer 2 .*2 layers|names layer 2"):
        sd["model.layers.2.self_attn.q_proj.binary"] = sd["model.layers.0.self_attn.q_proj.binary"]
        torch.save(sd, tmp_path / "bad.bin")
        importers.import_lutgemm_bin(tmp_path / "bad.bin", n_layers=2)
    del sd["model.layers.2.self_attn.q_proj.binary"]
    sd["model.layers.1.mlp.up_proj.alpha"] = sd["model.layers.1.mlp.up_proj.alpha"][:, :2]
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(importers.ReferenceImportError, match=r"model\.layers\.1\.mlp\.up_proj\.alpha must be"):
        importers.import_lutgemm_bin(tmp_path / "bad.bin", n_layers=2)
    del sd["model.layers.1.mlp.up_proj.alpha"]
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(importers.ReferenceImportError, match=r"model\.layers\.1\.mlp\.up_proj lacks \['alpha'\]"):
        importers.import_lutgemm_bin(tmp_path / "bad.bin", n_layers=2)


# ---------------------------------------------------------------------------- unit: refusals
def _one_layer_cheatsheet() -> list:
    q = torch.zeros(8, 2, dtype=torch.int32)
    return [{m: {"cheatsheet": q, "reordered_scales": torch.ones(16)} for ms in SPLIT.values() for m in ms}]


@pytest.mark.parametrize("mutate, match", [
    (lambda cs: cs[0].pop("self_attn.v_proj"), r"layer 0 lacks module\(s\) \['self_attn.v_proj'\]"),
    (lambda cs: cs[0]["self_attn.o_proj"].update(reordered_scales=torch.ones(12)),
     r"layer 0 self_attn.o_proj.reordered_scales must be .* out = 8 \* 2 = 16"),
    (lambda cs: cs[0]["mlp.up_proj"].update(cheatsheet=torch.zeros(8, 2)), r"layer 0 mlp.up_proj.cheatsheet must be .* int32"),
    (lambda cs: cs[0]["self_attn.k_proj"].update(cheatsheet=torch.zeros(4, 2, dtype=torch.int32)),
     r"layer 0 qkv parts disagree on in_features"),
    (lambda cs: cs[0].update({"self_attn.rotary": {}}), r"layer 0 has module 'self_attn.rotary'"),
    (lambda cs: cs[0].update({"self_attn.qkv_proj": cs[0]["self_attn.q_proj"]}), r"both 'self_attn.qkv_proj' and"),
    (lambda cs: cs[0]["mlp.down_proj"].pop("cheatsheet"), r"layer 0 mlp.down_proj must be a dict with 'cheatsheet'"),
])
def test_cheatsheet_structure_errors(tmp_path, mutate, match):
    cs = _one_layer_cheatsheet()
    mutate(cs)
    torch.save(cs, tmp_path / "cheatsheet.pt")
    with pytest.raises(importers.ReferenceImportError, match=match) as e:
        importers.import_reference_cheatsheet(tmp_path / "cheatsheet.pt")
    assert str(tmp_path / "cheatsheet.pt") in str(e.value)


def test_wrong_containers_and_missing_file(tmp_path):
    torch.save({"self_attn.q_proj": torch.ones(3)}, tmp_path / "thresholds.pt")
    with pytest.raises(importers.ReferenceImportError, match="must be a list with one dict per layer"):
        importers.import_reference_thresholds(tmp_path / "thresholds.pt")
    torch.save([{m: torch.arange(4.0) for ms in SPLIT.values() for m in ms}], tmp_path / "thresholds.pt")
    with pytest.raises(importers.ReferenceImportError, match="not sorted descending"):
        importers.import_reference_thresholds(tmp_path / "thresholds.pt")
    with pytest.raises(importers.ReferenceImportError, match="cheatsheet not found"):
        importers.import_reference_cheatsheet(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(importers.ReferenceImportError, match="refusing to load cheatsheet"):
        importers.import_reference_cheatsheet(tmp_path / "garbage.pt")


class Payload:
    """Unpickling this runs code (touches ``path``)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("fn", [importers.import_reference_cheatsheet, importers.import_reference_thresholds,
                                lambda p: importers.import_lutgemm_bin(p, 1)])
def test_malicious_pickle_refused(tmp_path, fn):
    marker = tmp_path / "pwned"
    evil = [{"self_attn.q_proj": {"cheatsheet": Payload(marker), "reordered_scales": torch.ones(8)}}]
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(evil, f, protocol=2)
    with pytest.raises(importers.ReferenceImportError, match="refusing to load .*weights_only=True"):
        fn(tmp_path / "evil.pt")
    assert not marker.exists()


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("importers")
    original = tiny_original(root / "cache", SHAPE)
    spec = dict(bits=3, calib_tokens=256, calib_seq_len=64, clip_tokens=64)
    made = {b: prepare_checkpoint(original, root / b, PrepareSpec(backend=b, **spec), tiny_calibration_text())
            for b in ("ap", "lutgemm")}
    return root, original, made


def _dec_outputs(path: Path, backend: str, k_chunk: int = 256) -> dict:
    """Decode-step (one token) output of every QuantLinear with DEC on, for a fixed x."""
    dec = DecConfig(name="on", n_tb=2, k_chunk=KChunk(qkv=k_chunk, o=k_chunk, gate_up=k_chunk, down=k_chunk))
    built = build_model(ckpt.Checkpoint.open(path), backend, 3, False, torch.float32, torch.device("cpu"), dec)
    g = torch.Generator().manual_seed(0)
    outs = {}
    for proj, layer, mod in built.model.linears():
        assert mod.k_chunk == k_chunk
        x = torch.randn(1, mod.in_features, generator=g)
        outs[(proj, layer)] = mod(x)
    return outs


def _export_files(src: Path, dst: Path, args: ModelArgs) -> tuple[Path, Path]:
    c = ckpt.Checkpoint.open(src)
    cs, ts = export_reference(c.load(ckpt.CHEATSHEET), c.load(ckpt.THRESHOLDS), args)
    dst.mkdir(exist_ok=True)
    torch.save(cs, dst / "cheatsheet.pt")
    torch.save(ts, dst / "thresholds.pt")
    return dst / "cheatsheet.pt", dst / "thresholds.pt"


def test_end_to_end_ap_weights_from(prepared):
    root, original, made = prepared
    args = ModelArgs.from_hf_config(ckpt.Checkpoint.open(original).hf_config)
    cs_pt, th_pt = _export_files(made["ap"], root / "ref-ap", args)
    out = importers.import_reference_checkpoint(original, root / "imported-ap", "ap", 3, cs_pt, th_pt,
                                                weights_from=made["ap"])
    imp, ours = ckpt.Checkpoint.open(out), ckpt.Checkpoint.open(made["ap"])
    assert imp.manifest["imported_from"]["cheatsheet"]["sha256"] == ckpt.file_sha256([cs_pt])
    assert imp.manifest["imported_from"]["weights_from"]["path"] == str(made["ap"].resolve())
    assert (imp.manifest["backend"], imp.manifest["bits"], imp.manifest["mixed"]) == ("ap", 3, False)
    assert json.loads((out / "config.json").read_text()) == ours.hf_config
    assert not list(root.glob(".imported-ap.staging-*"))
    a, b = imp.load(ckpt.CHEATSHEET), ours.load(ckpt.CHEATSHEET)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    thr = imp.load(ckpt.THRESHOLDS)
    assert all(torch.equal(v, ours.load(ckpt.THRESHOLDS)[k]) for k, v in thr.items())
    assert not any(k.endswith("channel_hits") for k in thr)  # ours, not the reference's: dropped
    got, want = _dec_outputs(out, "ap"), _dec_outputs(made["ap"], "ap")
    for k in want:
        assert torch.equal(got[k], want[k]), k

    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        importers.import_reference_checkpoint(original, out, "ap", 3, cs_pt, th_pt, weights_from=made["ap"])
    with pytest.raises(NotImplementedError, match="weights_from"):
        importers.import_reference_checkpoint(original, root / "x", "ap", 3, cs_pt, th_pt)
    with pytest.raises(importers.ReferenceImportError, match="not backend=ap 4-bit"):
        importers.import_reference_checkpoint(original, root / "x", "ap", 4, cs_pt, th_pt, weights_from=made["ap"])
    assert not (root / "x").exists()


def test_end_to_end_lutgemm_bin(prepared):
    root, original, made = prepared
    args = ModelArgs.from_hf_config(ckpt.Checkpoint.open(original).hf_config)
    ours = ckpt.Checkpoint.open(made["lutgemm"])
    cs_pt, th_pt = _export_files(made["lutgemm"], root / "ref-lut", args)
    torch.save(export_lutgemm(ours.load(ckpt.WEIGHTS), args), root / "ref-lut" / "pytorch_model.bin")
    out = importers.import_reference_checkpoint(original, root / "imported-lut", "lutgemm", 3, cs_pt, th_pt,
                                                lutgemm_bin=root / "ref-lut" / "pytorch_model.bin")
    imp = ckpt.Checkpoint.open(out)
    assert imp.manifest["group_size"] == ours.manifest["group_size"] == 64
    assert "lutgemm_bin" in imp.manifest["imported_from"]
    a, b = imp.load(ckpt.WEIGHTS), ours.load(ckpt.WEIGHTS)
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    got, want = _dec_outputs(out, "lutgemm"), _dec_outputs(made["lutgemm"], "lutgemm")
    for k in want:
        assert torch.equal(got[k], want[k]), k

    # layers at 3 and 4 bits make a mixed (3.5-bit) checkpoint with bitwidth_map.json
    sd = export_lutgemm(ours.load(ckpt.WEIGHTS), args)
    g = torch.Generator().manual_seed(1)
    for k in [k for k in sd if k.startswith("model.layers.1.") and k.endswith(".binary")]:
        inp, out = 32 * sd[k].shape[0], sd[k].shape[2]
        b4, a4, q4 = quantize.quantize_lutgemm(torch.randn(out, inp, generator=g), 4, group_size=64)
        sd[k], sd[k[:-6] + "alpha"], sd[k[:-6] + "q_bias"] = b4, a4.half(), q4.half()
    torch.save(sd, root / "ref-lut" / "mixed.bin")
    out = importers.import_reference_checkpoint(original, root / "imported-mixed", "lutgemm", 3, cs_pt, th_pt,
                                                lutgemm_bin=root / "ref-lut" / "mixed.bin")
    mixed = ckpt.Checkpoint.open(out)
    mixed.check_request("lutgemm", 3, True)
    assert mixed.bitwidth_map() == {0: 3, 1: 4}
    from decdec.config import DecBits

    dec = DecConfig(name="on", per_bits={"3": DecBits(2, KChunk(64, 64, 64, 64)), "4": DecBits(2, KChunk(32, 32, 32, 32))})
    built = build_model(mixed, "lutgemm", 3, True, torch.float32, torch.device("cpu"), dec)
    assert {layer: m.bits for _, layer, m in built.model.linears()} == {0: 3, 1: 4}
    with pytest.raises(importers.ReferenceImportError, match=r"holds \[3, 4\]-bit layers; bits=4"):
        importers.import_reference_checkpoint(original, root / "y", "lutgemm", 4, cs_pt, th_pt,
                                              lutgemm_bin=root / "ref-lut" / "mixed.bin")

    # a cheatsheet for another model is a clear error naming the file, and nothing is written
    small = {k: (v[:, :-1] if k.endswith("q_residual") and "wo" in k else v) for k, v in ours.load(ckpt.CHEATSHEET).items()}
    small = {k: (v[:-8] if k.endswith("scales") and "wo" in k else v) for k, v in small.items()}
    cs, _ = export_reference(small, ours.load(ckpt.THRESHOLDS), args)
    torch.save(cs, root / "ref-lut" / "wrong.pt")
    with pytest.raises(importers.ReferenceImportError, match=r"cheatsheet from .*wrong\.pt does not fit .*wo\.q_residual"):
        importers.import_reference_checkpoint(original, root / "y", "lutgemm", 3, root / "ref-lut" / "wrong.pt", th_pt,
                                              lutgemm_bin=root / "ref-lut" / "pytorch_model.bin")
    assert not (root / "y").exists() and not list(root.glob(".y.staging-*"))


def test_cli(prepared, monkeypatch, capsys):
    import runpy
    import subprocess
    import sys

    root, original, made = prepared
    args = ModelArgs.from_hf_config(ckpt.Checkpoint.open(original).hf_config)
    cs_pt, th_pt = _export_files(made["ap"], root / "ref-cli", args)
    script = Path(__file__).resolve().parent.parent / "scripts" / "import_reference.py"
    argv = [str(script), "--original", str(original), "--cheatsheet", str(cs_pt), "--thresholds", str(th_pt),
            "--backend", "ap", "--bits", "3", "--out", str(root / "cli-out"), "--weights-from", str(made["ap"])]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout and ckpt.Checkpoint.open(root / "cli-out").manifest["imported_from"]
    monkeypatch.setattr(sys, "argv", argv)  # the error path, in-process: a message and exit 2, no traceback
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
