"""Incentive design with a zero-sum lower level (SPEC 6 "zero-sum lower level", SPEC 7.5).

A designer pays incentives `x` that shift the payoff of an entropy-regularized two-player
zero-sum Markov game (`bilevel_jax.games`: mu, `A` actions, minimizes; nu, `B` actions,
maximizes; temperature `lam`). The players settle at the game's unique regularized Nash
equilibrium `(mu*_x, nu*_x)`; the designer scores that play with its own reward `rbar(s, a, b)`
and discount `gammabar` and pays a quadratic cost:

    F(x) = E^{mu*_x, nu*_x}_{s_0 ~ initial} [ sum_t gammabar^t rbar(s_t, a_t, b_t) ] - c ||x||^2

Incentive maps (`IncentiveDesignProblem.incentive_fn`, static):

* additive (`incentive_fn=None`, the default of `games.apply_incentive`): `x` has shape
  `[S, A, B]` and the payoff becomes `r + x`. In a zero-sum game one payoff moves both players:
  `x(s, a, b) > 0` makes the pair more attractive to nu (the maximizer) and less to mu.
* features (`num_features=d` in `incentive_design_problem`): `x` in `R^d`, the payoff becomes
  `r + Phi x` with fixed random features `Phi [S, A, B, d]` (entries `N(0, 1/d)`).

The designer reward of the generated instances is a *social target*: one joint action
`(a*_s, b*_s)` per state, `rbar(s, a, b) = 1{a = a*_s, b = b*_s}`, so `F + cost` is the expected
discounted number of steps at which the players play the target pair (at most
`1 / (1 - gammabar)`). The game's own payoff is unrelated (uniform in `[-1, 1]`), so without
incentives the target is played about as often as any other pair.

`designer_objective` differentiates through the equilibrium by the implicit function theorem
(`solve_game_equilibrium`'s custom VJP), so `jax.grad` of `F` is the exact hypergradient.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bilevel_jax.core.evaluation import policy_evaluation
from bilevel_jax.core.mdp import TabularMDP
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.games import (
    GameEquilibrium,
    TabularGame,
    apply_incentive,
    check_game_shapes,
    nikaido_isoda_gap,
    solve_game_equilibrium,
    validate_game,
)
from bilevel_jax.problem import InvalidProblemError

Array = jax.Array

DEFAULT_TOL = {"float64": 1e-10, "float32": 1e-5}


@struct.dataclass
class IncentiveDesignProblem:
    """An incentive-design instance as a pytree (works under `jit`, `vmap`, `grad`).

    Attributes:
      game: the `TabularGame` before incentives (`[S, A, B]` payoff, `[S, A, B, S]` kernel).
      designer_reward: `[S, A, B]`, `rbar`.
      designer_discount: `gammabar` in `[0, 1)`.
      temperature: the players' entropy temperature `lam > 0`.
      cost: weight `c >= 0` of the incentive cost `c ||x||^2` (sum of squares over `x`'s leaves).
      incentive_fn: static `(game, x) -> TabularGame`; None: `x [S, A, B]` is added to the payoff.
      solver_iters: static, the equilibrium solver's cap on outer sweeps.
      inner_iters: static, extragradient steps per stage game and sweep.
      solver_tol: static early-stopping tolerance of the solver (None: always `solver_iters`
        sweeps); with a tolerance a warm start from the previous iterate pays off.
    """

    game: TabularGame
    designer_reward: Array
    designer_discount: Any = 0.9
    temperature: Any = 0.2
    cost: Any = 0.1
    incentive_fn: Callable[[TabularGame, Any], TabularGame] | None = struct.field(
        pytree_node=False, default=None)
    solver_iters: int = struct.field(pytree_node=False, default=500)
    inner_iters: int = struct.field(pytree_node=False, default=20)
    solver_tol: float | None = struct.field(pytree_node=False, default=None)

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(S, A, B)`."""
        return tuple(self.game.rewards.shape)

    def incentivized_game(self, x) -> TabularGame:
        """The game the players face under incentive `x`."""
        return apply_incentive(self.game, x, self.incentive_fn)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _concrete(value):
    """`np.ndarray` of a concrete value, None for a tracer (swept values are not checked)."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    except (TypeError, ValueError):
        return np.asarray(np.nan)


def check_incentive_problem(problem: IncentiveDesignProblem, x=None) -> None:
    """Checks valid under `jit`: shapes, and the scalar fields wherever they are concrete.

    Raises:
      InvalidProblemError: naming `problem`, `designer_reward`, `designer_discount`,
        `temperature` or `cost`.
      InvalidMDPError: inconsistent game shapes (names the game's field).
      InvalidArgumentError: `x` not accepted by the incentive map (names `x`).
    """
    if not isinstance(problem, IncentiveDesignProblem):
        raise InvalidProblemError(
            f"problem: expected an IncentiveDesignProblem, got {type(problem).__name__}")
    check_game_shapes(problem.game)
    shape = tuple(getattr(problem.designer_reward, "shape", ()))
    if shape != tuple(problem.game.rewards.shape):
        raise InvalidProblemError(
            f"designer_reward: expected shape [S, A, B] = {tuple(problem.game.rewards.shape)} "
            f"(that of the game's rewards), got {shape}")
    for name, low, high, high_open, low_open in (("designer_discount", 0.0, 1.0, True, False),
                                                 ("temperature", 0.0, np.inf, False, True),
                                                 ("cost", 0.0, np.inf, False, False)):
        value = _concrete(getattr(problem, name))
        if value is None:
            continue
        bad = (value.shape != () or not np.isfinite(value) or value < low
               or (low_open and value == low) or value > high or (high_open and value == high))
        if bad:
            interval = {"designer_discount": "a scalar in [0, 1)",
                        "temperature": "a finite scalar > 0",
                        "cost": "a finite scalar >= 0"}[name]
            raise InvalidProblemError(
                f"{name}: expected {interval}, got {getattr(problem, name)!r}")
    if x is not None:
        out = jax.eval_shape(problem.incentivized_game, x)
        check_game_shapes(out)


def validate_incentive_problem(problem: IncentiveDesignProblem, x=None) -> IncentiveDesignProblem:
    """Eager checks (outside `jit`): everything of `check_incentive_problem`, the game's values
    (`validate_game`: probabilities, discount, finite payoffs) and a finite designer reward.
    Returns the problem unchanged."""
    check_incentive_problem(problem, x)
    validate_game(problem.game)
    reward = _concrete(problem.designer_reward)
    if reward is None:
        raise InvalidProblemError("designer_reward: validate_incentive_problem checks values and "
                                  "must run outside jit (got a traced field)")
    if not np.isfinite(reward).all():
        raise InvalidProblemError("designer_reward: expected finite values")
    if x is not None:
        leaves = jax.tree_util.tree_leaves(x)
        if not all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves):
            raise InvalidArgumentError("x: expected finite values")
    return problem


# --------------------------------------------------------------------------------------------
# The designer's objective
# --------------------------------------------------------------------------------------------

def incentive_cost(problem: IncentiveDesignProblem, x) -> Array:
    """`c ||x||^2` (scalar; the sum of squares runs over every leaf of `x`)."""
    leaves = jax.tree_util.tree_leaves(x)
    total = sum(jnp.sum(jnp.square(leaf)) for leaf in leaves)
    return jnp.asarray(problem.cost, jnp.result_type(total)) * total


def designer_value(problem: IncentiveDesignProblem, x, mu_policy: Array, nu_policy: Array) -> Array:
    """`E^{mu, nu}[sum_t gammabar^t rbar(s_t, a_t, b_t)]` from `initial` in the game under `x`.

    `mu_policy [S, A]`, `nu_policy [S, B]`; no entropy terms (the designer's reward is its own).
    The joint play is evaluated as nu's MDP given mu: rewards `sum_a mu rbar`, kernel
    `sum_a mu P`, discount `gammabar` (one `[S, S]` solve). Differentiable in `x` (through the
    game's kernel when the incentive map changes it) and in both policies.
    """
    game = problem.incentivized_game(x)
    dtype = jnp.result_type(game.rewards.dtype, mu_policy.dtype, nu_policy.dtype, float)
    mdp = TabularMDP(
        transitions=jnp.einsum("sabt,sa->sbt", game.transitions.astype(dtype), mu_policy),
        rewards=jnp.einsum("sab,sa->sb", problem.designer_reward.astype(dtype), mu_policy),
        discount=problem.designer_discount, initial=game.initial, terminal=game.terminal)
    values = policy_evaluation(mdp, nu_policy.astype(dtype), 0.0).v
    return jnp.dot(game.initial.astype(dtype), values)


def policy_objective(problem: IncentiveDesignProblem, x, mu_logits: Array,
                     nu_logits: Array) -> Array:
    """`f(x, mu, nu) = designer_value(x, softmax(mu_logits), softmax(nu_logits)) - c ||x||^2`:
    the designer's objective at given player logits (`[S, A]`, `[S, B]`), PBRL's upper level."""
    mu = jax.nn.softmax(mu_logits, axis=-1)
    nu = jax.nn.softmax(nu_logits, axis=-1)
    return designer_value(problem, x, mu, nu) - incentive_cost(problem, x)


def solve_equilibrium(problem: IncentiveDesignProblem, x, *,
                      init: GameEquilibrium | None = None) -> GameEquilibrium:
    """The regularized Nash equilibrium of the game under `x` (the problem's solver options;
    warm-started from `init`; differentiable by the implicit function theorem)."""
    return solve_game_equilibrium(problem.incentivized_game(x), problem.temperature,
                                  problem.solver_iters, inner_iters=problem.inner_iters,
                                  init=init, tol=problem.solver_tol)


def designer_objective(problem: IncentiveDesignProblem, x, *,
                       init: GameEquilibrium | None = None) -> tuple[Array, GameEquilibrium]:
    """`(F(x), equilibrium)`: the designer's objective at the players' equilibrium under `x`.

    `jax.grad(lambda x: designer_objective(problem, x)[0])` is the exact hypergradient: the
    equilibrium's derivative comes from one adjoint solve at the fixed point
    (`solve_game_equilibrium`), the rest is ordinary autodiff of a policy evaluation.

    Args:
      problem: the `IncentiveDesignProblem`.
      x: the incentive (`[S, A, B]` for the additive map, else what `incentive_fn` takes).
      init: optional warm start (the previous iterate's `GameEquilibrium`).
    """
    check_incentive_problem(problem, x)
    eq = solve_equilibrium(problem, x, init=init)
    value = designer_value(problem, x, eq.mu_policy, eq.nu_policy) - incentive_cost(problem, x)
    return value, eq


def equilibrium_gap(problem: IncentiveDesignProblem, x, mu_logits: Array, nu_logits: Array,
                    **options) -> Array:
    """Nikaido-Isoda gap of `(softmax(mu_logits), softmax(nu_logits))` in the game under `x`
    (`games.nikaido_isoda_gap`; `options` go to it, e.g. `init_q_max`, `num_sweeps`)."""
    return nikaido_isoda_gap(problem.game, x, mu_logits, nu_logits, problem.temperature,
                             problem.incentive_fn, **options)


# --------------------------------------------------------------------------------------------
# Random instances
# --------------------------------------------------------------------------------------------

def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def _check_float(name: str, value, low: float, high: float, *, low_open=False,
                 high_open=False) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (np.isfinite(v) and v >= low and not (low_open and v == low) and v <= high
              and not (high_open and v == high))
    if not ok:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        raise InvalidArgumentError(f"{name}: expected a number in {left}{low}, {high}{right}, "
                                   f"got {value!r}")
    return float(value)


def incentive_design_problem(seed: int = 0, num_states: int = 8, min_actions: int = 3,
                             max_actions: int = 3, *, discount: float = 0.9,
                             designer_discount: float = 0.9, temperature: float = 0.2,
                             cost: float = 0.1, num_features: int | None = None,
                             solver_iters: int = 500, inner_iters: int = 20,
                             solver_tol: float | None = None, dtype=jnp.float64):
    """A random (seeded, host-side numpy) incentive-design instance and the starting `x0 = 0`.

    The game: payoff `r ~ U[-1, 1]^{S x A x B}`, kernel rows `P(.|s, a, b) ~ Dirichlet(1)`,
    `initial ~ Dirichlet(1)` (every state has positive mass, so the Nikaido-Isoda gap vanishes
    only at the equilibrium), no terminal states. The designer: target pairs `(a*_s, b*_s)`
    uniform, `rbar = 1{(a, b) = (a*_s, b*_s)}` (module docstring).

    Args:
      seed: numpy seed of everything random (game, target, features).
      num_states, min_actions, max_actions: `S`, `A` (mu, the minimizer), `B` (nu, the maximizer).
      discount: the players' `gamma` in `[0, 1)`.
      designer_discount: `gammabar` in `[0, 1)`.
      temperature: `lam > 0`.
      cost: `c >= 0` of `c ||x||^2`.
      num_features: None for the additive incentive (`x [S, A, B]`), or `d` for `x in R^d`
        acting through random features `Phi [S, A, B, d]`.
      solver_iters, inner_iters: the equilibrium solver's sweeps cap and extragradient steps.
      solver_tol: the solver's early-stopping tolerance; None picks 1e-10 (float64) or 1e-5
        (float32).
      dtype: float dtype of every array.

    Returns:
      `(IncentiveDesignProblem, x0)` with `x0` zeros of shape `[S, A, B]` or `[d]`.

    Raises:
      InvalidArgumentError: naming the argument that is out of range.
    """
    seed = _check_int("seed", seed, 0)
    S = _check_int("num_states", num_states, 1)
    A = _check_int("min_actions", min_actions, 1)
    B = _check_int("max_actions", max_actions, 1)
    discount = _check_float("discount", discount, 0.0, 1.0, high_open=True)
    designer_discount = _check_float("designer_discount", designer_discount, 0.0, 1.0,
                                     high_open=True)
    temperature = _check_float("temperature", temperature, 0.0, np.inf, low_open=True)
    cost = _check_float("cost", cost, 0.0, np.inf)
    if num_features is not None:
        num_features = _check_int("num_features", num_features, 1)
    solver_iters = _check_int("solver_iters", solver_iters, 1)
    inner_iters = _check_int("inner_iters", inner_iters, 1)
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise InvalidArgumentError(f"dtype: expected float32 or float64, got {dtype}")
    if solver_tol is None:
        solver_tol = DEFAULT_TOL[dtype.name]
    solver_tol = _check_float("solver_tol", solver_tol, 0.0, np.inf, low_open=True)

    rng = np.random.default_rng(seed)
    transitions = rng.dirichlet(np.ones(S), size=(S, A, B))
    rewards = rng.uniform(-1.0, 1.0, size=(S, A, B))
    initial = rng.dirichlet(np.ones(S))
    target_a, target_b = rng.integers(A, size=S), rng.integers(B, size=S)
    designer_reward = np.zeros((S, A, B))
    designer_reward[np.arange(S), target_a, target_b] = 1.0

    as_array = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    game = TabularGame(transitions=as_array(transitions), rewards=as_array(rewards),
                       discount=discount, initial=as_array(initial))
    incentive_fn = None     # the additive map of games.apply_incentive
    x0 = jnp.zeros((S, A, B), dtype)
    if num_features is not None:
        features = as_array(rng.normal(size=(S, A, B, num_features)) / np.sqrt(num_features))

        def feature_incentive(g: TabularGame, x) -> TabularGame:
            shape = tuple(getattr(x, "shape", ()))
            if shape != (num_features,):
                raise InvalidArgumentError(
                    f"x: the feature incentive expects shape [d] = ({num_features},), got {shape}")
            return g.replace(rewards=g.rewards + features @ x)

        incentive_fn = feature_incentive
        x0 = jnp.zeros(num_features, dtype)
    problem = IncentiveDesignProblem(
        game=game, designer_reward=as_array(designer_reward),
        designer_discount=designer_discount, temperature=temperature, cost=cost,
        incentive_fn=incentive_fn, solver_iters=solver_iters, inner_iters=inner_iters,
        solver_tol=solver_tol)
    return problem, x0


__all__ = [
    "IncentiveDesignProblem",
    "check_incentive_problem",
    "designer_objective",
    "designer_value",
    "equilibrium_gap",
    "incentive_cost",
    "incentive_design_problem",
    "policy_objective",
    "solve_equilibrium",
    "validate_incentive_problem",
]
