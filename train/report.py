"""`python -m train.report RUN_DIR [RUN_DIR ...] [--out FILE.png|.html]`: a run's curves as one figure.

Reads only the run directory (offline): metrics.jsonl, config.yaml (the run's name) and
expert_load.json (the last logged step's token count per MoE layer and expert). Panels:

  loss (train; `val_loss` when evaluation logged it)   MTP loss (train; `val_mtp_loss`)
  learning rate   gradient norm   tokens/s   MFU
  router-bias drift (max |bias| and mean per-layer std)
  histogram of the last step's per-expert load / mean load, over every MoE layer's experts
  per run: heatmap of each MoE layer's max/mean expert load at every logged step (+ its colour bar)

Against tokens seen. Several runs are overlaid on the shared panels (each gets its own heatmap).
Skipped steps (non-finite loss or gradient) are marked with a red X, logged steps where data records
were skipped (data.on_bad_record=skip) with an orange triangle: both on the loss and grad-norm curves,
at the logged step where the run's count went up (at the panel's top where the value is not finite).
`.html` writes a self-contained page: the PNG (base64) and a summary table.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator
from omegaconf import OmegaConf

SHARED_PANELS = 8  # loss, MTP loss, lr, grad norm, tokens/s, MFU, router bias, expert-load histogram
AXES_PER_RUN = 2  # load heatmap and its colour bar


class ReportError(ValueError):
    """A run directory that cannot be reported; the message names the directory and the problem."""


@dataclass
class Run:
    """One run directory's logged records, deduplicated by step (a resumed run re-logs steps)."""

    path: Path
    name: str
    records: list[dict[str, Any]]
    expert_load: Optional[dict[str, Any]] = None
    x_key: str = "tokens"
    layer_names: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(x, y) of the records that hold a finite number under `key`."""
        xs, ys = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(r.get(self.x_key, r["step"]))
                ys.append(float(v))
        return xs, ys

    def increases(self, key: str) -> list[dict[str, Any]]:
        """Records where the cumulative count `key` (absent = 0) went up since the previous record."""
        out, last = [], 0
        for r in self.records:
            n = r.get(key, 0) or 0
            if n > last:
                out.append(r)
            last = max(last, n)
        return out

    def last(self, key: str) -> Any:
        return next((r[key] for r in reversed(self.records) if key in r), None)


def load_run(path: str | Path) -> Run:
    """Read RUN_DIR; ReportError when it has no metrics to draw."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{path}: no metrics.jsonl (not a run directory, or the run logged no step yet)")
    by_step: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ReportError(f"{metrics}:{i}: not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ReportError(f"{metrics}:{i}: a record without an integer 'step'")
        by_step.setdefault(record["step"], {}).update(record)  # later lines (a resumed run) win
    if not by_step:
        raise ReportError(f"{metrics}: no records (the run logged no step yet)")
    records = [by_step[s] for s in sorted(by_step)]
    name = path.name
    config = path / "config.yaml"
    if config.is_file():
        name = str(OmegaConf.select(OmegaConf.load(config), "run.name", default=name) or name)
    expert_load = None
    if (path / "expert_load.json").is_file():
        expert_load = json.loads((path / "expert_load.json").read_text())
    x_key = "tokens" if all("tokens" in r for r in records) else "step"
    n_layers = max((len(r.get("load_max_mean_per_layer") or []) for r in records), default=0)
    names = list((expert_load or {}).get("layers", []))
    if len(names) != n_layers:
        names = [f"moe_{j:02d}" for j in range(n_layers)]
    return Run(path, name, records, expert_load, x_key, names)


def _labels(runs: Sequence[Run]) -> list[str]:
    """Run names, or their paths where two runs share a name."""
    names = [r.name for r in runs]
    return [str(r.path) if names.count(r.name) > 1 else r.name for r in runs]


def _mark_events(ax, run: Run, key: str, color: str) -> None:
    """Red X: a step was skipped; orange triangle: data records were skipped. On the `key` curve, or at
    the top of the panel where the value is not finite (a skipped step's infinite gradient norm)."""
    for counter, marker, mcolor, what in (("skipped_steps", "X", "red", "skipped step"),
                                          ("bad_records", "^", "orange", "skipped records")):
        hits = run.increases(counter)
        finite = [r for r in hits if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        off_scale = [r for r in hits if r not in finite]
        style = {"marker": marker, "s": 80, "color": mcolor, "edgecolors": color, "linewidths": 1.0, "zorder": 5}
        if finite:
            ax.scatter([r.get(run.x_key, r["step"]) for r in finite], [r[key] for r in finite], label=what, **style)
        if off_scale:
            ax.scatter([r.get(run.x_key, r["step"]) for r in off_scale], [0.96] * len(off_scale),
                       transform=ax.get_xaxis_transform(), label="_nolegend_" if finite else what, **style)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _curve_panel(ax, runs: Sequence[Run], labels: list[str], colors: list[str], title: str,
                 keys: Sequence[tuple[str, str, dict[str, Any]]], marks: Optional[str] = None,
                 scale: float = 1.0) -> None:
    """One panel of `keys` (metric, label suffix, line style) for every run."""
    drawn = False
    for run, label, color in zip(runs, labels, colors):
        for key, suffix, style in keys:
            xs, ys = run.series(key)
            if xs:
                ax.plot(xs, [y * scale for y in ys], label=f"{label} {suffix}".strip(), color=color, **style)
                drawn = True
        if marks:
            _mark_events(ax, run, marks, color)
    ax.set_title(title)
    if not drawn:
        _empty(ax, "not logged")
        return
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _load_histogram(ax, runs: Sequence[Run], labels: list[str], colors: list[str]) -> None:
    """Each (MoE layer, expert)'s share of its layer's tokens over the layer mean, last logged step."""
    ax.set_title("expert load at the last step")
    drawn = False
    for run, label, color in zip(runs, labels, colors):
        counts = (run.expert_load or {}).get("counts") or []
        ratios = [n * len(row) / sum(row) for row in counts if sum(row) > 0 for n in row]
        if ratios:
            ax.hist(ratios, bins=20, histtype="step", linewidth=2, color=color,
                    label=f"{label} (step {run.expert_load['step']})")
            drawn = True
    if not drawn:
        _empty(ax, "no expert_load.json")
        return
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("expert load / mean load (1 = balanced)")
    ax.set_ylabel("experts")
    ax.legend(fontsize=8)


def _load_heatmap(fig: Figure, ax, run: Run, label: str) -> None:
    """Rows: MoE layers; columns: logged steps; colour: max/mean expert load."""
    rows = [r for r in run.records if r.get("load_max_mean_per_layer")]
    ax.set_title(f"{label}: max/mean expert load per MoE layer")
    if not rows or not run.layer_names:
        _empty(ax, "no expert load logged (dense model?)")
        fig.colorbar(ax.imshow([[math.nan]], aspect="auto"), ax=ax)
        return
    n = len(run.layer_names)
    grid = [[(r["load_max_mean_per_layer"] + [math.nan] * n)[j] for r in rows] for j in range(n)]
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma_r", origin="lower",
                   extent=(-0.5, len(rows) - 0.5, -0.5, n - 0.5), vmin=1.0)
    ax.set_yticks(range(n), run.layer_names)
    ticks = sorted({round(i * (len(rows) - 1) / 5) for i in range(6)})
    ax.set_xticks(ticks, [str(rows[i]["step"]) for i in ticks])
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax, label="max / mean")


def build_figure(runs: Sequence[Run]) -> Figure:
    """The report figure: SHARED_PANELS shared panels, then AXES_PER_RUN axes for each run."""
    if not runs:
        raise ReportError("no run to report")
    labels = _labels(runs)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    fig = Figure(figsize=(20, 8.5 + 3.0 * len(runs)), layout="constrained")
    grid = fig.add_gridspec(2 + len(runs), 4, height_ratios=[1.0, 1.0] + [0.75] * len(runs))
    ax = [fig.add_subplot(grid[i // 4, i % 4]) for i in range(SHARED_PANELS)]
    solid, dashed = {"linewidth": 1.4}, {"linewidth": 2.0, "linestyle": "--", "marker": "o", "markersize": 4}
    _curve_panel(ax[0], runs, labels, colors, "loss (nats)",
                 [("loss", "train", solid), ("val_loss", "val", dashed)], marks="loss")
    _curve_panel(ax[1], runs, labels, colors, "MTP loss (nats, mean over depths)",
                 [("mtp_loss", "train", solid), ("val_mtp_loss", "val", dashed)])
    _curve_panel(ax[2], runs, labels, colors, "learning rate", [("lr", "", solid)])
    _curve_panel(ax[3], runs, labels, colors, "gradient norm (before clipping)", [("grad_norm", "", solid)],
                 marks="grad_norm")
    _curve_panel(ax[4], runs, labels, colors, "tokens/s", [("tokens_per_s", "", solid)])
    _curve_panel(ax[5], runs, labels, colors, "MFU (%)", [("mfu", "", solid)], scale=100.0)
    _curve_panel(ax[6], runs, labels, colors, "router-bias drift",
                 [("router_bias_absmax", "max |b|", solid), ("router_bias_std", "std(b) per layer", dashed)])
    _load_histogram(ax[7], runs, labels, colors)
    x_label = "tokens" if all(r.x_key == "tokens" for r in runs) else "step"
    for a in ax[:7]:
        a.set_xlabel(x_label)
        a.xaxis.set_major_locator(MaxNLocator(6))
        a.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.5M, ... tokens
    for i, (run, label) in enumerate(zip(runs, labels)):
        _load_heatmap(fig, fig.add_subplot(grid[2 + i, :]), run, label)
    return fig


def summary(run: Run) -> dict[str, Any]:
    """The numbers of the HTML table."""
    last = run.records[-1]
    rates = run.series("tokens_per_s")[1][1:] or run.series("tokens_per_s")[1]  # step 1 includes warm-up
    mfu = run.series("mfu")[1][1:]
    return {
        "run": run.name, "dir": str(run.path), "steps": last["step"], "tokens": last.get("tokens"),
        "first loss": run.records[0].get("loss"), "last loss": last.get("loss"),
        "last val_loss": run.last("val_loss"), "last mtp_loss": run.last("mtp_loss"),
        "median tokens/s": statistics.median(rates) if rates else None,
        "median MFU %": 100 * statistics.median(mfu) if mfu else None,
        "last load max/mean": run.last("load_max_mean"),
        "skipped steps": run.last("skipped_steps") or 0, "skipped records": run.last("bad_records") or 0,
    }


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape("" if v is None else str(v))


def render_html(png: bytes, runs: Sequence[Run]) -> str:
    rows = [summary(r) for r in runs]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    title = html.escape("moeforge report: " + ", ".join(r.name for r in runs))
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin-bottom:1em}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style></head>"
            f"<body><h2>{title}</h2><table><tr>{head}</tr>{body}</table>"
            f"<img alt='report' src='data:image/png;base64,{base64.b64encode(png).decode()}'></body></html>\n")


def write_report(run_dirs: Sequence[str | Path], out: Optional[str | Path] = None) -> Path:
    """Draw the runs into `out` (.png or .html; default FIRST_RUN_DIR/report.png); returns the path."""
    runs = [load_run(d) for d in run_dirs]
    out = Path(out) if out is not None else runs[0].path / "report.png"
    if out.suffix.lower() not in (".png", ".html"):
        raise ReportError(f"--out {out}: must end in .png or .html")
    buf = io.BytesIO()
    build_figure(runs).savefig(buf, format="png", dpi=80)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":
        out.write_bytes(buf.getvalue())
    else:
        out.write_text(render_html(buf.getvalue(), runs))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (overlaid)")
    parser.add_argument("--out", help="FILE.png or FILE.html (default: FIRST_RUN_DIR/report.png)")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.run_dirs, args.out)
    except ReportError as e:
        print(f"report error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
