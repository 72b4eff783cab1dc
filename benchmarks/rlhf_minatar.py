"""RLHF on MinAtar (issue 14): PBRL against the decoupled pipeline, PPO on the true reward as
the ceiling, at three annotator noise levels.

    python benchmarks/rlhf_minatar.py [--quick] [--json PATH] [--envs breakout,space_invaders]
                                      [--iterations N] [--seeds N] [--noise 0,0.5,2]
                                      [--fit-batch-size B] [--speed-iterations N]
                                      [--speed-only] [--runs-dir DIR] [--reuse] [--out DIR]

Runs `configs/rlhf_minatar/<env>_{true_reward,decoupled,pbrl}.yaml` with the library's runner
(each one compiled program over its noise levels x seeds, vmapped), with `iterations`, `seeds`,
`problem.fit_batch_size` and the noise sweep overridden as given (the table titles say what ran),
measures the uniform-random policy's episodic return on each game, then writes

* `rlhf_minatar.md` and `rlhf_minatar.json` (`--json` elsewhere): per game, method and noise,
  at each environment-step budget (a third, two thirds and all of the shortest run's steps), the
  true episodic return of the policy (raw, and normalized as `(R - R_random) / (R_ceiling -
  R_random)` with `R_ceiling` the true-reward PPO run at the same budget, mean over its seeds)
  and the held-out preference accuracy, mean ± SE over seeds; the environment steps per second
  of every loop and its ratio to the true-reward loop's (the overhead of preference learning,
  target <= 1.5x), measured twice: over the whole runs above (init included, programs of
  different sizes), and at steady state by separate short runs on the first game
  (`--speed-iterations`, default 20; every loop with the same `--seeds` runs, noise 0, timed by
  the runner over its compiled chunks alone; `output.final_fraction=0.1`, so that the configs'
  `track_every: 10` evaluates the held-out accuracy on 4 of the 20 iterations, the share of a
  300-iteration run's 57);
* `rlhf_minatar_curves.png`: true episodic return (with the random policy's) and held-out
  preference accuracy against environment steps, per game, method and noise (SE bands).

Environment steps per iteration are counted from the configs: the iteration's pair rollout
(`problem.num_envs x num_steps`), the follower's training (`learner_options.num_updates x
num_envs x num_steps`), and for PBRL the penalty estimate's rollouts of `pi_y` and `pi*`
(`2 x algorithm.num_envs x num_steps`). A metric "at budget b" is its mean over the iterations
whose cumulative steps lie in `(0.9 b, b]` (at least the last iteration at or below `b`; for
the held-out accuracy, evaluated on the configs' `track_every` schedule, the last evaluation at
or below `b` where the window holds none).

`--quick` (a few minutes, most of it compilation) runs Breakout only, 3 iterations, 2 seeds and
noise 0, and writes `rlhf_minatar_quick.*`. `--speed-only` runs the steady-state speed runs
alone and writes `rlhf_minatar_speed.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CONFIGS = os.path.join(ROOT, "configs", "rlhf_minatar")
ENVS = {"breakout": "Breakout-MinAtar", "space_invaders": "SpaceInvaders-MinAtar"}
METHODS = ("true_reward", "decoupled", "pbrl")
LABELS = {"true_reward": "PPO on the true reward (ceiling)", "decoupled": "decoupled",
          "pbrl": "PBRL (value penalty)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--envs", default=None, help="comma-separated: breakout,space_invaders")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--noise", default=None, help="comma-separated annotator noise levels")
    parser.add_argument("--fit-batch-size", type=int, default=64,
                        help="pairs per reward step (0: the whole buffer, the paper's)")
    parser.add_argument("--speed-iterations", type=int, default=None,
                        help="iterations of the steady-state speed runs (0: none)")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the steady-state speed runs (rlhf_minatar_speed.*)")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "rlhf_minatar"))
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    envs = args.envs or ("breakout" if args.quick else "breakout,space_invaders")
    args.envs = [e.strip() for e in envs.split(",") if e.strip()]
    unknown = [e for e in args.envs if e not in ENVS]
    if unknown:
        parser.error(f"--envs: expected names among {sorted(ENVS)}, got {unknown}")
    args.iterations = args.iterations or (3 if args.quick else 300)
    args.seeds = args.seeds or (2 if args.quick else 3)
    if args.speed_iterations is None:
        args.speed_iterations = 0 if args.quick else 20
    if args.speed_iterations < 0 or args.speed_iterations == 1:
        parser.error(f"--speed-iterations: expected 0 or an int >= 2, got {args.speed_iterations}")
    if args.speed_only and not args.speed_iterations:
        parser.error("--speed-only: needs --speed-iterations >= 2")
    noise = args.noise or ("0" if args.quick else "0,0.5,2")
    try:
        args.noise = [float(v) for v in noise.split(",")]
    except ValueError:
        parser.error(f"--noise: expected comma-separated numbers >= 0, got {noise!r}")
    if any(not math.isfinite(v) or v < 0 for v in args.noise):
        parser.error(f"--noise: expected numbers >= 0, got {noise!r}")
    if args.iterations < 1 or args.seeds < 1 or args.fit_batch_size < 0:
        parser.error("--iterations and --seeds: expected ints >= 1; --fit-batch-size >= 0")
    return args


def _job(args, env: str, method: str, key: str, directory: str, overrides: list[str],
         noise_overrides: list[str]) -> dict:
    """A run of `configs/rlhf_minatar/<env>_<method>.yaml`; the preference loops also get
    `problem.fit_batch_size` and `noise_overrides` (the ceiling has no labels)."""
    if method != "true_reward":
        fit = "null" if args.fit_batch_size == 0 else str(args.fit_batch_size)
        overrides = overrides + [f"problem.fit_batch_size={fit}", *noise_overrides]
    return {"key": key, "env": env, "method": method,
            "config": os.path.join(CONFIGS, f"{env}_{method}.yaml"), "overrides": overrides,
            "directory": os.path.join(args.runs_dir, directory)}


def plan(args) -> list[dict]:
    return [_job(args, env, method, f"{env}_{method}", f"{env}_{method}_{args.iterations}",
                 [f"iterations={args.iterations}", f"seeds={list(range(args.seeds))}",
                  f"chunk_size={min(25, args.iterations)}"],
                 [f"sweep={{problem.noise: {args.noise}}}"])
            for env in args.envs for method in METHODS]


def speed_plan(args) -> list[dict]:
    """The steady-state speed runs: on the first game, each loop with the same runs in its
    program (`--seeds` seeds, noise 0, no sweep), `--speed-iterations` iterations in two chunks,
    timed by the runner over its compiled chunks alone (init, compilation and writing excluded)."""
    if not args.speed_iterations:
        return []
    env, n = args.envs[0], args.speed_iterations
    return [_job(args, env, method, f"speed_{env}_{method}", f"speed_{env}_{method}_{n}",
                 [f"iterations={n}", f"seeds={list(range(args.seeds))}", f"chunk_size={n // 2}",
                  "sweep={}", "output.final_fraction=0.1"], ["problem.noise=0.0"])
            for method in METHODS]


def _add_overhead(rows: list[dict]) -> list[dict]:
    """Each row's `overhead_vs_true_reward`: its game's true-reward rate over its own."""
    base = {r["env"]: r["env_steps_per_s_per_run"] for r in rows if r["method"] == "true_reward"}
    for r in rows:
        r["overhead_vs_true_reward"] = base[r["env"]] / r["env_steps_per_s_per_run"]
    return rows


def steady_speed(jobs, times, configs) -> list[dict]:
    rows = []
    for job in jobs:
        t = times[job["key"]]
        per_it = steps_per_iteration(configs[job["key"]])
        runs = len(configs[job["key"]]["seeds"])
        loop = t.get("loop_seconds", math.nan) / max(t.get("loop_iterations", 0), 1)
        rows.append({"env": job["env"], "method": job["method"], "runs_in_program": runs,
                     "steps_per_iteration": per_it, "loop_seconds_per_iteration": loop,
                     "env_steps_per_s_per_run": per_it * runs / loop if loop > 0 else math.nan})
    return _add_overhead(rows)


def steps_per_iteration(config: dict) -> int:
    """Environment steps of one iteration of a run of `config` (see the module doc)."""
    problem, algorithm = config["problem"], config["algorithm"]
    learner = algorithm["learner_options"] or {}
    steps = problem["num_envs"] * problem["num_steps"]
    steps += learner["num_updates"] * learner["num_envs"] * learner["num_steps"]
    if algorithm["name"] == "pbrl":
        steps += 2 * algorithm["num_envs"] * algorithm["num_steps"]
    return int(steps)


def random_return(env_key: str, num_envs: int = 64, num_steps: int = 2_000) -> dict:
    """Mean undiscounted episodic return of the uniform policy (episodes that start and end
    inside a `num_envs x num_steps` rollout)."""
    import jax
    import jax.numpy as jnp

    from bilevel_jax.preferences_sim import episodic_returns
    from bilevel_jax.runner.config import load_config
    from bilevel_jax.runner.problems.rlhf_minatar import build_rlhf_minatar
    from bilevel_jax.sim.rollout import rollout

    config = load_config(os.path.join(CONFIGS, f"{env_key}_true_reward.yaml"))
    problem, x0 = build_rlhf_minatar(config["problem"])
    num_actions = problem.sim.env.action_space(problem.sim.env_params(None, None)).n
    uniform = lambda obs: jnp.zeros((num_actions,), jnp.float32)  # noqa: E731
    traj = jax.jit(lambda k: rollout(k, problem.sim, x0, None, uniform, num_envs, num_steps))(
        jax.random.key(12345))
    mean, count = episodic_returns(traj.reward, traj.time, traj.done)
    return {"return": float(mean), "episodes": int(count)}


def read_runs(directory: str) -> dict:
    """`{noise: {metric: [seeds, iterations]}}` of a run directory (noise None: no sweep)."""
    from bilevel_jax.runner.results import read_metrics_csv

    with open(os.path.join(directory, "summary.json")) as handle:
        summary = json.load(handle)
    curves = read_metrics_csv(os.path.join(directory, "metrics.csv"), summary)
    out = {}
    for point in summary["points"]:
        noise = point["values"].get("problem.noise")
        out[None if noise is None else float(noise)] = curves[point["point"]]
    return out


def at_budget(per_seed: np.ndarray, cumulative: np.ndarray, budget: float) -> np.ndarray:
    """Per seed, the mean of the metric over the iterations with steps in `(0.9 b, b]`; where
    none of them has a finite value (the held-out accuracy off the `track_every` schedule), the
    last finite value at or below `b`."""
    window = (cumulative <= budget) & (cumulative > 0.9 * budget)
    if not window.any():
        below = cumulative[cumulative <= budget]
        window = cumulative == (below.max() if below.size else cumulative.min())

    def one(series):
        if np.isfinite(series[window]).any():
            return np.nanmean(series[window])
        earlier = np.flatnonzero(np.isfinite(series) & (cumulative <= budget))
        return series[earlier[-1]] if earlier.size else math.nan

    with np.errstate(all="ignore"):
        return np.array([one(series) for series in per_seed])


def load_curves(jobs, configs) -> dict:
    """`{job key: (curves of read_runs, cumulative env steps [iterations])}`, read once."""
    out = {}
    for job in jobs:
        config = configs[job["key"]]
        steps = steps_per_iteration(config) * np.arange(1, config["iterations"] + 1, dtype=float)
        out[job["key"]] = (read_runs(job["directory"]), steps)
    return out


def summarize(jobs, times, configs, randoms, curves) -> dict:
    budgets_by_env, rows, speed = {}, [], []
    for env in sorted({j["env"] for j in jobs}):
        env_jobs = [j for j in jobs if j["env"] == env]
        total = {j["method"]: steps_per_iteration(configs[j["key"]]) * configs[j["key"]]["iterations"]
                 for j in env_jobs}
        shortest = min(total.values())
        budgets = [shortest / 3, 2 * shortest / 3, shortest]
        budgets_by_env[env] = budgets
        ceiling = {}
        data = {}
        for job in env_jobs:
            per_it = steps_per_iteration(configs[job["key"]])
            iterations = configs[job["key"]]["iterations"]
            data[job["method"]] = curves[job["key"]]
            t = times[job["key"]]
            runs = len(configs[job["key"]]["seeds"]) * max(1, len(data[job["method"]][0]))
            seconds = t["wall_seconds"] - t["compile_seconds"]
            speed.append({"env": env, "method": job["method"], "runs_in_program": runs,
                          "steps_per_iteration": per_it,
                          "wall_seconds": t["wall_seconds"], "compile_seconds": t["compile_seconds"],
                          "env_steps_per_s_per_run": per_it * iterations / seconds
                          if seconds > 0 else math.nan})
        curves_true, cumulative_true = data["true_reward"]
        true_curve = next(iter(curves_true.values()))["true_return"]
        for b in budgets:
            ceiling[b] = float(np.nanmean(at_budget(true_curve, cumulative_true, b)))
        r_rand = randoms[env]["return"]
        for method, (points, cumulative) in data.items():
            for noise, metrics in sorted(points.items(), key=lambda kv: (kv[0] is not None, kv[0])):
                for b in budgets:
                    raw = at_budget(metrics["true_return"], cumulative, b)
                    gap = ceiling[b] - r_rand
                    normalized = (raw - r_rand) / gap if abs(gap) > 1e-9 else raw * math.nan
                    accuracy = at_budget(metrics["preference_accuracy"], cumulative, b)
                    rows.append({"env": env, "method": method, "noise": noise, "budget": b,
                                 "return": common.mean_se(raw),
                                 "normalized_return": common.mean_se(normalized),
                                 "preference_accuracy": common.mean_se(accuracy),
                                 "ceiling_return": ceiling[b], "random_return": r_rand})
    return {"budgets": budgets_by_env, "rows": rows, "speed": _add_overhead(speed)}


def fmt(stats: dict, digits: int = 2) -> str:
    if not math.isfinite(stats["mean"]):
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['se']:.{digits}f}"


def speed_markdown(result: dict, args) -> list[str]:
    if not result.get("steady_speed"):
        return []
    n = args.speed_iterations
    lines = [f"## Steady-state speed of the loop ({ENVS[result['steady_speed'][0]['env']]}; "
             f"every program {args.seeds} runs, noise 0, {n} iterations timed by the runner "
             f"over its compiled chunks: init, compilation and writing excluded; held-out "
             f"accuracy on the configs' track_every schedule)", "",
             "| method | env steps/it | s/it (all runs) | env steps/s per run | "
             "overhead vs true reward (target <= 1.5x) |", "|---|---|---|---|---|"]
    for r in result["steady_speed"]:
        lines.append(f"| {LABELS[r['method']]} | {r['steps_per_iteration']:,} | "
                     f"{r['loop_seconds_per_iteration']:.2f} | "
                     f"{r['env_steps_per_s_per_run']:,.0f} | "
                     f"{r['overhead_vs_true_reward']:.2f}x |")
    return lines + [""]


def markdown(result: dict, args) -> str:
    protocol = (f"{args.iterations} iterations x {args.seeds} seeds, noise {args.noise}, "
                f"reward steps on {args.fit_batch_size or 'all'} pairs")
    short = "" if args.iterations >= 300 else (
        f" (SHORT RUNS: {args.iterations} iterations of the configs' 300)")
    lines = [f"# RLHF on MinAtar: PBRL against the decoupled pipeline{short}", "",
             f"Generated by `python benchmarks/rlhf_minatar.py {' '.join(sys.argv[1:])}` "
             f"({protocol}). Return = the true game score of the episodes that start and end "
             f"inside the iteration's pair rollout; normalized = `(R - R_random) / (R_ceiling - "
             f"R_random)`, `R_ceiling` the true-reward PPO run at the same budget (mean over "
             f"seeds); accuracy on 256 held-out pairs (the ceiling never trains its reward "
             f"model: its accuracy is the initial model's). Mean ± SE over seeds.", ""]
    for env in sorted(result["budgets"]):
        r_rand = next(r["random_return"] for r in result["rows"] if r["env"] == env)
        lines += [f"## {ENVS[env]} (random policy: {r_rand:.3f})", "",
                  "| method | noise | env steps | return | normalized | accuracy |",
                  "|---|---|---|---|---|---|"]
        for row in (r for r in result["rows"] if r["env"] == env):
            noise = "-" if row["noise"] is None else f"{row['noise']:g}"
            lines.append(f"| {LABELS[row['method']]} | {noise} | {row['budget']:,.0f} | "
                         f"{fmt(row['return'])} | {fmt(row['normalized_return'])} | "
                         f"{fmt(row['preference_accuracy'])} |")
        lines.append("")
    lines += speed_markdown(result, args)
    lines += ["## Speed of the whole runs above (init included: warm-up epochs, pair rollouts; "
              "programs of different sizes, on a shared machine)", "",
              "| game | method | runs in program | env steps/it | env steps/s per run | "
              "overhead vs true reward (target <= 1.5x) | wall s (compile s) |",
              "|---|---|---|---|---|---|---|"]
    for s in result["speed"]:
        lines.append(f"| {ENVS[s['env']]} | {LABELS[s['method']]} | {s['runs_in_program']} | "
                     f"{s['steps_per_iteration']:,} | {s['env_steps_per_s_per_run']:,.0f} | "
                     f"{s['overhead_vs_true_reward']:.2f}x | {s['wall_seconds']:.0f} "
                     f"({s['compile_seconds']:.0f}) |")
    return "\n".join(lines) + "\n"


def plot(path: str, jobs, randoms, result, loaded) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted(result["budgets"])
    fig, axes = plt.subplots(2, len(envs), figsize=(6 * len(envs), 7), squeeze=False)
    for col, env in enumerate(envs):
        curves = {j["method"]: loaded[j["key"]] for j in jobs if j["env"] == env}
        r_rand = randoms[env]["return"]
        # Raw returns (the normalized ones divide by the ceiling's early, near-random gap).
        axes[0, col].axhline(r_rand, color="gray", linestyle="--", linewidth=1,
                             label="uniform random policy")
        for method, (points, steps) in curves.items():
            for noise, metrics in points.items():
                label = LABELS[method] + ("" if noise is None else f", noise {noise:g}")
                for row, (name, values) in enumerate((("true episodic return", metrics["true_return"]),
                                                      ("held-out preference accuracy",
                                                       metrics["preference_accuracy"]))):
                    with np.errstate(all="ignore"):
                        mean = np.nanmean(values, 0)
                        se = (np.nanstd(values, 0, ddof=1) / np.sqrt(values.shape[0])
                              if values.shape[0] > 1 else 0 * mean)
                    # the accuracy is NaN off the configs' track_every schedule: join the
                    # evaluated iterations
                    shown = np.isfinite(mean)
                    ax = axes[row, col]
                    ax.plot(steps[shown], mean[shown], label=label)
                    ax.fill_between(steps[shown], (mean - se)[shown], (mean + se)[shown],
                                    alpha=0.2)
                    ax.set_ylabel(name)
        axes[0, col].set_title(ENVS[env])
        axes[1, col].set_xlabel("environment steps")
        axes[0, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_jobs(jobs, args, times: dict, configs: dict) -> None:
    """Runs (or with `--reuse` reuses) each job, filling `configs` and `times` by job key."""
    from bilevel_jax.runner import load_config

    for job in jobs:
        configs[job["key"]] = load_config(job["config"], job["overrides"])
        times[job["key"]] = common.run_job(job, args.reuse)


def speed_only(args, times, configs) -> int:
    jobs = speed_plan(args)
    run_jobs(jobs, args, times, configs)
    result = {"steady_speed": steady_speed(jobs, times, configs),
              "environment": common.environment(), "argv": sys.argv[1:],
              "protocol": {"speed_iterations": args.speed_iterations, "seeds": args.seeds,
                           "fit_batch_size": args.fit_batch_size or None}}
    text = "\n".join([f"# RLHF on MinAtar: steady-state speed (`python benchmarks/"
                      f"rlhf_minatar.py {' '.join(sys.argv[1:])}`)", ""]
                     + speed_markdown(result, args)) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rlhf_minatar_speed.md"), "w") as handle:
        handle.write(text)
    common.write_json(args.json or os.path.join(args.out, "rlhf_minatar_speed.json"), result)
    print(text)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    times, configs = {}, {}
    if args.speed_only:
        return speed_only(args, times, configs)
    jobs = plan(args)
    run_jobs(jobs, args, times, configs)
    randoms = {env: random_return(env) for env in args.envs}
    curves = load_curves(jobs, configs)
    result = summarize(jobs, times, configs, randoms, curves)
    speed_jobs = speed_plan(args)
    run_jobs(speed_jobs, args, times, configs)
    result["steady_speed"] = steady_speed(speed_jobs, times, configs)
    result.update({"environment": common.environment(), "quick": args.quick,
                   "protocol": {"iterations": args.iterations, "seeds": args.seeds,
                                "noise": args.noise, "fit_batch_size": args.fit_batch_size or None,
                                "envs": args.envs},
                   "random_policy": randoms})
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    text = markdown(result, args)
    with open(os.path.join(args.out, f"rlhf_minatar{suffix}.md"), "w") as handle:
        handle.write(text)
    plot(os.path.join(args.out, f"rlhf_minatar{suffix}_curves.png"), jobs, randoms, result,
         curves)
    common.write_json(args.json or os.path.join(args.out, f"rlhf_minatar{suffix}.json"), result)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
