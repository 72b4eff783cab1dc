"""Derivatives of the follower's model in `x`, shared by the model-based and sampled estimators.

`x` is any pytree; internally estimators work with its flat vector (`ravel_pytree`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax.core.mdp import SparseTransitions, expected_next


def flat_problem_fns(problem, x):
    """`(x_flat, unravel, follower_flat, leader_flat)` with flat-vector versions of the maps."""
    x_flat, unravel = ravel_pytree(x)

    def follower_flat(xf, context):
        return problem.follower(unravel(xf), context)

    def leader_flat(xf, context):
        return problem.leader_reward(unravel(xf), context)

    return x_flat, unravel, follower_flat, leader_flat


def jac_rewards(follower_flat, x_flat, context):
    """`d_x r` as `[S, A, n]`."""
    return jax.jacfwd(lambda xf: follower_flat(xf, context).rewards)(x_flat)


def jac_expected_next(follower_flat, x_flat, context, values):
    """`sum_s' d_x P(s'|s, a) values(s')` as `[S, A, n]` (zeros, cheaply, when P is constant)."""
    return jax.jacfwd(lambda xf: expected_next(follower_flat(xf, context).transitions,
                                               values))(x_flat)


def jac_initial_dot(follower_flat, x_flat, context, values):
    """`sum_s d_x mu(s) values(s)` as `[n]`."""
    return jax.grad(lambda xf: jnp.dot(follower_flat(xf, context).initial, values))(x_flat)


def transition_cotangent(transitions, states, actions, next_states, weights):
    """Cotangent on the transition parameters for `sum_i w_i log P(s'_i | s_i, a_i)`.

    Dense: `[S, A, S]` with `w_i / P(s'_i|s_i, a_i)` scattered; sparse: `[S, A, B]` on `probs`,
    the same spread over every stored successor equal to `s'_i` (repeats share the probability).
    """
    if isinstance(transitions, SparseTransitions):
        rows_idx = transitions.indices[states, actions]                # [N, B]
        match = (rows_idx == next_states[:, None]).astype(weights.dtype)
        prob = jnp.sum(transitions.probs[states, actions] * match, axis=-1)
        scale = jnp.where(prob > 0, weights / jnp.where(prob > 0, prob, 1.0), 0.0)
        cot = jnp.zeros(transitions.probs.shape, weights.dtype)
        return cot.at[states, actions].add(match * scale[:, None])
    prob = transitions[states, actions, next_states]
    scale = jnp.where(prob > 0, weights / jnp.where(prob > 0, prob, 1.0), 0.0)
    return jnp.zeros(transitions.shape, weights.dtype).at[states, actions, next_states].add(scale)


def _transition_params(transitions):
    return transitions.probs if isinstance(transitions, SparseTransitions) else transitions


def model_vjp(follower_flat, leader_flat, x_flat, context, *, rewards=None, transitions=None,
              initial=None, leader_reward=None):
    """`sum` of cotangent . derivative over the follower's model and the leader's reward, `[n]`.

    Each keyword is a cotangent (or None for zero) for: follower `rewards [S, A]`, transition
    parameters (`[S, A, S]` dense, `[S, A, B]` sparse `probs`), `initial [S]`, and the leader's
    reward `[S, A]`. One reverse pass through the user's model functions.
    """
    def model(xf):
        mdp = follower_flat(xf, context)
        return (mdp.rewards, _transition_params(mdp.transitions), mdp.initial,
                leader_flat(xf, context))

    primals, vjp_fn = jax.vjp(model, x_flat)
    cotangents = tuple(jnp.zeros_like(p) if c is None else c.astype(p.dtype)
                       for p, c in zip(primals, (rewards, transitions, initial, leader_reward)))
    (grad,) = vjp_fn(cotangents)
    return grad
