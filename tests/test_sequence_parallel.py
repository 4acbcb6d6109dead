"""Sequence parallelism under TP (parallel/sequence_parallel.py).

One 2-rank launch trains the small model as TP2 with SP on and with SP off (today's TP):
  - with SP every tp rank routes only its own sequence shard: the tokens each MoE router sees per
    rank are B x S / tp (and with SP off, all B x S), counted by a hook on every router;
  - the two runs agree step by step (losses, grad norms, final parameters and router biases) within
    the parity tolerances, here with MLA without q_lora and tied embeddings (the default model matches the
    single process under SP in tests/test_parallel_parity.py's tp2 layouts);
  - every SP collective is counted under the group "tp" (none without SP).
The config errors (sequence not divisible by tp, an ep group over the tp ranks) need no launch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.moe import moe_layers
from tests.distributed import run_ranks
from tests.parity_worker import history_metrics
from tests.test_parallel_parity import assert_parity
from tests.trainer_helpers import small_overrides
from train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
MICRO, SEQ = 2, 64


def train_counting_routed(rank: int, runs: list[list[str]]) -> list[dict]:
    from parallel.mesh import init_distributed
    from parallel.state import full_state_dict
    from train.trainer import Trainer

    results = []
    for overrides in runs:
        cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
        ctx = init_distributed(cfg.parallel, cfg.model)
        trainer = Trainer(cfg, ctx)
        routed: list[int] = []
        for layer in moe_layers(trainer.model):
            layer.gate.register_forward_hook(lambda m, args, out: routed.append(args[0].shape[0]))
        history = trainer.fit()
        results.append({"metrics": history_metrics(history), "state": full_state_dict(trainer.model, ctx),
                        "routed": routed, "comm_keys": sorted({k for h in history for k in h["comm"]["by"]})})
    torch.distributed.destroy_process_group()
    return results


@pytest.mark.multirank
def test_sp_routes_each_shard_once_and_matches_tp(tmp_path):
    common = {"train.steps": 2, "train.micro_batch_size": MICRO, "train.grad_accum_steps": 2, "train.threads": 1,
              "train.seq_len": SEQ, "checkpoint.at_end": "false", "model.bias_update_speed": 0.01,
              "model.aux_loss_alpha": 0.01, "optim.eps": 1e-6, "optim.warmup_steps": 1, "parallel.tp": 2,
              # the other gather point (MLA without q_lora: the hidden state) and a head tied to the embedding;
              # tests/test_parallel_parity.py's tp2 covers the latents' gather and an untied head
              "model.q_lora_rank": "null", "model.tie_word_embeddings": "true"}
    runs = [small_overrides(tmp_path / name, tmp_path / "cache", **common, **{"parallel.sequence_parallel": sp})
            for name, sp in (("sp", "true"), ("tp", "false"))]
    results = run_ranks(2, train_counting_routed, runs)
    for rank, (sp, tp) in enumerate(results):
        assert sp["routed"] and set(sp["routed"]) == {MICRO * SEQ // 2}, (rank, sp["routed"])
        assert set(tp["routed"]) == {MICRO * SEQ}, (rank, tp["routed"])
        assert len(sp["routed"]) == len(tp["routed"])
        assert {"all_gather/tp", "reduce_scatter/tp", "all_reduce/tp"} <= set(sp["comm_keys"]), sp["comm_keys"]
        assert not any(k.endswith("/tp") and not k.startswith("all_reduce") for k in tp["comm_keys"]), tp["comm_keys"]
        assert_parity(tp, sp, f"tp2 sp vs no sp, rank {rank}")


def test_sequence_not_divisible_by_tp_is_a_config_error(tmp_path):
    args = small_overrides(tmp_path, tmp_path, **{"parallel.tp": 2, "train.seq_len": 63})
    with pytest.raises(ConfigError, match=r"train.seq_len: 63 is not divisible by parallel.tp=2.*sequence_parallel=false"):
        load_config(REPO / "configs" / "tiny.yaml", args)
    load_config(REPO / "configs" / "tiny.yaml", args + ["parallel.sequence_parallel=false"])  # plain TP: any length


def test_ep_over_the_tp_ranks_is_refused(tmp_path):
    args = small_overrides(tmp_path, tmp_path, **{"parallel.tp": 2, "parallel.ep": 2, "parallel.dp_shard": 1})
    with pytest.raises(ConfigError, match=r"parallel.ep: ep=2 spans the tp ranks"):
        load_config(REPO / "configs" / "tiny.yaml", args)
