"""Batched trajectory sampling in a tabular MDP: one `lax.scan` over time, `num_envs` wide.

Environments auto-reset: after acting in a terminal state (SPEC 1: the reward is earned and the
episode ends) or after `max_episode_steps` steps, the next state is drawn from `initial` and the
in-episode time restarts at 0. Actions and successors are drawn by inverse CDF over the `B`
stored successors (a linear scan for small `B`, a binary search for dense rows), never by a
Gumbel draw over all `S` states.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from bilevel_jax.core.mdp import SparseTransitions, TabularMDP, check_shapes
from bilevel_jax.errors import InvalidArgumentError

Array = jax.Array

_LINEAR_SCAN_MAX = 16


@struct.dataclass
class Trajectory:
    """`num_steps x num_envs` transitions; every field is `[T, N]`.

    Attributes:
      states: state acted in at step t.
      actions: action taken.
      rewards: `r(s_t, a_t)` of the MDP.
      next_states: the sampled successor (before any reset; meaningless where `terminated`).
      dones: the episode ended after this step (terminal state or time limit).
      terminated: the episode ended because `s_t` is terminal (no successor follows).
      times: in-episode time of step t (0 at each episode's first step).
    """

    states: Array
    actions: Array
    rewards: Array
    next_states: Array
    dones: Array
    terminated: Array
    times: Array


def _inverse_cdf(cdf: Array, rows: Array, u: Array) -> Array:
    """For each `n`, the first `k` with `cdf[rows[n], k] > u[n] * cdf[rows[n], -1]`.

    `cdf` is `[R, B]`, non-decreasing along `B`. Entries of zero probability are never chosen.
    """
    width = cdf.shape[-1]
    target = u * cdf[rows, width - 1]
    if width <= _LINEAR_SCAN_MAX:
        return jnp.sum(cdf[rows] <= target[:, None], axis=-1).astype(jnp.int32)
    lo = jnp.zeros(rows.shape, jnp.int32)
    hi = jnp.full(rows.shape, width - 1, jnp.int32)
    for _ in range(math.ceil(math.log2(width))):
        mid = (lo + hi) // 2
        go_right = cdf[rows, mid] <= target
        lo = jnp.where(go_right, mid + 1, lo)
        hi = jnp.where(go_right, hi, mid)
    return lo


def sample_trajectories(key: Array, mdp: TabularMDP, policy: Array, *, num_envs: int,
                        num_steps: int, max_episode_steps: int | None = None,
                        start_states: Array | None = None,
                        start_actions: Array | None = None) -> Trajectory:
    """Rolls out `policy` in `num_envs` parallel copies of `mdp` for `num_steps` steps.

    Args:
      key: PRNG key.
      mdp: a `TabularMDP` (dense or sparse transitions).
      policy: `[S, A]` action probabilities.
      num_envs: parallel environments `N` (static).
      num_steps: steps per environment `T` (static).
      max_episode_steps: time limit (static); `None` for none.
      start_states: optional int `[N]` first states (default: drawn from `mdp.initial`); later
        episodes always start from `mdp.initial`.
      start_actions: optional int `[N]` first actions (default: drawn from `policy`).

    Returns:
      `Trajectory` with `[T, N]` fields.
    """
    check_shapes(mdp)
    for name, value in (("num_envs", num_envs), ("num_steps", num_steps)):
        if not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name}: expected an int >= 1, got {value!r}")
    if max_episode_steps is not None and (not isinstance(max_episode_steps, int)
                                          or max_episode_steps < 1):
        raise InvalidArgumentError(
            f"max_episode_steps: expected an int >= 1 or None, got {max_episode_steps!r}")
    if tuple(policy.shape) != tuple(mdp.rewards.shape):
        raise InvalidArgumentError(
            f"policy: expected shape [S, A] = {tuple(mdp.rewards.shape)}, got {tuple(policy.shape)}")

    num_states, num_actions = mdp.rewards.shape
    policy_cdf = jnp.cumsum(policy, axis=-1)
    initial_cdf = jnp.cumsum(mdp.initial)[None, :]
    terminal = (jnp.zeros(num_states, bool) if mdp.terminal is None
                else jnp.asarray(mdp.terminal, bool))
    zeros = jnp.zeros(num_envs, jnp.int32)
    sparse = isinstance(mdp.transitions, SparseTransitions)
    if sparse:
        # Joint inverse CDF over the A x B (action, stored successor) pairs of each state: one
        # uniform per step instead of two, the same distribution.
        branching = mdp.transitions.branching
        joint = policy[:, :, None] * mdp.transitions.probs
        joint_cdf = jnp.cumsum(joint.reshape(num_states, num_actions * branching), axis=-1)
        successors = mdp.transitions.indices.reshape(num_states, num_actions * branching)
    else:
        transition_cdf = jnp.cumsum(mdp.transitions, axis=-1).reshape(num_states * num_actions, -1)

    def draw_initial(u):
        return _inverse_cdf(initial_cdf, jnp.zeros(u.shape, jnp.int32).reshape(-1), u.reshape(-1)
                            ).reshape(u.shape)

    for name, value in (("start_states", start_states), ("start_actions", start_actions)):
        if value is not None and tuple(value.shape) != (num_envs,):
            raise InvalidArgumentError(
                f"{name}: expected shape [num_envs] = [{num_envs}], got {tuple(value.shape)}")
    key_start, key_steps, key_reset = jax.random.split(key, 3)
    start = (draw_initial(jax.random.uniform(key_start, (num_envs,))) if start_states is None
             else jnp.asarray(start_states, jnp.int32))
    uniforms = jax.random.uniform(key_steps, (num_steps, 1 if sparse else 2, num_envs))
    # Reset states are drawn up front (vectorized); a deterministic start needs no randomness.
    deterministic_start = jnp.max(mdp.initial) >= 1.0
    reset_states = lax.cond(
        deterministic_start,
        lambda: jnp.full((num_steps, num_envs), jnp.argmax(mdp.initial), jnp.int32),
        lambda: draw_initial(jax.random.uniform(key_reset, (num_steps, num_envs))))
    forced = jnp.zeros(num_steps, bool).at[0].set(start_actions is not None)
    first_actions = zeros if start_actions is None else jnp.asarray(start_actions, jnp.int32)

    def sample_sparse(state, u, force):
        pair = _inverse_cdf(joint_cdf, state, u[0])
        if start_actions is not None:
            # A forced first action: its successor from that action's row of the kernel.
            k = _inverse_cdf(mdp.transitions.probs.reshape(num_states * num_actions, branching)
                             .cumsum(-1), state * num_actions + first_actions, u[0])
            pair = jnp.where(force, first_actions * branching + k, pair)
        return pair // branching, successors[state, pair]

    def sample_dense(state, u, force):
        action = jnp.where(force, first_actions, _inverse_cdf(policy_cdf, state, u[0]))
        return action, _inverse_cdf(transition_cdf, state * num_actions + action, u[1])

    def step(carry, inputs):
        state, time = carry
        u, force, reset_state = inputs
        action, next_state = (sample_sparse if sparse else sample_dense)(state, u, force)
        terminated = terminal[state]
        done = terminated
        if max_episode_steps is not None:
            done = done | (time + 1 >= max_episode_steps)
        out = (state, action, mdp.rewards[state, action], next_state, done, terminated, time)
        carry = (jnp.where(done, reset_state, next_state), jnp.where(done, 0, time + 1))
        return carry, out

    _, out = lax.scan(step, (start, zeros), (uniforms, forced, reset_states))
    states, actions, rewards, next_states, dones, terminated, times = out
    return Trajectory(states=states, actions=actions, rewards=rewards, next_states=next_states,
                      dones=dones, terminated=terminated, times=times)
