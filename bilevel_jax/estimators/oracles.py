"""Follower oracles for HPGD (SPEC 5): how the follower's policy is obtained at each outer step.

An oracle is `FollowerOracle(solve)` with
`solve(mdp, temperature, q_prev, key) -> (q, info)`; `q [S, A]` defines the follower's policy
`softmax(q / lam)` and value `lam logsumexp(q / lam)`, and `q_prev` (the previous outer step's
table for this context) is the warm start. Oracles are chosen by name in `hpgd(oracle=...)`:

* `"exact"`: soft value iteration to tolerance (warm-started).
* `"warm"`: `oracle_sweeps` sweeps from the previous table (the leader steers follower training,
  as AMD assumes).
* `"soft_q_learning"`: model-free soft Q-learning on `oracle_envs x oracle_steps` transitions
  sampled from the MDP (used as a simulator only), behaviour policy `softmax(q_prev / lam)`.
* `"multilevel"`: randomly truncated multilevel sweeps, handled by `hpgd` itself since it
  combines estimates at two levels.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
from jax import lax

from bilevel_jax.core.rollout import sample_trajectories
from bilevel_jax.core.soft_vi import soft_bellman_operator, soft_greedy_policy, soft_value, soft_value_iteration
from bilevel_jax.errors import InvalidArgumentError

ORACLES = ("exact", "warm", "soft_q_learning", "multilevel")


class FollowerOracle(NamedTuple):
    solve: Callable


def dynamic_sweeps(mdp, temperature, q, num_sweeps):
    """`num_sweeps` (a traced int allowed) soft Bellman sweeps from `q`."""
    return lax.fori_loop(0, num_sweeps, lambda _, q: soft_bellman_operator(q, mdp, temperature), q)


def make_oracle(name: str, *, oracle_sweeps: int = 10, oracle_envs: int = 16,
                oracle_steps: int = 200, learning_rate: float = 0.5) -> FollowerOracle:
    if name not in ORACLES:
        raise InvalidArgumentError(f"oracle: expected one of {ORACLES}, got {name!r}")

    if name == "exact":
        def solve(mdp, lam, q_prev, key):
            sol = soft_value_iteration(mdp, lam, init_q=q_prev)
            return sol.q, {"sweeps": sol.num_iters, "samples": jnp.zeros((), jnp.int32)}
    elif name in ("warm", "multilevel"):
        def solve(mdp, lam, q_prev, key):
            q = soft_value_iteration(mdp, lam, init_q=q_prev, num_sweeps=oracle_sweeps).q
            return q, {"sweeps": jnp.asarray(oracle_sweeps, jnp.int32),
                       "samples": jnp.zeros((), jnp.int32)}
    else:
        def solve(mdp, lam, q_prev, key):
            traj = sample_trajectories(key, mdp, soft_greedy_policy(q_prev, lam),
                                       num_envs=oracle_envs, num_steps=oracle_steps)
            keep = mdp.continuation()
            gamma = mdp.discount

            def td_step(q, t):
                s, a, r = traj.states[t], traj.actions[t], traj.rewards[t]
                target = r + gamma * keep[s] * soft_value(q, lam)[traj.next_states[t]]
                # Average the TD errors of environments that share an (s, a) pair this step.
                counts = jnp.zeros_like(q).at[s, a].add(1.0)
                errors = jnp.zeros_like(q).at[s, a].add(target - q[s, a])
                return q + learning_rate * errors / jnp.maximum(counts, 1.0), None

            q, _ = lax.scan(td_step, q_prev, jnp.arange(oracle_steps))
            return q, {"sweeps": jnp.zeros((), jnp.int32),
                       "samples": jnp.asarray(oracle_envs * oracle_steps, jnp.int32)}

    return FollowerOracle(solve)
