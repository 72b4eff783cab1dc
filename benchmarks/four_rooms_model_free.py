"""Model-free HPGD on Four-Rooms run as a simulator, against `exact` (the check of issue 12 on
Four-Rooms, too long for the test suite: 143 s on 2 cores).

`bj.sim.as_simulator(four_rooms)` with one-hot observations, lam = 0.05, x ~ N(0, 0.01^2) as in
SPEC 7.1, both goals per estimate (`contexts="all"`). The default (single-batch) HPGD with the
exact-policy learner `soft_vi_tabular`: its critics are warm-started by `warm` outer steps at
the fixed x, then `num_estimates` vmapped estimates of `num_envs x num_steps` steps each are
drawn from that state. Reported: relative error of the mean against `exact`, its noise floor
`||SE|| / ||grad F||`, cosine of the mean, mean single-estimate cosine, seconds. Target (the
issue's): relative error <= 10%, cosine >= 0.95.

    python benchmarks/four_rooms_model_free.py [--quick] [--json PATH]
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import bilevel_jax as bj  # noqa: E402

LAM = 0.05


def measure(warm: int, num_estimates: int, num_envs: int, num_steps: int, critic_steps: int):
    problem, n = bj.envs.four_rooms_problem(temperature=LAM, dtype=jnp.float32)
    simp = bj.sim.as_simulator(problem)
    x = 0.01 * jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    exact = np.asarray(jax.jit(lambda x: bj.hypergradient(problem, x, "exact")[0])(x))
    estimator = bj.make_estimator("hpgd", learner="soft_vi_tabular", num_envs=num_envs,
                                  num_steps=num_steps, critic_hidden=(64,),
                                  critic_steps=critic_steps, contexts="all",
                                  estimate_variance=False)
    start = time.perf_counter()
    step = jax.jit(lambda s, k: estimator.update(simp, x, s, k)[1])
    state = jax.jit(estimator.init)(simp, x)
    for k in jax.random.split(jax.random.key(0), warm):
        state = step(state, k)
    keys = jax.random.split(jax.random.key(1), num_estimates)
    estimates = np.asarray(jax.jit(jax.vmap(lambda k: estimator.update(simp, x, state, k)[0]))(keys))
    seconds = time.perf_counter() - start
    mean = estimates.mean(0)
    se = estimates.std(0, ddof=1) / np.sqrt(len(estimates))
    norm = np.linalg.norm(exact)
    cos = lambda g: float(g @ exact / (np.linalg.norm(g) * norm))  # noqa: E731
    return {"warm": warm, "num_estimates": num_estimates, "num_envs": num_envs,
            "num_steps": num_steps, "critic_steps": critic_steps,
            "rel_error": float(np.linalg.norm(mean - exact) / norm),
            "noise_floor": float(np.linalg.norm(se) / norm), "cosine": cos(mean),
            "single_cosine": float(np.mean([cos(g) for g in estimates])),
            "grad_norm": float(norm), "seconds": seconds}


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    env = common.environment()
    settings = dict(warm=25, num_estimates=16, num_envs=64, num_steps=200, critic_steps=20) \
        if args.quick else dict(warm=100, num_estimates=48, num_envs=64, num_steps=200,
                                critic_steps=20)
    r = measure(**settings)
    r["within_target"] = r["rel_error"] <= 0.10 and r["cosine"] >= 0.95
    title = ("Four-Rooms model-free HPGD vs exact" + (" [quick: fewer warm steps and estimates "
                                                      "than the check's settings]" if args.quick else ""))
    common.print_table(title, [
        ("settings", f"warm={r['warm']} estimates={r['num_estimates']} "
                     f"{r['num_envs']}x{r['num_steps']} critic_steps={r['critic_steps']}", ""),
        ("rel_error", f"{r['rel_error']:.3f}", f"noise floor {r['noise_floor']:.3f}; target <= 0.10"),
        ("cosine", f"{r['cosine']:.4f}", f"single estimates {r['single_cosine']:.3f}; target >= 0.95"),
        ("seconds", f"{r['seconds']:.0f}", "compilation included")])
    common.write_json(args.json, {"environment": env, "quick": args.quick, **r})


if __name__ == "__main__":
    main()
