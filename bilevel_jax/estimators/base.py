"""One interface for every estimator of the leader's hypergradient `grad F(x)` (SPEC 5).

An estimator is an `init`/`update` pair of pure functions, in the manner of optax:

    estimator = bj.estimators.amd(num_sweeps=10)
    state = estimator.init(problem, x)
    grad, state, info = estimator.update(problem, x, state, key)

`grad` has the pytree structure of `x` and is the ascent direction of `F`. `state` carries what
persists between outer steps (warm-started follower Q-tables, AMD's recursions, zero-order's
step counter), so a whole training loop can be one `lax.scan`. `info` is a dict of scalars (and,
for stochastic methods, a per-coordinate `variance` pytree) with a fixed structure per method.

To add an estimator, write a function returning `Estimator(init, update)` and register it with
`register("name", factory)`; every tool that takes a method name (hypergradient, the estimator
benchmark, the runner) then accepts it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.problem import BilevelProblem, check_problem


class Estimator(NamedTuple):
    """`init(problem, x) -> state`; `update(problem, x, state, key) -> (grad, state, info)`.

    `exact_objective`: `info["objective"]` is the exact `F(x)` (followers solved to the default
    tolerance), so a training loop that reports `F` need not solve again.
    """

    init: Callable[[BilevelProblem, Any], Any]
    update: Callable[[BilevelProblem, Any, Any, jax.Array], tuple[Any, Any, dict]]
    exact_objective: bool = False


_REGISTRY: dict[str, Callable[..., Estimator]] = {}


def check_positive_ints(allow_none: tuple[str, ...] = (), **options) -> None:
    """Raises `InvalidArgumentError` naming the first option that is not an int >= 1."""
    for name, value in options.items():
        if value is None and name in allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            expected = "an int >= 1" + (" or None" if name in allow_none else "")
            raise InvalidArgumentError(f"{name}: expected {expected}, got {value!r}")


def register(name: str, factory: Callable[..., Estimator]) -> Callable[..., Estimator]:
    """Makes `factory(**options) -> Estimator` available under `name`."""
    _REGISTRY[name] = factory
    return factory


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def make_estimator(method: str | Estimator, **options) -> Estimator:
    """The estimator named `method` built with `options` (an `Estimator` passes through)."""
    if isinstance(method, Estimator):
        if options:
            raise InvalidArgumentError("options: given with a ready-made Estimator; expected none")
        return method
    if method not in _REGISTRY:
        raise InvalidArgumentError(f"method: expected one of {available()}, got {method!r}")
    try:
        return _REGISTRY[method](**options)
    except TypeError as err:
        raise InvalidArgumentError(f"options of method {method!r}: {err}") from None


def hypergradient(problem: BilevelProblem, x, method: str | Estimator = "exact", *,
                  key: jax.Array | None = None, state=None, **options):
    """One estimate of `grad F(x)`: `(grad, info)`; `info["state"]` is the updated state.

    Pass `state=info["state"]` of a previous call to warm-start a stateful method.
    """
    check_problem(problem, x)
    estimator = make_estimator(method, **options)
    if key is None:
        key = jax.random.key(0)
    if state is None:
        state = estimator.init(problem, x)
    grad, state, info = estimator.update(problem, x, state, key)
    return grad, dict(info, state=state)
