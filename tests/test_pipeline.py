"""Pipeline parallelism without processes: stage splits, stage placement, layout validation, pruning.

The multi-rank parity of every schedule and composition is in test_pipeline_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.transformer import Transformer
from parallel.layout import (SCHEDULES, LayoutError, check, check_microbatches, layout_size, split_layers,
                             stage_to_rank)
from parallel.pipeline import StageModule, prune_model
from train.config import ConfigError, ParallelConfig


def model_cfg(layers: int = 4, mtp: int = 1, **extra) -> ModelConfig:
    return ModelConfig(num_hidden_layers=layers, num_nextn_predict_layers=mtp, n_routed_experts=8, **extra)


@pytest.mark.parametrize(
    "parallel,layers,mtp,expected",
    [
        (dict(pp=2), 4, 1, [[0, 1], [2, 3]]),
        (dict(pp=2), 5, 1, [[0, 1, 2], [3, 4]]),
        (dict(pp=2, pipeline_layers_per_stage=[3, 1]), 4, 1, [[0, 1, 2], [3]]),
        (dict(pp=2, pipeline_layers_per_stage=[1, 3]), 4, 1, [[0], [1, 2, 3]]),
        (dict(pp=2, pipeline_mtp_stage=True), 4, 1, [[0, 1, 2, 3], []]),
        (dict(pp=2, pipeline_layers_per_stage=[4, 0]), 4, 1, [[0, 1, 2, 3], []]),
        (dict(pp=2, pipeline_schedule="Interleaved1F1B"), 4, 1, [[0], [1], [2], [3]]),
        (dict(pp=2, pipeline_schedule="Interleaved1F1B", pipeline_stages_per_rank=3, pipeline_mtp_stage=True),
         5, 1, [[0], [1], [2], [3], [4], []]),
        (dict(pp=2, pipeline_schedule="DualPipeV"), 8, 0, [[0, 1], [2, 3], [4, 5], [6, 7]]),
    ],
)
def test_split_layers(parallel, layers, mtp, expected):
    assert split_layers(ParallelConfig(**parallel), model_cfg(layers, mtp)) == expected


def test_stage_placement_loop_and_v():
    assert [stage_to_rank(s, 2, "single") for s in range(2)] == [0, 1]
    assert [stage_to_rank(s, 2, "loop") for s in range(4)] == [0, 1, 0, 1]
    assert [stage_to_rank(s, 4, "v") for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]


INVALID = {
    "more_stages_than_layers": (dict(pp=4), 3, 0, ["parallel.pp", "num_hidden_layers=3"]),
    "counts_wrong_length": (dict(pp=2, pipeline_layers_per_stage=[4]), 4, 1,
                            ["parallel.pipeline_layers_per_stage", "1 entries for 2 stages"]),
    "counts_wrong_sum": (dict(pp=2, pipeline_layers_per_stage=[2, 3]), 4, 1,
                         ["parallel.pipeline_layers_per_stage", "num_hidden_layers=4"]),
    "empty_middle_stage": (dict(pp=2, pipeline_schedule="Interleaved1F1B", pipeline_layers_per_stage=[2, 0, 1, 1]),
                           4, 1, ["parallel.pp", "stage 1"]),
    "empty_last_stage_without_mtp": (dict(pp=2, pipeline_layers_per_stage=[4, 0]), 4, 0, ["parallel.pp", "MTP"]),
    "mtp_stage_without_mtp": (dict(pp=2, pipeline_mtp_stage=True), 4, 0, ["parallel.pipeline_mtp_stage"]),
    "unknown_schedule": (dict(pp=2, pipeline_schedule="2F2B"), 4, 1, ["parallel.pipeline_schedule", "1F1B"]),
    "v_needs_two_stages_per_rank": (dict(pp=2, pipeline_schedule="ZBVZeroBubble", pipeline_stages_per_rank=3), 8, 1,
                                    ["parallel.pipeline_stages_per_rank", "exactly 2"]),
    "single_schedule_virtual_stages": (dict(pp=2, pipeline_schedule="1F1B", pipeline_stages_per_rank=2), 4, 1,
                                       ["parallel.pipeline_stages_per_rank", "one stage per rank"]),
    "too_few_microbatches_1f1b": (dict(pp=4, pipeline_microbatches=2), 4, 0,
                                  ["parallel.pipeline_microbatches", "at least 4"]),
    "too_few_microbatches_dualpipev": (dict(pp=2, pipeline_schedule="DualPipeV", pipeline_microbatches=3), 4, 1,
                                       ["parallel.pipeline_microbatches", "at least 4"]),
    "interleaved_rounds": (dict(pp=4, pipeline_schedule="Interleaved1F1B", pipeline_microbatches=9), 8, 0,
                           ["parallel.pipeline_microbatches", "multiple"]),
    "v_schedule_fsdp_tied_embeddings": (dict(pp=2, dp_shard=2, pipeline_schedule="DualPipeV", data_parallel="fsdp"),
                                        4, 1, ["parallel.pipeline_schedule", "tie_word_embeddings"],
                                        dict(tie_word_embeddings=True)),
    "v_schedule_with_tp_and_mtp": (dict(pp=2, tp=2, pipeline_schedule="ZBVZeroBubble", data_parallel="fsdp"),
                                   4, 1, ["parallel.pipeline_schedule", "tp=1"]),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_pipeline_layout(case):
    parallel, layers, mtp, words, *model_extra = INVALID[case]
    p = ParallelConfig(**parallel)
    world = layout_size(p)
    with pytest.raises(LayoutError) as err:
        check(p, model_cfg(layers, mtp, **(model_extra[0] if model_extra else {})), world)
        if p.pipeline_microbatches is not None:
            check_microbatches(p, p.pipeline_microbatches)
    for word in words:
        assert word in str(err.value), f"{word!r} not in {err.value}"


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_valid_pipeline_layouts(schedule):
    p = ParallelConfig(pp=2, dp_shard=2, ep=2, pipeline_schedule=schedule, pipeline_microbatches=4,
                       data_parallel="zero1")
    check(p, model_cfg(4, 1), 4)
    check_microbatches(p, 4)


@pytest.mark.parametrize("schedule,mtp", [("InterleavedZeroBubble", 1), ("ZBVZeroBubble", 1), ("DualPipeV", 0),
                                          ("DualPipeV", 1), ("1F1B", 1)])
def test_fsdp_with_pipeline_schedules(schedule, mtp):
    """FSDP2 works with split-backward schedules and with V placement (MTP: private embedding copy)."""
    p = ParallelConfig(pp=2, dp_shard=2, pipeline_schedule=schedule, data_parallel="fsdp")
    check(p, model_cfg(4, mtp), 4)


def test_pipeline_microbatches_must_match_grad_accum(repo_root):
    from train.config import load_config

    with pytest.raises(ConfigError, match="parallel.pipeline_microbatches"):
        load_config(repo_root / "configs" / "tiny.yaml",
                    ["parallel.pp=2", "parallel.pipeline_microbatches=3", "train.grad_accum_steps=4"])


def test_pruning_keeps_names_and_ties_the_embedding():
    """Union of every rank's parameter names is the full model's; both ends keep embed_tokens."""
    cfg = model_cfg(4, 1, vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                    num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    torch.manual_seed(0)
    full = dict(Transformer(cfg).named_parameters())
    split = split_layers(ParallelConfig(pp=2, pipeline_layers_per_stage=[1, 3]), cfg)
    names: set[str] = set()
    for stage, layers in enumerate(split):
        torch.manual_seed(0)
        model = Transformer(cfg)
        prune_model(model, set(layers), first=stage == 0, last=stage == 1)
        mine = dict(model.named_parameters())
        for name, p in mine.items():
            torch.testing.assert_close(p, full[name], rtol=0, atol=0)  # same init as the single-process model
        assert "embed_tokens.weight" in mine  # first stage: input; last stage: MTP's shifted tokens
        assert ("lm_head.weight" in mine) == (stage == 1)
        assert any(n.startswith("mtp.") for n in mine) == (stage == 1)
        names |= set(mine)
        StageModule(model, stage, 2, layers, torch.float32)  # wraps without copying
    assert names == set(full)


@pytest.mark.parametrize("tie", [False, True])
def test_stages_compose_the_models_forward(tie):
    """Two stages (the last one without layers: the MTP stage) give Transformer.forward's loss sums bit for bit."""
    cfg = model_cfg(2, 2, vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                    num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=2, tie_word_embeddings=tie)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 64, (2, 10), generator=g), torch.randint(0, 64, (2, 10), generator=g)
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [2] * 10])
    torch.manual_seed(0)
    want = Transformer(cfg)(ids, labels, doc_ids).loss_sums()
    stages = []
    for stage, layers in enumerate([[0, 1], []]):
        torch.manual_seed(0)
        model = Transformer(cfg)
        prune_model(model, set(layers), first=stage == 0, last=stage == 1)
        stages.append(StageModule(model, stage, 2, layers, torch.float32))
    h = stages[0](ids, tokens=ids, labels=labels, doc_ids=doc_ids)
    got = stages[1](h, tokens=ids, labels=labels, doc_ids=doc_ids)
    assert got.shape == (3,) and torch.equal(got, want)


def test_interleaved_microbatch_rounds_checked_at_config_load(repo_root):
    from train.config import load_config

    with pytest.raises(ConfigError, match="train.grad_accum_steps"):
        load_config(repo_root / "configs" / "tiny.yaml",
                    ["parallel.pp=2", "parallel.pipeline_schedule=Interleaved1F1B", "train.grad_accum_steps=5"])
    load_config(repo_root / "configs" / "tiny.yaml",
                ["parallel.pp=2", "parallel.pipeline_schedule=LoopedBFS", "train.grad_accum_steps=5"])
