"""Flax networks of the learners: an MLP torso with one output head per action dimension."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax.core.soft_vi import soft_value as core_soft_value


def _orthogonal(scale: float):
    """flax's orthogonal initializer, run one member at a time under `vmap`.

    Why: with several layers, `vmap` over >= 128 seeds turns each layer's QR into a batched
    LAPACK call, and XLA's CPU runtime (jax 0.10.2) deadlocks running them side by side (the
    program never returns, at 0% CPU). `sequential_vmap` makes the batch a `lax.map` of the
    unbatched QR: the same matrices, and init is a negligible part of a run.
    """
    base = nn.initializers.orthogonal(scale)

    def init(key, shape, dtype=jnp.float32):
        @jax.custom_batching.sequential_vmap
        def one(k):
            return base(k, shape, dtype)
        return one(key)

    return init


class MLP(nn.Module):
    """Flattened observation -> ReLU (or tanh) layers (orthogonal init, scale sqrt 2)."""

    hidden: Sequence[int] = (64, 64)
    activation: str = "relu"

    @nn.compact
    def __call__(self, obs):
        act = nn.relu if self.activation == "relu" else nn.tanh
        h = obs
        for width in self.hidden:
            h = act(nn.Dense(width, kernel_init=_orthogonal(np.sqrt(2)),
                             bias_init=nn.initializers.zeros)(h))
        return h


class HeadsNet(nn.Module):
    """MLP torso and one linear head per action dimension: `obs -> [n]` or a tuple of heads.

    Observations are flattened (any shape, e.g. MinAtar's `10 x 10 x C`) and cast to float.
    `factorized=False` returns a single array `[heads[0]]` (a `Discrete` space).
    """

    heads: Sequence[int]
    factorized: bool = False
    hidden: Sequence[int] = (64, 64)
    activation: str = "relu"
    head_scale: float = 0.1

    @nn.compact
    def __call__(self, obs):
        h = jnp.asarray(obs, jnp.float32).reshape(-1)
        h = MLP(self.hidden, self.activation)(h)
        outs = tuple(nn.Dense(n, kernel_init=_orthogonal(self.head_scale),
                              bias_init=nn.initializers.zeros)(h) for n in self.heads)
        return outs if self.factorized else outs[0]


class ValueNet(nn.Module):
    """MLP torso and a linear output of `outputs` values (`outputs=None`: a scalar)."""

    hidden: Sequence[int] = (64, 64)
    activation: str = "relu"
    outputs: int | None = None

    @nn.compact
    def __call__(self, obs):
        h = jnp.asarray(obs, jnp.float32).reshape(-1)
        h = MLP(self.hidden, self.activation)(h)
        out = nn.Dense(1 if self.outputs is None else self.outputs,
                       kernel_init=_orthogonal(1.0), bias_init=nn.initializers.zeros)(h)
        return out[0] if self.outputs is None else out


def soft_value(logits_or_q, temperature):
    """`lam logsumexp(Q / lam)`, summed over heads for a factorized Q."""
    if isinstance(logits_or_q, (tuple, list)):
        return sum(core_soft_value(q, temperature) for q in logits_or_q)
    return core_soft_value(logits_or_q, temperature)
