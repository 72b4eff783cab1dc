"""Bilevel problems whose followers act in a simulator (SPEC 9).

The follower acts in a gymnax environment whose params depend on the leader's `x` and the
context `xi`; its reward and the leader's are functions of `x`, `xi` and the transition, and
`log p_x(s' | s, a)` (optional) gives the score terms where `x` enters the dynamics. No tabular
model is needed: every quantity is an expectation over rollouts (`bilevel_jax.sim.rollout`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments.environment import Environment

from bilevel_jax.checks import check_unit_interval, is_concrete
from bilevel_jax.contexts import ContextsMixin, check_contexts
from bilevel_jax.errors import BilevelJaxError
from bilevel_jax.sim import spaces

Array = jax.Array


class InvalidSimulatorError(BilevelJaxError, ValueError):
    """A `SimulatorProblem` is malformed; the message names the field and what was expected."""


@struct.dataclass
class Step:
    """One transition, as the reward functions see it (leaves without batch axes).

    Attributes:
      obs, next_obs: observations before and after (`next_obs` before any auto-reset).
      action: int `[]` (`Discrete`) or `[D]` (tuple of `Discrete`).
      reward: the environment's own reward.
      terminated: the episode ended in the environment (no bootstrap after it).
      truncated: the episode was cut by a time limit (bootstrap from `next_obs`).
      done: `terminated | truncated`.
      time: the in-episode time of `obs` (0 at an episode's first step).
      state, next_state: the environment states before and after (pytrees).
    """

    obs: Any
    action: Array
    next_obs: Any
    reward: Array
    terminated: Array
    truncated: Array
    done: Array
    time: Array
    state: Any
    next_state: Any


@struct.dataclass
class SimulatorProblem(ContextsMixin):
    """A leader's problem over followers that best-respond in a simulator.

    Attributes:
      env: a gymnax `Environment` (`reset_env(key, params)`, `step_env(key, state, action,
        params)`); auto-reset is done by `bilevel_jax.sim.rollout`.
      env_params: `(x, context) -> EnvParams`: how `x` and the context configure the world.
      follower_reward: `(x, context, step: Step) -> scalar`.
      leader_reward: `(x, context, step: Step) -> scalar`.
      transition_log_prob: optional `(x, context, state, action, next_state) -> scalar`, the
        log-density of the dynamics where `x` enters them (for score terms).
      temperature: the followers' entropy temperature `lam > 0`.
      discount: the follower's `gamma` in `[0, 1)`; None reads `env_params(x, context).discount`.
      leader_discount: `gammabar` in `[0, 1)`.
      contexts: pytree whose leaves have a leading axis `K` (None: one context, passed as None).
      context_probs: `[K]` probabilities (None: uniform).
      context_sampler: optional `key -> context` (instead of finite contexts).
      max_episode_steps: time limit of the simulated episodes (None: the environment's own).
      reference: optional tabular `BilevelProblem` modelling the same problem (`as_simulator`
        sets it to its source; `tax_design_problem` to a binned twin). Only for reporting the
        exact `F(x)` (`reference_model`); no estimator reads it. It is evaluated at this
        problem's `temperature` and `leader_discount`, so sweeping those keeps them in step.
    """

    env: Environment = struct.field(pytree_node=False)
    env_params: Callable[[Any, Any], Any] = struct.field(pytree_node=False)
    follower_reward: Callable[[Any, Any, Step], Array] = struct.field(pytree_node=False)
    leader_reward: Callable[[Any, Any, Step], Array] = struct.field(pytree_node=False)
    transition_log_prob: Callable[..., Array] | None = struct.field(pytree_node=False, default=None)
    temperature: Any = 0.1
    discount: Any = None
    leader_discount: Any = 0.99
    contexts: Any = None
    context_probs: Any = None
    context_sampler: Callable[[Array], Any] | None = struct.field(pytree_node=False, default=None)
    max_episode_steps: int | None = struct.field(pytree_node=False, default=None)
    reference: Any = None

    def follower_discount(self, x, context) -> Any:
        if self.discount is not None:
            return self.discount
        return self.env_params(x, context).discount

    def action_space(self, params):
        return self.env.action_space(params)

    def action_heads(self, params) -> tuple[int, ...]:
        heads = spaces.action_heads(self.env.action_space(params))
        if heads is None:
            raise InvalidSimulatorError(
                "env: expected a Discrete or Tuple-of-Discrete action space, got "
                f"{type(self.env.action_space(params)).__name__}")
        return heads

    def is_factorized(self, params) -> bool:
        return spaces.is_factorized(self.env.action_space(params))


def reference_model(problem: SimulatorProblem):
    """The tabular model to evaluate the exact `F(x)` of `problem` on: `problem.reference` at the
    simulator's `temperature` and `leader_discount`, or None when it has none."""
    if problem.reference is None:
        return None
    return problem.reference.replace(temperature=problem.temperature,
                                     leader_discount=problem.leader_discount)


def check_simulator(problem: SimulatorProblem) -> None:
    """Cheap checks (valid under tracing): types, temperature, discounts, contexts."""
    if not isinstance(problem, SimulatorProblem):
        raise InvalidSimulatorError(
            f"problem: expected a SimulatorProblem, got {type(problem).__name__}")
    if not isinstance(problem.env, Environment):
        raise InvalidSimulatorError(
            "env: expected a gymnax Environment (gymnax.environments.environment.Environment), "
            f"got {type(problem.env).__name__}")
    if is_concrete(problem.temperature):
        lam = np.asarray(problem.temperature, dtype=np.float64)
        if lam.shape != () or not np.isfinite(lam) or lam <= 0:
            raise InvalidSimulatorError(
                f"temperature: expected a finite scalar > 0, got {problem.temperature!r}")
    check_unit_interval("discount", problem.discount, InvalidSimulatorError)
    check_unit_interval("leader_discount", problem.leader_discount, InvalidSimulatorError)
    steps = problem.max_episode_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InvalidSimulatorError(f"max_episode_steps: expected an int >= 1 or None, got {steps!r}")
    check_contexts(problem, InvalidSimulatorError)
    if problem.reference is not None:
        from bilevel_jax.problem import BilevelProblem  # noqa: PLC0415 - avoids an import cycle

        if not isinstance(problem.reference, BilevelProblem):
            raise InvalidSimulatorError(
                "reference: expected a tabular BilevelProblem or None, got "
                f"{type(problem.reference).__name__}")


def _probe_context(problem: SimulatorProblem, key):
    if problem.contexts is None and problem.context_sampler is not None:
        return problem.context_sampler(key)
    return problem.context(0)


def _call(name: str, fn, *args):
    try:
        return fn(*args)
    except BilevelJaxError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the field named
        raise InvalidSimulatorError(f"{name}: calling it failed: {type(err).__name__}: {err}") from err


def _finite_scalar(name: str, value) -> None:
    arr = np.asarray(value)
    if arr.shape != () or not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr):
        raise InvalidSimulatorError(
            f"{name}: expected a finite scalar, got {arr.dtype} of shape {arr.shape} "
            f"(value {arr if arr.size <= 4 else '...'})")


def validate_simulator(problem: SimulatorProblem, x, key: Array | None = None) -> SimulatorProblem:
    """Eager check: `check_simulator`, then one probed transition under a uniform action.

    Raises `InvalidSimulatorError` naming the field: env not a gymnax environment, rewards or
    log-densities that are not finite scalars, discounts outside `[0, 1)`, temperature <= 0,
    contexts whose leaves disagree in their leading axis, an action space that is not discrete.
    """
    check_simulator(problem)
    key = jax.random.key(0) if key is None else key
    k_context, k_reset, k_action, k_step = jax.random.split(key, 4)
    context = _probe_context(problem, k_context)
    params = _call("env_params", problem.env_params, x, context)
    check_unit_interval("discount", _call("discount", problem.follower_discount, x, context),
                        InvalidSimulatorError)
    heads = problem.action_heads(params)
    obs, state = _call("env.reset_env", problem.env.reset_env, k_reset, params)
    if problem.is_factorized(params):
        action = spaces.sample(k_action, tuple(jnp.zeros(n) for n in heads))
    else:
        action = jax.random.randint(k_action, (), 0, heads[0])
    next_obs, next_state, reward, terminated, _ = _call(
        "env.step_env", problem.env.step_env, k_step, state, action, params)
    step = Step(obs=obs, action=action, next_obs=next_obs, reward=reward,
                terminated=jnp.asarray(terminated), truncated=jnp.asarray(False),
                done=jnp.asarray(terminated), time=jnp.zeros((), jnp.int32),
                state=state, next_state=next_state)
    _finite_scalar("follower_reward", _call("follower_reward", problem.follower_reward, x, context, step))
    _finite_scalar("leader_reward", _call("leader_reward", problem.leader_reward, x, context, step))
    if problem.transition_log_prob is not None:
        _finite_scalar("transition_log_prob", _call(
            "transition_log_prob", problem.transition_log_prob, x, context, state, action, next_state))
    return problem
