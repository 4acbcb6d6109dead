"""parallel.layout.check: every layout that cannot work is refused with a LayoutError
naming the config key, and `python -m train` turns it into a clean `config error:` exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from models.config import ModelConfig
from parallel.layout import LayoutError, check
from train.config import ParallelConfig


def moe_model(n_routed_experts: int = 16, **extra) -> ModelConfig:
    return ModelConfig(n_routed_experts=n_routed_experts, **extra)


# Cases are chosen to stay invalid as tensor and pipeline parallelism land (tp=3 does not divide
# 128 heads; 3 stages cannot split 2 layers), so the test pins the contract (LayoutError naming the
# key and the numbers at fault), not the wording.
# (parallel overrides, world size, model overrides, key the message must name, other words it must contain)
INVALID = {
    "world_size_smaller_than_product": (dict(dp_shard=2), 1, {}, "WORLD_SIZE", ["dp_shard", "2", "1"]),
    "world_size_larger_than_product": (dict(dp_replicate=2, dp_shard=2), 8, {}, "WORLD_SIZE", ["dp_replicate", "4", "8"]),
    "experts_not_divisible_by_ep": (dict(dp_shard=3, ep=3), 3, {}, "parallel.ep", ["n_routed_experts=16", "ep=3"]),
    "ep_not_dividing_dp_shard": (dict(dp_shard=2, ep=4), 2, {}, "parallel.ep", ["dp_shard", "ep=4"]),
    "ep_not_dividing_dp_shard_with_tp": (dict(dp_shard=1, tp=2, ep=2), 2, {}, "parallel.ep", []),
    "ep_with_dense_only_model": (dict(dp_shard=2, ep=2), 2, dict(n_routed_experts=0), "parallel.ep", ["n_routed_experts=0", "ep=1"]),
    "tp_not_dividing_heads": (dict(tp=3), 3, dict(num_attention_heads=128), "parallel.tp", []),
    "tp_not_dividing_heads_named": (dict(tp=4), 4, dict(num_attention_heads=6), "parallel.tp", ["model.num_attention_heads=6", "tp=4"]),
    "tp_not_dividing_dense_mlp": (dict(tp=2), 2, dict(intermediate_size=129), "parallel.tp", ["model.intermediate_size=129"]),
    "tp_not_dividing_vocab": (dict(tp=2), 2, dict(vocab_size=4097), "parallel.tp", ["model.vocab_size=4097"]),
    "tp_not_dividing_shared_experts": (dict(tp=2), 2, dict(moe_intermediate_size=33, n_shared_experts=1), "parallel.tp",
                                       ["moe_intermediate_size", "33"]),
    "tp_with_zero1": (dict(tp=2, data_parallel="zero1"), 2, {}, "parallel.data_parallel", ["zero1", "fsdp"]),
    "pp_more_stages_than_layers": (dict(pp=3), 3, dict(num_hidden_layers=2, num_nextn_predict_layers=0), "parallel.pp", []),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_layout_raises_naming_the_key(case):
    overrides, world, model, key, words = INVALID[case]
    with pytest.raises(LayoutError) as err:
        check(ParallelConfig(**overrides), moe_model(**model), world)
    message = str(err.value)
    assert key in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert isinstance(err.value, ValueError)  # callers that catch ValueError still see it


VALID = [
    (dict(), 1, 16),
    (dict(dp_shard=2), 2, 16),
    (dict(dp_shard=2, ep=2), 2, 16),
    (dict(dp_shard=4, ep=2), 4, 16),
    (dict(dp_shard=4, ep=4), 4, 16),
    (dict(dp_replicate=2, dp_shard=2, ep=2), 4, 16),
    (dict(dp_shard=2), 2, 0),  # dense model, plain data parallelism
    (dict(dp_shard=8, ep=8), 8, 8),  # one expert per rank
    (dict(dp_shard=2, ep=2, tp=2), 4, 16),  # ep folds into dp_shard; tp divides the default model's sizes
]


@pytest.mark.parametrize("overrides,world,experts", VALID)
def test_valid_layout_accepted(overrides, world, experts):
    check(ParallelConfig(**overrides), moe_model(experts), world)


def test_cli_reports_layout_error_as_config_error(repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", "configs/tiny.yaml", "parallel.dp_shard=2",
         f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "config error:" in proc.stderr
    assert "WORLD_SIZE" in proc.stderr and "dp_shard" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training started


def test_without_world_size_only_the_process_count_is_skipped():
    check(ParallelConfig(dp_shard=2, ep=2), moe_model())  # no WORLD_SIZE to compare the product with
    with pytest.raises(LayoutError, match="parallel.ep"):
        check(ParallelConfig(dp_shard=3, ep=3), moe_model())


@pytest.mark.parametrize("overrides", [
    {"dp_shard": 3, "ep": 3},
    {"tp": 3},
    {"pp": 8},
    {"pp": 2, "pipeline_schedule": "Interleaved1F1B", "pipeline_layers_per_stage": [2, 0, 1, 1]},
])
def test_config_load_and_runtime_refuse_with_the_same_message(repo_root, overrides):
    """One rule, one message: load_config's refusal is parallel.layout.check's."""
    import dataclasses

    from train.config import ConfigError, load_config

    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["train.grad_accum_steps=8"])
    with pytest.raises(LayoutError) as runtime:
        check(dataclasses.replace(cfg.parallel, **overrides), cfg.model)
    dotlist = [f"parallel.{k}={str(v).replace(' ', '')}" for k, v in overrides.items()]
    with pytest.raises(ConfigError) as loaded:
        load_config(repo_root / "configs" / "tiny.yaml", ["train.grad_accum_steps=8", *dotlist])
    assert str(loaded.value) == str(runtime.value)


# ---------------------------------------------------------------- parallel.dp_shard: auto
@pytest.mark.parametrize("degrees,world,expected", [
    (dict(), 1, 1),
    (dict(), 4, 4),  # plain torchrun --nproc-per-node 4: 4-way data parallel
    (dict(pp=2), 4, 2),
    (dict(tp=2, dp_replicate=2), 8, 2),
    (dict(ep=2), 2, 2),
    (dict(dp_shard=2), 4, 2),  # an explicit value stays as it is (the process-count rule then refuses it)
])
def test_dp_shard_auto_takes_what_the_world_size_leaves(degrees, world, expected):
    from parallel.layout import resolve_dp_shard

    assert ParallelConfig().dp_shard == "auto"  # the default
    assert resolve_dp_shard(ParallelConfig(**degrees), world) == expected


def test_dp_shard_auto_that_cannot_divide_and_bad_values_are_refused():
    from parallel.layout import resolve_dp_shard

    with pytest.raises(LayoutError, match=r"parallel.dp_shard: auto .*WORLD_SIZE=3.* = 2, which does not divide"):
        resolve_dp_shard(ParallelConfig(pp=2), 3)
    for bad in ("two", 0, True):
        with pytest.raises(LayoutError, match="parallel.dp_shard: must be auto or an integer >= 1"):
            resolve_dp_shard(ParallelConfig(dp_shard=bad), 2)
    with pytest.raises(LayoutError, match=r"dp_shard\(2\) x tp\(1\) = 2, but WORLD_SIZE is 4"):
        check(ParallelConfig(dp_shard=2), moe_model(), 4)  # explicit values keep today's message
    check(ParallelConfig(ep=2), moe_model(), 2)  # auto: ep=2 over the 2 processes left


def test_load_config_resolves_dp_shard_auto(repo_root, monkeypatch):
    from train.config import ConfigError, load_config

    tiny = repo_root / "configs" / "tiny.yaml"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert load_config(tiny).parallel.dp_shard == 1  # one process
    assert load_config(tiny, ["parallel.ep=2"], world_size=4).parallel.dp_shard == 4
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun
    cfg = load_config(tiny)
    assert cfg.parallel.dp_shard == 2 and cfg.global_batch_sequences == 2 * cfg.train.micro_batch_size
    with pytest.raises(ConfigError, match="parallel.dp_shard: auto"):
        load_config(tiny, ["parallel.tp=4"], world_size=6)
    with pytest.raises(ConfigError, match="parallel.dp_shard: must be auto or an integer"):
        load_config(tiny, ["parallel.dp_shard=many"])


def test_planner_fills_dp_shard_auto_from_gpus(repo_root, capsys):
    from train.plan import main

    assert main(["--config", str(repo_root / "configs" / "tiny.yaml"), "--gpus", "4", "--json",
                 "parallel.ep=2"]) == 0
    import json

    layout = json.loads(capsys.readouterr().out)["layout"]
    assert (layout["dp_shard"], layout["ep"], layout["edp"]) == (4, 2, 2)
