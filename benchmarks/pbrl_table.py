"""PBRL's applications (SPEC 7.3-7.5): penalty methods against hypergradient methods.

    python benchmarks/pbrl_table.py [--quick] [--json PATH] [--only stackelberg,rlhf,...]
                                    [--runs-dir DIR] [--reuse] [--iterations N] [--seeds N]

Runs every config of `configs/stackelberg/`, `configs/rlhf/` and `configs/incentive_design/` with
the library's runner (each config is one or a few compiled, vmapped programs over its grid points
and seeds), then writes

* `benchmarks/results/pbrl_table.md`: per benchmark, one row per method and setting with the
  final metrics (mean over the last 10% of iterations of each run; mean ± standard error over
  seeds) and the wall time;
* `benchmarks/results/pbrl_table.json` (`--json` elsewhere): the same numbers;
* `benchmarks/results/pbrl_<benchmark>.png`: learning curves of the benchmark's metrics, mean over
  seeds with standard-error bands.

A row's method is `algorithm.name` made specific: `ascent` runs are named by their estimator
(`exact`, `hpgd`, `naive`), `pbrl` runs by their penalty (`pbrl_value`, `pbrl_bellman`; the
Nikaido-Isoda penalty of the zero-sum lower level is `pbrl_ni`), `decoupled` stays. The other
swept keys of the config (annotator noise, rho) are the row's setting.

`--quick` (about a minute or two, mostly compilation) runs a fifth of the iterations with 2 seeds
and writes `pbrl_table_quick.*` instead, so the committed full results are never overwritten by
a quick run. `--reuse` reads finished run directories instead of running them again.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# benchmark -> (title, the metrics shown, in order; the first is the leader's objective)
BENCHMARKS = {
    "stackelberg": ("Stackelberg Markov game (SPEC 7.3)",
                    ("objective", "penalty", "best_response_gap")),
    "rlhf": ("RLHF with policy-dependent preference data (SPEC 7.4)",
             ("objective", "preference_accuracy", "labels", "penalty")),
    # (the NI gap of PBRL's players is its penalty: one column shows both)
    "incentive_design": ("Incentive design with a zero-sum lower level (SPEC 7.5)",
                         ("objective", "equilibrium_gap", "rho")),
}
METRIC_NAMES = {
    "objective": "F(x)",
    "penalty": "penalty",
    "best_response_gap": "follower gap V*-V^y",
    "preference_accuracy": "held-out pref. acc.",
    "labels": "labels used",
    "equilibrium_gap": "NI gap",
    "rho": "rho",
}
OBJECTIVE_NAMES = {
    "stackelberg": "leader value F(x)",
    "rlhf": "true return (fraction of optimal)",
    "incentive_design": "designer objective F(x)",
}
METHOD_KEYS = ("algorithm.name", "estimator.name", "algorithm.penalty")
METHOD_ORDER = ("exact", "hpgd", "naive", "amd", "zero_order", "decoupled", "pbrl_value",
                "pbrl_bellman", "pbrl_ni")
GAP_METRICS = ("penalty", "best_response_gap", "equilibrium_gap")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a fifth of the iterations, 2 seeds (about a minute or two)")
    parser.add_argument("--json", metavar="PATH",
                        help="JSON output (default: benchmarks/results/pbrl_table[_quick].json)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="comma-separated benchmarks to run (default: all three)")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "pbrl_table"),
                        help="where the run directories go")
    parser.add_argument("--reuse", action="store_true",
                        help="read finished run directories instead of running them")
    parser.add_argument("--iterations", type=int, help="override every config's iterations")
    parser.add_argument("--seeds", type=int, help="override every config's number of seeds")
    parser.add_argument("--out", default=RESULTS, help="directory of the table and figures")
    args = parser.parse_args(argv)
    unknown = [b for b in args.only.split(",") if b not in BENCHMARKS]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; expected some of {list(BENCHMARKS)}")
    for name in ("iterations", "seeds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: expected an int >= 1, got {value}")
    return args


# --------------------------------------------------------------------------------------------
# Running and reading
# --------------------------------------------------------------------------------------------

def config_paths(benchmark: str) -> list[str]:
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", benchmark, "*.yaml")))
    if not paths:
        raise SystemExit(f"no configs in configs/{benchmark}/")
    return paths


def overrides_for(path: str, args) -> list[str]:
    from bilevel_jax.runner.config import load_config

    base = load_config(path)
    iterations, seeds = base["iterations"], len(base["seeds"])
    if args.quick:
        iterations, seeds = max(10, iterations // 5), 2
    iterations = args.iterations or iterations
    seeds = args.seeds or seeds
    chunk = min(base["chunk_size"], iterations)
    return [f"iterations={iterations}", f"seeds={seeds}", f"chunk_size={chunk}"]


def run_config(path: str, directory: str, overrides: list[str], reuse: bool) -> float:
    """Runs one config into `directory` (or reuses a finished run); returns its wall time."""
    from bilevel_jax.runner import load_config, run_experiment

    config = load_config(path, overrides + [f"output.dir={directory}"])
    summary_path = os.path.join(directory, "summary.json")
    wall_path = os.path.join(directory, "wall_seconds.json")
    if reuse and os.path.exists(summary_path):
        with open(summary_path) as handle:
            summary = json.load(handle)
        if (summary.get("iterations") == config["iterations"]
                and len(summary.get("seeds", [])) == len(config["seeds"])):
            print(f"reusing {directory}")
            if not os.path.exists(wall_path):
                return math.nan
            with open(wall_path) as handle:
                return float(json.load(handle)["wall_seconds"])
    start = time.perf_counter()
    run_experiment(config, progress=False)
    seconds = time.perf_counter() - start
    common.write_json(wall_path, {"wall_seconds": seconds})
    return seconds


def method_label(point: dict) -> str:
    algorithm = point["algorithm"]["name"]
    if algorithm == "ascent":
        return point["estimator"]["name"]
    if algorithm == "pbrl":
        if point["problem"]["name"] == "incentive_design":
            return "pbrl_ni"
        return f"pbrl_{point['algorithm']['penalty']}"
    return algorithm


def read_rows(benchmark: str, path: str, directory: str, seconds: float) -> list[dict]:
    """One row per grid point: method, setting, final metrics and the curves."""
    import yaml

    from bilevel_jax.runner.config import point_config
    from bilevel_jax.runner.fields import show_value
    from bilevel_jax.runner.results import read_metrics_csv

    with open(os.path.join(directory, "summary.json")) as handle:
        summary = json.load(handle)
    with open(os.path.join(directory, "config.yaml")) as handle:
        config = yaml.safe_load(handle)
    curves = read_metrics_csv(os.path.join(directory, "metrics.csv"), summary)
    metrics = BENCHMARKS[benchmark][1]
    rows = []
    for point in summary["points"]:
        values = point["values"]
        resolved = point_config(config, values)
        setting = {k: show_value(v) for k, v in values.items() if k not in METHOD_KEYS}
        final = {m: point["final"][m] for m in metrics if m in point["final"]}
        if "labels" in final:      # a count: its value at the end, not a window mean
            last = curves[point["point"]]["labels"][:, -1]
            final["labels"] = {"mean": float(np.mean(last)), "se": 0.0 if np.ptp(last) == 0
                               else float(np.std(last, ddof=1) / np.sqrt(last.size))}
        problem = {k: show_value(v) for k, v in resolved["problem"].items()}
        rows.append({
            "benchmark": benchmark, "config": os.path.relpath(path, ROOT), "problem": problem,
            "method": method_label(resolved), "setting": setting,
            "iterations": summary["iterations"], "seeds": len(summary["seeds"]),
            "initial_objective": point["initial"].get("objective"),
            "final": {m: {"mean": s["mean"], "se": s["se"]} for m, s in final.items()},
            "config_seconds": seconds,
            "curves": {m: curves[point["point"]][m] for m in metrics if m in curves[point["point"]]},
        })
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def fmt(stats: dict | None) -> str:
    if not stats or not _finite(stats.get("mean")):
        return "-"
    mean, se = stats["mean"], stats.get("se")
    if not _finite(se):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {se:.2g}"


def setting_text(row: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row["setting"].items()) or "-"


def label_instances(rows: list[dict]) -> None:
    """`row["instance"]`: the problem fields that differ between the benchmark's configs (but
    not sizes left null in some config, which that config's other fields determine)."""
    keys = sorted({k for r in rows for k in r["problem"]})
    varying = [k for k in keys if len({r["problem"].get(k) for r in rows}) > 1
               and not any(f"problem.{k}" in r["setting"] for r in rows)
               and "null" not in {r["problem"].get(k) for r in rows}]
    for row in rows:
        row["instance"] = ", ".join(f"{k}={row['problem'].get(k)}" for k in varying) or "-"


def sort_rows(rows: list[dict]) -> list[dict]:
    def key(row):
        method = row["method"]
        rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return (row["instance"], rank, method)
    return sorted(rows, key=key)   # stable: settings keep the sweep's order


def markdown(rows_by_benchmark: dict[str, list[dict]], args, wall: float) -> str:
    lines = ["# PBRL applications: penalty methods vs hypergradient methods", "",
             f"Generated by `python benchmarks/pbrl_table.py{' --quick' if args.quick else ''}`"
             f" in {wall:.0f} s on {common.environment()['cpu_count']} CPU cores "
             f"({common.environment()['backend']}). Final = mean over the last 10% of iterations "
             "(labels: the count at the end) "
             "of each run; mean ± standard error over seeds.", ""]
    for benchmark, rows in rows_by_benchmark.items():
        title, metrics = BENCHMARKS[benchmark]
        shown = [m for m in metrics if any(m in r["final"] for r in rows)]
        lines += [f"## {title}", "",
                  f"`objective` is the {OBJECTIVE_NAMES[benchmark]}. Configs: "
                  + ", ".join(sorted({f"`{r['config']}`" for r in rows})) + ".", ""]
        header = ["instance", "method", "setting", "F(x0)"] + [METRIC_NAMES[m] for m in shown] + [
            "iterations x seeds"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in rows:
            initial = row["initial_objective"]
            cells = [row["instance"], row["method"], setting_text(row),
                     f"{initial:.4g}" if _finite(initial) else "-"]
            cells += [fmt(row["final"].get(m)) for m in shown]
            cells.append(f"{row['iterations']} x {row['seeds']}")
            lines.append("| " + " | ".join(cells) + " |")
        walls = {r["config"]: r["config_seconds"] for r in rows}
        lines += ["", "Wall time (compilation included): " + ", ".join(
            f"`{c}` {s:.0f} s" if _finite(s) else f"`{c}` (reused)" for c, s in walls.items()), ""]
    return "\n".join(lines)


def plot_benchmark(path: str, benchmark: str, rows: list[dict]) -> None:
    """One row of panels per instance, one panel per metric; curves: mean ± SE over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bilevel_jax.runner.io import atomic_savefig
    from bilevel_jax.runner.plots import mean_and_se

    title, metrics = BENCHMARKS[benchmark]
    shown = [m for m in metrics if m not in ("rho", "labels") and any(
        m in r["curves"] and np.isfinite(r["curves"][m]).any() for r in rows)]
    instances = list(dict.fromkeys(r["instance"] for r in rows))
    figure = Figure(figsize=(5.0 * len(shown), 3.8 * len(instances)), layout="constrained")
    FigureCanvasAgg(figure)
    for line, instance in enumerate(instances):
        chosen = [r for r in rows if r["instance"] == instance]
        for column, metric in enumerate(shown):
            axes = figure.add_subplot(len(instances), len(shown), line * len(shown) + column + 1)
            for number, row in enumerate(chosen):
                values = row["curves"].get(metric)
                if values is None or not np.isfinite(values).any():
                    continue
                if metric in GAP_METRICS:
                    values = np.maximum(values, 1e-12)   # exact zeros on the log axis
                mean, se = mean_and_se(values)
                steps = np.arange(mean.shape[0])
                color = f"C{number % 10}"
                label = row["method"] + ("" if not row["setting"] else f" ({setting_text(row)})")
                axes.plot(steps, mean, color=color, lw=1.4, label=label)
                if np.isfinite(se).any():
                    low = np.maximum(mean - se, 1e-12) if metric in GAP_METRICS else mean - se
                    axes.fill_between(steps, low, mean + se, color=color, alpha=0.2, lw=0)
            if metric in GAP_METRICS:
                axes.set_yscale("log")
            axes.set_xlabel("iteration")
            axes.set_ylabel(OBJECTIVE_NAMES[benchmark] if metric == "objective"
                            else METRIC_NAMES.get(metric, metric))
            if instance != "-":
                axes.set_title(instance, fontsize="small")
            axes.grid(alpha=0.3)
            if column == 0:
                axes.legend(fontsize="x-small")
    figure.suptitle(f"{title}: mean ± SE over {rows[0]['seeds']} seeds")
    atomic_savefig(figure, path)
    print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    suffix = "_quick" if args.quick else ""
    rows_by_benchmark: dict[str, list[dict]] = {}
    for benchmark in args.only.split(","):
        rows = []
        for path in config_paths(benchmark):
            stem = os.path.splitext(os.path.basename(path))[0]
            directory = os.path.join(args.runs_dir + suffix, benchmark, stem)
            print(f"\n== {benchmark}: {os.path.relpath(path, ROOT)} -> {directory}", flush=True)
            seconds = run_config(path, directory, overrides_for(path, args), args.reuse)
            rows += read_rows(benchmark, path, directory, seconds)
        label_instances(rows)
        rows_by_benchmark[benchmark] = sort_rows(rows)
    wall = time.perf_counter() - start
    if args.reuse:      # the recorded wall times of the runs the table was read from
        wall = sum(r for r in {row["config"]: row["config_seconds"]
                               for rows in rows_by_benchmark.values() for row in rows}.values()
                   if _finite(r))

    report = markdown(rows_by_benchmark, args, wall)
    print("\n" + report)
    os.makedirs(args.out, exist_ok=True)
    md_path = os.path.join(args.out, f"pbrl_table{suffix}.md")
    with open(md_path + ".tmp", "w") as handle:
        handle.write(report + "\n")
    os.replace(md_path + ".tmp", md_path)
    print(f"wrote {md_path}")
    for benchmark, rows in rows_by_benchmark.items():
        plot_benchmark(os.path.join(args.out, f"pbrl_{benchmark}{suffix}.png"), benchmark, rows)
    payload = {"environment": common.environment(), "quick": args.quick, "wall_seconds": wall,
               "benchmarks": {b: [{k: v for k, v in r.items() if k != "curves"} for r in rows]
                              for b, rows in rows_by_benchmark.items()}}
    common.write_json(args.json or os.path.join(args.out, f"pbrl_table{suffix}.json"), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
