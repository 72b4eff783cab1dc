"""Learning curves (mean over seeds +- standard error bands), one figure per metric.

Uses matplotlib's object API with the Agg canvas, so no pyplot state or display is touched.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from bilevel_jax.runner.io import atomic_savefig

LOG_METRICS = ("grad_norm", "follower_residual", "penalty", "rho")
LINESTYLES = ("-", "--", "-.", ":")


class Curve(NamedTuple):
    label: str
    values: np.ndarray       # [seeds, iterations]


def mean_and_se(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error (std with ddof=1 over sqrt(n); NaN for a single sample)."""
    values = np.asarray(values, np.float64)
    n = values.shape[axis]
    mean = np.mean(values, axis=axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, np.std(values, axis=axis, ddof=1) / np.sqrt(n)


def plot_metric(path: str, metric: str, curves: list[Curve], title: str,
                legend_title: str | None = None) -> bool:
    """Writes one figure; returns False (and writes nothing) when no curve has a finite value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not any(np.isfinite(c.values).any() for c in curves):
        return False
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positive = True
    for index, curve in enumerate(curves):
        mean, se = mean_and_se(curve.values)
        # Only the iterations some seed reports (a `track_every` schedule leaves the untracked
        # ones NaN): the line joins the tracked points instead of breaking at every gap.
        steps = np.nonzero(np.isfinite(mean))[0]
        mean, se = mean[steps], se[steps]
        color = f"C{index % 10}"
        axes.plot(steps, mean, color=color, lw=1.5, label=curve.label,
                  linestyle=LINESTYLES[(index // 10 + index) % len(LINESTYLES)])
        if np.isfinite(se).any():
            axes.fill_between(steps, mean - se, mean + se, color=color, alpha=0.2, lw=0)
        finite = mean[np.isfinite(mean)]
        positive = positive and finite.size > 0 and bool(np.all(finite > 0))
    if metric in LOG_METRICS and positive:
        axes.set_yscale("log")
    axes.set_xlabel("iteration")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if len(curves) > 1 or legend_title:
        axes.legend(title=legend_title, fontsize="small")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_savefig(figure, path)
    return True
