"""model=phi3 end to end on a tiny Phi-3-structured checkpoint (fused qkv_proj / gate_up_proj in
the HF weights): prepare -> DecDEC checkpoint -> run.py generate + perplexity with DEC."""

import pytest
import torch

from decdec import prepare, tiny
from decdec.checkpoint import StagingDir, save_tensors_atomic, write_json_atomic


@pytest.fixture(scope="module")
def phi3_dirs(tmp_path_factory):
    from transformers import Phi3Config, Phi3ForCausalLM

    root = tmp_path_factory.mktemp("phi3")
    cfg = Phi3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    assert any("qkv_proj" in k for k in sd) and any("gate_up_proj" in k for k in sd)
    original = root / "original"
    with StagingDir(original) as tmp:
        save_tensors_atomic(tmp / "model.safetensors", sd)
        write_json_atomic(tmp / "config.json", cfg.to_dict())
        tiny._train_tokenizer(320).save_pretrained(tmp)
    out = root / "ap-w3"
    prepare.prepare_checkpoint(original, out, prepare.PrepareSpec(backend="ap", bits=3, calib_tokens=512,
                                                                  calib_seq_len=128), tiny.tiny_calibration_text())
    return original, out


def test_phi3_generate_and_perplexity_with_dec(phi3_dirs, tmp_path, cache_dir):
    from conftest import run_inprocess

    original, ckpt_dir = phi3_dirs
    common = ["model=phi3", f"model.checkpoint_path={ckpt_dir}", "model.dim=64", "model.n_layers=2",
              "model.vocab_size=320", "model.chat_template=false", "logger=yaml",
              "dec.k_chunk.qkv=256", "dec.k_chunk.o=256", "dec.k_chunk.gate_up=256", "dec.k_chunk.down=256"]
    gen = run_inprocess([*common, "task.num_samples=2", "task.max_new_tokens=6"], tmp_path / "gen", cache_dir)
    assert gen["num_samples"] == 2 and gen["dec_rows_per_token"] > 0
    ppl = run_inprocess([*common, "task=perplexity", "task.text=builtin", "task.window=64"], tmp_path / "ppl", cache_dir)
    assert ppl["tokens_evaluated"] > 500 and ppl["perplexity"] > 1
    dense = run_inprocess(["model=phi3", f"model.checkpoint_path={original}", "model.dim=64", "model.n_layers=2",
                           "model.vocab_size=320", "backend=fp16", "logger=yaml", "task=perplexity",
                           "task.text=builtin", "task.window=64"], tmp_path / "dense", cache_dir)
    assert dense["dec_rows_per_token"] == 0


def test_phi3_checkpoint_is_not_a_llama3(phi3_dirs, tmp_path, cache_dir):
    from conftest import run_inprocess

    from decdec.checkpoint import CheckpointError

    _, ckpt_dir = phi3_dirs
    with pytest.raises(CheckpointError, match="arch"):
        run_inprocess(["model=llama3", f"model.checkpoint_path={ckpt_dir}", "logger=yaml"], tmp_path / "x", cache_dir)
