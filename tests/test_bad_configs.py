"""Bad experiment configs are refused before anything runs, and every message names the key at
fault and the fix (allowed values, a suggestion, or what to change).

Each case: (base config, overrides, key the message must name, fix the message must state).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from train.config import ConfigError, load_config

CASES = {
    # ---- unknown keys and wrong types (the structured schema)
    "typo_in_key": ("tiny", ["train.stepz=3"], "train.stepz", "Did you mean: 'steps'"),
    "unknown_section": ("tiny", ["experiment.steps=3"], "experiment", "valid keys here: run, model, data, parallel"),
    "unknown_nested_key": ("deepseek_v2_lite", ["model.rope_scaling.factr=2"], "model.rope_scaling.factr",
                           "Did you mean: 'factor'"),
    "int_given_text": ("tiny", ["train.steps=ten"], "train.steps", "expected an integer"),
    "float_given_text": ("tiny", ["optim.lr=fast"], "optim.lr", "expected a number"),
    "bool_given_text": ("tiny", ["log.wandb=maybe"], "log.wandb", "expected true or false"),
    "list_given_scalar": ("tiny", ["optim.betas=0.9"], "optim.betas", "expected a list"),
    "optional_int_given_text": ("tiny", ["model.q_lora_rank=abc"], "model.q_lora_rank", "an integer or null"),
    # ---- values out of range
    "negative_lr": ("tiny", ["optim.lr=-0.001"], "optim.lr", "must be > 0"),
    "infinite_lr": ("tiny", ["optim.lr=inf"], "optim.lr", "must be a finite number"),
    "betas_out_of_range": ("tiny", ["optim.betas=[0.9,1.5]"], "optim.betas", "two numbers in [0, 1)"),
    "negative_grad_clip": ("tiny", ["optim.grad_clip=-1"], "optim.grad_clip", "must be >= 0 (0 disables clipping)"),
    "unknown_precision": ("tiny", ["train.precision=fp16"], "train.precision", "must be fp32|bf16|fp8"),
    "keep_no_checkpoints": ("tiny", ["checkpoint.keep_last=0"], "checkpoint.keep_last", "must be >= 1"),
    "unknown_wandb_mode": ("tiny", ["log.wandb_mode=cloud"], "log.wandb_mode", "must be online|offline|disabled"),
    "negative_source_weight": ("tiny", ["data.sources=[{path: x.jsonl, weight: -1}]"], "data.sources[0].weight",
                               "must be a finite number > 0"),
    # ---- the model
    "top_k_beyond_experts": ("tiny", ["model.num_experts_per_tok=20"], "model.num_experts_per_tok",
                             "must be in [1, n_routed_experts=16]"),
    "topk_group_beyond_n_group": ("tiny", ["model.topk_group=5"], "model.topk_group", "must be in [1, n_group=4]"),
    "groups_not_dividing_experts": ("tiny", ["model.n_group=3", "model.topk_group=1"], "n_group=3",
                                    "must be divisible by"),
    "noaux_router_with_softmax": ("tiny", ["model.scoring_func=softmax"], "scoring_func", "needs scoring_func 'sigmoid'"),
    "odd_rope_dim": ("tiny", ["model.qk_rope_head_dim=15"], "model.qk_rope_head_dim", "must be even"),
    "zero_routed_scaling": ("tiny", ["model.routed_scaling_factor=0"], "model.routed_scaling_factor", "must be > 0"),
    "yarn_shrinking_context": ("deepseek_v2_lite", ["model.rope_scaling.factor=0.5"], "model.rope_scaling.factor",
                               "must be >= 1"),
    "negative_dense_layers": ("tiny", ["model.first_k_dense_replace=-1"], "model.first_k_dense_replace", "must be >= 0"),
    "seq_len_beyond_positions": ("tiny", ["train.seq_len=2048"], "train.seq_len",
                                 "lower train.seq_len or raise max_position_embeddings"),
    "vocab_smaller_than_tokenizer": ("tiny", ["model.vocab_size=1024"], "model.vocab_size",
                                     "raise model.vocab_size or lower data.tokenizer_vocab_size"),
    # ---- impossible parallel layouts (whatever the number of GPUs)
    "experts_not_divisible_by_ep": ("tiny", ["parallel.dp_shard=3", "parallel.ep=3"], "parallel.ep",
                                    "use an ep that divides it (1, 2, 4, 8, 16)"),
    "ep_not_dividing_dp_shard": ("tiny", ["parallel.dp_shard=2", "parallel.ep=4"], "parallel.ep",
                                 "set dp_shard to a multiple of ep"),
    "ep_on_a_dense_model": ("tiny", ["model.n_routed_experts=0", "parallel.dp_shard=2", "parallel.ep=2"],
                            "parallel.ep", "set parallel.ep=1"),
    "heads_not_divisible_by_tp": ("tiny", ["parallel.tp=3"], "parallel.tp", "use a tp that divides the number of heads"),
    "more_stages_than_layers": ("tiny", ["parallel.pp=8", "train.grad_accum_steps=8"], "parallel.pp",
                                "at most one stage per layer"),
    "too_few_microbatches_for_1f1b": ("tiny", ["parallel.pp=2"], "train.grad_accum_steps",
                                      "raise train.grad_accum_steps to at least 2"),
    "too_few_microbatches_for_dualpipev": ("tiny", ["parallel.pp=2", "parallel.pipeline_schedule=DualPipeV",
                                                    "train.grad_accum_steps=2"], "train.grad_accum_steps",
                                           "at least 4"),
    "unknown_pipeline_schedule": ("tiny", ["parallel.pipeline_schedule=ZigZag"], "parallel.pipeline_schedule",
                                  "choose one of GPipe, 1F1B"),
    "unknown_data_resume": ("tiny", ["data.resume=continue"], "data.resume", "must be exact|restart"),
    "unknown_data_parallel": ("tiny", ["parallel.data_parallel=ddp"], "parallel.data_parallel", "must be fsdp|zero1"),
    "zero_tp": ("tiny", ["parallel.tp=0"], "parallel.tp", "must be >= 1"),
    # ---- activation recomputation
    "unknown_recompute_mode": ("tiny", ["train.recompute=partial"], "train.recompute", "must be none|selective|full"),
    "unknown_recompute_module": ("tiny", ["train.recompute=selective", "train.recompute_modules=[layernorm,softmax]"],
                                 "train.recompute_modules", "choose from layernorm, mla_up_proj"),
    "selective_without_modules": ("tiny", ["train.recompute=selective", "train.recompute_modules=[]"],
                                  "train.recompute_modules", "needs at least one module"),
    "recompute_module_twice": ("tiny", ["train.recompute=selective", "train.recompute_modules=[mlp,mlp]"],
                               "train.recompute_modules", "lists a module twice"),
    "negative_recompute_layers": ("tiny", ["train.recompute=full", "train.recompute_num_layers=-1"],
                                  "train.recompute_num_layers", "must be >= 0 (0 = every block)"),
    "recompute_layers_without_full": ("tiny", ["train.recompute_num_layers=2"], "train.recompute_num_layers",
                                      "set it to 0 or train.recompute=full"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_names_key_and_fix(repo_root, case):
    base, overrides, key, fix = CASES[case]
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs" / f"{base}.yaml", overrides)
    message = str(err.value)
    assert key in message, f"{case}: key {key!r} not in {message!r}"
    assert fix in message, f"{case}: fix {fix!r} not in {message!r}"


def test_at_least_twenty_distinct_cases():
    assert len(CASES) >= 20
    assert len({tuple(c[1]) for c in CASES.values()}) == len(CASES)


def test_bad_yaml_file(repo_root, tmp_path):
    """Mistakes inside a YAML file are reported the same way as overrides."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match=r"train\.micro_batch: .*Did you mean: 'micro_batch_size'"):
        load_config(bad)
    bad.write_text("model:\n  n_routed_experts: 8\n  num_experts_per_tok: 2\n  n_group: 4\n  topk_group: 2\n"
                   "parallel:\n  dp_shard: 4\n  ep: 16\n")
    with pytest.raises(ConfigError, match=r"parallel\.ep: model\.n_routed_experts=8 cannot be split evenly over ep=16"):
        load_config(bad)


def test_cli_exits_2_with_the_message(repo_root, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", "configs/tiny.yaml", "model.topk_group=5", f"run.dir={tmp_path}/r"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "config error: model.topk_group" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["tiny", "deepseek_v3_671b", "deepseek_v2_lite", "deepseek_v3_16b",
                                  "deepseek_v3_4b_a1b"])
def test_shipped_configs_pass_every_check(repo_root, name):
    load_config(repo_root / "configs" / f"{name}.yaml").validate()
