"""Fitting a differentiable loss by an optax optimizer in one `lax.scan`: the one loop behind
the learned critics and baselines of the model-free estimators and the reward fits of RLHF."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax import lax


def fit(loss_fn: Callable[[Any], jax.Array], optimizer: optax.GradientTransformation, params,
        opt_state, num_steps: int):
    """`num_steps >= 1` steps of `optimizer` on `loss_fn(params)` (a scalar).

    Returns `(params, opt_state, losses [num_steps], grad_norms [num_steps])`, each step's loss
    and gradient norm taken at the parameters that step starts from.
    """
    def body(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, optax.tree.norm(grads))

    (params, opt_state), (losses, norms) = lax.scan(body, (params, opt_state), None,
                                                    length=num_steps)
    return params, opt_state, losses, norms
