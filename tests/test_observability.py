"""Observability: W&B (offline, read back from the run file), TensorBoard (event files read back),
expert-load statistics and histograms, console line, W&B mode selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.moe_state import ExpertLoad
from tests.trainer_helpers import small_overrides
from tests.wandb_files import read_wandb_run
from train.config import load_config
from train.metrics import (
    MetricsLogger,
    chart_name,
    expert_load_stats,
    load_on_cpu,
    moe_layer_names,
    wandb_mode,
)

N_EXPERTS, TOP_K = 8, 2  # tests/trainer_helpers.SMALL_MODEL


@pytest.fixture(scope="module")
def observed_run(repo_root, tmp_path_factory):
    """One short real run with W&B offline and TensorBoard on, resumed once for 2 more steps."""
    from train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("observed")
    run_dir = tmp / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("WANDB_API_KEY", raising=False)
    try:
        histories = []
        for steps in (4, 6):  # the second Trainer resumes from the first's final checkpoint
            cfg = load_config(repo_root / "configs" / "tiny.yaml", small_overrides(
                run_dir, tmp / "cache", **{"train.steps": steps, "log.wandb": "true", "log.tensorboard": "true",
                                           "eval.interval": 3, "eval.tokens": 128,  # held-out loss at 3 and 6
                                           "log.wandb_project": "moeforge-test", "run.name": "observed"}))
            histories.append(Trainer(cfg).fit())
    finally:
        mp.undo()
    return run_dir, histories


def test_wandb_offline_run_is_written_and_holds_the_metrics(observed_run):
    run_dir, histories = observed_run
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    run_dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # Resuming continues the same W&B run: two offline segments with one id.
    assert len(run_dirs) == 2 and all(d.name.endswith(run_id) for d in run_dirs), run_dirs
    rows = []
    for d in run_dirs:
        files = list(d.glob("run-*.wandb"))
        assert len(files) == 1
        data = read_wandb_run(files[0])
        rows += [r for r in data["history"] if "train/loss" in r]
        config = data["config"]
        model, train = (config[k].get("value", config[k]) for k in ("model", "train"))  # W&B may wrap values
        assert model["hidden_size"] == 64 and train["steps"] in (4, 6)  # the resolved config is logged
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["_step"] for r in rows] == [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for row, rec in zip(rows, records):
        assert row["train/loss"] == pytest.approx(rec["loss"])
        assert row["optim/lr"] == pytest.approx(rec["lr"])
        assert row["optim/grad_norm"] == pytest.approx(rec["grad_norm"])
        assert row["perf/tokens_per_s"] == pytest.approx(rec["tokens_per_s"])
        for key in ("train/mtp_loss", "train/aux_loss", "perf/mfu", "system/memory_mb", "moe/load_max_mean",
                    "moe/router_bias_absmax", "moe/experts_idle", "moe_layers/load_max_mean/layer_01",
                    "moe_layers/bias_std/layer_01", "moe_layers/bias_absmax/mtp_1"):
            assert key in row, (key, sorted(row))
        # Per-expert load histogram: one bin per expert, shares summing to 1.
        assert row["expert_load/layer_01/_type"] == "histogram"
        assert len(row["expert_load/layer_01/values"]) == N_EXPERTS
        assert row["expert_load/layer_01/bins"][0] == -0.5 and len(row["expert_load/layer_01/bins"]) == N_EXPERTS + 1
        assert sum(row["expert_load/layer_01/values"]) == pytest.approx(1.0)
        assert row["router_bias/mtp_1/_type"] == "histogram"
    val = {r["_step"]: r for r in rows if "val/val_loss" in r}
    assert sorted(val) == [3, 6]
    for rec in records:
        if rec["step"] in val:
            assert val[rec["step"]]["val/val_loss"] == pytest.approx(rec["val_loss"])
            assert val[rec["step"]]["val/val_mtp_loss_depth_1"] == pytest.approx(rec["val_mtp_loss"])
    # Histograms are not copied into metrics.jsonl; the per-layer scalars are.
    assert "expert_load" not in records[0] and len(records[0]["load_max_mean_per_layer"]) == 2


def test_tensorboard_event_files_read_back(observed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = observed_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/mtp_loss", "optim/lr", "optim/grad_norm", "perf/tokens_per_s", "perf/mfu",
                "system/memory_mb", "moe/load_max_mean", "moe/router_bias_std", "moe_layers/load_max_mean/layer_01"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    val = {e.step: e.value for e in acc.Scalars("val/val_loss")}
    assert val == pytest.approx({r["step"]: r["val_loss"] for r in records if "val_loss" in r}, rel=1e-6)
    assert sorted(val) == [3, 6] and "val/val_mtp_loss" in tags["scalars"]
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert losses[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    assert losses[6] < losses[1]
    # Per-expert load: one bucket per expert; the counts are the step's routed tokens x top-k.
    hist = acc.Histograms("expert_load/layer_01")
    assert [h.step for h in hist] == [1, 2, 3, 4, 5, 6]
    h = hist[-1].histogram_value
    assert list(h.bucket_limit) == [e + 0.5 for e in range(N_EXPERTS)]
    tokens_per_step = 4 * 64  # micro_batch_size x seq_len (small_overrides)
    assert sum(h.bucket) == h.num == tokens_per_step * TOP_K
    assert "router_bias/layer_01" in tags["histograms"] and "router_bias/mtp_1" in tags["histograms"]


# ---------------------------------------------------------------- units (no training)
def test_expert_load_stats():
    counts = torch.tensor([[4.0, 4.0, 4.0, 4.0], [8.0, 0.0, 4.0, 4.0]])
    biases = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-0.002, 0.002, 0.0, 0.0]])
    load = ExpertLoad([1, 2], counts, biases, 0.0)
    s = expert_load_stats(load)
    assert s["load_max_mean_per_layer"] == [1.0, 2.0]
    assert s["load_max_mean"] == pytest.approx(1.5) and s["load_max_mean_worst"] == pytest.approx(2.0)
    assert s["load_min_mean"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert s["experts_idle"] == 1
    assert s["router_bias_absmax"] == pytest.approx(0.002)
    got_counts, got_biases = load_on_cpu(load)  # what the logger's histograms are drawn from
    assert torch.equal(got_counts, counts) and torch.equal(got_biases, biases)
    assert expert_load_stats(None) == {}
    assert "router_bias_absmax" not in expert_load_stats(ExpertLoad([1, 2], counts, None, 0.0))  # V2 routers


def test_layer_names_follow_the_model(repo_root):
    cfg = load_config(repo_root / "configs" / "deepseek_v3_671b.yaml")
    names = moe_layer_names(cfg, 61 - 3 + 1)
    assert names[0] == "layer_03" and names[-2] == "layer_60" and names[-1] == "mtp_1"
    assert moe_layer_names(cfg, 5) == [f"moe_{i:02d}" for i in range(5)]  # rows that do not match: by position
    assert chart_name("loss") == "train/loss" and chart_name("mfu") == "perf/mfu"
    assert chart_name("dropped_tokens") == "moe/dropped_tokens"


def test_console_line_and_rank0_only(repo_root, tmp_path, capsys):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", [f"run.dir={tmp_path}", "log.progress=false"])
    metrics = {"loss": 3.25, "mtp_loss": 3.5, "aux_loss": 1e-4, "lr": 1e-3, "grad_norm": 0.5,
               "tokens_per_s": 12345.0, "mfu": 0.42, "load_max_mean": 1.75, "dropped_tokens": 17.0}
    worker = MetricsLogger(cfg, tmp_path / "w", is_main=False, total_steps=10)
    worker.log(1, metrics)
    worker.close()
    assert capsys.readouterr().out == "" and not (tmp_path / "w").exists()
    logger = MetricsLogger(cfg, tmp_path / "m", is_main=True, total_steps=10)
    logger.log(1, metrics)
    logger.close()
    line = capsys.readouterr().out.strip()
    assert line.startswith("step      1/10 | loss 3.2500 | mtp 3.5000")
    for part in ("12,345 tok/s", "mfu 42.0%", "load max/mean 1.75", "dropped 17"):
        assert part in line, line


def test_wandb_mode_selection(repo_root, tmp_path, monkeypatch, capsys):
    cfg = load_config(repo_root / "configs" / "tiny.yaml")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode(cfg.log) == "offline"  # no key anywhere: offline, never a prompt
    assert "no API key" in capsys.readouterr().out
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_mode(cfg.log) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(cfg.log) == "disabled"
    cfg.log.wandb_mode = "offline"
    assert wandb_mode(cfg.log) == "offline"
