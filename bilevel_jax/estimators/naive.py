"""`naive`: the leader's gradient with the follower's policy held fixed (no response term).

    g(x) = E_xi [ sum_s dbar(s) sum_a pi*(a|s) ( d_x rbar(s, a)
                  + gammabar (1 - terminal[s]) sum_s' d_x P(s'|s, a) Vbar(s') )
                  + sum_s d_x mu(s) Vbar(s) ]

This is SPEC 4's hypergradient without the response term `(1/lam) Qbar d_x A*`: the gradient
of the leader's value `f(x, pi)` in `x` at `pi = pi*_x`, treating the follower's policy as a
constant (`stop_gradient`). It is what a leader gets who ignores that the follower will
re-optimize (a myopic, Nash-like leader; in a Stackelberg game its fixed points are the leader's
best responses to the follower, not commitments). Exact where the follower's policy does not
depend on `x`; the baseline that shows what the response term is worth.

Computed as `jax.grad` of the leader's exact value of the fixed, stop-gradient policy: one solve
of the follower (on a stop-gradient copy of its MDP, warm-started from the previous call) and one
policy evaluation plus its adjoint per context; no derivative of the solver.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bilevel_jax.core.evaluation import policy_evaluation
from bilevel_jax.core.linear import METHODS
from bilevel_jax.core.soft_vi import soft_value_iteration
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.estimators.base import Estimator, check_positive_ints, register
from bilevel_jax.estimators.exact import gradient_estimator
from bilevel_jax.problem import map_contexts


def policy_fixed_objective(problem, x, init_q, solver_options, linear_solver="auto"):
    """`sum_k p_k mu . Vbar^{pi*}` with `pi*` (solved at `x`) held constant, and aux
    `(q [K, S, A], residual [K], sweeps [K])`; its gradient in `x` is the naive gradient."""

    def per_context(context, q0):
        mdp = problem.follower(x, context)
        frozen = jax.tree_util.tree_map(jax.lax.stop_gradient, mdp)
        sol = soft_value_iteration(frozen, jax.lax.stop_gradient(problem.temperature),
                                   init_q=q0, linear_solver=linear_solver, **solver_options)
        policy = jax.lax.stop_gradient(sol.policy)
        leader = policy_evaluation(problem.leader_mdp(x, context, mdp), policy,
                                   linear_solver=linear_solver)
        return jnp.dot(mdp.initial, leader.v), (sol.q, sol.residual, sol.num_iters)

    values, aux = map_contexts(per_context, problem, init_q)
    return jnp.dot(problem.probs().astype(values.dtype), values), aux


def naive(*, tol: float | None = None, max_iters: int = 100_000, linear_solver="auto",
          warm_start: bool = True) -> Estimator:
    """Policy-fixed gradient of the leader's value (follower solved to `tol`, warm-started
    across steps when `warm_start`). `info`: `objective` (the exact `F(x)`: the policy is the
    exact best response), `follower_residual`, `sweeps`, `samples` (0)."""
    check_positive_ints(max_iters=max_iters)
    if isinstance(linear_solver, str) and linear_solver not in METHODS:
        raise InvalidArgumentError(
            f"linear_solver: expected one of {METHODS}, got {linear_solver!r}")
    if tol is not None and not tol > 0:
        raise InvalidArgumentError(f"tol: expected a number > 0 or None, got {tol!r}")
    solver_options = dict(tol=tol, max_iters=max_iters)
    return gradient_estimator(
        lambda problem, x, init_q: policy_fixed_objective(problem, x, init_q, solver_options,
                                                          linear_solver),
        warm_start, exact_objective=tol is None)


register("naive", naive)
