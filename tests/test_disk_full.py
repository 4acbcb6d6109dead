"""A checkpoint save on a full disk (train/disk_space.py): a clear error naming the directory,
"no space left on device", the bytes needed and free; the partial .tmp directory removed; the
previous checkpoints untouched and loadable.

For real on a small tmpfs (sync save through the CLI: one line, exit 6; async save through the
trainer) where this machine lets the test mount one, and with a simulated ENOSPC everywhere.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.trainer_helpers import small_overrides
from train import checkpoint as ckpt
from train.config import load_config
from train.disk_space import DiskFullError
from train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# One checkpoint of the small model is ~3.4 MB: the first fits in 6 MB, the second does not.
TMPFS_SIZE = "6m"
MESSAGE = r"checkpoint save to {dir}: no space left on device \((\d+) bytes needed for this rank's shards, (\d+) bytes free\)"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("disk_full_cache")


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here; test_simulated_enospc covers the handling")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}; needs root or "
                    "CAP_SYS_ADMIN); test_simulated_enospc covers the handling")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def config(run_dir: Path, cache_dir: Path, **extra):
    return load_config("configs/tiny.yaml", small_overrides(run_dir, cache_dir, **{
        "train.steps": 4, "checkpoint.interval": 2, "checkpoint.keep_last": 10, **extra}))


def assert_cleaned_up_and_resumable(run_dir: Path, cache_dir: Path) -> None:
    root = run_dir / "checkpoints"
    assert not list(root.glob("*.tmp")), list(root.iterdir())
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [2]
    resumed = Trainer(config(run_dir, cache_dir))  # the earlier checkpoint loads
    assert resumed.step == 2 and resumed.resumed_from == ckpt.step_dir(root, 2)


def test_disk_full_sync_save_on_tmpfs_one_line_exit_6(repo_root, small_tmpfs, cache_dir, capsys, monkeypatch):
    from train.__main__ import main

    monkeypatch.chdir(repo_root)
    run_dir = small_tmpfs / "run"
    code = main(["--config", "configs/tiny.yaml", *small_overrides(run_dir, cache_dir, **{
        "train.steps": 4, "checkpoint.interval": 2, "checkpoint.keep_last": 10})])
    err = capsys.readouterr().err
    assert code == 6, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    m = re.search(MESSAGE.format(dir=re.escape(str(run_dir / "checkpoints"))), line)
    assert line.startswith("checkpoint error: ") and m, line
    needed, free = int(m.group(1)), int(m.group(2))
    assert needed > free and needed > 1_000_000, line
    assert "step_00000004.tmp removed" in line
    print(line)
    assert_cleaned_up_and_resumable(run_dir, cache_dir)


def test_disk_full_async_save_on_tmpfs(repo_root, small_tmpfs, cache_dir, monkeypatch):
    monkeypatch.chdir(repo_root)
    run_dir = small_tmpfs / "run"
    trainer = Trainer(config(run_dir, cache_dir, **{"checkpoint.async_save": "true"}))
    with pytest.raises(DiskFullError, match=MESSAGE.format(dir=re.escape(str(run_dir / "checkpoints")))):
        trainer.fit()
    assert_cleaned_up_and_resumable(run_dir, cache_dir)


def test_simulated_enospc(repo_root, tmp_path, cache_dir, monkeypatch):
    """Wherever a tmpfs cannot be mounted: the write of step 4 fails with ENOSPC after writing part of a shard."""
    monkeypatch.chdir(repo_root)
    real_save = ckpt.dcp.save

    def save(state_dict, checkpoint_id, **kw):
        if not checkpoint_id.endswith("step_00000004.tmp"):
            return real_save(state_dict, checkpoint_id=checkpoint_id, **kw)
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.dcp, "save", save)
    run_dir = tmp_path / "run"
    with pytest.raises(DiskFullError, match=MESSAGE.format(dir=re.escape(str(run_dir / "checkpoints")))):
        Trainer(config(run_dir, cache_dir)).fit()
    assert_cleaned_up_and_resumable(run_dir, cache_dir)
