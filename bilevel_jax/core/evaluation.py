"""Policy evaluation and discounted visitation (SPEC 2): one solve with `(I - gamma P_pi)`.

    V^pi = (I - gamma P_pi)^{-1} r_pi,   r_pi(s) = sum_a pi(a|s) (r(s, a) - lam log pi(a|s))
    Q^pi(s, a) = r(s, a) + gamma (1 - terminal[s]) sum_s' P(s'|s, a) V^pi(s')
    d = mu^T (I - gamma P_pi)^{-1}     (unnormalized; total = expected discounted episode length)

Both are differentiable in every input (policy, rewards, transitions, initial, discount).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from bilevel_jax.core.linear import LinearSolverOptions, solve_policy_system
from bilevel_jax.core.mdp import TabularMDP, check_shapes, expected_next
from bilevel_jax.errors import InvalidArgumentError

Array = jax.Array


@struct.dataclass
class PolicyEvaluation:
    """`q [S, A]` and `v [S]` of a fixed policy (soft values when a temperature is given)."""

    q: Array
    v: Array


def _options(linear_solver) -> LinearSolverOptions:
    if isinstance(linear_solver, str):
        return LinearSolverOptions(method=linear_solver)
    return linear_solver


def _check_policy(mdp: TabularMDP, policy) -> None:
    check_shapes(mdp)
    shape = tuple(getattr(policy, "shape", ()))
    if shape != tuple(mdp.rewards.shape[-2:]):
        raise InvalidArgumentError(
            f"policy: expected shape [S, A] = {tuple(mdp.rewards.shape[-2:])}, got {shape}")


def policy_evaluation(mdp: TabularMDP, policy: Array, temperature=0.0, *,
                      linear_solver: str | LinearSolverOptions = "auto") -> PolicyEvaluation:
    """Exact (soft) values of `policy`.

    Args:
      mdp: a `TabularMDP`.
      policy: `[S, A]` action probabilities.
      temperature: entropy bonus weight `lam >= 0` (0: ordinary values).
      linear_solver: `"auto"` (direct up to 2048 states), `"direct"`, `"richardson"`, `"gmres"`.

    Returns:
      `PolicyEvaluation(q [S, A], v [S])`.
    """
    _check_policy(mdp, policy)
    dtype = jnp.result_type(mdp.rewards.dtype, policy.dtype, float)
    policy = policy.astype(dtype)
    rewards = mdp.rewards.astype(dtype)
    # p log p with a zero (and zero gradient) where p == 0: xlogy's gradient there is -inf, which
    # turns into NaN once chained through a softmax that underflowed to 0 (float32).
    positive = policy > 0
    plogp = jnp.where(positive, policy * jnp.log(jnp.where(positive, policy, 1.0)), 0.0)
    entropy_bonus = -jnp.asarray(temperature, dtype) * plogp
    reward_pi = jnp.sum(policy * rewards + entropy_bonus, axis=-1)
    v = solve_policy_system(mdp, policy, reward_pi, options=_options(linear_solver))
    gamma = jnp.asarray(mdp.discount, dtype)
    keep = mdp.continuation().astype(dtype)
    q = rewards + gamma * keep[:, None] * expected_next(mdp.transitions, v).astype(dtype)
    return PolicyEvaluation(q=q, v=v)


def visitation(mdp: TabularMDP, policy: Array, *,
               linear_solver: str | LinearSolverOptions = "auto") -> Array:
    """Unnormalized discounted state visitation `d(s) = sum_t gamma^t Pr(s_t = s)`, `[S]`.

    `E^pi[sum_t gamma^t g(s_t, a_t)] = sum_s d(s) sum_a pi(a|s) g(s, a)` for any `g`.
    """
    _check_policy(mdp, policy)
    dtype = jnp.result_type(mdp.initial.dtype, policy.dtype, float)
    return solve_policy_system(mdp, policy.astype(dtype), mdp.initial.astype(dtype),
                               transpose=True, options=_options(linear_solver))
