"""User mistakes on `python -m train` print one clean line and exit with a documented code
(train/user_errors.py); tracebacks are for bugs, or on request with MOEFORGE_DEBUG=1.

Each mistake of the issue runs `train.__main__.main` in-process (one also as a real process):
a missing data path, run.dir pointing at a file, data failing the `error` policy, resuming with
changed data sources, a checkpoint that cannot be loaded, an HF directory that cannot be
imported, a config error found once the run starts. run.dir in use: tests/test_run_lock.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_helpers import small_overrides
from train.__main__ import main
from train.user_errors import run_reporting_user_errors

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("user_errors_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A jsonl file of stdlib source text (enough to train the small tokenizer)."""
    import sysconfig

    d = tmp_path_factory.mktemp("corpus")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    (d / "good.jsonl").write_text("".join(json.dumps({"text": f.read_text(errors="replace")}) + "\n" for f in files))
    return d


def train_cli(repo_root: Path, run_dir: Path, cache_dir: Path, capsys, *extra: str) -> tuple[int, str]:
    """`python -m train` in this process: (exit code, stderr)."""
    old = os.getcwd()
    os.chdir(repo_root)
    try:
        code = main(["--config", "configs/tiny.yaml",
                     *small_overrides(run_dir, cache_dir, **{"train.steps": 2}), *extra])
    finally:
        os.chdir(old)
    return code, capsys.readouterr().err


def assert_one_line(stderr: str, label: str, *fragments: str) -> None:
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"{label}: "), last
    for f in fragments:
        assert f in last, (f, last)


def test_missing_data_path_is_one_line_exit_3_as_a_real_process(repo_root, tmp_path, cache_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", "configs/tiny.yaml",
         *small_overrides(tmp_path / "run", cache_dir), "data.sources=[{path: /nonexistent/corpus.jsonl}]"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert_one_line(proc.stderr, "data error", "data.sources[0].path", "/nonexistent/corpus.jsonl")


def test_run_dir_is_a_file_exit_4(repo_root, tmp_path, cache_dir, capsys):
    (tmp_path / "run").write_text("not a directory")
    code, err = train_cli(repo_root, tmp_path / "run", cache_dir, capsys)
    assert code == 4
    assert_one_line(err, "run directory error", f"{tmp_path / 'run'} is a file")


def test_bad_record_under_error_policy_exit_3(repo_root, tmp_path, cache_dir, corpus, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = (corpus / "good.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"text": "unterminated'] + lines[2:]) + "\n")
    code, err = train_cli(repo_root, tmp_path / "run", cache_dir, capsys, f"data.sources=[{{path: {bad}}}]")
    assert code == 3
    assert_one_line(err, "data error", f"{bad}:3", "data.on_bad_record=skip")


def test_resume_with_changed_sources_exit_3_names_data_resume(repo_root, tmp_path, cache_dir, corpus, capsys):
    assert train_cli(repo_root, tmp_path / "run", cache_dir, capsys)[0] == 0  # a checkpoint at step 2
    changed = f"data.sources=[{{path: '@python-stdlib'}}, {{path: {corpus / 'good.jsonl'}}}]"
    code, err = train_cli(repo_root, tmp_path / "run", cache_dir, capsys, changed, "train.steps=4")
    assert code == 3
    assert_one_line(err, "data error", "data state:", "data.resume=restart")


def test_unloadable_checkpoint_exit_6(repo_root, tmp_path, cache_dir, capsys):
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{not json")
    (step / "COMPLETE").write_text("2\n")
    code, err = train_cli(repo_root, tmp_path / "run", cache_dir, capsys)
    assert code == 6
    assert_one_line(err, "checkpoint error", "none of the 1 complete checkpoints", "meta.json")


def test_hf_import_problem_exit_7(repo_root, tmp_path, cache_dir, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    code, err = train_cli(repo_root, tmp_path / "run", cache_dir, capsys, f"checkpoint.init_from_hf={tmp_path / 'hf'}")
    assert code == 7
    assert_one_line(err, "hf import error", "checkpoint.init_from_hf:", str(tmp_path / "hf"))


def test_config_error_found_at_start_exit_2_and_debug_traceback(repo_root, tmp_path, cache_dir, capsys, monkeypatch):
    code, err = train_cli(repo_root, tmp_path / "run", cache_dir, capsys, "model.vocab_size=300")
    assert code == 2
    assert_one_line(err, "config error", "model.vocab_size: 300")
    monkeypatch.setenv("MOEFORGE_DEBUG", "1")
    code, err = train_cli(repo_root, tmp_path / "run", cache_dir, capsys, "model.vocab_size=300")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("config error: ")


def test_bugs_keep_their_traceback():
    def bug() -> int:
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        run_reporting_user_errors(bug)
