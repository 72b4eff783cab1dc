"""Fitting a differentiable loss by an optax optimizer in one `lax.scan`: the one loop behind
the learned critics and baselines of the model-free estimators and the reward fits of RLHF."""

from __future__ import annotations

from typing import Callable

import jax
import optax
from jax import lax


def fit(loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation, params,
        opt_state, num_steps: int, key=None):
    """`num_steps >= 1` steps of `optimizer` on `loss_fn(params)` (a scalar), or, with `key`, on
    `loss_fn(params, key_i)` with a fresh key per step (a stochastic loss, e.g. a minibatch).

    Returns `(params, opt_state, losses [num_steps], grad_norms [num_steps])`, each step's loss
    and gradient norm taken at the parameters that step starts from.
    """
    def body(carry, step_key):
        params, opt_state = carry
        args = () if step_key is None else (step_key,)
        loss, grads = jax.value_and_grad(loss_fn)(params, *args)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, optax.tree.norm(grads))

    keys = None if key is None else jax.random.split(key, num_steps)
    (params, opt_state), (losses, norms) = lax.scan(body, (params, opt_state), keys,
                                                    length=num_steps)
    return params, opt_state, losses, norms
