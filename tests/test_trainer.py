"""Real short training runs: outputs on disk, falling loss, gradient accumulation parity,
bias balancing, resume, NaN skipping and SIGTERM handling."""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainer_helpers import small_overrides
from train.config import load_config
from train.trainer import NonFiniteLossError, Trainer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moeforge_cache")


def make_trainer(repo_root, run_dir, cache_dir, **extra) -> Trainer:
    cfg = load_config(repo_root / "configs" / "tiny.yaml", small_overrides(run_dir, cache_dir, **extra))
    return Trainer(cfg)


def test_short_run_writes_outputs_and_loss_falls(repo_root, tmp_path, cache_dir):
    run = tmp_path / "run"
    trainer = make_trainer(repo_root, run, cache_dir, **{"train.steps": 30, "train.log_interval": 5})
    history = trainer.fit()
    assert (run / "config.yaml").is_file()
    saved = load_config(run / "config.yaml")
    assert saved.train.steps == 30 and saved.model.hidden_size == 64
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 5, 10, 15, 20, 25, 30]
    for r in records:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mtp_loss", "aux_loss", "load_max_mean"):
            assert key in r, key
    first = sum(h["loss"] for h in history[:3]) / 3
    last = sum(h["loss"] for h in history[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert (run / "checkpoints" / "step_00000030" / "COMPLETE").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()


def _one_step_params(repo_root, tmp_path, cache_dir, micro, accum):
    torch.manual_seed(0)
    trainer = make_trainer(
        repo_root, tmp_path / f"r{micro}x{accum}", cache_dir,
        **{"train.micro_batch_size": micro, "train.grad_accum_steps": accum, "train.steps": 2,
           "checkpoint.at_end": "false", "optim.grad_clip": 0.0, "optim.eps": 1e-6},
    )
    history = trainer.fit()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    biases = [b.clone() for n, b in trainer.model.named_buffers() if n.endswith("e_score_correction_bias")]
    return history, params, biases


def test_grad_accumulation_matches_one_big_batch(repo_root, tmp_path, cache_dir):
    """4 micro-batches of 2 give the same update as 1 batch of 8 (fp32)."""
    h_acc, p_acc, b_acc = _one_step_params(repo_root, tmp_path, cache_dir, micro=2, accum=4)
    h_big, p_big, b_big = _one_step_params(repo_root, tmp_path, cache_dir, micro=8, accum=1)
    for a, b in zip(h_acc, h_big):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["mtp_loss"] == pytest.approx(b["mtp_loss"], rel=1e-5)
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # AdamW's first steps move every weight by ~lr * g / (|g| + eps) whatever |g|, so
    # float-rounding differences in near-zero gradients become update differences; eps=1e-6
    # bounds that sensitivity, and atol is 0.5% of lr (2e-3).
    for name in p_big:
        torch.testing.assert_close(p_acc[name], p_big[name], rtol=1e-5, atol=1e-5, msg=name)
    for a, b in zip(b_acc, b_big):
        torch.testing.assert_close(a, b)


def test_bias_balancing_lowers_expert_imbalance(repo_root, tmp_path, cache_dir):
    """On the demo corpus, max/mean expert load with gamma > 0 ends lower than with gamma = 0."""
    results = {}
    for gamma in (0.0, 0.01):
        torch.manual_seed(0)
        trainer = make_trainer(
            repo_root, tmp_path / f"g{gamma}", cache_dir,
            **{"train.steps": 40, "model.bias_update_speed": gamma, "model.aux_loss_alpha": 0.0,
               "checkpoint.at_end": "false", "optim.lr": 3e-3},
        )
        history = trainer.fit()
        results[gamma] = sum(h["load_max_mean"] for h in history[-10:]) / 10
    assert results[0.01] < results[0.0] - 0.1, results


def test_resume_continues_where_it_stopped(repo_root, tmp_path, cache_dir):
    """Rerunning with the same run.dir resumes from the newest checkpoint with the same losses."""
    pinned = {"optim.warmup_steps": 1, "optim.decay_steps": 6}  # schedule independent of train.steps
    straight = make_trainer(repo_root, tmp_path / "straight", cache_dir, **{"train.steps": 6, **pinned}).fit()
    run = tmp_path / "resumed"
    make_trainer(repo_root, run, cache_dir, **{"train.steps": 3, **pinned}).fit()
    second = make_trainer(repo_root, run, cache_dir, **{"train.steps": 6, **pinned})
    assert second.step == 3 and second.resumed_from is not None
    rest = second.fit()
    assert [h["step"] for h in rest] == [4, 5, 6]
    for a, b in zip(straight[3:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_nonfinite_steps_are_skipped_then_stop(repo_root, tmp_path, cache_dir):
    trainer = make_trainer(repo_root, tmp_path / "nan", cache_dir, **{"train.steps": 5, "train.max_nonfinite_steps": 2})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps=2"):
        trainer.fit()
    assert trainer.skipped_steps == 3
    for n, p in trainer.model.named_parameters():
        if n != "lm_head.weight":
            torch.testing.assert_close(p, before[n], msg=n)  # no update was applied


def test_skipped_bad_records_show_in_the_training_log(repo_root, tmp_path, cache_dir):
    """data.on_bad_record=skip: the skipped records are counted in metrics.jsonl, not lost silently."""
    corpus = tmp_path / "corpus.jsonl"
    good = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20}) for i in range(60)]
    corpus.write_text("\n".join(good[:1] + ["{not json", json.dumps({"body": "wrong field"})] + good[1:]) + "\n")
    run = tmp_path / "run"
    trainer = make_trainer(repo_root, run, cache_dir, **{
        "train.steps": 2, "data.on_bad_record": "skip", "data.sources": f"[{{path: '{corpus}'}}]",
        "data.max_files": "null", "checkpoint.at_end": "false"})
    trainer.fit()
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["bad_records"] == 2, last.get("bad_records_by_reason")
