"""`python -m train.report` on real short runs: PNG and HTML written, the expected panels, skipped
steps and records marked, two runs overlaid, and a clear one-line error for a directory without metrics."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import pytest

from data.config import SourceConfig
from tests.trainer_helpers import small_overrides
from train.config import load_config
from train.report import AXES_PER_RUN, SHARED_PANELS, build_figure, load_run, main
from train.trainer import Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(repo_root, run_dir, cache_dir, bad_dir=None, nan_step=None, **extra):
    cfg = load_config(repo_root / "configs" / "tiny.yaml",
                      small_overrides(run_dir, cache_dir, **{"data.on_bad_record": "skip", **extra}))
    if bad_dir is not None:  # a first source with malformed lines (read from step 1): skipped and counted
        cfg.data.sources.insert(0, SourceConfig(str(bad_dir), weight=0.5))
    trainer = Trainer(cfg)
    if nan_step is not None:  # one non-finite gradient: the step is skipped and counted
        trainer.model.lm_head.weight.register_hook(
            lambda g: g * float("inf") if trainer.step + 1 == nan_step else g)
    trainer.fit()
    return run_dir


@pytest.fixture(scope="module")
def runs(repo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text(('{oops\n{"text": "def f(x):\\n    return x + 1\\n"}\n' * 40))  # a bad line first: counted at step 1
    faulty = _train(repo_root, tmp / "faulty", tmp / "cache", bad_dir=bad, nan_step=3,
                    **{"train.steps": 8, "run.name": "faulty"})
    plain = _train(repo_root, tmp / "plain", tmp / "cache", **{"train.steps": 5, "run.name": "plain"})
    return faulty, plain


def test_png_from_a_real_run_has_every_panel_and_marks(runs, tmp_path):
    faulty, _ = runs
    out = tmp_path / "r.png"
    assert main([str(faulty), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 20_000

    run = load_run(faulty)
    assert [r["step"] for r in run.records] == list(range(1, 9))
    assert run.expert_load["step"] == 8 and run.expert_load["layers"] == ["layer_01", "mtp_1"]
    assert [len(row) for row in run.expert_load["counts"]] == [8, 8]
    fig = build_figure([run])
    assert len(fig.axes) == SHARED_PANELS + AXES_PER_RUN == 10
    titles = [ax.get_title() for ax in fig.axes]
    for t in ("loss (nats)", "MTP loss", "learning rate", "gradient norm", "tokens/s", "MFU", "router-bias",
              "expert load at the last step", "faulty: max/mean expert load"):
        assert any(t in x for x in titles), (t, titles)
    loss_ax = fig.axes[0]
    marks = {c.get_label(): c.get_offsets() for c in loss_ax.collections}
    assert len(marks["skipped step"]) == 1 and float(marks["skipped step"][0][0]) == run.records[2]["tokens"]
    assert len(marks["skipped records"]) >= 1
    grad_marks = {c.get_label(): c.get_offsets() for c in fig.axes[3].collections}
    assert len(grad_marks["skipped step"]) == 1  # its gradient norm is inf: drawn at the panel's top
    heat = fig.axes[SHARED_PANELS].images[0].get_array()
    assert heat.shape == (2, 8)  # MoE layers x logged steps


def test_two_runs_overlay_and_html(runs, tmp_path):
    faulty, plain = runs
    fig = build_figure([load_run(faulty), load_run(plain)])
    assert len(fig.axes) == SHARED_PANELS + 2 * AXES_PER_RUN
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["faulty train", "plain train"]
    assert len(fig.axes[7].patches) == 2  # one step histogram per run

    out = tmp_path / "sub" / "cmp.html"
    assert main([str(faulty), str(plain), "--out", str(out)]) == 0
    page = out.read_text()
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1))
    assert png.startswith(PNG_MAGIC)
    assert page.count("<tr>") == 3 and ">faulty<" in page and ">plain<" in page
    assert "http" not in page.split("base64,")[0]  # self-contained: nothing fetched


def test_resumed_run_keeps_the_latest_record_per_step(tmp_path):
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "loss": 3.5}, {"step": 3, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = load_run(tmp_path)
    assert run.series("loss") == ([1, 2, 3], [5.0, 3.5, 3.0])  # no `tokens` logged: against steps
    assert len(build_figure([run]).axes) == SHARED_PANELS + AXES_PER_RUN  # missing metrics: empty panels


def test_directory_without_metrics_is_a_one_line_error(repo_root, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train.report", str(tmp_path)], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "no metrics.jsonl" in proc.stderr, proc.stderr
    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path)]) == 2
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert main([str(tmp_path), "--out", str(tmp_path / "r.pdf")]) == 2
