"""Where HPGD's tax-design hypergradient goes wrong: the estimate at fixed taxes against exact.

    python benchmarks/tax_design_bias.py [--quick] [--json PATH]

In `benchmarks/tax_design.py` HPGD (soft-DQN household, warm-started) follows exact ascent up
to an income tax of about 0.6 and then, at lam = 0.2 and 0.3, keeps raising it (0.76 at lam 0.3
against exact's 0.60) while the twin's welfare falls. This script holds the taxes fixed at
points of that path and compares, per component of `grad_w F`:

  - `exact`: the exact hypergradient of the 41-bin tabular twin;
  - `twin sim`: model-free HPGD on `as_simulator` of the same twin with its exact soft-optimal
    household (`soft_vi_tabular`): the estimator alone, no learned household, no discretization
    gap (mean ± SE of the estimates after a warm-up);
  - `continuous`: model-free HPGD on the continuous economy with the soft-DQN household of
    `configs/tax_design/hpgd.yaml` (the same estimator options), the household trained at the
    fixed taxes for `warm` outer steps, then mean ± SE of the next estimates (it keeps
    training).

Both the single-batch form of the runs (a learned critic of the leader's `Qbar(s, a)` over the
1,250 joint actions: its error is a bias) and the branching form (`unbiased=True`, paired
branch rollouts of 50 steps, unbiased up to `gammabar^50`) are measured. If the branching
form matches `exact` on the twin where the single batch does not, the single batch's critic is
the bias; `continuous` then shows which form to run on the economy itself. The points
are vmapped (one compiled program per column).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from tax_design import CONFIGS, logits  # noqa: E402

LAM = 0.3
INCOME_TAXES = (0.3, 0.6, 0.76)
VAT = 0.3
BRANCH_HORIZON = 50   # gammabar^50 = 0.005 of the leader's return is cut


def _points(dtype):
    import jax.numpy as jnp

    return jnp.asarray(logits([[tau, VAT, VAT, VAT] for tau in INCOME_TAXES]), dtype)


def _mean_estimates(estimator, problem, points, warm: int, count: int, seed: int):
    """Per point: mean and SE of `count` estimates after `warm` warm-up updates at that point."""
    import jax

    def run(w, key):
        state = estimator.init(problem, w)

        def body(state, key):
            grad, state = estimator.update(problem, w, state, key)[:2]
            return state, grad

        keys = jax.random.split(key, warm + count)
        _, grads = jax.lax.scan(body, state, keys)
        return grads[warm:]

    keys = jax.random.split(jax.random.key(seed), points.shape[0])
    grads = np.asarray(jax.jit(jax.vmap(run))(points, keys))         # [P, count, 4]
    return grads.mean(axis=1), grads.std(axis=1, ddof=1) / np.sqrt(count)


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    import jax
    import yaml

    import bilevel_jax as bj
    from bilevel_jax.envs import tax_design as td

    bins = 21 if args.quick else 41
    warm, count = (20, 10) if args.quick else (150, 30)
    twin, _ = td.tax_design_tabular(bins, temperature=LAM)
    continuous, _ = td.tax_design_problem(temperature=LAM)
    points = _points(jax.numpy.float32)

    start = time.perf_counter()
    exact = np.asarray(jax.jit(jax.vmap(
        lambda w: bj.hypergradient(twin, w, "exact", validate=False)[0]))(points))
    objective = np.asarray(jax.jit(jax.vmap(lambda w: bj.leader_objective(twin, w)))(points))
    times = {"exact": time.perf_counter() - start}

    start = time.perf_counter()
    twin_estimator = bj.make_estimator("hpgd", learner="soft_vi_tabular", critic_steps=10,
                                       num_envs=64, num_steps=64, critic_hidden=(32,),
                                       estimate_variance=False)
    twin_mean, twin_se = _mean_estimates(twin_estimator, bj.as_simulator(twin), points,
                                         warm=20, count=count, seed=1)
    times["twin sim"] = time.perf_counter() - start

    start = time.perf_counter()
    branching = dict(unbiased=True, unbiased_form="plain", horizon=BRANCH_HORIZON,
                     samples_per_trajectory=4, estimate_variance=False)
    twin_branch_estimator = bj.make_estimator("hpgd", learner="soft_vi_tabular", num_envs=16,
                                              num_steps=64, **branching)
    twin_b_mean, twin_b_se = _mean_estimates(twin_branch_estimator, bj.as_simulator(twin),
                                             points, warm=20, count=count, seed=3)
    times["twin sim, branching"] = time.perf_counter() - start

    start = time.perf_counter()
    with open(os.path.join(CONFIGS, "hpgd.yaml")) as handle:
        options = yaml.safe_load(handle)["estimator"]["hpgd"]
    continuous_estimator = bj.make_estimator("hpgd", **options)
    cont_mean, cont_se = _mean_estimates(continuous_estimator, continuous, points,
                                         warm=warm, count=count, seed=2)
    times["continuous"] = time.perf_counter() - start

    start = time.perf_counter()
    branch_options = {**options, **branching}
    cont_b_mean, cont_b_se = _mean_estimates(bj.make_estimator("hpgd", **branch_options),
                                             continuous, points, warm=warm, count=count, seed=4)
    times["continuous, branching"] = time.perf_counter() - start

    names = ("income tax", "VAT 1", "VAT 2", "VAT 3")
    title = (f"Tax design, lam = {LAM}: grad_w F at fixed taxes (VAT {VAT}); exact = the "
             f"{bins}-bin twin; twin sim: {count} estimates after 20 warm-up; continuous: "
             f"{count} estimates after {warm} warm-up household updates"
             + (" (--quick: short of the script's protocol)" if args.quick else ""))
    print(f"\n{title}\n")
    print("| income tax | F twin | component | exact | twin sim | twin sim, branching | "
          "continuous | continuous, branching |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for p, tau in enumerate(INCOME_TAXES):
        for c, name in enumerate(names):
            row = {"income_tax": tau, "F_twin": float(objective[p]), "component": name,
                   "exact": float(exact[p, c]), "twin_sim": float(twin_mean[p, c]),
                   "twin_sim_se": float(twin_se[p, c]),
                   "twin_sim_branching": float(twin_b_mean[p, c]),
                   "twin_sim_branching_se": float(twin_b_se[p, c]),
                   "continuous": float(cont_mean[p, c]), "continuous_se": float(cont_se[p, c]),
                   "continuous_branching": float(cont_b_mean[p, c]),
                   "continuous_branching_se": float(cont_b_se[p, c])}
            rows.append(row)
            print(f"| {tau:g} | {objective[p]:.2f} | {name} | {exact[p, c]:+.3f} | "
                  f"{twin_mean[p, c]:+.3f} ± {twin_se[p, c]:.3f} | "
                  f"{twin_b_mean[p, c]:+.3f} ± {twin_b_se[p, c]:.3f} | "
                  f"{cont_mean[p, c]:+.3f} ± {cont_se[p, c]:.3f} | "
                  f"{cont_b_mean[p, c]:+.3f} ± {cont_b_se[p, c]:.3f} |")
    print("\nseconds (compile included): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    common.write_json(args.json, {"title": title, "lam": LAM, "bins": bins, "warm": warm,
                                  "count": count, "rows": rows, "seconds": times,
                                  "environment": common.environment()})


if __name__ == "__main__":
    main()
