"""Vectorized rollouts of a policy in a simulator problem: one `lax.scan` over time.

`N` environments step side by side; an environment whose episode ended (terminated by the
environment, or cut by a time limit) is reset in the same step, so the next step starts a new
episode at in-episode time 0. Rewards are evaluated after the loop, in one vectorized pass of
`follower_reward` / `leader_reward` over all `T * N` transitions (so what depends on `x` alone,
e.g. building a tabular model, is computed once, not once per step).

Everything here is a pure function, jittable and vmappable over keys, `x` and contexts.
Learners use `reset` / `env_step` / `step_rewards` for their own interaction with the world, so
there is one rollout, not a copy per learner.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.sim import spaces
from bilevel_jax.sim.problem import SimulatorProblem, Step

Array = jax.Array
Policy = Callable[[Any], Any]  # one observation -> logits (`[n]`, or a tuple of heads)


@struct.dataclass
class RolloutCarry:
    """Where `N` environments stand: env states, current observations, in-episode times `[N]`."""

    env_state: Any
    obs: Any
    time: Array


@struct.dataclass
class Trajectory(Step):
    """`[T, N]` transitions of a rollout (leading axes time, environment): the `Step` fields, and

    `follower_reward`, `leader_reward`: the problem's rewards at `x` (`reward` is the
    environment's own). `state` / `next_state` hold the env states (None unless `keep_states`).
    `final` is where the environments stand after the last step (pass it as `start` to go on).
    """

    follower_reward: Array
    leader_reward: Array
    final: RolloutCarry

    def steps(self) -> Step:
        """The transitions as a plain `Step` pytree with `[T, N]` leading axes."""
        return Step(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Step)})


def reset(key: Array, problem: SimulatorProblem, params, num_envs: int) -> RolloutCarry:
    """`N` fresh episodes."""
    obs, env_state = jax.vmap(problem.env.reset_env, (0, None))(
        jax.random.split(key, num_envs), params)
    return RolloutCarry(env_state=env_state, obs=obs, time=jnp.zeros((num_envs,), jnp.int32))


def _env_truncated(env, state, params) -> Array:
    if hasattr(state, "time") and hasattr(params, "max_steps_in_episode"):
        return env.is_truncated(state, params)
    return jnp.zeros((), bool)


def env_step(key: Array, problem: SimulatorProblem, params, policy: Policy,
             carry: RolloutCarry) -> tuple[RolloutCarry, Step]:
    """One step of all `N` environments under `policy`, with auto-reset.

    Returns the new carry and the `[N]` transitions (`next_obs` before any reset).
    """
    env = problem.env
    num_envs = carry.time.shape[0]
    k_act, k_step, k_reset = jax.random.split(key, 3)
    logits = jax.vmap(policy)(carry.obs)
    action = spaces.sample(k_act, logits)
    next_obs, next_state, reward, terminated, _ = jax.vmap(env.step_env, (0, 0, 0, None))(
        jax.random.split(k_step, num_envs), carry.env_state, action, params)
    terminated = jnp.asarray(terminated, bool)
    truncated = jax.vmap(_env_truncated, (None, 0, None))(env, next_state, params)
    if problem.max_episode_steps is not None:
        truncated = truncated | (carry.time + 1 >= problem.max_episode_steps)
    truncated = truncated & ~terminated
    done = terminated | truncated
    reset_obs, reset_state = jax.vmap(env.reset_env, (0, None))(
        jax.random.split(k_reset, num_envs), params)

    def select(new, old):
        mask = done.reshape(done.shape + (1,) * (new.ndim - 1))
        return jnp.where(mask, new, old)

    step = Step(obs=carry.obs, action=action, next_obs=next_obs,
                reward=jnp.asarray(reward), terminated=terminated, truncated=truncated,
                done=done, time=carry.time, state=carry.env_state, next_state=next_state)
    new_carry = RolloutCarry(
        env_state=jax.tree_util.tree_map(select, reset_state, next_state),
        obs=jax.tree_util.tree_map(select, reset_obs, next_obs),
        time=jnp.where(done, 0, carry.time + 1))
    return new_carry, step


def _flatten(steps: Step) -> tuple[Step, tuple[int, ...]]:
    """`steps` with its leading axes (those of `time`) folded into one, and those axes."""
    batch_shape = steps.time.shape
    flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[len(batch_shape):]), steps)
    return flat, batch_shape


def step_rewards(problem: SimulatorProblem, x, context, steps: Step) -> tuple[Array, Array]:
    """`(follower_reward, leader_reward)` at every transition of `steps` (any leading axes)."""
    flat, batch_shape = _flatten(steps)
    follower = jax.vmap(problem.follower_reward, (None, None, 0))(x, context, flat)
    leader = jax.vmap(problem.leader_reward, (None, None, 0))(x, context, flat)
    return follower.reshape(batch_shape), leader.reshape(batch_shape)


def transition_log_probs(problem: SimulatorProblem, x, context, steps: Step) -> Array:
    """`log p_x(s'|s, a)` at every transition of `steps` (needs `transition_log_prob`)."""
    if problem.transition_log_prob is None:
        raise InvalidArgumentError(
            "transition_log_prob: this method needs it (x enters the dynamics), got None")
    flat, batch_shape = _flatten(steps)
    logp = jax.vmap(problem.transition_log_prob, (None, None, 0, 0, 0))(
        x, context, flat.state, flat.action, flat.next_state)
    return logp.reshape(batch_shape)


def rollout(key: Array, problem: SimulatorProblem, x, context, policy: Policy, num_envs: int,
            num_steps: int, *, start: RolloutCarry | None = None,
            keep_states: bool = False) -> Trajectory:
    """Rolls out `policy` in `num_envs` environments for `num_steps` steps (auto-reset).

    Args:
      key: PRNG key.
      problem: the simulator problem; the world is `problem.env_params(x, context)`.
      policy: `obs -> logits` for one observation (`[n]`, or a tuple of heads).
      num_envs, num_steps: `N`, `T` (static).
      start: a previous trajectory's `final` to continue from (None: fresh episodes).
      keep_states: keep the env states before and after each step in the trajectory.

    Returns:
      a `Trajectory` with `[T, N]` leading axes.
    """
    for name, value in (("num_envs", num_envs), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name}: expected an int >= 1, got {value!r}")
    params = problem.env_params(x, context)
    k_reset, k_steps = jax.random.split(key)
    carry = reset(k_reset, problem, params, num_envs) if start is None else start

    def body(carry, k):
        return env_step(k, problem, params, policy, carry)

    final, steps = lax.scan(body, carry, jax.random.split(k_steps, num_steps))
    follower_reward, leader_reward = step_rewards(problem, lax.stop_gradient(x), context, steps)
    if not keep_states:
        steps = steps.replace(state=None, next_state=None)
    return Trajectory(**{f.name: getattr(steps, f.name) for f in dataclasses.fields(Step)},
                      follower_reward=follower_reward, leader_reward=leader_reward, final=final)


def discounted_returns(rewards: Array, done: Array, discount, bootstrap: Array | None = None) -> Array:
    """Returns-to-go within episodes, `G_t = r_t + gamma (1 - done_t) G_{t+1}`, `[T, ...]`.

    `bootstrap` (`[...]`): the value after the last step (0 when None); trajectories cut by the
    window's end are otherwise summed only up to it.
    """
    tail = jnp.zeros_like(rewards[0]) if bootstrap is None else bootstrap

    def body(g, inp):
        r, d = inp
        g = r + discount * (1.0 - d) * g
        return g, g

    _, returns = lax.scan(body, tail, (rewards, done.astype(rewards.dtype)), reverse=True)
    return returns
