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


# The keys of summary.json that the report reads, with their types.
SUMMARY_KEYS = {"iterations": int, "seeds": list, "sweep_keys": list, "metrics": list,
                "points": list, "statistic": str}
POINT_KEYS = {"point": int, "values": dict, "label": str, "final": dict, "initial": dict}
_KINDS = {int: "an int", list: "a list", str: "a string", dict: "an object"}


def check_summary(path: str, summary) -> dict:
    """`summary` if it has the keys the report reads; `ConfigError` naming the first that is off."""
    if not isinstance(summary, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    for key, kind in SUMMARY_KEYS.items():
        if not isinstance(summary.get(key), kind):
            raise ConfigError(f"{path}: {key}: expected {_KINDS[kind]}, got "
                              f"{type(summary.get(key)).__name__}")
    for i, point in enumerate(summary["points"]):
        for key, kind in POINT_KEYS.items():
            if not isinstance(point, dict) or not isinstance(point.get(key), kind):
                raise ConfigError(f"{path}: points[{i}].{key}: expected {_KINDS[kind]}")
    return summary


def load_run(directory: str) -> dict:
    path = os.path.join(directory, "summary.json")
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory}: not a directory")
    if not os.path.exists(path):
        raise ConfigError(f"{directory}: no summary.json (not a finished run directory)")
    try:
        with open(path, "rb") as handle:
            summary = json.loads(handle.read().decode())
    except (OSError, ValueError) as err:     # JSONDecodeError and UnicodeDecodeError
        raise ConfigError(f"{path}: cannot read ({err})") from None
    if not os.path.exists(os.path.join(directory, "metrics.csv")):
        raise ConfigError(f"{directory}: no metrics.csv")
    return check_summary(path, summary)


def prepare_out(out: str | None, default: str) -> str:
    """The report's output directory, created; `ConfigError` naming --out if it cannot be."""
    if out is not None and not out.strip():
        raise ConfigError("--out: expected a directory path, got an empty string")
    out = default if out is None else out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out: expected a directory, got the file {out!r}")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out: cannot create the directory {out!r} ({err.strerror})") from None
    return out


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

    Raises `ConfigError` (nothing written) for a directory that is not a finished run, a
    malformed `summary.json` or `metrics.csv`, and an `--out` that is a file or cannot be made.
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
    out = prepare_out(out, os.path.join(directories[0], "report"))
    print(text, file=stream)

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
