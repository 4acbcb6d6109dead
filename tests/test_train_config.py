"""Experiment config: every shipped file loads, overrides apply, bad keys/values name the key."""

from __future__ import annotations

import pytest

from train.config import Config, ConfigError, load_config

CONFIG_FILES = ["tiny", "deepseek_v3_671b", "deepseek_v2_lite", "deepseek_v3_16b", "deepseek_v3_4b_a1b", "tiny_gpt_oss",
                "gpt_oss_20b", "gpt_oss_120b"]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_loads(repo_root, name):
    cfg = load_config(repo_root / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)
    cfg.validate()


def test_all_files_in_configs_are_covered(repo_root):
    assert sorted(p.stem for p in (repo_root / "configs").glob("*.yaml")) == sorted(CONFIG_FILES)


def test_overrides_apply(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["train.steps=7", "optim.lr=0.5", "model.n_group=2", "run.name=x"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.5 and cfg.model.n_group == 2
    assert cfg.run.dir == "runs/tiny"  # tiny.yaml sets dir explicitly
    assert load_config(None, ["run.name=abc"]).run.dir == "runs/abc"  # interpolation of the default


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("nosuchsection.a=1", "nosuchsection"),
        ("model.hidden_sizee=3", "model.hidden_sizee"),
        ("train.steps=many", "train.steps"),
        ("optim.lr=fast", "optim.lr"),
        ("model.q_lora_rank=abc", "model.q_lora_rank"),
        ("train.precision=fp4", "train.precision"),
        ("optim.lr=-1", "optim.lr"),
        ("train.seq_len=4096", "train.seq_len"),
        ("model.num_experts_per_tok=99", "model.num_experts_per_tok"),
        ("model.topk_group=9", "model.topk_group"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("parallel.tp=0", "parallel.tp"),
        ("data.on_bad_record=ignore", "data.on_bad_record"),
        ("train.grad_accum_steps=0", "train.grad_accum_steps"),
    ],
)
def test_bad_values_name_the_key(repo_root, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs" / "tiny.yaml", [override])
    assert key in str(err.value)


def test_override_without_equals_is_rejected(repo_root):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(repo_root / "configs" / "tiny.yaml", ["train.steps"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_schedule_boundaries_checked(repo_root):
    with pytest.raises(ConfigError, match="train.mtp_weight.boundaries"):
        load_config(repo_root / "configs" / "tiny.yaml", ["train.mtp_weight.values=[0.3,0.1]"])
