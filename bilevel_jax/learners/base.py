"""One interface for every follower that learns from samples, in the manner of the estimators:

    learner = bj.learners.make_learner("soft_dqn", num_envs=10)
    state = learner.init(problem, x, context, key)
    state, info = learner.update(problem, x, context, state, key)   # one jitted lax.scan
    logits = learner.policy(state, obs)                             # the learned soft policy
    v = learner.value(state, obs)                                   # its soft value estimate

`problem` is a `bilevel_jax.SimulatorProblem`; the follower maximizes the entropy-regularized
return of `problem.follower_reward` at `x` (temperature `problem.temperature`, discount
`problem.follower_discount(x, context)`) in the world `problem.env_params(x, context)`.
`x` is treated as a constant (no gradient flows through a learner). The state is a pytree
holding networks, optimizer state, replay buffer and the learner's running environments, so a
learner warm-starts across the leader's iterations by keeping it, vmaps over seeds, contexts
and grid points, and lives inside an estimator's state. `reset_each_step=True` asks the user of
the learner (`follow`) to re-initialize it before every fit (the papers' protocol).

`info` is a dict of scalars with a fixed structure per learner; it always has `loss` (mean over
the call's updates) and `finite` (loss and parameters all finite).

To add a learner, write a factory returning `Learner(...)` and `register("name", factory)`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bilevel_jax.errors import InvalidArgumentError

Array = jax.Array


class Learner(NamedTuple):
    """`init(problem, x, context, key) -> state`;
    `update(problem, x, context, state, key) -> (state, info)`;
    `policy(state, obs) -> logits` (`[n]`, or a tuple of heads) for one observation;
    `value(state, obs) -> scalar` soft value estimate; `reset_each_step` (see module doc)."""

    init: Callable[..., Any]
    update: Callable[..., tuple[Any, dict]]
    policy: Callable[[Any, Any], Any]
    value: Callable[[Any, Any], Array]
    reset_each_step: bool = False


_REGISTRY: dict[str, Callable[..., Learner]] = {}


def register(name: str, factory: Callable[..., Learner]) -> Callable[..., Learner]:
    """Makes `factory(**options) -> Learner` available under `name`."""
    _REGISTRY[name] = factory
    return factory


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def options_of(name: str) -> dict[str, Any]:
    """The learner's options and their defaults (what the runner's config may set)."""
    if name not in _REGISTRY:
        raise InvalidArgumentError(f"learner: expected one of {available()}, got {name!r}")
    return {p.name: p.default for p in inspect.signature(_REGISTRY[name]).parameters.values()}


def make_learner(learner: str | Learner, **options) -> Learner:
    """The learner named `learner` built with `options` (a `Learner` passes through)."""
    if isinstance(learner, Learner):
        if options:
            raise InvalidArgumentError("options: given with a ready-made Learner; expected none")
        return learner
    if learner not in _REGISTRY:
        raise InvalidArgumentError(f"learner: expected one of {available()}, got {learner!r}")
    try:
        return _REGISTRY[learner](**options)
    except TypeError as err:
        raise InvalidArgumentError(f"options of learner {learner!r}: {err}") from None


def follow(learner: Learner, problem, x, context, state, key: Array) -> tuple[Any, dict]:
    """One fit of the follower at `x`: `update`, after a fresh `init` if `reset_each_step`."""
    if learner.reset_each_step:
        key, k_init = jax.random.split(key)
        state = learner.init(problem, x, context, k_init)
    return learner.update(problem, x, context, state, key)


def all_finite(*trees) -> Array:
    """True when every inexact leaf of every tree is finite."""
    leaves = [jnp.all(jnp.isfinite(leaf)) for tree in trees for leaf in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def check_options(**checks) -> None:
    """`name=(value, kind)` with kind in {"pos_int", "nonneg_int", "pos_float", "unit", "bool",
    "bool_or_none"}: raises `InvalidArgumentError` naming the first option out of range."""
    for name, (value, kind) in checks.items():
        if kind in ("pos_int", "nonneg_int"):
            low = 1 if kind == "pos_int" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
        elif kind == "pos_float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidArgumentError(f"{name}: expected a number > 0, got {value!r}")
        elif kind == "unit":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InvalidArgumentError(f"{name}: expected a number in [0, 1], got {value!r}")
        elif kind in ("bool", "bool_or_none"):
            if not isinstance(value, bool) and not (kind == "bool_or_none" and value is None):
                expected = "a bool" + (" or None" if kind == "bool_or_none" else "")
                raise InvalidArgumentError(f"{name}: expected {expected}, got {value!r}")
        else:  # pragma: no cover - programming error
            raise ValueError(kind)


def sequential_members(option: bool | None) -> bool:
    """Whether a learner runs its vmapped members' gradient steps one after another
    (`jax.custom_batching.sequential_vmap`) rather than as batched dots. `None` chooses by
    backend: sequential on CPU, where XLA's batched dots of these sizes cost 2-3x per member
    what a plain dot does (measured at 1,000 x 64 x 64), batched on accelerators."""
    if option is None:
        return jax.default_backend() == "cpu"
    return option
