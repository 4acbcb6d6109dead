"""The gpt-oss family end to end: config, the model against transformers' GptOssForCausalLM
(fp32 logits <= 1e-5, export -> transformers and transformers -> import, sequences longer than
the sliding window, square and non-square experts), MXFP4 export -> import (dequantisation against transformers' is in test_gpt_oss_modules.py), the planner's published totals,
and the tiny demo training."""

from __future__ import annotations

import json

import pytest
import torch

from models.config import ModelConfig, RopeScalingConfig
from models.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from models.transformer import Transformer
from tests.test_export import hf_load, input_ids, save_synthetic_checkpoint
from train.hf.read import HFImportError, init_from_hf, load_hf_model
from train.hf.write import INDEX_FILE, export_checkpoint

transformers = pytest.importorskip("transformers")

TOL = 1e-5
WINDOW = 8
SEQ = 3 * WINDOW + 5  # longer than the window: windowing and sinks both matter


def tiny_cfg(hidden: int = 64, intermediate: int = 32, **kw) -> ModelConfig:
    """3 layers (sliding, full, sliding); MXFP4 needs hidden and intermediate multiples of 32."""
    base = dict(
        family="gpt_oss", vocab_size=96, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, rope_theta=150000.0, rms_norm_eps=1e-5,
        rope_scaling=RopeScalingConfig(factor=32.0, original_max_position_embeddings=16, beta_fast=32.0,
                                       beta_slow=1.0, mscale=0.0, mscale_all_dim=0.0, truncate=False),
        initializer_range=0.1, attn_implementation="eager",
    )
    return ModelConfig(**{**base, **kw})


SHAPES = {"non_square": (64, 32), "square": (32, 32)}  # (hidden, expert intermediate): down_proj [I, H]


def hf_config(cfg: ModelConfig):
    from train.hf import gpt_oss

    d = gpt_oss.config_dict(cfg, torch.float32, "gpt_oss")
    d.pop("architectures"), d.pop("model_type")
    return transformers.GptOssConfig(**d)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_to_transformers_gives_equal_logits(tmp_path, shape):
    cfg = tiny_cfg(*SHAPES[shape])
    ours, ckpt_path = save_synthetic_checkpoint(tmp_path / "run", cfg)
    out = export_checkpoint(ckpt_path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt_oss"
    hf, info = hf_load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = input_ids(cfg.vocab_size, seq=SEQ)
    with torch.no_grad():
        diff = float((ours(ids).logits - hf(ids).logits).abs().max())
    assert diff <= TOL, f"{shape}: max |logit diff| {diff}"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_import_from_transformers_gives_equal_logits(tmp_path, shape):
    cfg = tiny_cfg(*SHAPES[shape])
    torch.manual_seed(1)
    hf = transformers.GptOssForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # every tensor random, biases and sinks included
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf", tiny_cfg(*SHAPES[shape]))
    ids = input_ids(cfg.vocab_size, seq=SEQ, seed=1)
    with torch.no_grad():
        diff = float((ours(ids).logits - hf(ids).logits).abs().max())
    assert diff <= TOL, f"{shape}: max |logit diff| {diff}"
    assert load_hf_model(tmp_path / "hf").cfg.layer_types == cfg.layer_types  # config.json read back


def test_mxfp4_export_then_import_gives_the_quantised_models_logits(tmp_path):
    cfg = tiny_cfg()
    ours, ckpt_path = save_synthetic_checkpoint(tmp_path / "run", cfg)
    out = export_checkpoint(ckpt_path, tmp_path / "hf", torch.float32, mxfp4=True)
    keys = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in keys and "model.layers.0.mlp.experts.down_proj" not in keys
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    with torch.no_grad():  # the reference: our experts through MXFP4 and back, along the packed (input) dim
        for name, p in ours.named_parameters():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                p.copy_(dequantize_mxfp4(*quantize_mxfp4(p), torch.float32))
    model = Transformer(tiny_cfg())
    init_from_hf(model, out)
    ids = input_ids(cfg.vocab_size, seq=SEQ)
    with torch.no_grad():
        diff = float((model.eval()(ids).logits - ours(ids).logits).abs().max())
    assert diff <= TOL
    with pytest.raises(HFImportError, match="architecture differs: model.num_key_value_heads=4"):
        init_from_hf(Transformer(tiny_cfg(num_key_value_heads=4)), out)


def test_export_cli_dtype_mxfp4_and_fp8_refused(tmp_path):
    from safetensors import safe_open

    from train.export import main

    _, ckpt_path = save_synthetic_checkpoint(tmp_path / "run", tiny_cfg())
    assert main(["--checkpoint", str(ckpt_path), "--out", str(tmp_path / "hf"), "--dtype", "mxfp4"]) == 0
    shard = next((tmp_path / "hf").glob("model-*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.down_proj_blocks").dtype == torch.uint8
        assert f.get_tensor("model.layers.1.self_attn.q_proj.weight").dtype == torch.bfloat16  # the rest: bf16
    with pytest.raises(ValueError, match="model_type gpt_oss has no released FP8 format"):
        export_checkpoint(ckpt_path, tmp_path / "fp8", torch.float8_e4m3fn)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.n_routed_experts=8 does not apply to family gpt_oss"):
        tiny_cfg(n_routed_experts=8)
    with pytest.raises(ValueError, match="num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        tiny_cfg(num_key_value_heads=3).validate()
    with pytest.raises(ValueError, match="layer_types needs one entry per layer"):
        tiny_cfg(layer_types=["full_attention"]).validate()
    with pytest.raises(ValueError, match="model.family='gpt-oss' must be one of"):
        ModelConfig(family="gpt-oss").validate()


@pytest.mark.parametrize("name, total, active", [("gpt_oss_20b", 20.91e9, 3.61e9), ("gpt_oss_120b", 116.83e9, 5.13e9)])
def test_planner_counts_the_published_totals(repo_root, name, total, active):
    from models.accounting import count_model
    from train.config import load_config

    cfg = load_config(repo_root / "configs" / f"{name}.yaml").model
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.vocab_size) == (2880, 2880, 201088)
    assert cfg.layer_types[:2] == ["sliding_attention", "full_attention"] and cfg.sliding_window == 128
    counts = count_model(cfg)
    assert counts.params_total == pytest.approx(total, rel=2e-3)
    assert counts.params_active == pytest.approx(active, rel=2e-3)


def test_tiny_gpt_oss_demo_trains_and_its_loss_falls(repo_root, tmp_path):
    from tests.trainer_helpers import SMALL_GPT_OSS, small_overrides
    from train.config import load_config
    from train.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(repo_root / "configs" / "tiny_gpt_oss.yaml", small_overrides(
        run, tmp_path / "cache", model=SMALL_GPT_OSS, **{"train.steps": 30, "train.log_interval": 5}))
    assert cfg.model.family == "gpt_oss" and cfg.model.sliding_window < cfg.train.seq_len
    history = Trainer(cfg).fit()
    first = sum(h["loss"] for h in history[:3]) / 3
    last = sum(h["loss"] for h in history[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert all(h["aux_loss"] > 0 for h in history)
    assert (run / "checkpoints" / "step_00000030" / "COMPLETE").is_file()
    assert load_config(run / "config.yaml").model.num_local_experts == 4  # the saved config loads back
