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


def shared_cond(pred, true_fn: Callable, false_fn: Callable, operand):
    """`lax.cond(pred, true_fn, false_fn, operand)` that stays a branch under `vmap`.

    `vmap` turns a `lax.cond` with a batched predicate into a `select`: both branches run for
    every member. For a rare, costly branch that all members take at the same steps (a learner's
    target refresh, the switch at `learning_starts`), this runs the true branch for the whole
    batch only at the steps where some member takes it (`any(pred)`, a real branch), and selects
    per member there; the results are those of `lax.cond` per member. Nested vmaps apply the
    same rule level by level. The branches may close over traced values of any dtype (they are
    hoisted into the operand: `jax.custom_batching.custom_vmap` refuses batched closures).
    """
    true_c, true_consts = _hoist(true_fn, operand)
    false_c, false_consts = _hoist(false_fn, operand)
    return _shared_cond(pred, true_c, false_c, (operand, true_consts, false_consts))


def _hoist(fn: Callable, operand):
    """`fn` as a function of `(operand, consts)` with every traced value it closes over in
    `consts` (like `jax.closure_convert`, which hoists only the inexact ones)."""
    from jax import extend

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(operand)
    out_tree = jax.tree_util.tree_structure(out_shape)

    def converted(op, consts):
        out = extend.core.jaxpr_as_fun(extend.core.ClosedJaxpr(closed.jaxpr, consts))(
            *jax.tree_util.tree_leaves(op))
        return jax.tree_util.tree_unflatten(out_tree, out)

    return converted, list(closed.consts)


def _shared_cond(pred, true_c, false_c, packed):
    def on_true(p):
        return true_c(p[0], p[1])

    def on_false(p):
        return false_c(p[0], p[2])

    @jax.custom_batching.custom_vmap
    def branch(pred, packed):
        return jax.lax.cond(pred, on_true, on_false, packed)

    @branch.def_vmap
    def rule(axis_size, in_batched, pred, packed):
        pred_batched, packed_batched = in_batched
        axes = jax.tree_util.tree_map(lambda b: 0 if b else None, packed_batched)
        if not pred_batched:
            out = jax.vmap(lambda p: jax.lax.cond(pred, on_true, on_false, p), (axes,),
                           axis_size=axis_size)(packed)
        else:
            def all_members(args):
                member_pred, p = args
                taken = jax.vmap(on_true, (axes,), axis_size=axis_size)(p)
                kept = jax.vmap(on_false, (axes,), axis_size=axis_size)(p)
                return jax.tree_util.tree_map(
                    lambda a, b: jnp.where(member_pred.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                    taken, kept)

            def none_taken(args):
                return jax.vmap(on_false, (axes,), axis_size=axis_size)(args[1])

            out = _shared_cond(jnp.any(pred), lambda a, _: all_members(a),
                               lambda a, _: none_taken(a), ((pred, packed), [], []))
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return branch(pred, packed)
