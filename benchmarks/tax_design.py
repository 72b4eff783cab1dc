"""CB-RL's tax design (SPEC 7.2): HPGD against zero-order, PBRL and exact ascent on the twin.

    python benchmarks/tax_design.py [--quick] [--json PATH] [--runs-dir DIR] [--reuse]
                                    [--iterations N] [--method-iterations m=N,...]
                                    [--seeds N] [--methods hpgd,...] [--ablation K,K,...]
                                    [--ablation-method hpgd|hpgd_branching] [--out DIR]

Runs `configs/tax_design/{hpgd,hpgd_branching,zero_order,pbrl,exact}.yaml` with the library's
runner (each config one compiled program over its 3 temperatures x seeds; `hpgd` is the
single-batch form, `hpgd_branching` the branching form), the warm-start ablation (HPGD at
`lam = 0.1` with `K = estimator.hpgd.learner_options.num_updates` follower env steps x 10
environments per outer step, for each `K` of `--ablation`, in the form `--ablation-method`),
then writes

* `tax_design.md` and `tax_design.json` (`--json` elsewhere): per method and `lam`, the welfare
  `F` (the exact welfare of the 41-bin tabular twin at the leader's iterate, for every method, so
  the rows are comparable; mean over the last 10% of iterations of each run, mean ± SE over
  seeds), its best tracked value, the final income tax and VAT rates, and the wall time per outer
  iteration; the ablation's rows;
* `tax_design_welfare.png` (F vs outer iteration, SE bands), `tax_design_rates.png` (the income
  tax and the VAT per good vs iteration) and `tax_design_policy.png` (the household's expected
  hours and consumption per good against its assets, under the initial and the learned taxes,
  for each preference context: the twin's soft-optimal household at `lam = 0.1`).

The model-free runs' `F` is tracked every `track_every` (25) iterations; exact ascent's at every
iteration. The iteration counts and seeds that ran are in every table's title: the protocol of
SPEC 7.2 is 1,000 iterations and 10 seeds (`--iterations 1000 --seeds 10`), and the reference
retrains the household from scratch for 300,000 steps per outer iteration, which no config here
does (the runs warm-start it; see the ablation).

`--quick` (a few minutes, nearly all of it the five programs' compilation) runs 5 iterations, 2
seeds and only `lam = 0.1`, and writes `tax_design_quick.*`, so the committed results are never
overwritten by it. `--reuse` reads finished run directories (`summary.json` with the same
iterations and seeds) instead of running them again; a run made by the CLI can be reused when it
is in the directory this script would use (`<runs-dir>/<method>_<iterations>`) with its
`wall_seconds.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import textwrap
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CONFIGS = os.path.join(ROOT, "configs", "tax_design")
METHODS = ("hpgd", "hpgd_branching", "zero_order", "pbrl", "exact")
LABELS = {"hpgd": "HPGD single batch (soft-DQN household)",
          "hpgd_branching": "HPGD branching (soft-DQN household)",
          "zero_order": "zero-order (soft-DQN household)",
          "pbrl": "PBRL value penalty (policy network)", "exact": "exact ascent (41-bin twin)"}
ABLATION_METHODS = ("hpgd", "hpgd_branching")
RATES = ("income_tax", "vat_1", "vat_2", "vat_3")
RATE_NAMES = {"income_tax": "income tax", "vat_1": "VAT good 1", "vat_2": "VAT good 2",
              "vat_3": "VAT good 3"}
ABLATION_LAM = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="5 iterations, 2 seeds, lam 0.1 only (a few minutes)")
    parser.add_argument("--json", metavar="PATH",
                        help="JSON output (default: <out>/tax_design[_quick].json)")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "tax_design"),
                        help="where the run directories go")
    parser.add_argument("--reuse", action="store_true",
                        help="read finished run directories instead of running them")
    parser.add_argument("--iterations", type=int,
                        help="outer iterations of the model-free methods (default: the configs')")
    parser.add_argument("--exact-iterations", type=int,
                        help="outer iterations of exact ascent (default: the config's 1,000)")
    parser.add_argument("--method-iterations", default="",
                        help="per-method outer iterations overriding --iterations, e.g. "
                             "'hpgd_branching=1000,zero_order=300'")
    parser.add_argument("--seeds", type=int, help="seeds of the model-free methods")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, some of {','.join(METHODS)}")
    parser.add_argument("--ablation", default="50,200,800",
                        help="follower updates K per outer step for the ablation ('' for none)")
    parser.add_argument("--ablation-iterations", type=int, default=100,
                        help="outer iterations of each ablation run")
    parser.add_argument("--ablation-method", default="hpgd", choices=ABLATION_METHODS,
                        help="the HPGD form of the ablation")
    parser.add_argument("--out", default=RESULTS, help="directory of the tables and figures")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown method(s) {unknown}; expected some of {list(METHODS)}")
    per_method = {}
    for item in (i for i in args.method_iterations.split(",") if i):
        method, _, value = item.partition("=")
        if method not in METHODS or not value.isdigit() or int(value) < 1:
            parser.error(f"--method-iterations: expected 'method=N' with a method of "
                         f"{list(METHODS)} and N >= 1, got {item!r}")
        per_method[method] = int(value)
    args.method_iterations = per_method
    try:
        args.ablation = [int(k) for k in args.ablation.split(",") if k]
    except ValueError:
        parser.error(f"--ablation: expected comma-separated ints, got {args.ablation!r}")
    for name in ("iterations", "exact_iterations", "seeds", "ablation_iterations"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {value}")
    if any(k < 1 for k in args.ablation):
        parser.error(f"--ablation: expected ints >= 1, got {args.ablation}")
    return args


# --------------------------------------------------------------------------------------------
# Running and reading
# --------------------------------------------------------------------------------------------

def plan(args) -> list[dict]:
    """The runs: `{key, method, config, directory, overrides}` for each method and ablation K."""
    from bilevel_jax.runner.config import load_config

    jobs = []
    for method in args.methods:
        path = os.path.join(CONFIGS, f"{method}.yaml")
        base = load_config(path)
        if method == "exact":
            iterations, seeds = args.exact_iterations or base["iterations"], len(base["seeds"])
        else:
            iterations = (args.method_iterations.get(method) or args.iterations
                          or base["iterations"])
            seeds = args.seeds or len(base["seeds"])
        overrides = []
        if args.quick:
            iterations, seeds = 5, (1 if method == "exact" else 2)
            overrides.append(f"sweep={{problem.temperature: [{ABLATION_LAM}]}}")
        overrides += [f"iterations={iterations}", f"seeds={seeds}",
                      f"chunk_size={min(base['chunk_size'], iterations)}"]
        suffix = "_quick" if args.quick else ""
        jobs.append({"key": method, "method": method, "config": path, "overrides": overrides,
                     "directory": os.path.join(args.runs_dir, f"{method}_{iterations}{suffix}")})
    if not args.quick:
        method = args.ablation_method
        prefix = "ablation" if method == "hpgd" else f"ablation_{method}"
        for k in args.ablation:
            iterations = args.ablation_iterations
            jobs.append({
                "key": f"ablation_K{k}", "method": method, "updates": k,
                "config": os.path.join(CONFIGS, f"{method}.yaml"),
                "overrides": ["sweep={}", f"problem.temperature={ABLATION_LAM}",
                              f"estimator.hpgd.learner_options.num_updates={k}",
                              f"iterations={iterations}", f"seeds={args.seeds or 2}",
                              f"chunk_size={min(50, iterations)}"],
                "directory": os.path.join(args.runs_dir, f"{prefix}_K{k}_{iterations}")})
    return jobs


def read_metrics(directory: str) -> dict:
    """`metrics.csv` -> `{lam: {metric: [seeds, iterations] array}}` (NaN where not tracked)."""
    rows = {}
    with open(os.path.join(directory, "metrics.csv")) as handle:
        for row in csv.DictReader(handle):
            lam = float(row.get("problem.temperature") or ABLATION_LAM)
            rows.setdefault(lam, {}).setdefault(int(row["seed"]), []).append(row)
    out = {}
    for lam, seeds in rows.items():
        metrics = {}
        for name in ("objective", *RATES):
            metrics[name] = np.array([[float(r[name]) if r[name] not in ("", None) else math.nan
                                       for r in sorted(seed_rows, key=lambda r: int(r["iteration"]))]
                                      for _, seed_rows in sorted(seeds.items())])
        out[lam] = metrics
    return out


def _final(per_seed: np.ndarray) -> np.ndarray:
    """Per seed, the mean over the last 10% of the iterations where the metric was tracked."""
    finals = []
    for series in per_seed:
        tracked = series[np.isfinite(series)]
        window = max(1, int(round(0.1 * tracked.size)))
        finals.append(tracked[-window:].mean() if tracked.size else math.nan)
    return np.array(finals)


def summarize(job: dict, times: dict) -> list[dict]:
    with open(os.path.join(job["directory"], "summary.json")) as handle:
        summary = json.load(handle)
    iterations, seeds = summary["iterations"], summary["seeds"]
    num_runs = sum(len(point["runs"]) for point in summary["points"])
    per_iteration = (times["wall_seconds"] - times["compile_seconds"]) / iterations
    rows = []
    for lam, metrics in sorted(read_metrics(job["directory"]).items()):
        objective = metrics["objective"]
        row = {"key": job["key"], "method": job["method"], "lam": lam,
               "updates": job.get("updates"), "iterations": iterations, "seeds": len(seeds),
               "F0": float(objective[0, 0]), "F": common.mean_se(_final(objective)),
               "best_F": common.mean_se(np.nanmax(objective, axis=1)),
               "rates": {name: common.mean_se(metrics[name][:, -1]) for name in RATES},
               "seconds_per_iteration_all_runs": per_iteration,
               "seconds_per_run_iteration": per_iteration / num_runs,
               "wall_seconds": times["wall_seconds"], "compile_seconds": times["compile_seconds"],
               "runs_in_program": num_runs}
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------------------------

def fmt(stats: dict, digits: int = 2) -> str:
    if not math.isfinite(stats["mean"]):
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['se']:.{digits}f}"


def markdown(rows: list[dict], ablation: list[dict], quick: bool) -> str:
    main = [r for r in rows if not r["key"].startswith("ablation")]
    lines = ["# Tax design (SPEC 7.2)" + (" — QUICK run, not results" if quick else ""), ""]
    runs = sorted({(r["method"], r["iterations"], r["seeds"]) for r in main})
    lines.append("Ran: " + "; ".join(f"{LABELS[m]} {i} iterations x {s} seeds"
                                     for m, i, s in runs)
                 + ". The protocol is 1,000 iterations x 10 seeds with the household retrained "
                   "from scratch (300,000 steps) per outer step; these runs warm-start it.")
    lines += ["", "F = the exact welfare of the 41-bin tabular twin at the leader's iterate "
              "(mean over the last 10% of the tracked iterations of each run; mean ± SE over "
              "seeds); rates = the last iterate's; s/it = wall time of one outer iteration of "
              "one run (the program's time per iteration over its vmapped runs, compilation "
              "excluded); continuous F = the welfare of the seeds' mean final rates in the continuous "
              "economy (simulated, 2 x 2,000 episodes, the household acting by the twin's "
              "soft-optimal policy on the bin of its assets; ± its simulation SE).", "",
              "| method | lam | iterations x seeds | F(x0) | F final | F best tracked | income tax "
              "| VAT 1 | VAT 2 | VAT 3 | continuous F(x0) | continuous F final | s/it per run |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(main, key=lambda r: (r["lam"], METHODS.index(r["method"]))):
        rates = " | ".join(fmt(r["rates"][name], 3) for name in RATES)
        lines.append(f"| {LABELS[r['method']]} | {r['lam']:g} | {r['iterations']} x {r['seeds']} "
                     f"| {r['F0']:.2f} | {fmt(r['F'])} | {fmt(r['best_F'])} | {rates} "
                     f"| {fmt(r['F0_continuous'])} | {fmt(r['F_continuous'])} "
                     f"| {r['seconds_per_run_iteration']:.3g} |")
    if ablation:
        lines += ["", f"## Warm-start ablation: {LABELS[ablation[0]['method']]} at lam = "
                  f"{ABLATION_LAM}, K follower env "
                  "steps x 10 environments per outer step", "",
                  "| K | iterations x seeds | F final | F best tracked | income tax | s/it per run |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(ablation, key=lambda r: r["updates"]):
            lines.append(f"| {r['updates']} | {r['iterations']} x {r['seeds']} | {fmt(r['F'])} "
                         f"| {fmt(r['best_F'])} | {fmt(r['rates']['income_tax'], 3)} "
                         f"| {r['seconds_per_run_iteration']:.3g} |")
    return "\n".join(lines) + "\n"


def _band(ax, iterations, per_seed, label, color):
    mask = np.isfinite(per_seed).all(axis=0)
    if not mask.any():
        return
    mean = per_seed[:, mask].mean(axis=0)
    se = (per_seed[:, mask].std(axis=0, ddof=1) / math.sqrt(per_seed.shape[0])
          if per_seed.shape[0] > 1 else np.zeros_like(mean))
    ax.plot(iterations[mask], mean, label=label, color=color)
    ax.fill_between(iterations[mask], mean - se, mean + se, alpha=0.25, color=color)


def plot_curves(path: str, curves: dict, names: tuple[str, ...], ylabels: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = sorted({lam for method in curves.values() for lam in method})
    fig, axes = plt.subplots(len(lams), len(names), figsize=(4.2 * len(names), 3.2 * len(lams)),
                             squeeze=False)
    colors = dict(zip(METHODS, ("C0", "C3", "C1", "C2", "k")))
    for i, lam in enumerate(lams):
        for j, name in enumerate(names):
            ax = axes[i, j]
            for method, by_lam in curves.items():
                if lam in by_lam:
                    series = by_lam[lam][name]
                    _band(ax, np.arange(series.shape[1]), series, LABELS[method], colors[method])
            ax.set_title(f"lam = {lam:g}: {ylabels[name]}", fontsize=9)
            ax.set_xlabel("outer iteration")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    # A one-column figure is narrower than the title: wrap it to the figure's width.
    fig.suptitle(textwrap.fill(title, width=int(40 * len(names))), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def household_policies(final_rates: dict) -> dict:
    """The twin's soft-optimal household at `lam = 0.1` under each set of rates: per label and
    context, expected hours and consumption per good against the asset bin centers."""
    import jax.numpy as jnp

    from bilevel_jax.envs import tax_design as td
    from bilevel_jax.problem import solve_follower

    twin, _ = td.tax_design_tabular(41, temperature=ABLATION_LAM)
    params = td.TaxDesignParams()
    _, centers = td.asset_bins(41, params)
    hours, consumption = td.hours_and_consumption(params, td.joint_actions(params).T)
    amounts = jnp.concatenate([hours[None], consumption], axis=0)   # [1 + G, A]
    out = {"assets": np.asarray(centers).tolist()}
    for label, rates in final_rates.items():
        w = jnp.asarray(logits(rates), jnp.float32)
        per_context = []
        for k in range(twin.num_contexts):
            context = jax_tree_index(twin.contexts, k)
            _, solution = solve_follower(twin, w, context)
            per_context.append(np.asarray(solution.policy @ amounts.T).tolist())   # [S, 1 + G]
        out[label] = per_context
    return out


def jax_tree_index(tree, k):
    import jax

    return jax.tree_util.tree_map(lambda leaf: leaf[k], tree)


def logits(rates):
    """`w` with `2 sigmoid(w) = rates`."""
    rates = np.asarray(rates, float) / 2
    return np.log(rates) - np.log1p(-rates)


def continuous_welfare(rates, lam: float, seed: int = 0, num_envs: int = 2_000,
                       num_steps: int = 80) -> dict:
    """Welfare of taxes `rates` in the *continuous* economy, the household acting by the 41-bin
    twin's soft-optimal policy read off the bin of its assets (`tests/test_tax_design.py`
    checks this household against the twin): `num_envs` episodes per preference context,
    `num_steps` steps (0.9^80 = 2e-4 of the return cut); mean and SE over episodes, the two
    contexts weighted 1/2."""
    import jax
    import jax.numpy as jnp

    from bilevel_jax.envs import tax_design as td
    from bilevel_jax.problem import solve_follower

    twin, _ = td.tax_design_tabular(41, temperature=lam)
    simulator, _ = td.tax_design_problem(temperature=lam)
    actions, w = td.joint_actions(), jnp.asarray(logits(rates), jnp.float32)

    @jax.jit
    def per_context(context, key):
        _, solution = solve_follower(twin, w, context)
        params, env = simulator.env_params(w, context), simulator.env
        log_pi = jnp.log(solution.policy)
        k_reset, k_run = jax.random.split(key)
        _, state = jax.vmap(env.reset_env, (0, None))(jax.random.split(k_reset, num_envs), params)

        def step(carry, key):
            state, ret, disc = carry
            k_act, k_env = jax.random.split(key)
            index = jax.random.categorical(k_act, log_pi[td.asset_bin(state.assets, 41)])
            action = actions[index]
            welfare = jax.vmap(td.social_welfare, (None, 0, 0))(params, state.assets, action)
            _, state, _, _, _ = jax.vmap(env.step_env, (0, 0, 0, None))(
                jax.random.split(k_env, num_envs), state, action, params)
            return (state, ret + disc * welfare, disc * simulator.leader_discount), None

        init = (state, jnp.zeros(num_envs), jnp.ones(()))
        (_, ret, _), _ = jax.lax.scan(step, init, jax.random.split(k_run, num_steps))
        return ret.mean(), ret.var(ddof=1) / num_envs

    keys = jax.random.split(jax.random.key(seed), twin.num_contexts)
    parts = [per_context(twin.context(k), keys[k]) for k in range(twin.num_contexts)]
    probs = np.asarray(twin.probs(), float)
    mean = float(sum(p * float(m) for p, (m, _) in zip(probs, parts)))
    se = float(math.sqrt(sum(p**2 * float(v) for p, (_, v) in zip(probs, parts))))
    return {"mean": mean, "se": se, "n": num_envs}


def plot_policy(path: str, policies: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assets = np.array(policies["assets"])
    labels = [k for k in policies if k != "assets"]
    titles = ("hours worked", "consumption good 1", "consumption good 2", "consumption good 3")
    contexts = len(policies[labels[0]])
    fig, axes = plt.subplots(contexts, 4, figsize=(16, 3.2 * contexts), squeeze=False)
    for k in range(contexts):
        for j in range(4):
            ax = axes[k, j]
            for i, label in enumerate(labels):
                ax.plot(assets, np.array(policies[label][k])[:, j], label=label, color=f"C{i}")
            ax.set_title(f"context {k}: expected {titles[j]}", fontsize=9)
            ax.set_xlabel("assets")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"The household's soft-optimal policy on the 41-bin twin (lam = {ABLATION_LAM})"
                 " under the initial and the learned taxes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def household_throughput(runs_list=(1, 6), repeats: int = 5) -> list[dict]:
    """The soft-DQN household's training speed on the economy alone (the configs' options, the
    reference's update rule: one batch-1,000 update per env step of 10 environments): seconds
    per `learner.update` of 200 env steps after warm-up (past `learning_starts`), best of
    `repeats`, for 1 run and for vmapped runs. SPEC 8's reference: about 7,000 transitions/s."""
    import jax
    import jax.numpy as jnp
    import yaml

    from bilevel_jax import learners
    from bilevel_jax.envs import tax_design as td

    with open(os.path.join(CONFIGS, "hpgd.yaml")) as handle:
        options = yaml.safe_load(handle)["estimator"]["hpgd"]["learner_options"]
    problem, w0 = td.tax_design_problem(temperature=ABLATION_LAM)
    context = jax.tree_util.tree_map(lambda c: c[0], problem.contexts)
    learner = learners.make_learner("soft_dqn", **options)
    state = jax.jit(learner.init)(problem, w0, context, jax.random.key(0))
    out = []
    for runs in runs_list:
        batched = jax.tree_util.tree_map(lambda a: jnp.stack([a] * runs), state)
        update = jax.jit(jax.vmap(lambda st, k: learner.update(problem, w0, context, st, k)[0]))
        keys = jax.random.split(jax.random.key(1), (3 + repeats, runs))
        for i in range(3):   # compile, and fill the buffer past learning_starts
            batched = jax.block_until_ready(update(batched, keys[i]))
        times = []
        for i in range(3, 3 + repeats):
            start = time.perf_counter()
            batched = jax.block_until_ready(update(batched, keys[i]))
            times.append(time.perf_counter() - start)
        transitions = runs * options["num_updates"] * options["num_envs"]
        out.append({"runs": runs, "seconds_per_update_call": min(times),
                    "transitions_per_second": transitions / min(times),
                    "ratio_to_reference_7000": transitions / min(times) / 7000.0})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    rows, curves = [], {}
    for job in plan(args):
        times = common.run_job(job, args.reuse)
        rows += summarize(job, times)
        if not job["key"].startswith("ablation"):
            curves[job["method"]] = read_metrics(job["directory"])
    main_rows = [r for r in rows if not r["key"].startswith("ablation")]
    ablation = [r for r in rows if r["key"].startswith("ablation")]
    for r in main_rows:
        final = [r["rates"][name]["mean"] for name in RATES]
        r["F_continuous"] = continuous_welfare(final, r["lam"])
        r["F0_continuous"] = continuous_welfare([0.3] * 4, r["lam"])
    suffix = "_quick" if args.quick else ""
    throughput = household_throughput()
    text = markdown(rows, ablation, args.quick)
    text += ("\n## The household alone (soft DQN, 200 env steps x 10 environments per call, one "
             "batch-1,000 update per env step; SPEC 8's reference: about 7,000 transitions/s)\n\n"
             "| runs vmapped | s per call | transitions/s | ratio to 7,000 |\n|---|---|---|---|\n"
             + "".join(f"| {t['runs']} | {t['seconds_per_update_call']:.3f} | "
                       f"{t['transitions_per_second']:,.0f} | {t['ratio_to_reference_7000']:.2f} |\n"
                       for t in throughput))
    print(text)

    title = ("QUICK run: " if args.quick else "") + "tax design, " + "; ".join(
        f"{m} {r['iterations']} its x {r['seeds']} seeds"
        for m, r in {r["method"]: r for r in main_rows}.items())
    plot_curves(os.path.join(args.out, f"tax_design_welfare{suffix}.png"), curves, ("objective",),
                {"objective": "welfare F (41-bin twin)"}, title)
    plot_curves(os.path.join(args.out, f"tax_design_rates{suffix}.png"), curves, RATES,
                RATE_NAMES, title)
    initial = [0.3] * 4
    finals = {"initial taxes (0.3)": initial}
    for r in main_rows:
        if r["lam"] == ABLATION_LAM:
            finals[f"{r['method']} final"] = [r["rates"][name]["mean"] for name in RATES]
    policies = household_policies(finals)
    plot_policy(os.path.join(args.out, f"tax_design_policy{suffix}.png"), policies)

    with open(os.path.join(args.out, f"tax_design{suffix}.md"), "w") as handle:
        handle.write(text)
    payload = {"environment": common.environment(), "quick": args.quick, "rows": main_rows,
               "ablation": ablation, "household_policy": policies,
               "household_throughput": throughput,
               "benchmark_seconds": time.perf_counter() - start}
    common.write_json(args.json or os.path.join(args.out, f"tax_design{suffix}.json"), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
