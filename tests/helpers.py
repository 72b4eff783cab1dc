"""Shared test helpers: conversion of reference MDPs to `bj.TabularMDP`, module-level jitted
entry points (so that compilations are cached across test files), and comparison helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bilevel_jax as bj
from reference import RefMDP

# jit caches are keyed on the function object: defining these once keeps compilations few.
soft_vi = jax.jit(bj.soft_value_iteration, static_argnames=(
    "tol", "max_iters", "num_sweeps", "differentiation", "linear_solver"))
value_iteration = jax.jit(bj.value_iteration, static_argnames=(
    "tol", "max_iters", "num_sweeps", "differentiation", "linear_solver"))
visitation = jax.jit(bj.visitation, static_argnames=("linear_solver",))


def to_mdp(ref: RefMDP, *, sparse: bool = False, dtype=jnp.float64, discount=None) -> bj.TabularMDP:
    """The `bj.TabularMDP` holding the same numbers as a reference MDP."""
    if sparse:
        assert ref.indices is not None, "generate the reference MDP with branching=b"
        transitions = bj.SparseTransitions(indices=jnp.asarray(ref.indices, jnp.int32),
                                           probs=jnp.asarray(ref.probs, dtype))
    else:
        transitions = jnp.asarray(ref.P, dtype)
    terminal = None if ref.terminal is None else jnp.asarray(ref.terminal, bool)
    return bj.TabularMDP(transitions=transitions, rewards=jnp.asarray(ref.rewards, dtype),
                         discount=ref.discount if discount is None else discount,
                         initial=jnp.asarray(ref.initial, dtype), terminal=terminal)


def assert_rel_close(actual, expected, rtol=1e-6, atol_scale=1e-9, err_msg=""):
    """Elementwise `|actual - expected| <= rtol |expected| + atol_scale * max |expected|`.

    The small absolute floor (relative to the array's scale) only matters for entries that are
    (nearly) zero; everything else is compared to relative `rtol`.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    assert np.all(np.isfinite(actual)), f"non-finite values: {actual} {err_msg}"
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol_scale * scale,
                               err_msg=err_msg)


def numpy_mdp(mdp: bj.TabularMDP):
    """`(P [S, A, S], r [S, A], gamma, mu [S], terminal [S] or None)` in NumPy float64."""
    P = mdp.transitions.todense() if mdp.is_sparse else mdp.transitions
    terminal = None if mdp.terminal is None else np.asarray(mdp.terminal, bool)
    return (np.asarray(P, np.float64), np.asarray(mdp.rewards, np.float64), float(mdp.discount),
            np.asarray(mdp.initial, np.float64), terminal)


def soft_optimal_kl(mdp: bj.TabularMDP, temperature: float, logits) -> float:
    """`sum_s d*(s) KL(pi*(.|s) || pi(.|s))` with `d*` the soft-optimal policy's discounted
    visitation normalized to a distribution and `pi = softmax(logits [S, A])`; everything from
    the NumPy float64 reference."""
    from reference import logsumexp, soft_value_iteration, visitation as ref_visitation
    P, r, gamma, mu, terminal = numpy_mdp(mdp)
    _, _, pi_star = soft_value_iteration(P, r, gamma, temperature, terminal, tol=1e-10)
    d_star = ref_visitation(P, gamma, pi_star, mu, terminal)
    logits = np.asarray(logits, np.float64)
    log_pi = logits - logsumexp(logits)[:, None]
    kl = np.sum(pi_star * (np.log(pi_star) - log_pi), axis=-1)
    return float(np.dot(d_star, kl) / d_star.sum())


def switchable_transitions_problem(seed: int = 0, **options):
    """A random problem (x in the rewards and in the transitions' logits) whose context says
    whether the transitions follow x or stay at x0: `(problem, x0, bj.as_simulator(problem))`.
    The two cases of a test are then the same functions with different context arrays
    (`contexts["x_in_transitions"]`), so each jitted batch compiles once for both."""
    from bilevel_jax.envs.random_mdp import random_bilevel_problem

    base, x0 = random_bilevel_problem(seed, num_contexts=1, transition_dependent=True, **options)

    def follower(x, context):
        mdp = base.follower(x, context)
        fixed = base.follower(x0, context).transitions
        return mdp.replace(transitions=jnp.where(context["x_in_transitions"], mdp.transitions,
                                                 fixed))

    problem = bj.BilevelProblem(follower=follower, leader_reward=base.leader_reward,
                                leader_discount=base.leader_discount, temperature=base.temperature,
                                contexts=dict(base.contexts, x_in_transitions=jnp.zeros(1, bool)))
    return problem, x0, bj.sim.as_simulator(problem)
