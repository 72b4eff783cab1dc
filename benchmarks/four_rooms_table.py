"""Four-Rooms reward shaping: the CB-RL paper's Table 1 (SPEC 7.1) from the runner's configs.

For each method this runs

    bilevel-jax run configs/four_rooms/<method>.yaml --set iterations=N --set seeds=S \
        --out <runs-dir>/<method> --no-progress

(one subprocess per method, sequentially), or reuses a finished run directory (`--reuse`), then
reads each `summary.json`, keeps per (lam, beta) cell the learning rate (and, for zero-order, the
smoothing c) with the best mean final objective, and writes to benchmarks/results/:

  four_rooms_table.md / .json   the table (mean ± standard error over seeds of the exact leader
                                value at the start state averaged over the two goals, averaged
                                over the last 10% of iterations)
  four_rooms_curves.png         objective curves of the best cell per method (mean ± SE bands)
  four_rooms_incentive.png      the learned incentive c = -0.2 softmax(x)[:104] on the map
  four_rooms_visitation.png     the follower's discounted visitation before / after shaping

The paper's settings (10,000 iterations, 10 seeds, full grids):

    python benchmarks/four_rooms_table.py --iterations 10000 --seeds 10

Usage:
    python benchmarks/four_rooms_table.py --iterations 300 --seeds 3 \
        --methods hpgd,amd,zero_order,exact,pbrl --runs-dir runs/four_rooms [--reuse] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
METHODS = ("hpgd", "amd", "zero_order", "exact", "pbrl")
PAPER_ITERATIONS = 10_000
PAPER_SEEDS = 10
PAPER_COMMAND = "python benchmarks/four_rooms_table.py --iterations 10000 --seeds 10"
LAM = "problem.temperature"
BETA = "problem.beta"
LR = "optimizer.learning_rate"
ZO_C = "estimator.zero_order.smoothing"
NAMES = {"hpgd": "HPGD", "amd": "AMD", "zero_order": "Zero-order", "exact": "Exact",
         "pbrl": "PBRL"}


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def chunk_for(iterations: int, preferred: int = 250) -> int:
    """Largest divisor of `iterations` <= preferred (one compiled chunk program, no tail)."""
    for size in range(min(preferred, iterations), 0, -1):
        if iterations % size == 0 and size >= min(50, iterations):
            return size
    return min(preferred, iterations)


def run_command(method: str, iterations: int, seeds: int, out: str,
                smoothing: list[float] | None) -> list[str]:
    command = ["bilevel-jax", "run", f"configs/four_rooms/{method}.yaml",
               "--set", f"iterations={iterations}", "--set", f"seeds={seeds}"]
    chunk = chunk_for(iterations)
    if chunk != 250:
        command += ["--set", f"chunk_size={chunk}"]
    if method == "zero_order" and smoothing:
        command += ["--set", f"sweep.{ZO_C}=[{', '.join(str(c) for c in smoothing)}]"]
    return command + ["--out", out, "--no-progress"]


def finished(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "summary.json"))


def _runs_log(args) -> str:
    return os.path.join(args.runs_dir, "four_rooms_runs.json")


def _read_runs_log(args) -> dict:
    path = _runs_log(args)
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    return {}


def run_methods(args, methods: list[str]) -> dict[str, dict]:
    """Runs (or reuses) each method; the command and wall time of every run actually made are
    kept in <runs-dir>/four_rooms_runs.json so a later --reuse reports them."""
    info = {}
    log = _read_runs_log(args)
    for method in methods:
        out = os.path.join(args.runs_dir, method)
        command = run_command(method, args.iterations, args.seeds, out, args.zo_smoothing)
        if args.reuse and finished(out):
            print(f"[{method}] reusing {out}", flush=True)
            info[method] = dict(log.get(method, {"command": None, "wall_seconds": None}),
                                reused=True)
            continue
        if args.reuse and log.get(method, {}).get("returncode") not in (None, 0):
            print(f"[{method}] the recorded run failed ({log[method]['returncode']}): not "
                  "retried with --reuse (run without --reuse to retry)", flush=True)
            info[method] = dict(log[method], reused=True)
            continue
        print(f"[{method}] {' '.join(command)}", flush=True)
        tick = time.perf_counter()
        try:
            code = subprocess.run(command, cwd=ROOT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        seconds = time.perf_counter() - tick
        print(f"[{method}] exit {code} after {seconds:.1f} s", flush=True)
        info[method] = {"command": " ".join(command), "reused": False,
                        "wall_seconds": round(seconds, 1), "returncode": code}
        log[method] = {k: v for k, v in info[method].items() if k != "reused"}
        os.makedirs(args.runs_dir, exist_ok=True)
        with open(_runs_log(args), "w") as handle:
            json.dump(log, handle, indent=2)
    return info


# --------------------------------------------------------------------------------------------
# Reading and selecting
# --------------------------------------------------------------------------------------------

def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def best_cells(method: str, summary: dict) -> list[dict]:
    """Per (lam, beta): the point with the best mean final objective over lr (and c)."""
    cells: dict[tuple, dict] = {}
    for point in summary["points"]:
        values = point["values"]
        stats = point["final"]["objective"]
        key = (float(values[LAM]), float(values[BETA]))
        candidate = {"lam": key[0], "beta": key[1], "method": method,
                     "mean": stats["mean"], "se": stats["se"],
                     "iterations": summary["iterations"], "seeds": len(summary["seeds"]),
                     "learning_rate": float(values[LR]), "point": point["point"],
                     "initial": point["initial"]["objective"]}
        if ZO_C in values:
            candidate["smoothing"] = float(values[ZO_C])
        if not _finite(candidate["mean"]):
            candidate["mean"] = None
        best = cells.get(key)
        if best is None or (best["mean"] is None and candidate["mean"] is not None) or (
                candidate["mean"] is not None and candidate["mean"] > best["mean"]):
            cells[key] = candidate
    return [cells[k] for k in sorted(cells)]


def fmt(cell: dict | None) -> str:
    if cell is None or cell["mean"] is None:
        return "-"
    se = cell["se"]
    return f"{cell['mean']:.4f} ± {se:.4f}" if _finite(se) else f"{cell['mean']:.4f}"


def write_tables(cells: list[dict], methods: list[str], run_info: dict, args, wall: float,
                 prefix: str) -> str:
    lams = sorted({c["lam"] for c in cells})
    betas = sorted({c["beta"] for c in cells})
    by = {(c["lam"], c["beta"], c["method"]): c for c in cells}
    header = "| lam | beta | " + " | ".join(NAMES[m] for m in methods) + " |"
    lines = [header, "|" + "---|" * (2 + len(methods))]
    for lam in lams:
        for beta in betas:
            lines.append(f"| {lam:g} | {beta:g} | "
                         + " | ".join(fmt(by.get((lam, beta, m))) for m in methods) + " |")
    table = "\n".join(lines)

    ran = {}
    for m in methods:
        mc = [c for c in cells if c["method"] == m]
        if mc:
            ran[m] = (mc[0]["iterations"], mc[0]["seeds"])
    short = [f"{NAMES[m]} ({it} iterations, {s} seeds)" for m, (it, s) in ran.items()
             if it < PAPER_ITERATIONS or s < PAPER_SEEDS]
    settings = "; ".join(f"{NAMES[m]}: {it} iterations x {s} seeds" for m, (it, s) in ran.items())
    initial = {m: np.mean([c["initial"] for c in cells if c["method"] == m]) for m in ran}
    selection = []
    for m in methods:
        mc = [c for c in cells if c["method"] == m]
        if not mc:
            continue
        parts = [f"({c['lam']:g}, {c['beta']:g}): lr {c['learning_rate']:g}"
                 + (f", c {c['smoothing']:g}" if "smoothing" in c else "") for c in mc]
        selection.append(f"- {NAMES[m]}: " + "; ".join(parts))

    zo = ""
    if "zero_order" in ran:
        grid = args.zo_smoothing if args.zo_smoothing else [0.01, 0.1, 0.5, 1.0]
        zo = (f"Zero-order smoothing grid actually run: c in {{{', '.join(f'{c:g}' for c in grid)}}}"
              + (" (the paper: {0.01, 0.1, 0.5, 1})." if args.zo_smoothing else "."))
    md = [
        f"# Four-Rooms reward shaping (CB-RL Table 1, SPEC 7.1){' - QUICK' if args.quick else ''}",
        "",
        "Exact leader value at the start state, averaged over the two goals (the runner's "
        "`objective`, F(x)), averaged over the last 10% of iterations of each run; per cell the "
        "best learning rate in {0.5, 0.1, 0.05, 0.01} (zero-order: and the best smoothing c) by "
        "mean final objective; mean ± standard error over seeds.",
        "",
        table,
        "",
        f"Run settings: {settings}. Total wall time {wall / 60:.1f} min "
        "(2 shared CPU cores, jax CPU).",
        "",
        (f"**Fewer iterations / seeds than the paper (10,000 iterations, 10 seeds) in every cell "
         f"of:** {', '.join(short)}." if short else "All cells ran the paper's 10,000 iterations "
         "and 10 seeds."),
        "",
        zo,
        "",
        "F(x0) (mean over cells, iteration 0): "
        + ", ".join(f"{NAMES[m]} {v:.4f}" for m, v in initial.items()) + ".",
        "",
        "Selected learning rate (and c) per (lam, beta):",
        "",
        *selection,
        "",
        "Commands run (wall time each, including compilation):",
        "",
        *[f"- {NAMES[m]}: `{i.get('command')}`"
          + (f" ({i['wall_seconds'] / 60:.1f} min)" if i.get("wall_seconds") else "")
          + ("" if i.get("returncode") in (0, None) else f" -> {i.get('returncode')}")
          for m, i in run_info.items()],
        "",
        f"Tables and figures: `{' '.join(sys.argv_display)}`",
        "",
        f"Full paper settings: `{PAPER_COMMAND}`",
        "",
    ]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{prefix}_table.md"), "w") as handle:
        handle.write("\n".join(md))
    payload = {
        "cells": [{k: v for k, v in c.items() if k not in ("point", "initial")} for c in cells],
        "command": PAPER_COMMAND,
        "command_run": " ".join(sys.argv_display),
        "runs": run_info,
        "zero_order_smoothing": args.zo_smoothing or [0.01, 0.1, 0.5, 1.0],
        "wall_seconds": round(wall, 1),
        "metric": "mean over the last 10% of iterations of F(x) (exact leader value at the start "
                  "state averaged over the two goals); best lr (and c) per cell; mean and SE "
                  "(ddof=1) over seeds",
        "paper": {"iterations": PAPER_ITERATIONS, "seeds": PAPER_SEEDS},
    }
    with open(os.path.join(RESULTS, f"{prefix}_table.json"), "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    return table


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def load_curves(directory: str, summary: dict, points: set[int]) -> dict[int, np.ndarray]:
    """`{point: objective [seeds, iterations]}` for the given points (streamed from metrics.csv)."""
    import csv
    seeds = {s: i for i, s in enumerate(summary["seeds"])}
    out = {p: np.full((len(seeds), summary["iterations"]), np.nan) for p in points}
    with open(os.path.join(directory, "metrics.csv"), newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        ip, isd, iit, iob = (header.index(c) for c in ("point", "seed", "iteration", "objective"))
        for row in reader:
            p = int(row[ip])
            if p in out and row[iob]:
                out[p][seeds[int(row[isd])], int(row[iit])] = float(row[iob])
    return out


def final_x(directory: str, point: int, seed_index: int = 0) -> np.ndarray:
    """The final `x` of (point, seed) from the run directory's checkpoint."""
    from bilevel_jax.runner import io as rio
    from bilevel_jax.runner.config import load_config
    from bilevel_jax.runner.run import make_groups

    config = load_config(os.path.join(directory, "config.yaml"))
    _, groups, _, _ = make_groups(config)
    checkpoint = rio.load_checkpoint(directory)
    seed = config["seeds"][seed_index]
    for group in groups:
        if (point, seed) in group.runs:
            row = group.runs.index((point, seed))
            leaves = checkpoint["groups"][group.index]["state"]
            # The state is a dict; its leaves are in sorted key order and "x" is the last
            # [runs, 105] leaf (ascent: estimator, key, [objective_q,] opt, step, x; pbrl: x, y).
            candidates = [leaf for leaf in leaves
                          if leaf.ndim == 2 and leaf.shape == (len(group.runs), 105)]
            return np.asarray(candidates[-1][row], np.float64)
    raise KeyError((point, seed))


def plot_curves(path, panels, curves_by_method, methods):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = sorted({k[0] for k in panels})
    betas = sorted({k[1] for k in panels})
    fig, axes = plt.subplots(len(lams), len(betas), figsize=(4.2 * len(betas), 3.2 * len(lams)),
                             squeeze=False, sharex=True)
    colors = dict(zip(METHODS, ("C0", "C1", "C2", "C3", "C4")))
    for i, lam in enumerate(lams):
        for j, beta in enumerate(betas):
            ax = axes[i, j]
            for method in methods:
                entry = curves_by_method.get((lam, beta, method))
                if entry is None:
                    continue
                data, cell = entry
                # Untracked iterations (a track_every schedule) are NaN in every seed: drawn
                # through, the curve joins the tracked points.
                n = np.sum(np.isfinite(data), axis=0)
                t = np.nonzero(n > 0)[0]
                data, n = data[:, t], n[t]
                mean = np.nanmean(data, axis=0)
                se = (np.nanstd(data, axis=0, ddof=1) / np.sqrt(n)) if data.shape[0] > 1 \
                    else np.zeros_like(mean)
                label = f"{NAMES[method]} (lr {cell['learning_rate']:g}" + (
                    f", c {cell['smoothing']:g}" if "smoothing" in cell else "") + ")"
                ax.plot(t, mean, color=colors[method], label=label, lw=1.3)
                ax.fill_between(t, mean - se, mean + se, color=colors[method], alpha=0.25)
            ax.set_title(f"lam={lam:g}, beta={beta:g}", fontsize=10)
            ax.grid(alpha=0.3)
            if i == len(lams) - 1:
                ax.set_xlabel("iteration")
            if j == 0:
                ax.set_ylabel("leader value F(x)")
            ax.legend(fontsize=6.5, loc="lower right")
    fig.suptitle("Four-Rooms: leader value (mean ± SE over seeds), best lr per method and cell",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_incentive(path, xs: dict, method: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bilevel_jax.envs.four_rooms import GOALS, LEADER_TARGET, START, four_rooms_layout

    layout = four_rooms_layout()
    S = layout.num_states
    lams = sorted(xs)
    fig, axes = plt.subplots(1, len(lams), figsize=(4.3 * len(lams), 4.3), squeeze=False)
    for ax, lam in zip(axes[0], lams):
        x = xs[lam]
        w = np.exp(x - x.max())
        w /= w.sum()
        c = -0.2 * w[:S]
        grid = layout.to_grid(c)
        im = ax.imshow(grid, cmap="viridis_r" if False else "magma", vmin=min(c.min(), -1e-6),
                       vmax=0)
        ax.set_facecolor("lightgray")
        for (r, col), mark in ((START, "S"), (GOALS[0], "G1"), (GOALS[1], "G2"),
                               (LEADER_TARGET, "T")):
            ax.text(col, r, mark, ha="center", va="center", color="cyan", fontsize=9,
                    fontweight="bold")
        ax.set_title(f"lam={lam:g}: ||c||_1={-c.sum():.3f}, slack {0.2 * w[S]:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle(f"Learned incentive c = -0.2 softmax(x)[:104] ({NAMES[method]}, beta=1, "
                 "best lr, seed 0; gray: walls; S start, G goals, T leader target)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_visitation(path, x: np.ndarray, lam: float, beta: float, method: str):
    import jax.numpy as jnp
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import bilevel_jax as bj
    from bilevel_jax.envs.four_rooms import (GOALS, LEADER_TARGET, START, four_rooms_layout,
                                             four_rooms_problem)

    layout = four_rooms_layout()
    problem, n = four_rooms_problem(beta=beta, temperature=lam)
    fig, axes = plt.subplots(2, 2, figsize=(8.6, 8.4))
    maps = {}
    for j, goal in enumerate(GOALS):
        for i, (name, xx) in enumerate((("before shaping (x = 0)", np.zeros(n)),
                                        ("after shaping (learned x)", x))):
            mdp = problem.follower(jnp.asarray(xx, jnp.float32), int(layout.state(goal)))
            sol = bj.soft_value_iteration(mdp, lam)
            d = np.asarray(bj.visitation(mdp, sol.policy))
            maps[(i, j)] = (name, goal, d)
    vmax = max(np.log10(d.max()) for _, _, d in maps.values())
    target = layout.state(LEADER_TARGET)
    for (i, j), (name, goal, d) in maps.items():
        ax = axes[i, j]
        grid = layout.to_grid(np.log10(np.maximum(d, 1e-4)))
        im = ax.imshow(grid, cmap="viridis", vmin=-4, vmax=vmax)
        ax.set_facecolor("lightgray")
        for (r, col), mark in ((START, "S"), (goal, "G"), (LEADER_TARGET, "T")):
            ax.text(col, r, mark, ha="center", va="center", color="red", fontsize=10,
                    fontweight="bold")
        ax.set_title(f"goal {goal}, {name}\nd(T) = {d[target]:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="log10 d(s)")
    fig.suptitle(f"Follower discounted visitation (soft-optimal policy), lam={lam:g}, "
                 f"beta={beta:g}, {NAMES[method]} x", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=PAPER_ITERATIONS)
    parser.add_argument("--seeds", type=int, default=PAPER_SEEDS)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs-dir", default="runs/four_rooms")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a method's finished run directory (summary.json present)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 20 iterations, 2 seeds, zero-order c in {0.1}; "
                             "outputs four_rooms_quick_* in a separate runs dir")
    parser.add_argument("--zo-smoothing", default=None,
                        help="comma-separated zero-order c grid (default: the config's "
                             "0.01,0.1,0.5,1)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which a method's run is stopped (left out)")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    sys.argv_display = ["python", "benchmarks/four_rooms_table.py"] + list(
        sys.argv[1:] if argv is None else argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; expected some of {','.join(METHODS)}")
    args.zo_smoothing = ([float(c) for c in args.zo_smoothing.split(",")]
                         if args.zo_smoothing else None)
    prefix = "four_rooms"
    if args.quick:
        args.iterations, args.seeds = 20, 2
        args.zo_smoothing = args.zo_smoothing or [0.1]
        if args.runs_dir == "runs/four_rooms":
            args.runs_dir = "runs/four_rooms_quick"
        prefix = "four_rooms_quick"
    os.chdir(ROOT)

    start = time.perf_counter()
    run_info = run_methods(args, methods)
    wall = time.perf_counter() - start
    if args.reuse:
        # Total of the recorded per-method times when runs were reused.
        previous = os.path.join(RESULTS, f"{prefix}_table.json")
        if os.path.exists(previous):
            with open(previous) as handle:
                old = json.load(handle).get("runs", {})
            for m, info in run_info.items():
                if info["reused"] and info.get("wall_seconds") is None and m in old \
                        and old[m].get("wall_seconds") is not None:
                    info.update({k: v for k, v in old[m].items() if k != "reused"})
        wall = sum(i["wall_seconds"] or 0 for i in run_info.values())

    cells, summaries = [], {}
    for method in methods:
        directory = os.path.join(args.runs_dir, method)
        if not finished(directory):
            print(f"[{method}] no summary.json in {directory}: left out of the table",
                  file=sys.stderr)
            continue
        with open(os.path.join(directory, "summary.json")) as handle:
            summaries[method] = json.load(handle)
        cells += best_cells(method, summaries[method])
    present = [m for m in methods if m in summaries]
    table = write_tables(cells, present, run_info, args, wall, prefix)
    print(table)

    if not args.no_figures and present:
        curves = {}
        for method in present:
            mc = [c for c in cells if c["method"] == method]
            directory = os.path.join(args.runs_dir, method)
            data = load_curves(directory, summaries[method], {c["point"] for c in mc})
            for c in mc:
                curves[(c["lam"], c["beta"], method)] = (data[c["point"]], c)
        panels = sorted({(c["lam"], c["beta"]) for c in cells})
        plot_curves(os.path.join(RESULTS, f"{prefix}_curves.png"), panels, curves, present)

        shaper = next((m for m in ("hpgd", "exact", "amd", "zero_order", "pbrl") if m in present))
        sc = {c["lam"]: c for c in cells if c["method"] == shaper and c["beta"] == 1.0}
        xs = {lam: final_x(os.path.join(args.runs_dir, shaper), c["point"])
              for lam, c in sc.items()}
        plot_incentive(os.path.join(RESULTS, f"{prefix}_incentive.png"), xs, shaper)
        lam = min(sc)
        plot_visitation(os.path.join(RESULTS, f"{prefix}_visitation.png"), xs[lam], lam, 1.0,
                        shaper)
        # Check that the checkpoint's x is the one the objective was computed for.
        import jax.numpy as jnp

        import bilevel_jax as bj
        from bilevel_jax.envs.four_rooms import four_rooms_problem
        problem, _ = four_rooms_problem(beta=1.0, temperature=lam)
        value = float(bj.leader_objective(problem, jnp.asarray(xs[lam], jnp.float32)))
        print(f"check: F(final x) of {shaper} lam={lam:g} beta=1 seed 0 = {value:.4f} "
              f"(last logged objectives of that run are F of the previous iterate)")
    print(f"wrote {RESULTS}/{prefix}_table.md, .json and figures; wall {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
