"""Leader algorithms as explicit-state pure functions.

An algorithm is `Algorithm(init, step)`:

    state = algorithm.init(problem, x0, key)          # a pytree holding "x", "key", "step", ...
    state, metrics = algorithm.step(problem, state)   # one outer iteration; metrics: dict of scalars

Every algorithm reports at least `objective` (exact `F(x)` where a model exists), `grad_norm`,
`follower_residual`, `samples` and `nonfinite` (a NaN or inf in `x` or in the gradient), so
runs of different algorithms share one metrics table. Because the state is explicit, a chunk of
iterations is one `lax.scan` and a batch of runs is one `vmap`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Algorithm(NamedTuple):
    init: Callable[[Any, Any, jax.Array], Any]
    step: Callable[[Any, Any], tuple[Any, dict]]


METRICS = ("objective", "grad_norm", "follower_residual", "samples", "nonfinite")


def global_norm(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves))


def any_nonfinite(*trees) -> jax.Array:
    leaves = [leaf for tree in trees for leaf in jax.tree_util.tree_leaves(tree)]
    return jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])))


def with_leader_metrics(algorithm: Algorithm, leader_metrics: Callable[[Any], dict]) -> Algorithm:
    """`algorithm` whose metrics also hold `leader_metrics(x)` (`{name: scalar}`, float32) at
    the iterate `x` each step starts from: the one its gradient and `objective` are taken at."""

    def step(problem, state):
        extra = leader_metrics(state["x"])
        new_state, metrics = algorithm.step(problem, state)
        clash = sorted(set(extra) & set(metrics))
        if clash:
            raise ValueError(f"leader_metrics: {clash} would replace the algorithm's own metrics")
        return new_state, {**metrics, **{k: jnp.asarray(v, jnp.float32) for k, v in extra.items()}}

    return Algorithm(algorithm.init, step)
