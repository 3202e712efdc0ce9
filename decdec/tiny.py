"""A tiny random Llama (``model=tiny``): an HF-format original checkpoint generated in seconds,
for tests and smoke runs. Its tokenizer is a small byte-level BPE trained on a built-in text;
its weights are HF's random init, so the text it writes is noise, but every code path is real.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from decdec.checkpoint import StagingDir, save_tensors_atomic, write_json_atomic

TEXT = (
    "Dynamic error compensation keeps the residual of every quantized weight in host memory. "
    "At each decoding step the largest activations choose which residual rows are fetched. "
    "The rows travel over the interconnect and are added to the output of the low-bit product. "
    "A three-bit model with compensation can match a model of higher precision at little cost. "
) * 8


def tiny_hf_config(shape: dict) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=shape.get("vocab_size", 320),
        hidden_size=shape.get("dim", 64),
        intermediate_size=shape.get("intermediate_size", 256),
        num_hidden_layers=shape.get("n_layers", 2),
        num_attention_heads=shape.get("n_heads", 4),
        num_key_value_heads=shape.get("n_kv_heads", 2),
        max_position_embeddings=shape.get("max_position_embeddings", 512),
        rms_norm_eps=1e-5,
        tie_word_embeddings=bool(shape.get("tie_word_embeddings", 0)),
        bos_token_id=1,
        eos_token_id=2,
    )
    return cfg.to_dict()


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_original(cache_dir: Path, shape: dict, seed: int = 0) -> Path:
    """HF directory of a random tiny Llama with the given shape (cached by shape and seed)."""
    key = hashlib.sha256(json.dumps({"shape": dict(shape), "seed": seed}, sort_keys=True).encode()).hexdigest()[:12]
    final = Path(cache_dir) / "tiny" / f"original-{key}"
    if (final / "config.json").exists():
        return final
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = tiny_hf_config(shape)
    tok = _train_tokenizer(hf_cfg["vocab_size"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**hf_cfg))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if hf_cfg["tie_word_embeddings"]:
        sd.pop("lm_head.weight", None)
    with StagingDir(final) as tmp:
        save_tensors_atomic(tmp / "model.safetensors", sd)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / "config.json", hf_cfg)
    return final


def tiny_calibration_text() -> str:
    return TEXT * 4
