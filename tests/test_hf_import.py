"""HF import (train/hf/read.py): a transformers-initialised DeepseekV3 saved with save_pretrained
gives our model the same logits; export -> import is the identity (MTP included); the trainer
starts from HF weights with `checkpoint.init_from_hf`."""

from __future__ import annotations

import json

import pytest
import torch

from models.config import RopeScalingConfig
from tests.test_export import input_ids, max_logit_diff, save_synthetic_checkpoint, small_v3_config
from tests.trainer_helpers import small_overrides
from train.config import ConfigError, load_config
from train.hf.write import export_checkpoint
from train.hf.read import HFImportError, hf_model_config, load_hf_model, load_hf_weights
from train.trainer import Trainer

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def hf_v3(**extra):
    """A transformers-initialised DeepseekV3ForCausalLM (tiny, YaRN, random norms and router biases)."""
    values = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    )
    values.update(extra)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**values)).eval()
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("norm.weight"):
                t.add_(0.1 * torch.randn_like(t))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.05 * torch.randn_like(t))
    return model


@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory):
    hf = hf_v3()
    out = tmp_path_factory.mktemp("hf_v3")
    hf.save_pretrained(str(out))
    return hf, out


def test_import_transformers_model_gives_equal_logits(saved_hf):
    hf, path = saved_hf
    cfg = hf_model_config(path)
    yarn = RopeScalingConfig(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0)
    assert cfg.rope_scaling == yarn
    assert (cfg.scoring_func, cfg.topk_method, cfg.num_nextn_predict_layers) == ("sigmoid", "noaux_tc", 1)
    from models.transformer import Transformer

    ours = Transformer(cfg)
    report = load_hf_weights(ours, path)
    assert report.ignored == [] and report.shared_mismatch == []
    # save_pretrained writes no MTP layer: ours keeps its initialised one, and says so.
    assert report.missing_mtp and all(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in report.missing_mtp)
    ids = input_ids(cfg.vocab_size, seq=96)  # past YaRN's original 64 positions
    assert max_logit_diff(ours, hf, ids) <= TOL
    # The imported router biases steer our selection as they steer transformers'.
    with torch.no_grad():
        for name, t in ours.state_dict(keep_vars=True).items():
            if name.endswith("e_score_correction_bias"):
                t.zero_()
    assert max_logit_diff(ours, hf, ids) > 1e-3


def test_import_reads_transformers_fused_expert_layout(saved_hf, tmp_path):
    """transformers' in-memory names (experts.gate_up_proj [E, 2I, H]) load as well as per-expert keys."""
    from safetensors.torch import save_file

    hf, path = saved_hf
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ours = load_hf_model(tmp_path)
    assert max_logit_diff(ours, hf, input_ids(512)) <= TOL


def test_export_then_import_is_identity_with_mtp(tmp_path):
    cfg = small_v3_config(
        rope_scaling=RopeScalingConfig(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0),
        num_nextn_predict_layers=2, bias_update_speed=0.02, capacity_factor=None,
    )
    model, checkpoint = save_synthetic_checkpoint(tmp_path / "run", cfg, seed=3)
    out = export_checkpoint(checkpoint, tmp_path / "hf", max_shard_size="150KB")
    imported_cfg = hf_model_config(out)
    assert imported_cfg == cfg  # including moeforge-only fields, kept under "moeforge" in config.json
    ours = load_hf_model(out)
    report = load_hf_weights(ours, out)
    assert report.missing_mtp == [] and report.ignored == [] and report.shared_mismatch == []
    expected, got = model.state_dict(), ours.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_import_refuses_mismatched_shapes(saved_hf):
    _, path = saved_hf
    from models.transformer import Transformer

    cfg = hf_model_config(path)
    cfg.moe_intermediate_size = 16
    with pytest.raises(HFImportError, match=r"experts\.0\.gate_proj\.weight has shape"):
        load_hf_weights(Transformer(cfg), path)


@pytest.fixture
def word_tokenizer(tmp_path):
    """A 512-token word-level tokenizer (no BPE training needed for a trainer that does not train)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "[UNK]": 2, **{f"w{i}": i + 3 for i in range(509)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tok"
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_trainer_starts_from_hf_weights(repo_root, tmp_path, word_tokenizer):
    """checkpoint.init_from_hf: a fresh run's model holds the HF weights; a mismatch fails clearly."""
    overrides = small_overrides(tmp_path / "run", tmp_path / "cache", **{"data.tokenizer": word_tokenizer})
    cfg = load_config(repo_root / "configs" / "tiny.yaml", overrides)
    hf = hf_v3(num_hidden_layers=cfg.model.num_hidden_layers, max_position_embeddings=cfg.model.max_position_embeddings,
               rope_parameters={"rope_type": "default", "rope_theta": cfg.model.rope_theta})
    hf.save_pretrained(str(tmp_path / "hf"))
    cfg.checkpoint.init_from_hf = str(tmp_path / "hf")
    trainer = Trainer(cfg, data=iter(()))
    expected = load_hf_model(tmp_path / "hf", cfg.model).state_dict()
    got = trainer.model.state_dict()
    for name, t in expected.items():
        if not name.startswith("mtp."):  # not in the HF files: initialised
            assert torch.equal(got[name], t), name
    with torch.no_grad():
        assert max_logit_diff(trainer.model, hf, input_ids(512)) <= TOL

    bad = load_config(repo_root / "configs" / "tiny.yaml",
                      overrides + ["model.hidden_size=128", f"run.dir={tmp_path / 'r2'}"])
    bad.checkpoint.init_from_hf = str(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"checkpoint.init_from_hf: .*model.hidden_size=128 but 64"):
        Trainer(bad, data=iter(()))


def test_hf_import_cli_prints_model_section(saved_hf, capsys):
    from train.hf.read import main

    _, path = saved_hf
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "model:" in text and "hidden_size: 64" in text and f"checkpoint.init_from_hf={path}" in text
    json.loads((path / "config.json").read_text())  # untouched


def test_unknown_families_are_refused_by_name(tmp_path):
    """A config.json of a family no module handles, and a model config no family exports, fail clearly."""
    from models.config import ModelConfig
    from train.hf.families import family_of_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HFImportError, match=r"config\.json: .*model_type 'llama' is not deepseek_v3 or deepseek_v2"):
        hf_model_config(tmp_path)
    with pytest.raises(ValueError, match=r"scoring_func='sigmoid' with model.topk_method='greedy' has no Hugging Face"):
        family_of_config(ModelConfig(scoring_func="sigmoid", topk_method="greedy"))
