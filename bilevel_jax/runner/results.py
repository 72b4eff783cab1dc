"""Run results: the long-format metrics table, the per-grid-point summary and the text tables."""

from __future__ import annotations

import csv
import math

import numpy as np

from bilevel_jax.runner.fields import ConfigError, show_value
from bilevel_jax.runner.plots import mean_and_se

ID_COLUMNS = ("run", "point")
TABLE_METRICS = ("objective", "grad_norm", "follower_residual", "samples", "penalty")


def final_window(iterations: int, fraction: float) -> int:
    return max(1, int(math.ceil(iterations * fraction)))


def point_label(values: dict, keys: list[str] | None = None) -> str:
    """`hpgd` for one swept key, `estimator.name=hpgd, optimizer.learning_rate=0.1` for several."""
    keys = list(values) if keys is None else keys
    if not keys:
        return "run"
    if len(keys) == 1:
        return show_value(values[keys[0]])
    return ", ".join(f"{k}={show_value(values[k])}" for k in keys)


def summarize(*, name: str, config_hash: str, iterations: int, seeds: list[int],
              sweep_keys: list[str], points: list[dict], metric_names: list[str],
              curves: dict[int, dict[str, np.ndarray]], final_fraction: float) -> dict:
    """`curves[point][metric]` is `[seeds, iterations]`; final = mean over the last window."""
    window = final_window(iterations, final_fraction)
    out_points = []
    for index, values in enumerate(points):
        final, initial = {}, {}
        for metric in metric_names:
            data = curves[index][metric]
            per_seed = np.mean(data[:, -window:], axis=1)
            mean, se = mean_and_se(per_seed)
            final[metric] = {"mean": float(mean), "se": float(se),
                             "per_seed": [float(v) for v in per_seed]}
            initial[metric] = float(np.mean(data[:, 0]))
        out_points.append({"point": index, "values": values, "label": point_label(values, sweep_keys),
                           "runs": [index * len(seeds) + i for i in range(len(seeds))],
                           "final": final, "initial": initial})
    return {"name": name, "config_hash": config_hash, "iterations": iterations, "seeds": seeds,
            "sweep_keys": sweep_keys, "metrics": metric_names, "final_window": window,
            "statistic": f"final = mean over the last {window} iterations of each run; "
                         "mean and standard error (ddof=1) over seeds",
            "points": out_points}


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e5:
        return f"{value:.{digits}g}"
    return f"{value:.{max(digits - 2, 1)}e}"


def summary_rows(summary: dict, *, run_name: str | None = None,
                 ms_per_iter: dict[int, float] | None = None, keys: list[str] | None = None,
                 metrics: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a run's summary table (`keys`, `metrics`: columns shared with other
    runs in a combined table; a run lacking one shows "-")."""
    keys = summary["sweep_keys"] if keys is None else keys
    if metrics is None:
        metrics = [m for m in TABLE_METRICS if m in summary["metrics"]]
    header = (["run"] if run_name is not None else []) + (keys or ["grid point"])
    if "objective" in metrics:
        header.append("F(x0)")
    for metric in metrics:
        header.append(f"{metric}/it" if metric == "samples" else metric)
    if ms_per_iter is not None:
        header.append("ms/it")
    rows = []
    for point in summary["points"]:
        row = [run_name] if run_name is not None else []
        row += ([show_value(point["values"][k]) if k in point["values"] else "-" for k in keys]
                if keys else [summary["name"]])
        if "objective" in metrics:
            row.append(_num(point["initial"].get("objective")))
        for metric in metrics:
            if metric not in point["final"]:
                row.append("-")
                continue
            stats = point["final"][metric]
            mean, se = stats["mean"], stats["se"]
            if metric == "samples":
                row.append(_num(mean, 6))
            elif se is None or (isinstance(se, float) and not math.isfinite(se)):
                row.append(_num(mean))
            elif mean is not None and math.isfinite(mean) and se <= 1e-6 * abs(mean):
                row.append(f"{_num(mean)} ± 0")   # identical seeds up to rounding
            else:
                row.append(f"{_num(mean)} ± {_num(se, 2)}")
        if ms_per_iter is not None:
            row.append(_num(ms_per_iter.get(point["point"]), 3))
        rows.append(row)
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _cell(path: str, line: int, row: dict, column: str, parse):
    text = row.get(column)
    try:
        return parse(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: line {line}: column {column!r}: expected "
                          f"{'an int' if parse is int else 'a number or empty'}, got "
                          f"{'nothing' if text is None else repr(text)}") from None


def _metric_value(text: str) -> float:
    return float(text) if text else np.nan


def read_metrics_csv(path: str, summary: dict) -> dict[int, dict[str, np.ndarray]]:
    """`{point: {metric: [seeds, iterations]}}` from a run's `metrics.csv`.

    Raises `ConfigError` naming the line and column of a malformed file (missing columns, a row
    of the wrong length, a cell that is not a number).
    """
    seeds = summary["seeds"]
    iterations = summary["iterations"]
    metrics = summary["metrics"]
    seed_index = {s: i for i, s in enumerate(seeds)}
    curves = {p["point"]: {m: np.full((len(seeds), iterations), np.nan) for m in metrics}
              for p in summary["points"]}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in ("point", "seed", "iteration", *metrics) if c not in columns]
            if missing:
                raise ConfigError(f"{path}: missing columns {missing}; expected the header of "
                                  f"a bilevel-jax metrics.csv")
            for line, row in enumerate(reader, start=2):
                if None in row or None in row.values():
                    raise ConfigError(f"{path}: line {line}: expected {len(columns)} cells "
                                      f"(one per column of the header)")
                point, seed, it = (_cell(path, line, row, c, int)
                                   for c in ("point", "seed", "iteration"))
                values = [_cell(path, line, row, m, _metric_value) for m in metrics]
                if point not in curves or seed not in seed_index or not 0 <= it < iterations:
                    continue
                for metric, value in zip(metrics, values):
                    curves[point][metric][seed_index[seed], it] = value
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    return curves
