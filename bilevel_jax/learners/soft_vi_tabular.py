"""The exact soft-optimal follower of a tabular simulator: an oracle behind the learner interface.

For a `SimulatorProblem` whose environment is `bilevel_jax.sim.TabularEnv` (e.g.
`bj.sim.as_simulator(problem)`), the model is in the environment params, so the follower's
soft-optimal `Q*` is one `soft_value_iteration` solve (warm-started at the previous `Q`). No
sample is drawn: this is what "the exact policy handed in" means in the model-free estimators'
tests and benchmarks (their error is then the estimator's alone, not the learner's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from bilevel_jax.core.mdp import TabularMDP
from bilevel_jax.core.soft_vi import soft_value_iteration
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.learners.base import Learner, all_finite, register
from bilevel_jax.learners.soft_q_tabular import table_policy, table_value

Array = jax.Array


@struct.dataclass
class SoftVITabularState:
    q: Array            # [S, A] the soft-optimal Q of the last fit
    residual: Array     # sup-norm soft Bellman residual of the last fit
    temperature: Array  # lam (policy and value see only the state)


def _mdp_of(problem, x, context) -> TabularMDP:
    from bilevel_jax.sim.tabular import TabularEnv, TabularEnvParams  # noqa: PLC0415 - gymnax
    params = problem.env_params(x, context)
    if not isinstance(problem.env, TabularEnv) or not isinstance(params, TabularEnvParams):
        raise InvalidArgumentError(
            "learner: soft_vi_tabular needs a TabularEnv simulator (bj.sim.as_simulator), got "
            f"{type(problem.env).__name__}; use a sample-based learner (soft_q_tabular, soft_dqn)")
    if problem.max_episode_steps is not None:
        raise InvalidArgumentError(
            "learner: soft_vi_tabular solves the infinite-horizon model; the problem has "
            f"max_episode_steps={problem.max_episode_steps} (expected None)")
    return TabularMDP(transitions=params.transitions, rewards=params.rewards,
                      discount=problem.follower_discount(x, context), initial=params.initial,
                      terminal=params.terminal)


def soft_vi_tabular(*, tol: float | None = None, reset_each_step: bool = False) -> Learner:
    """Soft value iteration on the model read from a `TabularEnv`'s params (an exact oracle).

    Args:
      tol: solver tolerance (None: the solver's default, near machine precision).
      reset_each_step: re-initialize (solve from zeros) before every fit.
    """
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise InvalidArgumentError(f"tol: expected a number > 0 or None, got {tol!r}")

    def init(problem, x, context, key):
        del key
        mdp = jax.eval_shape(lambda: _mdp_of(problem, x, context))
        return SoftVITabularState(q=jnp.zeros(mdp.rewards.shape, mdp.rewards.dtype),
                                  residual=jnp.asarray(jnp.inf, mdp.rewards.dtype),
                                  temperature=jnp.asarray(problem.temperature, mdp.rewards.dtype))

    def update(problem, x, context, state, key):
        del key
        mdp = _mdp_of(problem, lax.stop_gradient(x), context)
        sol = soft_value_iteration(mdp, problem.temperature, init_q=state.q, tol=tol,
                                   validate=False)
        q = lax.stop_gradient(sol.q)
        loss = jnp.asarray(sol.residual, q.dtype)
        return (state.replace(q=q, residual=loss),
                {"loss": loss, "finite": all_finite(loss, q)})

    return Learner(init=init, update=update, policy=table_policy, value=table_value,
                   reset_each_step=reset_each_step)


register("soft_vi_tabular", soft_vi_tabular)
