"""The checkpoint files themselves (train/checkpoint.py), on a tiny model in one process:

* truncated or corrupted shards, and missing files, give a CheckpointError naming the
  file and the cause;
* DCP metadata or non-tensor entries whose pickles reference anything outside the
  allow-list (os.system, also through protocol-4 dotted names) are refused, never executed;
* a directory without its COMPLETE marker (a leftover step_N.tmp, a step dir whose marker
  was removed) is never listed nor loaded;
* keep_last keeps exactly k complete checkpoints and removes stale .tmp directories;
* async saves copy the state when called, publish only after the background write,
  and report a failed write as a CheckpointError.
"""

from __future__ import annotations

import os
import pickle
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.state_dict_saver as dcp_saver

from parallel.checkpointing import CheckpointState
from parallel.context import ParallelContext
from train import checkpoint as ckpt
from train.config import CheckpointConfig

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _trained_state(seed: int = 0) -> tuple[torch.nn.Module, CheckpointState]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 16)).pow(2).sum().backward()
    opt.step()
    return model, CheckpointState(model, opt, ParallelContext.single())


def _checkpointer(root: Path, state: CheckpointState, keep_last: int = 10, async_save: bool = False) -> ckpt.Checkpointer:
    return ckpt.Checkpointer(root, CheckpointConfig(keep_last=keep_last, async_save=async_save), state)


def _save(root: Path, step: int, state: CheckpointState, keep_last: int = 10) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _checkpointer(root, state, keep_last).save(step, {"step": step, "tokens_seen": step}, {"rank_step": step})


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def saved(tmp_path):
    model, state = _trained_state()
    path = _save(tmp_path / "checkpoints", 5, state)
    return path, _params(model)


def _load_into_fresh(path: Path) -> tuple[dict, dict, torch.nn.Module]:
    model, state = _trained_state(seed=1)  # different weights, so a load is visible
    meta, rank_state = ckpt.load_checkpoint(path, state, rank=0)
    return meta, rank_state, model


def test_round_trip(saved):
    path, expected = saved
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "COMPLETE", "__0_0.distcp", "meta.json", "rank0.json"]
    meta, rank_state, model = _load_into_fresh(path)
    assert meta["step"] == 5 and rank_state == {"rank_step": 5}
    for name, ref in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), ref, rtol=0, atol=0)


# ------------------------------------------------------------------ corrupt / truncated files
def test_truncated_shard_names_the_file(saved):
    path, _ = saved
    shard = path / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated shard") as err:
        _load_into_fresh(path)
    assert str(shard) in str(err.value)
    assert f"{len(data) // 2} bytes" in str(err.value)


def test_corrupt_shard_bytes_give_a_checkpoint_error(saved):
    """Same size, garbage content: not caught by the size check, but by DCP's read."""
    path, _ = saved
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[64:] = b"\xff" * (len(data) - 64)
    shard.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="cannot load shards") as err:
        _load_into_fresh(path)
    assert str(path) in str(err.value) and "rank 0:" in str(err.value)


@pytest.mark.parametrize("victim, cause", [
    ("__0_0.distcp", "missing shard file"),
    (".metadata", "missing DCP metadata"),
    ("meta.json", "unreadable"),
])
def test_missing_file_names_it(saved, victim, cause):
    path, _ = saved
    (path / victim).unlink()
    with pytest.raises(ckpt.CheckpointError, match=cause) as err:
        _load_into_fresh(path)
    assert str(path) in str(err.value)


def test_garbage_meta_json(saved):
    path, _ = saved
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=r"meta\.json: unreadable"):
        _load_into_fresh(path)


class _RunsCommand:
    """A pickle that runs a shell command when unpickled by a permissive loader."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _dotted_name_payload(command: str) -> bytes:
    """Protocol 4 resolves dotted names in find_class: os.system reached through a torch.distributed.checkpoint
    module. An allow-list by module prefix would let this through."""
    module, name, arg = b"torch.distributed.checkpoint.filesystem", b"os.system", command.encode()
    return (b"\x80\x04" + b"\x8c" + bytes([len(module)]) + module + b"\x94" + b"\x8c" + bytes([len(name)]) + name
            + b"\x94\x93\x94" + b"\x8c" + bytes([len(arg)]) + arg + b"\x94\x85\x94R\x94.")


@pytest.mark.parametrize("kind", ["reduce", "dotted_name"])
def test_metadata_with_forbidden_global_is_refused_not_executed(saved, tmp_path, kind):
    path, _ = saved
    sentinel = tmp_path / "executed"
    command = f"touch {sentinel}"
    payload = pickle.dumps(_RunsCommand(command)) if kind == "reduce" else _dotted_name_payload(command)
    (path / ".metadata").write_bytes(payload)
    with pytest.raises(ckpt.CheckpointError, match="not allowed") as err:
        _load_into_fresh(path)
    assert str(path / ".metadata") in str(err.value) and "system" in str(err.value)
    assert not sentinel.exists(), "the metadata pickle was executed"


def test_non_tensor_entry_with_forbidden_global_is_refused_not_executed(tmp_path):
    """Optimizer hyper-parameters are stored as pickled bytes; DCP's own planner unpickles them
    with weights_only=False. Ours must refuse a payload there too."""
    _, state = _trained_state()
    path = _save(tmp_path / "checkpoints", 1, state)
    sentinel = tmp_path / "executed"
    sd = state.state_dict()
    sd["optim"]["param_groups"][0]["lr"] = _RunsCommand(f"touch {sentinel}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt.dcp.save(sd, checkpoint_id=str(path))  # the shards of a published checkpoint, rewritten
    with pytest.raises(ckpt.CheckpointError, match="refused") as err:
        _load_into_fresh(path)
    assert "param_groups.0.lr" in str(err.value) and "system" in str(err.value)
    assert not sentinel.exists(), "the non-tensor entry was executed"


# ------------------------------------------------------------------ the COMPLETE marker
def test_directories_without_marker_are_never_loaded(tmp_path):
    root = tmp_path / "checkpoints"
    _, state = _trained_state()
    for step in (2, 4, 6):
        _save(root, step, state)
    # A save killed after writing everything but before the rename: a marked step_N.tmp.
    os.replace(root / "step_00000006", root / "step_00000008.tmp")
    # A step directory whose marker was removed (e.g. by a crash while it was being deleted).
    (root / "step_00000004" / ckpt.MARKER).unlink()
    (root / "step_00000010").mkdir()  # an empty step directory
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [2]
    for bad in ("step_00000004", "step_00000010"):
        with pytest.raises(ckpt.CheckpointError, match="no COMPLETE marker"):
            _load_into_fresh(root / bad)


# ------------------------------------------------------------------ keep_last
@pytest.mark.parametrize("keep_last", [1, 3])
def test_keep_last_keeps_exactly_k(tmp_path, keep_last):
    root = tmp_path / "checkpoints"
    _, state = _trained_state()
    (root / "step_00000001.tmp").mkdir(parents=True)  # stale: left by a killed save
    (root / "step_00000001.tmp" / "__0_0.distcp").write_bytes(b"partial")
    for step in range(2, 8):
        _save(root, step, state, keep_last=keep_last)
        steps = [s for s, _ in ckpt.complete_checkpoints(root)]
        assert steps == list(range(max(2, step - keep_last + 1), step + 1)), steps
    assert sorted(p.name for p in root.iterdir()) == [f"step_{s:08d}" for s in range(8 - keep_last, 8)]


def test_resaving_a_step_replaces_it(tmp_path):
    """After resuming from an older checkpoint the run saves the same step again."""
    root = tmp_path / "checkpoints"
    _, state_a = _trained_state(seed=0)
    _save(root, 3, state_a)
    model_b, state_b = _trained_state(seed=7)
    _save(root, 3, state_b)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    _, _, loaded = _load_into_fresh(root / "step_00000003")
    for name, ref in _params(model_b).items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name].detach(), ref, rtol=0, atol=0)


# ------------------------------------------------------------------ async saves
def _start_async(root: Path, step: int, state: CheckpointState, keep_last: int = 10) -> ckpt.Checkpointer:
    """A checkpointer whose async save of `step` is in flight."""
    saver = _checkpointer(root, state, keep_last, async_save=True)
    saver.save(step, {"step": step, "tokens_seen": step}, {"rank_step": step})
    return saver


@pytest.fixture
def gated_writes(monkeypatch):
    """Holds DCP's background write until the test opens the gate."""
    gate = threading.Event()
    real_save = dcp_saver.save

    def held_save(*args, **kwargs):
        assert gate.wait(60), "gate never opened"
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dcp_saver, "save", held_save)  # the async executor imports it at call time
    return gate


def test_async_save_snapshots_then_publishes_after_the_write(tmp_path, gated_writes):
    root = tmp_path / "checkpoints"
    model, state = _trained_state()
    _save(root, 2, state)
    at_save = _params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saver = _start_async(root, 4, state)
        with torch.no_grad():  # training goes on while the write is pending
            for p in model.parameters():
                p.add_(1.0)
        assert saver.finish(wait=False) is None and not saver.pending.done()
        assert (root / "step_00000004.tmp").is_dir() and not (root / "step_00000004").exists()
        assert [s for s, _ in ckpt.complete_checkpoints(root)] == [2]
        gated_writes.set()
        assert saver.finish() == root / "step_00000004" and saver.pending is None
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [2, 4]
    assert not (root / "step_00000004.tmp").exists()
    meta, rank_state, loaded = _load_into_fresh(root / "step_00000004")
    assert meta["step"] == 4 and rank_state == {"rank_step": 4}
    for name, ref in at_save.items():  # the values at the save call, not the later ones
        torch.testing.assert_close(dict(loaded.named_parameters())[name].detach(), ref, rtol=0, atol=0)


def test_async_save_equals_sync_save(tmp_path):
    model, state = _trained_state()
    sync_path = _save(tmp_path / "sync", 3, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        async_path = _start_async(tmp_path / "async", 3, state).finish()
    a, b = _load_into_fresh(sync_path), _load_into_fresh(async_path)
    assert a[:2] == b[:2]
    for (name, pa), pb in zip(a[2].named_parameters(), b[2].parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)


def test_async_save_failure_is_a_checkpoint_error(tmp_path, monkeypatch):
    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dcp_saver, "save", failing_save)
    root = tmp_path / "checkpoints"
    _, state = _trained_state()
    saver = _start_async(root, 4, state)
    with pytest.raises(ckpt.CheckpointError, match="async save failed.*disk full") as err:
        saver.finish()
    assert "step_00000004.tmp" in str(err.value)
    assert ckpt.complete_checkpoints(root) == []
