"""The contextual bilevel RL problem (SPEC 3) and its exact leader objective.

    F(x) = E_xi [ f(x, xi) ],  f(x, xi) = E^{pi*_{x,xi}}_{s_0 ~ mu} [ sum_t gammabar^t rbar_{x,xi}(s_t, a_t) ]

where `pi*_{x,xi}` is the soft-optimal policy (temperature `lam`) of the follower MDP
`follower(x, xi)` and `rbar = leader_reward(x, xi)`. The leader's MDP shares the follower's
transitions, initial distribution and terminal states, with its own discount `gammabar`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bilevel_jax.checks import check_unit_interval, is_concrete
from bilevel_jax.contexts import ContextsMixin, check_contexts
from bilevel_jax.core.evaluation import policy_evaluation
from bilevel_jax.core.mdp import TabularMDP, validate_mdp
from bilevel_jax.core.soft_vi import SoftVISolution, check_temperature, soft_value_iteration
from bilevel_jax.errors import BilevelJaxError, InvalidMDPError

Array = jax.Array


class InvalidProblemError(BilevelJaxError, ValueError):
    """A `BilevelProblem` is malformed; the message names the field and what was expected."""


@struct.dataclass
class BilevelProblem(ContextsMixin):
    """A leader's problem over followers that best-respond in `follower(x, context)`.

    Attributes:
      follower: `(x, context) -> TabularMDP`; rewards, transitions and initial may depend on `x`.
      leader_reward: `(x, context) -> [S, A]` leader reward `rbar`.
      leader_discount: `gammabar` in `[0, 1)`.
      temperature: the followers' entropy temperature `lam > 0`.
      contexts: pytree whose leaves have a leading axis `K` (None: one context, passed as None).
      context_probs: `[K]` probabilities summing to 1 (None: uniform).
      context_sampler: optional `key -> context` for problems whose contexts are sampled; the
        model-based quantities (`leader_objective`, `exact`) need the finite `contexts`.
    """

    follower: Callable[[Any, Any], TabularMDP] = struct.field(pytree_node=False)
    leader_reward: Callable[[Any, Any], Array] = struct.field(pytree_node=False)
    leader_discount: Any = 0.99
    temperature: Any = 0.1
    contexts: Any = None
    context_probs: Any = None
    context_sampler: Callable[[Array], Any] | None = struct.field(pytree_node=False, default=None)

    def leader_mdp(self, x, context, follower_mdp: TabularMDP | None = None) -> TabularMDP:
        """The follower's MDP with the leader's reward and discount."""
        mdp = self.follower(x, context) if follower_mdp is None else follower_mdp
        return mdp.replace(rewards=self.leader_reward(x, context), discount=self.leader_discount)


def check_problem(problem: BilevelProblem, x) -> None:
    """Cheap checks valid under tracing (shapes) plus value checks of concrete fields.

    Raises `InvalidProblemError` naming the field. `validate_problem` also checks the MDPs.
    """
    if not isinstance(problem, BilevelProblem):
        raise InvalidProblemError(f"problem: expected a BilevelProblem, got {type(problem).__name__}")
    try:
        check_temperature(problem.temperature)
    except ValueError as err:
        raise InvalidProblemError(str(err)) from None
    check_unit_interval("leader_discount", problem.leader_discount, InvalidProblemError)
    check_contexts(problem, InvalidProblemError)
    context = jax.eval_shape(lambda: problem.context(0))
    try:
        mdp = jax.eval_shape(problem.follower, x, context)
    except InvalidMDPError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the field named
        raise InvalidProblemError(f"follower: calling follower(x, context) failed: {err}") from err
    if not isinstance(mdp, TabularMDP):
        raise InvalidProblemError(
            f"follower: expected a function returning a TabularMDP, got {type(mdp).__name__}")
    reward_shape = jax.eval_shape(problem.leader_reward, x, context).shape
    if tuple(reward_shape) != tuple(mdp.rewards.shape):
        raise InvalidProblemError(
            f"leader_reward: expected shape [S, A] = {tuple(mdp.rewards.shape)} (the follower's "
            f"rewards), got {tuple(reward_shape)}")


def validate_values(problem: BilevelProblem, x, *, skip_traced: bool = False) -> None:
    """`validate_mdp` of every context's follower MDP and finite leader rewards.

    `skip_traced`: return quietly when the follower's tables are traced (a follower closing over
    values being traced by an outer `jit`) instead of raising `InvalidMDPError`.
    """
    for k in range(problem.num_contexts):
        context = problem.context(k)
        mdp, rewards = problem.follower(x, context), problem.leader_reward(x, context)
        if skip_traced and not is_concrete((mdp, rewards)):
            return
        try:
            validate_mdp(mdp)
        except InvalidMDPError as err:
            raise InvalidMDPError(f"follower(x, contexts[{k}]): {err}") from None
        if not np.isfinite(np.asarray(rewards)).all():
            raise InvalidProblemError(f"leader_reward: expected finite values (context {k})")


def validate_problem(problem: BilevelProblem, x) -> BilevelProblem:
    """Eager full check: `check_problem` plus `validate_mdp` of every context's follower MDP."""
    check_problem(problem, x)
    validate_values(problem, x)
    return problem


def solve_follower(problem: BilevelProblem, x, context, **solver_options) -> tuple[TabularMDP, SoftVISolution]:
    """The follower MDP of one context and its soft-optimal solution (implicitly differentiable)."""
    mdp = problem.follower(x, context)
    return mdp, soft_value_iteration(mdp, problem.temperature, **solver_options)


def context_objective(problem: BilevelProblem, x, context, **solver_options) -> Array:
    """`f(x, xi)`: the leader's exact value at the start distribution for one context."""
    mdp, sol = solve_follower(problem, x, context, **solver_options)
    leader = policy_evaluation(problem.leader_mdp(x, context, mdp), sol.policy)
    return jnp.dot(mdp.initial, leader.v)


def map_contexts(fn: Callable[..., Any], problem: BilevelProblem, *tables):
    """`vmap` of `fn(context, *tables_k)` over the problem's `K` contexts.

    Each table is a pytree whose leaves have a leading axis `K` (or None). A context-free
    problem calls `fn(None, *tables_0)` once and returns its outputs with a leading axis of 1.
    """
    if problem.contexts is None:
        args = [None if t is None else jax.tree_util.tree_map(lambda a: a[0], t) for t in tables]
        return jax.tree_util.tree_map(lambda leaf: leaf[None], fn(None, *args))
    return jax.vmap(fn)(problem.contexts, *tables)


def leader_objective(problem: BilevelProblem, x, **solver_options) -> Array:
    """Exact `F(x) = sum_k p_k f(x, xi_k)`, differentiable in `x` (implicit differentiation).

    `solver_options` go to `soft_value_iteration` (e.g. `tol`, `linear_solver`).
    """
    check_problem(problem, x)
    values = map_contexts(lambda c: context_objective(problem, x, c, **solver_options), problem)
    return jnp.dot(problem.probs().astype(values.dtype), values)
