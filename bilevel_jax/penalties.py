"""Penalty functions of PBRL (SPEC 6): single-level surrogates of the bilevel problem.

The follower of context `k` gets its own tabular policy `pi_y = softmax(y[k])` (logits `y`,
`[K, S, A]`), and the leader minimizes `-f(x, pi_y) + rho * penalty(x, y)` jointly in `(x, y)`.
Both penalties below are `>= 0` and vanish exactly at `pi_y = pi*_x` (the soft-optimal policy of
every context, temperature `lam = problem.temperature`):

* value penalty   `p(x, y) = sum_k p_k [ V*_x(mu) - V^{pi_y}_x(mu) ]`
                           `= sum_k p_k sum_s d^{pi_y}(s) lam KL(pi_y(.|s) || pi*_x(.|s))`
* Bellman penalty
  `g(x, y) = sum_k p_k sum_s w(s) lam KL(pi_y(.|s) || softmax(Q^{pi_y}_x(s, .) / lam))`
  with `w = mu` or `w = d^{pi_y}`; it needs policy evaluation only, never `V*`.

Values are soft (entropy bonus `-lam log pi`), contexts are weighted by `problem.probs()` (or
explicit `weights`). Both functions are differentiable in `x` (any pytree) and `y`; the value
penalty's `x`-gradient uses Danskin's theorem and never differentiates the solver.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bilevel_jax.core.evaluation import policy_evaluation, visitation
from bilevel_jax.core.mdp import TabularMDP
from bilevel_jax.core.soft_vi import soft_value_iteration
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.problem import BilevelProblem, check_problem, map_contexts

Array = jax.Array

WEIGHTINGS = ("initial", "visitation")


# --------------------------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------------------------

def _follower_shape(problem: BilevelProblem, x) -> tuple[int, int]:
    """`(S, A)` of the follower MDP (from shapes only; valid under tracing)."""
    context = jax.eval_shape(lambda: problem.context(0))
    mdp = jax.eval_shape(problem.follower, x, context)
    return tuple(mdp.rewards.shape[-2:])


def _per_context(problem: BilevelProblem, x, name: str, table) -> Array | None:
    """Reshapes a per-context table to `[K, S, A]` (a context-free problem also accepts `[S, A]`).

    Raises `InvalidArgumentError` naming `name` for any other shape.
    """
    if table is None:
        return None
    num_states, num_actions = _follower_shape(problem, x)
    num_contexts = problem.num_contexts
    shape = tuple(getattr(table, "shape", ()))
    context_free = problem.contexts is None and shape == (num_states, num_actions)
    if not context_free and shape != (num_contexts, num_states, num_actions):
        alternative = ""
        if problem.contexts is None:
            alternative = f" or [S, A] = {(num_states, num_actions)}"
        raise InvalidArgumentError(
            f"{name}: expected one [S, A] table per context, shape [K, S, A] = "
            f"{(num_contexts, num_states, num_actions)}{alternative}, got {shape}")
    table = jnp.asarray(table)
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise InvalidArgumentError(f"{name}: expected a floating dtype, got {table.dtype}")
    return table[None] if context_free else table


def _context_weights(problem: BilevelProblem, weights) -> Array:
    """`[K]` weights of the contexts: `problem.probs()` unless `weights` is given."""
    if weights is None:
        return problem.probs()
    shape = tuple(getattr(weights, "shape", ()))
    if shape != (problem.num_contexts,):
        raise InvalidArgumentError(
            f"weights: expected shape [K] = [{problem.num_contexts}] (one weight per context), "
            f"got {shape}")
    return jnp.asarray(weights)


def _weighted_sum(problem: BilevelProblem, weights, values: Array) -> Array:
    return jnp.dot(_context_weights(problem, weights).astype(values.dtype), values)


def _stop_gradient_mdp(mdp: TabularMDP) -> TabularMDP:
    """The MDP with every floating leaf cut from differentiation (for the solver's input)."""
    return jax.tree_util.tree_map(lax.stop_gradient, mdp)


def soft_optimal_policy(mdp: TabularMDP, temperature, *, init_q=None, **solver_options) -> Array:
    """`[S, A]` soft-optimal policy of `mdp`, held constant under differentiation (Danskin)."""
    sol = soft_value_iteration(_stop_gradient_mdp(mdp), lax.stop_gradient(temperature),
                               init_q=init_q, **solver_options)
    return lax.stop_gradient(sol.policy)


# --------------------------------------------------------------------------------------------
# Value penalty
# --------------------------------------------------------------------------------------------

def context_value_penalty(mdp: TabularMDP, logits: Array, temperature, *, init_q=None,
                          linear_solver: str = "auto", **solver_options) -> Array:
    """`V*(mu) - V^{pi_y}(mu)` for one MDP and logits `[S, A]` (soft values at `temperature`).

    `V*` is the soft value of the solver's policy `pi*`, held fixed (`stop_gradient`) and evaluated
    exactly by `policy_evaluation`, which is differentiable in rewards, transitions and initial.
    At the fixed point `pi*` maximizes `V^pi`, so by Danskin's theorem the derivative of this
    policy-fixed value is the derivative of `V*`: no second derivatives, no adjoint solve through
    the solver. Evaluating `pi*` (rather than reading the solver's `v`) also makes the gap exactly
    zero (to round-off) at `pi_y = pi*`.
    """
    lam = temperature
    pi_star = soft_optimal_policy(mdp, lam, init_q=init_q, linear_solver=linear_solver,
                                  **solver_options)
    v_star = policy_evaluation(mdp, pi_star, lam, linear_solver=linear_solver).v
    pi_y = jax.nn.softmax(logits, axis=-1)
    v_y = policy_evaluation(mdp, pi_y, lam, linear_solver=linear_solver).v
    return jnp.dot(mdp.initial.astype(v_y.dtype), v_star - v_y)


def value_penalty(problem: BilevelProblem, x, y: Array, *, weights: Array | None = None,
                  init_q: Array | None = None, linear_solver: str = "auto",
                  **solver_options) -> Array:
    """Value penalty `p(x, y) = sum_k p_k [ V*_{x,k}(mu_k) - V^{pi_{y_k}}_{x,k}(mu_k) ] >= 0`.

    Soft values at `lam = problem.temperature`; `pi_{y_k} = softmax(y[k])`. Equals
    `sum_k p_k sum_s d^{pi_{y_k}}(s) lam KL(pi_{y_k}(.|s) || pi*_{x,k}(.|s))`, zero exactly at
    `pi_y = pi*_x`.

    Gradients: in `x` by Danskin (`V*` is the value of the fixed, stop-gradient policy `pi*`), so
    `grad_x p` is a difference of discounted expectations of `d_x r` (plus `d_x P`, `d_x mu`
    terms) under `pi*` and `pi_y`; in `y` by autodiff through the policy evaluation of `pi_y`
    (the entropy-regularized policy gradient
    `-d(s) pi(a|s) (Q^pi(s, a) - lam log pi(a|s) - V^pi(s))` per context, times `p_k`).

    If `V*` is only approximated (e.g. `num_sweeps=K` with a warm start `init_q`), `V*` is
    replaced by the value of the approximate soft-greedy policy and `p` may be slightly negative.

    Args:
      problem: the `BilevelProblem` (its `follower` and `temperature` are used).
      x: the leader's variable (any pytree accepted by `problem.follower`).
      y: follower logits `[K, S, A]` (one table per context; `[S, A]` also accepted for a
        context-free problem).
      weights: optional `[K]` context weights replacing `problem.probs()`.
      init_q: optional warm start of the `V*` solver, `[K, S, A]` (or `[S, A]` without contexts).
      linear_solver: method of the policy-evaluation solves (and of the solver's adjoint).
      **solver_options: passed to `soft_value_iteration` (`tol`, `max_iters`, `num_sweeps`).

    Returns:
      scalar penalty.

    Raises:
      InvalidProblemError: bad problem fields (e.g. temperature <= 0).
      InvalidArgumentError: `y`, `weights` or `init_q` with the wrong shape.
    """
    check_problem(problem, x)
    y = _per_context(problem, x, "y", y)
    init_q = _per_context(problem, x, "init_q", init_q)

    def one(context, logits, q0):
        mdp = problem.follower(x, context)
        return context_value_penalty(mdp, logits, problem.temperature, init_q=q0,
                                     linear_solver=linear_solver, **solver_options)

    return _weighted_sum(problem, weights, map_contexts(one, problem, y, init_q))


# --------------------------------------------------------------------------------------------
# Bellman penalty
# --------------------------------------------------------------------------------------------

def soft_greedy_gap(mdp: TabularMDP, logits: Array, temperature, *,
                    linear_solver: str = "auto") -> Array:
    """`[S]` one-step gap `lam KL(pi_y(.|s) || softmax(Q^{pi_y}(s, .) / lam))`.

    `pi_y = softmax(logits)` (`[S, A]` logits).

    Equivalently `lam logsumexp(Q^{pi_y}(s, .) / lam) - V^{pi_y}(s)`: how much one soft-greedy
    improvement step at `s` gains. Computed from log-probabilities (non-negative up to round-off).
    """
    lam = temperature
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    pi = jnp.exp(log_pi)
    q = policy_evaluation(mdp, pi, lam, linear_solver=linear_solver).q
    lam = jnp.asarray(lam, q.dtype)
    log_greedy = jax.nn.log_softmax(q / lam, axis=-1)
    return lam * jnp.sum(pi * (log_pi - log_greedy), axis=-1)


def context_bellman_penalty(mdp: TabularMDP, logits: Array, temperature, *,
                            weighting: str = "initial", linear_solver: str = "auto") -> Array:
    """`sum_s w(s) lam KL(pi_y(.|s) || softmax(Q^{pi_y}(s, .) / lam))`: one MDP, logits `[S, A]`."""
    gaps = soft_greedy_gap(mdp, logits, temperature, linear_solver=linear_solver)
    if weighting == "initial":
        w = mdp.initial
    else:
        w = visitation(mdp, jax.nn.softmax(logits, axis=-1), linear_solver=linear_solver)
    return jnp.dot(w.astype(gaps.dtype), gaps)


def bellman_penalty(problem: BilevelProblem, x, y: Array, *, weighting: str = "initial",
                    weights: Array | None = None, linear_solver: str = "auto") -> Array:
    """Bellman penalty: the context-weighted one-step soft-greedy gap of the follower policies,

        g(x, y) = sum_k p_k sum_s w_k(s) lam KL(pi_k(.|s) || softmax(Q_k(s, .) / lam)).

    Here `pi_k = softmax(y[k])` and `Q_k = Q^{pi_k}_{x,k}` is its soft Q-function in context `k`.

    The soft-greedy gap of each follower policy in its own soft Q-function (`Q^pi` includes the
    entropy bonus of `pi` from the next state on). Needs only policy evaluation, never `V*`.
    `>= 0`, zero at `pi_y = pi*_x`; with `weighting="visitation"` (`w = d^{pi_y}`) or an initial
    distribution of full support, zero only there. Differentiable in `x` and `y` (autodiff
    through the evaluation solves, including those of `d^{pi_y}`).

    Args:
      problem: the `BilevelProblem`.
      x: the leader's variable.
      y: follower logits `[K, S, A]` (`[S, A]` also accepted for a context-free problem).
      weighting: `"initial"` (`w = mu`) or `"visitation"` (`w = d^{pi_y}`, unnormalized).
      weights: optional `[K]` context weights replacing `problem.probs()`.
      linear_solver: method of the policy-evaluation solves.

    Returns:
      scalar penalty.
    """
    check_problem(problem, x)
    if weighting not in WEIGHTINGS:
        raise InvalidArgumentError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
    y = _per_context(problem, x, "y", y)

    def one(context, logits):
        mdp = problem.follower(x, context)
        return context_bellman_penalty(mdp, logits, problem.temperature, weighting=weighting,
                                       linear_solver=linear_solver)

    return _weighted_sum(problem, weights, map_contexts(one, problem, y))


__all__ = [
    "WEIGHTINGS",
    "bellman_penalty",
    "context_bellman_penalty",
    "context_value_penalty",
    "soft_greedy_gap",
    "soft_optimal_policy",
    "value_penalty",
]
