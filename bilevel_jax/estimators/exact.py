"""`exact` and `unrolled`: differentiate the leader's objective through the follower's solver.

`exact` is `jax.grad` of `F` through the implicit-differentiation solver (the ground truth);
`unrolled` backpropagates through `num_sweeps` soft value iteration sweeps from zeros or from the
previous outer step's Q (`warm_start=True`), and is biased for small `num_sweeps`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bilevel_jax.core.evaluation import policy_evaluation
from bilevel_jax.core.soft_vi import soft_value_iteration
from bilevel_jax.estimators.base import Estimator, register
from bilevel_jax.problem import map_contexts


def objective_and_q(problem, x, init_q, solver_options):
    """`F(x)` from per-context solves (warm-started at `init_q [K, S, A]`), with aux."""

    def per_context(context, q0):
        mdp = problem.follower(x, context)
        sol = soft_value_iteration(mdp, problem.temperature, init_q=q0, **solver_options)
        leader = policy_evaluation(problem.leader_mdp(x, context, mdp), sol.policy)
        return jnp.dot(mdp.initial, leader.v), (sol.q, sol.residual, sol.num_iters)

    values, aux = map_contexts(per_context, problem, init_q)
    return jnp.dot(problem.probs().astype(values.dtype), values), aux


def zero_q(problem, x):
    def shape_of(context):
        return problem.follower(x, context).rewards
    rewards = jax.eval_shape(lambda: map_contexts(shape_of, problem))
    return jnp.zeros(rewards.shape, rewards.dtype)


def gradient_estimator(objective, warm_start: bool, exact_objective: bool = False) -> Estimator:
    """The estimator that returns `grad_x` of `objective(problem, x, init_q) -> (value, (q,
    residual, sweeps))`, warm-starting the follower solves at the previous step's `q` when
    `warm_start`."""

    def init(problem, x):
        return {"q": zero_q(problem, x)}

    def update(problem, x, state, key=None):
        del key
        init_q = jax.lax.stop_gradient(state["q"]) if warm_start else jnp.zeros_like(state["q"])
        (value, (q, residual, sweeps)), grad = jax.value_and_grad(
            lambda x: objective(problem, x, init_q), has_aux=True)(x)
        info = {"objective": value, "follower_residual": jnp.max(residual),
                "sweeps": jnp.sum(sweeps), "samples": jnp.zeros((), jnp.int32)}
        return grad, {"q": jax.lax.stop_gradient(q)}, info

    return Estimator(init, update, exact_objective)


def exact(*, tol: float | None = None, max_iters: int = 100_000, linear_solver="auto",
          warm_start: bool = True) -> Estimator:
    """Implicit-differentiation hypergradient; follower solves warm-started across steps."""
    solver_options = dict(tol=tol, max_iters=max_iters, linear_solver=linear_solver)
    return gradient_estimator(
        lambda problem, x, init_q: objective_and_q(problem, x, init_q, solver_options),
        warm_start, exact_objective=tol is None)


def unrolled(*, num_sweeps: int = 50, warm_start: bool = False) -> Estimator:
    """Backpropagation through `num_sweeps` soft VI sweeps (from zeros, or warm-started)."""
    solver_options = dict(num_sweeps=num_sweeps, differentiation="unroll")
    return gradient_estimator(
        lambda problem, x, init_q: objective_and_q(problem, x, init_q, solver_options), warm_start)


register("exact", exact)
register("unrolled", unrolled)
