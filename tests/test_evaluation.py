"""Held-out evaluation during training (train/evaluation.py, data/holdout.py).

The held-out files are a hash-chosen share that training never reads; the evaluation reports the main
head's and each MTP depth's loss, leaves the training run exactly as it was (losses, parameters, resume),
and gives the single process's number under DP, EP, TP and PP.
"""

from __future__ import annotations

import json

import pytest
import torch

from data import TextBatchStream, load_tokenizer
from data.config import DataConfig, SourceConfig
from data.holdout import split_files
from data.sources import stdlib_files
from tests.distributed import run_ranks
from tests.parity_worker import train_and_report
from tests.trainer_helpers import small_overrides
from train.config import ConfigError, load_config
from train.evaluation import HeldOutData, evaluate_loss
from train.trainer import Trainer

SEQ = 64
EVAL_TOKENS = SEQ * 11  # 11 sequences: the last round of 8 is partly masked


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_cache")  # one trained tokenizer for the module


def eval_overrides(run_dir, cache_dir, **extra) -> list[str]:
    return small_overrides(run_dir, cache_dir, **{
        "eval.interval": 2, "eval.tokens": EVAL_TOKENS, "train.steps": 4, "train.threads": 1,
        "checkpoint.at_end": "false", **extra})


def test_held_out_files_are_a_hash_chosen_disjoint_share():
    files = stdlib_files()
    held = split_files(files, "@python-stdlib", 0.05, held_out=True)
    kept = split_files(files, "@python-stdlib", 0.05, held_out=False)
    assert held and set(held).isdisjoint(kept) and sorted(held + kept) == sorted(files)
    assert 0.02 < len(held) / len(files) < 0.1
    assert split_files(list(reversed(files)), "@python-stdlib", 0.05, True) == list(reversed(held))  # per file
    assert split_files(files, "@python-stdlib", 0.0, held_out=False) == files


def test_training_and_eval_streams_read_opposite_sides(repo_root, tmp_path, cache):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", small_overrides(tmp_path, cache))
    tok = load_tokenizer(cfg.data)
    train = TextBatchStream(cfg.data, tok, SEQ, 1)
    held = HeldOutData(load_config(repo_root / "configs" / "tiny.yaml",
                                   eval_overrides(tmp_path, cache)), tok, 0, 1)
    all_train = TextBatchStream(DataConfig(sources=[SourceConfig("@python-stdlib", holdout=0.02)]), tok, SEQ, 1)
    assert held.stream.files[0] and set(held.stream.files[0]).isdisjoint(all_train.files[0])
    assert set(train.files[0]) <= set(all_train.files[0])  # max_files spreads over the training side only
    first = [b["labels"].clone() for b in sum(list(held), [])]
    again = [b["labels"] for b in sum(list(held), [])]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the same batches every time


@pytest.mark.parametrize("overrides, message", [
    (["eval.interval=5"], "eval.sources: eval.interval=5 needs at least one source"),
    (["eval.sources=[{path: '@python-stdlib', holdout: 0.1}]", "eval.interval=5"],
     "eval.sources[0].holdout: 0.1 differs from data.sources' 0.02"),
    (["eval.sources=[{path: '@python-stdlib', holdout: 1.5}]"], "eval.sources[0].holdout: must be a share"),
    (["eval.tokens=0"], "eval.tokens: must be > 0"),
])
def test_bad_eval_config_is_refused_by_key(repo_root, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(repo_root / "configs" / "tiny.yaml", ["eval.sources=[]", *overrides])


def test_evaluation_reports_and_leaves_training_exact(repo_root, tmp_path, cache, capsys):
    """Eval on or off: the same losses and parameters; a run resumed between evaluations matches too."""
    tiny = repo_root / "configs" / "tiny.yaml"
    with_eval = Trainer(load_config(tiny, eval_overrides(tmp_path / "a", cache)))
    a = with_eval.fit()
    without = Trainer(load_config(tiny, eval_overrides(tmp_path / "b", cache, **{"eval.interval": 0})))
    b = without.fit()
    assert [h["loss"] for h in a] == [h["loss"] for h in b]
    for (name, p), q in zip(with_eval.model.state_dict().items(), without.model.state_dict().values()):
        assert torch.equal(p, q), name

    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in records if "val_loss" in r}
    assert sorted(val) == [2, 4] and all(len(r["val_mtp_loss_by_depth"]) == 1 for r in val.values())
    assert val[4]["val_mtp_loss"] == val[4]["val_mtp_loss_by_depth"][0] and val[4]["val_tokens"] > 0
    assert "val " in capsys.readouterr().out
    # The shared single-process function gives the trainer's number on the final model.
    batches = sum(list(with_eval.held_out), [])
    direct = evaluate_loss(with_eval.model, batches, depth=1)
    assert direct.loss == pytest.approx(val[4]["val_loss"], rel=1e-6)
    assert direct.mtp_losses[0] == pytest.approx(val[4]["val_mtp_loss"], rel=1e-6)
    assert direct.tokens == val[4]["val_tokens"] == EVAL_TOKENS  # 2 rounds of 8 sequences run, 11 count

    run = tmp_path / "c"
    Trainer(load_config(tiny, eval_overrides(run, cache, **{"train.steps": 2, "checkpoint.at_end": "true"}))).fit()
    resumed = Trainer(load_config(tiny, eval_overrides(run, cache))).fit()
    assert [h["loss"] for h in resumed] == [h["loss"] for h in a[2:]]
    assert resumed[-1]["val_loss"] == a[-1]["val_loss"]


LAYOUTS = {
    "dp2": (2, 2, {"parallel.data_parallel": "zero1"}),
    "ep2": (2, 2, {"parallel.ep": 2}),
    "tp2": (2, 1, {"parallel.tp": 2}),
    "pp2": (2, 1, {"parallel.pp": 2}),
    # V placement (stages 0 and 3 on rank 0): torch's forward-only eval() cannot run it, the stage-by-stage path can
    "pp2_zbv": (2, 1, {"parallel.pp": 2, "parallel.pipeline_schedule": "ZBVZeroBubble",
                       "parallel.pipeline_mtp_stage": "true", "train.grad_accum_steps": 4, "train.micro_batch_size": 2}),
}


def parity_overrides(run_dir, cache_dir, dp: int, **extra) -> list[str]:
    return eval_overrides(run_dir, cache_dir, **{
        "train.steps": 2, "eval.interval": 1, "train.micro_batch_size": 4 // dp, "train.grad_accum_steps": 2,
        "model.num_hidden_layers": 3, **extra})


@pytest.mark.multirank
def test_evaluation_matches_single_process_under_every_layout(tmp_path, cache):
    ref = run_ranks(1, train_and_report, parity_overrides(tmp_path / "ref", cache, dp=1))[0]["val"]
    assert [v[0] for v in ref] == [1.0, 2.0]
    for layout, (world, dp, extra) in LAYOUTS.items():
        results = run_ranks(world, train_and_report, parity_overrides(tmp_path / layout, cache, dp=dp, **extra))
        for rank, got in enumerate(results):
            torch.testing.assert_close(torch.tensor(got["val"]), torch.tensor(ref), rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{layout} rank {rank}: {m}")


def test_run_prints_train_and_validation_loss(repo_root, tmp_path, cache, capsys):
    from train.launch import run

    assert run(load_config(repo_root / "configs" / "tiny.yaml", eval_overrides(tmp_path, cache,
                                                                              **{"train.steps": 2}))) == 0
    out = capsys.readouterr().out
    assert "trained steps 1..2: loss" in out and "validation loss at step 2: " in out and ", MTP " in out
