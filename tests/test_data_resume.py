"""`data.resume: exact | restart` (data/resume.py) across a change of data mixture between phases.

exact (default) refuses a checkpoint whose data stream differs from the configured one, and
says how to go on; restart keeps model, optimizer and step, starts the new mixture's stream
from its beginning and says so loudly; a later resume within the new phase is exact again.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from data import DataError, TextBatchStream
from tests.trainer_helpers import small_overrides
from train import checkpoint as ckpt
from train.config import load_config
from train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def make(repo_root: Path, run_dir: Path, cache_dir: Path, *extra: str, steps: int) -> Trainer:
    return Trainer(load_config(repo_root / "configs" / "tiny.yaml",
                               small_overrides(run_dir, cache_dir, **{"train.steps": steps}) + list(extra)))


def optimizer_tensors(trainer: Trainer) -> list[torch.Tensor]:
    return [v.clone() for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


class Recording:
    """A data stream that keeps the batches it hands out (everything else passes through)."""

    def __init__(self, stream) -> None:
        self.stream, self.batches = stream, []

    def __next__(self):
        self.batches.append(next(self.stream))
        return self.batches[-1]

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_changed_mixture_exact_refuses_restart_starts_new_stream(repo_root, tmp_path, caplog):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    extra = tmp_path / "extra.jsonl"  # the new phase adds a source (the first one, and the tokenizer, stay)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:20]
    extra.write_text("".join(json.dumps({"text": f.read_text(errors="replace")}) + "\n" for f in files))
    new_mixture = f"data.sources=[{{path: '@python-stdlib', weight: 1}}, {{path: {extra}, weight: 1}}]"

    phase1 = make(repo_root, run_dir, cache, steps=2)
    phase1.fit()  # checkpoint at step 2 (checkpoint.at_end)
    params = {k: v.clone() for k, v in phase1.model.state_dict().items()}
    optim = optimizer_tensors(phase1)

    with pytest.raises(DataError, match=r"data state: sources .* set data.resume=restart"):
        make(repo_root, run_dir, cache, new_mixture, steps=4)

    with caplog.at_level("WARNING", logger="data.resume"):
        phase2 = make(repo_root, run_dir, cache, new_mixture, "data.resume=restart", steps=4)
    assert "data.resume=restart: the checkpoint's data stream does not match" in caplog.text
    assert "step 2 are kept" in caplog.text
    assert phase2.step == 2 and phase2.resumed_from == ckpt.step_dir(run_dir / "checkpoints", 2)
    for k, v in phase2.model.state_dict().items():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0, msg=k)
    for a, b in zip(optimizer_tensors(phase2), optim, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fresh = TextBatchStream(phase2.cfg.data, phase2.tokenizer, phase2.cfg.train.seq_len,
                            phase2.cfg.train.micro_batch_size, 0, 1)
    assert phase2.data.state_dict() == fresh.state_dict()  # the new mixture from its beginning
    phase2.data = Recording(phase2.data)
    history = phase2.fit()
    assert [h["step"] for h in history] == [3, 4]
    for got in phase2.data.batches:  # step 3 trained on the new stream's first batches
        want = next(fresh)
        assert all(torch.equal(got[k], want[k]) for k in want)

    # Requeued within the new phase: the checkpoint's stream is the configured one, so it resumes exactly.
    caplog.clear()
    with caplog.at_level("WARNING", logger="data.resume"):
        again = make(repo_root, run_dir, cache, new_mixture, "data.resume=restart", steps=6)
    assert again.step == 4 and "data.resume=restart" not in caplog.text
    saved = ckpt.read_rank_state(ckpt.step_dir(run_dir / "checkpoints", 4), 0)["data"]
    assert again.data.state_dict() == saved
