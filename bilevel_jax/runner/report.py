"""`bilevel-jax report RUN_DIR [RUN_DIR ...]`: one table and comparison plots across runs.

Reads each run's `summary.json` and `metrics.csv`, prints the final metrics of every grid point
of every run (mean ± standard error over seeds), and writes one figure per metric with the
learning curves of all of them to `--out` (default: the first run's `report/`).
"""

from __future__ import annotations

import json
import os
from typing import TextIO

from bilevel_jax.runner.fields import ConfigError
from bilevel_jax.runner.io import atomic_write_text
from bilevel_jax.runner.plots import Curve, plot_metric
from bilevel_jax.runner.results import TABLE_METRICS, format_table, read_metrics_csv, summary_rows


def load_run(directory: str) -> dict:
    path = os.path.join(directory, "summary.json")
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory}: not a directory")
    if not os.path.exists(path):
        raise ConfigError(f"{directory}: no summary.json (not a finished run directory)")
    try:
        with open(path) as handle:
            summary = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    if not os.path.exists(os.path.join(directory, "metrics.csv")):
        raise ConfigError(f"{directory}: no metrics.csv")
    return summary


def _run_names(directories: list[str], summaries: list[dict]) -> list[str]:
    names = [s.get("name") or os.path.basename(os.path.abspath(d))
             for d, s in zip(directories, summaries)]
    if len(set(names)) < len(names):
        names = [os.path.basename(os.path.abspath(d)) for d in directories]
    if len(set(names)) < len(names):
        names = [os.path.abspath(d) for d in directories]
    return names


def report(directories: list[str], out: str | None = None, *, metrics: list[str] | None = None,
           stream: TextIO | None = None) -> str:
    """Prints the combined table, writes the plots and `table.txt`; returns the output directory.

    Raises `ConfigError` (nothing written) for a directory that is not a finished run.
    """
    import sys

    stream = sys.stdout if stream is None else stream
    summaries = [load_run(d) for d in directories]
    names = _run_names(directories, summaries)
    all_metrics: list[str] = []
    for summary in summaries:
        all_metrics += [m for m in summary["metrics"] if m not in all_metrics]
    if metrics:
        unknown = [m for m in metrics if m not in all_metrics]
        if unknown:
            raise ConfigError(f"--metric: {unknown} not in these runs; expected some of {all_metrics}")
        all_metrics = list(metrics)
    curves_by_run = [read_metrics_csv(os.path.join(d, "metrics.csv"), s)
                     for d, s in zip(directories, summaries)]

    keys: list[str] = []
    for summary in summaries:
        keys += [k for k in summary["sweep_keys"] if k not in keys]
    columns = [m for m in TABLE_METRICS if any(m in s["metrics"] for s in summaries)]
    header, rows = None, []
    for name, summary in zip(names, summaries):
        header, more = summary_rows(summary, run_name=name, keys=keys, metrics=columns)
        rows += more
    text = format_table(header, rows)
    stats = sorted({s["statistic"] for s in summaries})
    text += "\n\n" + "\n".join(f"{s}." for s in stats)
    print(text, file=stream)

    out = out or os.path.join(directories[0], "report")
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "table.txt"), text + "\n")
    written = []
    for metric in all_metrics:
        curves = []
        for name, summary, run_curves in zip(names, summaries, curves_by_run):
            if metric not in summary["metrics"]:
                continue
            for point in summary["points"]:
                label = name if len(summary["points"]) == 1 else f"{name}: {point['label']}"
                curves.append(Curve(label, run_curves[point["point"]][metric]))
        path = os.path.join(out, f"{metric}.png")
        if curves and plot_metric(path, metric, curves, title=f"{metric} (mean ± SE over seeds)"):
            written.append(path)
    print(f"\nWrote {os.path.join(out, 'table.txt')} and {len(written)} plots to {out}",
          file=stream)
    return out
