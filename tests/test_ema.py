"""EMA of the weights in CPU memory (train.ema_decay, parallel/ema.py): the formula, its interval,
saves that never lag behind the background update, exact resume, old checkpoints, export --ema,
and the same EMA under FSDP2 and EP on 2 ranks as in one process."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallel.ema import WeightEMA
from tests.distributed import run_ranks
from tests.parity_worker import train_and_report
from tests.trainer_helpers import small_overrides
from train import checkpoint as ckpt
from train.config import ConfigError, load_config
from train.export import main as export_main
from train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
DECAY, STEPS = 0.5, 4
EMA_ON = {"train.ema_decay": DECAY, "train.ema_interval": 2, "checkpoint.interval": 2, "checkpoint.keep_last": 5}


def overrides(run_dir: Path, cache_dir: Path, **extra) -> list[str]:
    return small_overrides(run_dir, cache_dir, **{"train.steps": STEPS, "optim.warmup_steps": 1,
                                                  "optim.decay_steps": STEPS, **extra})


def make_trainer(repo_root: Path, run_dir: Path, cache_dir: Path, **extra) -> Trainer:
    return Trainer(load_config(repo_root / "configs" / "tiny.yaml", overrides(run_dir, cache_dir, **extra)))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def saved_ema(path: Path) -> dict[str, torch.Tensor]:
    saved = ckpt.SavedModel(path, ema=True)
    return {n: saved.read(n) for n in saved.shapes() if saved._keys[n].startswith("ema.")}


def assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), what
    for n, ref in expected.items():
        assert torch.equal(got[n], ref), f"{what}: {n}"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ema_cache")


@pytest.fixture(scope="module")
def reference(repo_root, tmp_path_factory, cache_dir):
    """4 steps, EMA every 2nd step, sync checkpoints at 2 and 4, with a background update slowed down
    so that a save that did not wait for it would hold the previous EMA. Returns the run dir, the
    history, the hand-computed EMA after each step and the trainer's final EMA."""
    run_dir = tmp_path_factory.mktemp("ema_run")
    trainer = make_trainer(repo_root, run_dir, cache_dir, **EMA_ON)
    expected = {0: weights(trainer)}  # the EMA starts from the initial weights
    real_step, real_blend = trainer.train_step, trainer.ema._blend

    def step_and_compute():
        metrics = real_step()
        previous, w = expected[trainer.step - 1], weights(trainer)
        if trainer.step % 2:
            expected[trainer.step] = previous
        else:  # ema <- d * ema + (1 - d) * w, the same roundings as parallel/ema.py
            expected[trainer.step] = {n: previous[n] * DECAY + w[n] * (1 - DECAY) for n in w}
        return metrics

    def slow_blend(copied):
        time.sleep(0.5)  # longer than a save of this model takes
        real_blend(copied)

    trainer.train_step, trainer.ema._blend = step_and_compute, slow_blend
    history = trainer.fit()
    return run_dir, history, expected, {n: t.clone() for n, t in trainer.ema.averages().items()}


def test_ema_is_the_hand_computed_average_and_saves_wait_for_it(reference):
    run_dir, history, expected, final = reference
    assert_equal(final, expected[STEPS], "final EMA")
    assert not torch.equal(final["embed_tokens.weight"], expected[0]["embed_tokens.weight"])  # it moved
    root = run_dir / "checkpoints"
    for step in (2, 4):  # each save came right after the step's update was queued
        assert_equal(saved_ema(ckpt.step_dir(root, step)), expected[step], f"checkpoint {step}")
    assert all(h["ema_lag_s"] >= 0 for h in history)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["ema_lag_s"] > 0.0  # a finished background update's duration


def test_resume_continues_with_the_same_ema_bitwise(repo_root, reference, tmp_path, cache_dir):
    run_dir, history, _, final = reference
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt.step_dir(run_dir / "checkpoints", 2), ckpt.step_dir(resumed / "checkpoints", 2))
    trainer = make_trainer(repo_root, resumed, cache_dir, **EMA_ON)
    assert trainer.step == 2
    rest = trainer.fit()
    assert [h["loss"] for h in rest] == [h["loss"] for h in history[2:]]
    assert_equal(trainer.ema.averages(), final, "resumed EMA")


def test_checkpoint_without_ema_starts_it_from_the_weights(repo_root, tmp_path, cache_dir, caplog):
    run_dir = tmp_path / "run"
    make_trainer(repo_root, run_dir, cache_dir, **{"train.steps": 1}).fit()
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(repo_root, run_dir, cache_dir, **{"train.steps": 1, "train.ema_decay": 0.9})
    assert trainer.step == 1
    assert_equal(trainer.ema.averages(), {n: w.float() for n, w in weights(trainer).items()}, "EMA at resume")
    assert sum("has no EMA" in r.getMessage() for r in caplog.records) == 1
    out = export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"), "--ema"])
    assert out == 1  # no EMA to export
    from train.inference import load_for_inference

    with pytest.raises(ckpt.CheckpointError, match="no EMA of the weights"):
        load_for_inference(ckpt.resolve_checkpoint(run_dir), ema=True)


def test_export_ema_writes_the_checkpoints_ema(reference, tmp_path, capsys):
    run_dir, _, expected, _ = reference
    path = ckpt.step_dir(run_dir / "checkpoints", STEPS)
    assert export_main(["--checkpoint", str(path), "--out", str(tmp_path / "ema"), "--ema"]) == 0
    assert export_main(["--checkpoint", str(path), "--out", str(tmp_path / "weights")]) == 0
    capsys.readouterr()

    def exported(d: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    ema, plain = exported(tmp_path / "ema"), exported(tmp_path / "weights")
    assert ema.keys() == plain.keys()
    assert torch.equal(ema["model.embed_tokens.weight"], expected[STEPS]["embed_tokens.weight"])
    buffers = {k for k in ema if "e_score_correction_bias" in k}
    assert buffers  # the router biases are buffers: exported as saved
    for k in ema:
        assert torch.equal(ema[k], plain[k]) == (k in buffers), k  # every parameter from the EMA


@pytest.mark.parametrize("bad, key", [({"train.ema_decay": 1.0}, "train.ema_decay"),
                                      ({"train.ema_decay": -0.1}, "train.ema_decay"),
                                      ({"train.ema_decay": 0.9, "train.ema_interval": 0}, "train.ema_interval")])
def test_bad_ema_settings_name_the_key(repo_root, tmp_path, bad, key):
    with pytest.raises(ConfigError, match=key):
        load_config(repo_root / "configs" / "tiny.yaml", overrides(tmp_path, tmp_path, **bad))


def test_update_snapshots_before_returning():
    """On CPU the snapshot is taken by update() itself: changing the weights right after does not reach the EMA."""
    model = torch.nn.Linear(4, 4)
    ema = WeightEMA(model, 0.5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.update(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(100.0)  # the next step, while the blend may still run
    got = ema.averages()
    for n in start:
        assert torch.equal(got[n], start[n] * 0.5 + stepped[n] * 0.5)
    ema.close()


# ------------------------------------------------------------------ 2 ranks
@pytest.mark.multirank
@pytest.mark.parametrize("layout", [{"parallel.dp_shard": 2}, {"parallel.dp_shard": 2, "parallel.ep": 2}],
                         ids=["fsdp_dp2", "ep2"])
def test_two_rank_ema_equals_the_single_process(layout, reference, tmp_path, cache_dir):
    """Every rank keeps the EMA of its own shard; gathered through the checkpoint reader it is the single
    process's (the parameters' parity tolerance)."""
    _, _, expected, _ = reference
    run_dir = tmp_path / "run"
    run_ranks(2, train_and_report, overrides(run_dir, cache_dir, **{
        **EMA_ON, "train.micro_batch_size": 2, "checkpoint.interval": 0, **layout}))
    got = saved_ema(ckpt.step_dir(run_dir / "checkpoints", STEPS))
    assert got.keys() == expected[STEPS].keys()
    for n, ref in expected[STEPS].items():
        torch.testing.assert_close(got[n], ref, rtol=1e-4, atol=5e-5, msg=lambda m: f"{n}: {m}")


def test_planner_reports_the_ema_as_host_memory(repo_root, tmp_path):
    """train.plan counts the EMA's CPU buffers (what WeightEMA allocates) beside the GPU total, not in it."""
    from models.transformer import Transformer
    from train.plan import GiB, plan

    def planned(**extra) -> dict:
        return plan(load_config(repo_root / "configs" / "tiny.yaml", overrides(tmp_path, tmp_path, **extra)))

    on, off = planned(**{"train.ema_decay": 0.9}), planned()
    assert off["memory"]["per_rank_gb"]["host_ema"] == 0
    assert on["memory"]["per_rank_gb"]["total"] == off["memory"]["per_rank_gb"]["total"]
    cfg = load_config(repo_root / "configs" / "tiny.yaml", overrides(tmp_path, tmp_path))
    measured = WeightEMA(Transformer(cfg.model), 0.9).nbytes()
    assert on["memory"]["per_rank_gb"]["host_ema"] * GiB == pytest.approx(measured, rel=1e-4)


def test_evaluate_ema_loads_the_checkpoints_ema(reference, tmp_path, capsys):
    """train.evaluate --ema: the model computes with the saved EMA (and a checkpoint without one is refused)."""
    from train.evaluate import main as evaluate_main
    from train.inference import load_for_inference

    run_dir, _, expected, _ = reference
    path = ckpt.step_dir(run_dir / "checkpoints", STEPS)
    model, _ = load_for_inference(path, ema=True)
    assert_equal({n: p.detach() for n, p in model.named_parameters()}, expected[STEPS], "evaluated weights")
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(20)))
    losses = []
    for extra in ([], ["--ema"]):
        assert evaluate_main(["--checkpoint", str(path), "--data", str(held_out), "--tokens", "64",
                              "--seq-len", "32", *extra]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert losses[0] != losses[1]
