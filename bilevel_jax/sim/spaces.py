"""Discrete and factorized (tuple) action spaces: sampling and log-probabilities per head.

A policy's output for one observation is `logits`: an array `[n]` for a `Discrete(n)` space, or
a tuple of arrays `([n_1], ..., [n_D])` for a `Tuple` of `Discrete` spaces (one head per action
dimension). The joint policy of a tuple space is the product of its heads, so the joint
log-probability of an action `[D]` is the sum of the heads' log-probabilities: never a softmax
over the joint space.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from gymnax.environments import spaces

from bilevel_jax.errors import InvalidArgumentError

Array = jax.Array


def action_heads(space) -> tuple[int, ...] | None:
    """`(n,)` for `Discrete(n)`, `(n_1, ..., n_D)` for a `Tuple` of `Discrete`; None otherwise."""
    if isinstance(space, spaces.Discrete):
        return (int(space.n),)
    if isinstance(space, spaces.Tuple) and all(isinstance(s, spaces.Discrete) for s in space.spaces):
        return tuple(int(s.n) for s in space.spaces)
    return None


def is_factorized(space) -> bool:
    return isinstance(space, spaces.Tuple)


def check_logits(logits, heads: tuple[int, ...], factorized: bool, where: str = "policy") -> None:
    """Raises `InvalidArgumentError` when `logits` (one observation) do not match the space."""
    if factorized:
        shapes = tuple(tuple(jnp.shape(l)) for l in logits) if isinstance(logits, (tuple, list)) else None
        expected = tuple((n,) for n in heads)
    else:
        shapes = tuple(jnp.shape(logits)) if not isinstance(logits, (tuple, list)) else None
        expected = (heads[0],)
    if shapes != expected:
        raise InvalidArgumentError(
            f"{where}: expected logits of shape {expected} for the action space, got {shapes}")


def sample(key: Array, logits) -> Array:
    """Draws actions from logits with any leading batch shape: `[...]` or `[..., D]` (tuple)."""
    if isinstance(logits, (tuple, list)):
        keys = jax.random.split(key, len(logits))
        return jnp.stack([jax.random.categorical(k, l) for k, l in zip(keys, logits)], axis=-1)
    return jax.random.categorical(key, logits)


def log_softmax(logits):
    return jax.tree_util.tree_map(jax.nn.log_softmax, logits)


def log_prob(logits, action: Array) -> Array:
    """Joint log-probability of `action` (`[...]` or `[..., D]`) under (factorized) `logits`."""
    if isinstance(logits, (tuple, list)):
        return sum(_head_log_prob(l, action[..., d]) for d, l in enumerate(logits))
    return _head_log_prob(logits, action)


def _head_log_prob(logits: Array, action: Array) -> Array:
    logp = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp, action[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy(logits) -> Array:
    """Joint entropy (the sum over heads for a factorized policy)."""
    def head(l):
        logp = jax.nn.log_softmax(l)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    if isinstance(logits, (tuple, list)):
        return sum(head(l) for l in logits)
    return head(logits)


def mix_uniform(logits, epsilon):
    """Logits of `(1 - epsilon) softmax(logits) + epsilon * uniform` (epsilon-exploration)."""
    def head(l):
        n = l.shape[-1]
        return jnp.logaddexp(jnp.log1p(-epsilon) + jax.nn.log_softmax(l), jnp.log(epsilon / n))
    epsilon = jnp.clip(epsilon, 1e-12, 1.0 - 1e-7)
    return jax.tree_util.tree_map(head, logits)
