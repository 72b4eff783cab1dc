"""Hypergradient ascent: any estimator, any optax optimizer (fed `-grad F`, since optax minimizes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bilevel_jax.algorithms.base import Algorithm, any_nonfinite, global_norm
from bilevel_jax.estimators.base import (Estimator, is_simulator, make_estimator,
                                         reports_exact_objective)
from bilevel_jax.estimators.exact import objective_and_q, zero_q


def hypergradient_ascent(estimator: Estimator | str, optimizer: optax.GradientTransformation, *,
                         track_objective: bool = True, **estimator_options) -> Algorithm:
    """Ascent on `F` with `estimator`'s gradients.

    `objective` is the exact `F(x)` at the iterate the gradient was taken at when
    `track_objective`: the estimator's own `info["objective"]` if it is exact
    (`estimator.exact_objective`), else one extra follower solve per iteration, to tolerance,
    warm-started from the previous iteration's solution (`state["objective_q"]`). On a
    `bj.SimulatorProblem` that solve runs on its tabular `reference` model
    (`bj.sim.reference_model`: `as_simulator`'s source, the tax-design twin) where it has one;
    the estimator never sees it. Without `track_objective`, and on a simulator problem without
    a reference, it is the estimator's `info["objective"]` if it has one (zero-order's sampled
    estimate there), else NaN.

    Under a tracking schedule (`train(..., track_every=k)`) the build without
    `track_objective` runs the untracked iterations on the tracked build's state: there it
    keeps `objective_q` fresh at no cost, copying the estimator's own follower table
    (`state["estimator"]["q"]`, `[K, S, A]`: HPGD's oracle solution, AMD's Q table) for each
    context the estimator updated, so the next tracked solve starts from the latest table
    rather than from the one of `k` iterations before. A tracked iteration's `F` then equals
    a fully tracked run's up to the solver's tolerance (`soft_value_iteration`'s; the warm
    start differs, the fixed point does not).
    """
    estimator = make_estimator(estimator, **estimator_options)

    def solve_for_objective(problem) -> bool:
        return track_objective and not reports_exact_objective(estimator, is_simulator(problem))

    def model(problem):
        """The tabular problem the exact `F` is solved on (None: no solve)."""
        if not solve_for_objective(problem):
            return None
        if is_simulator(problem):
            from bilevel_jax.sim.problem import reference_model  # noqa: PLC0415 - gymnax
            return reference_model(problem)
        return problem

    def estimator_q(problem, x, est_state):
        """The estimator state's follower table if it has the shape of the solves' warm start."""
        q = est_state.get("q") if isinstance(est_state, dict) else None
        if q is None or is_simulator(problem):
            return None
        want = jax.eval_shape(lambda: zero_q(problem, x))
        if getattr(q, "shape", None) != want.shape or getattr(q, "dtype", None) != want.dtype:
            return None
        return q

    def init(problem, x0, key):
        state = {"x": x0, "opt": optimizer.init(x0), "estimator": estimator.init(problem, x0),
                 "key": key, "step": jnp.zeros((), jnp.int32)}
        if model(problem) is not None:
            state["objective_q"] = zero_q(model(problem), x0)
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
        if model(problem) is not None:
            objective, (q, _, _) = objective_and_q(model(problem), x, state["objective_q"], {})
            new_state["objective_q"] = jax.lax.stop_gradient(q)
        else:
            objective = info.get("objective", jnp.nan)
            if "objective_q" in state:
                # An untracked iteration of a schedule: the latest follower tables as the next
                # tracked solve's warm start (per context, where the estimator updated it).
                old_q = estimator_q(problem, x, state["estimator"])
                new_q = estimator_q(problem, x, est_state)
                if old_q is not None and new_q is not None:
                    axes = tuple(range(1, new_q.ndim))
                    updated = jnp.any(new_q != old_q, axis=axes).reshape(
                        (-1,) + (1,) * (new_q.ndim - 1))
                    new_state["objective_q"] = jax.lax.stop_gradient(
                        jnp.where(updated, new_q, state["objective_q"]))
                else:
                    new_state["objective_q"] = state["objective_q"]
        metrics = {"objective": jnp.asarray(objective, jnp.float32),
                   "grad_norm": global_norm(grad).astype(jnp.float32),
                   "follower_residual": jnp.asarray(info.get("follower_residual", 0.0), jnp.float32),
                   "samples": jnp.asarray(info.get("samples", 0), jnp.float32),
                   "nonfinite": any_nonfinite(grad, new_x)}
        return new_state, metrics

    return Algorithm(init, step)
