"""Hypergradient ascent: any estimator, any optax optimizer (fed `-grad F`, since optax minimizes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bilevel_jax.algorithms.base import Algorithm, any_nonfinite, global_norm
from bilevel_jax.estimators.base import Estimator, is_simulator, make_estimator
from bilevel_jax.estimators.exact import objective_and_q, zero_q


def hypergradient_ascent(estimator: Estimator | str, optimizer: optax.GradientTransformation, *,
                         track_objective: bool = True, **estimator_options) -> Algorithm:
    """Ascent on `F` with `estimator`'s gradients.

    `objective` is the exact `F(x)` at the iterate the gradient was taken at when
    `track_objective`: the estimator's own `info["objective"]` if it is exact
    (`estimator.exact_objective`), else one extra follower solve per iteration, to tolerance,
    warm-started from the previous iteration's solution. Without `track_objective`, and on a
    `bj.SimulatorProblem` (no model to solve), it is the estimator's `info["objective"]` if it
    has one (zero-order's sampled estimate there), else NaN.
    """
    estimator = make_estimator(estimator, **estimator_options)
    solve_for_objective = track_objective and not estimator.exact_objective

    def solves(problem) -> bool:
        return solve_for_objective and not is_simulator(problem)

    def init(problem, x0, key):
        state = {"x": x0, "opt": optimizer.init(x0), "estimator": estimator.init(problem, x0),
                 "key": key, "step": jnp.zeros((), jnp.int32)}
        if solves(problem):
            state["objective_q"] = zero_q(problem, x0)
        return state

    def step(problem, state):
        key, sub = jax.random.split(state["key"])
        x = state["x"]
        grad, est_state, info = estimator.update(problem, x, state["estimator"], sub)
        updates, opt_state = optimizer.update(jax.tree_util.tree_map(jnp.negative, grad),
                                              state["opt"], x)
        new_x = optax.apply_updates(x, updates)
        new_state = {"x": new_x, "opt": opt_state, "estimator": est_state, "key": key,
                     "step": state["step"] + 1}
        if solves(problem):
            objective, (q, _, _) = objective_and_q(problem, x, state["objective_q"], {})
            new_state["objective_q"] = jax.lax.stop_gradient(q)
        else:
            objective = info.get("objective", jnp.nan)
        metrics = {"objective": jnp.asarray(objective, jnp.float32),
                   "grad_norm": global_norm(grad).astype(jnp.float32),
                   "follower_residual": jnp.asarray(info.get("follower_residual", 0.0), jnp.float32),
                   "samples": jnp.asarray(info.get("samples", 0), jnp.float32),
                   "nonfinite": any_nonfinite(grad, new_x)}
        return new_state, metrics

    return Algorithm(init, step)
