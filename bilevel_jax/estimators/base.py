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

import sys
from typing import Any, Callable, NamedTuple

import jax

from bilevel_jax.checks import is_concrete
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.problem import BilevelProblem, check_problem, validate_values


class Estimator(NamedTuple):
    """`init(problem, x) -> state`; `update(problem, x, state, key) -> (grad, state, info)`.

    `exact_objective`: on a tabular problem, `info["objective"]` is the exact `F(x)` (followers
    solved to the default tolerance), so a training loop that reports `F` need not solve again
    (on a simulator problem it is sampled: `reports_exact_objective`).
    `simulator`: the estimator also accepts a `bj.SimulatorProblem` (it needs no model).
    """

    init: Callable[[BilevelProblem, Any], Any]
    update: Callable[[BilevelProblem, Any, Any, jax.Array], tuple[Any, Any, dict]]
    exact_objective: bool = False
    simulator: bool = False


_REGISTRY: dict[str, Callable[..., Estimator]] = {}
_SIMULATOR_METHODS: set[str] = set()


def is_simulator(problem) -> bool:
    """True for a `bj.SimulatorProblem` (without importing `bilevel_jax.sim`, i.e. gymnax: a
    problem of that class exists only once the module is loaded)."""
    module = sys.modules.get("bilevel_jax.sim.problem")
    return module is not None and isinstance(problem, module.SimulatorProblem)


def reports_exact_objective(estimator: Estimator, simulator: bool) -> bool:
    """Whether `estimator`'s `info["objective"]` is the exact `F` on a problem that is a
    simulator (`simulator=True`: never, its objective is sampled there) or tabular."""
    return estimator.exact_objective and not simulator


def check_problem_for(problem, x, estimator: Estimator, method: str = "this method") -> None:
    """The one check of a problem against an estimator: a tabular problem by `check_problem`,
    a simulator problem by `check_simulator`, refused with `InvalidArgumentError` naming the
    model-free methods when `estimator` needs the model (`exact`, `amd`, `naive`, ...)."""
    if not is_simulator(problem):
        check_problem(problem, x)
        return
    if not estimator.simulator:
        names = ", ".join(repr(n) for n in sorted(_SIMULATOR_METHODS)) or "'hpgd'"
        raise InvalidArgumentError(
            f"method {method!r} needs the tabular model of a BilevelProblem; a SimulatorProblem "
            f"has none: use a model-free method ({names}; e.g. method='hpgd', "
            f"learner='soft_dqn')")
    from bilevel_jax.sim.problem import check_simulator  # noqa: PLC0415 - loaded (see above)
    check_simulator(problem)


def check_learner_option(learner, learner_options) -> None:
    """The model-free estimators' `learner` (a registered name or a `bj.learners.Learner`) and
    `learner_options` (a dict or None); checked without importing the learners (gymnax)."""
    module = sys.modules.get("bilevel_jax.learners.base")
    if not (isinstance(learner, str) or (module is not None and isinstance(learner, module.Learner))):
        raise InvalidArgumentError(
            f"learner: expected a learner name or a bj.learners.Learner, got {learner!r}")
    if learner_options is not None and not isinstance(learner_options, dict):
        raise InvalidArgumentError(
            f"learner_options: expected a dict or None, got {learner_options!r}")


def check_positive_ints(allow_none: tuple[str, ...] = (), **options) -> None:
    """Raises `InvalidArgumentError` naming the first option that is not an int >= 1."""
    for name, value in options.items():
        if value is None and name in allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            expected = "an int >= 1" + (" or None" if name in allow_none else "")
            raise InvalidArgumentError(f"{name}: expected {expected}, got {value!r}")


def register(name: str, factory: Callable[..., Estimator], *,
             simulator: bool = False) -> Callable[..., Estimator]:
    """Makes `factory(**options) -> Estimator` available under `name` (`simulator`: its
    estimators accept simulator problems, see `check_problem_for`)."""
    _REGISTRY[name] = factory
    if simulator:
        _SIMULATOR_METHODS.add(name)
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
                  key: jax.Array | None = None, state=None, validate: bool = True, **options):
    """One estimate of `grad F(x)`: `(grad, info)`; `info["state"]` is the updated state.

    Pass `state=info["state"]` of a previous call to warm-start a stateful method. A
    `bj.SimulatorProblem` goes to the model-free methods (`hpgd`); the others refuse it
    (`check_problem_for`).

    An eager call on a concrete `problem` and `x` checks the values of every context's follower
    MDP (as `validate_problem` does: probabilities, `initial`, discount, sparse indices, finite
    rewards) unless `validate=False`; under `jit` (traced `x` or problem) only shapes and the
    concrete scalars are checked (`check_problem`): validate the problem eagerly beforehand.
    """
    estimator = make_estimator(method, **options)
    check_problem_for(problem, x, estimator, method if isinstance(method, str) else "estimator")
    if validate and not is_simulator(problem) and is_concrete((problem, x)):
        validate_values(problem, x, skip_traced=True)
    if key is None:
        key = jax.random.key(0)
    if state is None:
        state = estimator.init(problem, x)
    grad, state, info = estimator.update(problem, x, state, key)
    return grad, dict(info, state=state)
