"""Entropy-regularized two-player zero-sum Markov games (SPEC 6, 7.5): the lower level of
incentive design, its Nikaido-Isoda gap and a solver for its regularized Nash equilibrium.

Conventions (SPEC 6). `transitions[s, a, b, s'] = P(s'|s, a, b)`; `rewards[s, a, b]` is the
payoff that `J` accumulates. The min player (policy `mu(a|s)`, `A` actions) minimizes `J`; the max
player (policy `nu(b|s)`, `B` actions) maximizes it. Both act simultaneously; terminal states
follow SPEC 1 (the stage payoff is earned, then the episode ends). With temperature `lam > 0`

    J(mu, nu) = E_{s_0 ~ initial} [ sum_t gamma^t ( r(s_t, a_t, b_t) + lam log mu(a_t|s_t)
                                                                 - lam log nu(b_t|s_t) ) ]

Each player's own entropy is a bonus in its own objective: `-lam log nu` raises what nu
maximizes, `+lam log mu` raises what mu minimizes (mu maximizes `-J`, which carries
`-lam log mu`). So `J` is strongly convex in `mu` and strongly concave in `nu` per state, and the
game has a unique regularized Nash equilibrium `(mu*, nu*)`, the fixed point of the soft Shapley
operator (`H(p) = -sum p log p`)

    Q(s, a, b) = r(s, a, b) + gamma (1 - terminal[s]) sum_s' P(s'|s, a, b) V(s')
    V(s) = min_mu max_nu [ mu^T Q(s) nu - lam H(mu) + lam H(nu) ]
    mu*(.|s) = softmax(-Q(s) nu*(.|s) / lam),   nu*(.|s) = softmax(Q(s)^T mu*(.|s) / lam)

The Nikaido-Isoda gap of a pair is `max_nu' J(mu, nu') - min_mu' J(mu', nu) >= 0`. Given one
player's policy the other faces a single-agent soft MDP (`max_player_mdp`: nu's, over the `B`
actions, given mu; `min_player_mdp`: mu's, over the `A` actions, given nu) whose rewards include
the fixed player's entropy term (a per-state constant for the responder, but it changes the
values). The min player's MDP is the negated game, so `min_mu' J(mu', nu) = -V*(initial)` of
`min_player_mdp`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.scipy.special import xlogy

from bilevel_jax.core.evaluation import policy_evaluation
from bilevel_jax.core.linear import dense_solve
from bilevel_jax.core.mdp import TabularMDP, _check_distribution
from bilevel_jax.core.soft_vi import check_temperature, soft_value_iteration
from bilevel_jax.errors import InvalidArgumentError, InvalidMDPError

Array = jax.Array

DIFFERENTIATION_MODES = ("implicit", "unroll")


@struct.dataclass
class TabularGame:
    """A finite two-player zero-sum Markov game as a pytree (works under `jit`, `vmap`, `grad`).

    Attributes:
      transitions: `[S, A, B, S]`, `P(s'|s, a, b)`.
      rewards: `[S, A, B]`, the payoff `J` accumulates: maximized by nu (the max player, `B`
        actions), minimized by mu (the min player, `A` actions).
      discount: scalar in `[0, 1)`.
      initial: `[S]` start-state distribution.
      terminal: optional bool `[S]`; `None` means no terminal states.
    """

    transitions: Array
    rewards: Array
    discount: Any
    initial: Array
    terminal: Array | None = None

    @property
    def num_states(self) -> int:
        return self.rewards.shape[-3]

    @property
    def num_max_actions(self) -> int:
        """`B`, the max player's (nu's) action count."""
        return self.rewards.shape[-1]

    @property
    def num_min_actions(self) -> int:
        """`A`, the min player's (mu's) action count."""
        return self.rewards.shape[-2]

    def continuation(self) -> Array:
        """`(1 - terminal[s])` as a float `[S]` vector (all ones without terminal states)."""
        dtype = self.rewards.dtype
        if self.terminal is None:
            return jnp.ones(self.rewards.shape[:-2], dtype)
        return 1.0 - jnp.asarray(self.terminal, dtype)


@struct.dataclass
class GameEquilibrium:
    """Result of `solve_game_equilibrium`.

    Attributes:
      mu_logits: `[S, A]` log-probabilities of the min player's (mu's) equilibrium policy.
      nu_logits: `[S, B]` log-probabilities of the max player's (nu's) equilibrium policy.
      mu_policy: `[S, A]`, `exp(mu_logits)`.
      nu_policy: `[S, B]`, `exp(nu_logits)`.
      q: `[S, A, B]` stage-game payoffs `r + gamma (1 - terminal) P V`.
      v: `[S]` soft Nash values `min_mu max_nu [mu^T Q nu - lam H(mu) + lam H(nu)]` per state;
        `initial . v` is `J(mu*, nu*)`.
      residual: `max |V_n - V_{n-1}|` at the last outer sweep.
      stage_residual: the larger of `max |log mu - log softmax(-Q nu / lam)|` and
        `max |log nu - log softmax(Q^T mu / lam)|` (the stage games' best-response violation, in
        log-probability units).
      num_sweeps: int32 scalar, outer sweeps performed (`num_iters` unless stopped by `tol`).
    """

    mu_logits: Array
    nu_logits: Array
    mu_policy: Array
    nu_policy: Array
    q: Array
    v: Array
    residual: Array
    stage_residual: Array
    num_sweeps: Array


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def check_game_shapes(game: TabularGame) -> None:
    """Static shape checks (valid under `jit`). Raises `InvalidMDPError` naming the field."""
    if not isinstance(game, TabularGame):
        raise InvalidMDPError(f"game: expected a TabularGame, got {type(game).__name__}")
    rewards_shape = tuple(getattr(game.rewards, "shape", ()))
    if len(rewards_shape) != 3:
        raise InvalidMDPError(f"rewards: expected an array of shape [S, A, B], got {rewards_shape}")
    num_states, num_a, num_b = rewards_shape
    expected = (num_states, num_a, num_b, num_states)
    shape = tuple(getattr(game.transitions, "shape", ()))
    if shape != expected:
        raise InvalidMDPError(
            f"transitions: expected shape [S, A, B, S] = {list(expected)} to match rewards "
            f"[S, A, B], got {shape}")
    shape = tuple(getattr(game.initial, "shape", ()))
    if shape != (num_states,):
        raise InvalidMDPError(
            f"initial: expected shape [S] = [{num_states}] to match rewards, got {shape}")
    if game.terminal is not None:
        shape = tuple(getattr(game.terminal, "shape", ()))
        if shape != (num_states,):
            raise InvalidMDPError(
                f"terminal: expected a bool array of shape [S] = [{num_states}], got {shape}")
        if jnp.asarray(game.terminal).dtype != jnp.bool_:
            raise InvalidMDPError(
                f"terminal: expected dtype bool, got {jnp.asarray(game.terminal).dtype}")


def validate_game(game: TabularGame) -> TabularGame:
    """Checks a game eagerly (outside `jit`) and returns it unchanged.

    Raises `InvalidMDPError` naming the field for: shape mismatches, non-floating or non-finite
    rewards, a discount outside `[0, 1)`, negative/NaN/inf probabilities, transition rows or
    `initial` not summing to 1 (rows of terminal states may also be all zero).
    """
    check_game_shapes(game)
    try:
        rewards = np.asarray(game.rewards)
        probs = np.asarray(game.transitions)
        initial = np.asarray(game.initial)
        discount = np.asarray(game.discount)
        terminal = None if game.terminal is None else np.asarray(game.terminal)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        raise InvalidMDPError(
            "validate_game checks values and must run outside jit (got traced fields)") from err
    if not np.issubdtype(rewards.dtype, np.floating):
        raise InvalidMDPError(f"rewards: expected a floating dtype, got {rewards.dtype}")
    if not np.isfinite(rewards).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(rewards))[0])
        raise InvalidMDPError(f"rewards: expected finite values, found {rewards[where]} at {where}")
    if discount.shape != () or np.isnan(discount) or not 0 <= discount < 1:
        raise InvalidMDPError(f"discount: expected a scalar in [0, 1), got {game.discount!r}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise InvalidMDPError(f"transitions: expected floating probabilities, got {probs.dtype}")
    zero_rows_ok = None
    if terminal is not None:
        zero_rows_ok = np.broadcast_to(terminal[:, None, None], probs.shape[:-1])
    _check_distribution("transitions", probs, zero_rows_ok)
    _check_distribution("initial", initial)
    return game


def _check_logits(name: str, logits, shape: tuple[int, int]) -> Array:
    got = tuple(getattr(logits, "shape", ()))
    if got != shape:
        player = "min player's [S, A]" if name == "mu_logits" else "max player's [S, B]"
        raise InvalidArgumentError(
            f"{name}: expected the {player} logits, shape {shape}, got {got}")
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise InvalidArgumentError(f"{name}: expected a floating dtype, got {logits.dtype}")
    return logits


# --------------------------------------------------------------------------------------------
# Induced single-agent MDPs and the game value
# --------------------------------------------------------------------------------------------

def max_player_mdp(game: TabularGame, mu_policy: Array, temperature) -> TabularMDP:
    """The max player's (nu's) soft MDP over the `B` actions, given the min player's `mu [S, A]`.

    `r_mu(s, b) = sum_a mu(a|s) r(s, a, b) + lam sum_a mu(a|s) log mu(a|s)` (the min player's
    `+lam log mu` term of `J`), `P_mu(s'|s, b) = sum_a mu(a|s) P(s'|s, a, b)`. Its soft value
    (temperature `lam`) of a policy `nu` is `J(mu, nu)` state by state.
    """
    lam = jnp.asarray(temperature, game.rewards.dtype)
    mu_term = lam * jnp.sum(xlogy(mu_policy, mu_policy), axis=-1)
    rewards = jnp.einsum("sab,sa->sb", game.rewards, mu_policy) + mu_term[:, None]
    transitions = jnp.einsum("sabt,sa->sbt", game.transitions, mu_policy)
    return TabularMDP(transitions=transitions, rewards=rewards, discount=game.discount,
                      initial=game.initial, terminal=game.terminal)


def min_player_mdp(game: TabularGame, nu_policy: Array, temperature) -> TabularMDP:
    """The min player's (mu's) soft MDP over `A` actions given nu `[S, B]`, maximizing `-J`.

    `r_nu(s, a) = -sum_b nu(b|s) r(s, a, b) + lam sum_b nu(b|s) log nu(b|s)` (the negated game's
    payoff and the max player's `-lam log nu` term of `J`, negated),
    `P_nu(s'|s, a) = sum_b nu(b|s) P(s'|s, a, b)`. Its soft value of a policy `mu` is
    `-J(mu, nu)`.
    """
    lam = jnp.asarray(temperature, game.rewards.dtype)
    nu_term = lam * jnp.sum(xlogy(nu_policy, nu_policy), axis=-1)
    rewards = -jnp.einsum("sab,sb->sa", game.rewards, nu_policy) + nu_term[:, None]
    transitions = jnp.einsum("sabt,sb->sat", game.transitions, nu_policy)
    return TabularMDP(transitions=transitions, rewards=rewards, discount=game.discount,
                      initial=game.initial, terminal=game.terminal)


def game_value(game: TabularGame, mu_policy: Array, nu_policy: Array, temperature) -> Array:
    """`J(mu, nu)` (scalar): the regularized value at the initial distribution.

    `mu_policy [S, A]` is the min player's policy, `nu_policy [S, B]` the max player's.
    """
    check_game_shapes(game)
    mdp = max_player_mdp(game, mu_policy, temperature)
    values = policy_evaluation(mdp, nu_policy, temperature).v
    return jnp.dot(game.initial.astype(values.dtype), values)


def apply_incentive(game: TabularGame, x, incentive_fn: Callable[[TabularGame, Any], TabularGame]
                    | None = None) -> TabularGame:
    """The game the players face under incentive `x`.

    With `incentive_fn`, returns `incentive_fn(game, x)` (any differentiable map to a
    `TabularGame`). By default `x` is added to the rewards: `x` of shape `[S, A, B]`, or `None`
    (no incentive).
    """
    if incentive_fn is not None:
        out = incentive_fn(game, x)
        if not isinstance(out, TabularGame):
            raise InvalidArgumentError(
                "incentive_fn: expected a function returning a TabularGame, got "
                f"{type(out).__name__}")
        return out
    if x is None:
        return game
    shape = tuple(getattr(x, "shape", ()))
    if shape != tuple(game.rewards.shape):
        raise InvalidArgumentError(
            f"x: the default incentive adds x to the rewards, so it needs shape [S, A, B] = "
            f"{tuple(game.rewards.shape)}, got {shape} (pass incentive_fn for other "
            "parameterizations)")
    return game.replace(rewards=game.rewards + x)


# --------------------------------------------------------------------------------------------
# The Nikaido-Isoda gap
# --------------------------------------------------------------------------------------------

def _best_response_value(mdp: TabularMDP, temperature, linear_solver, solver_options) -> Array:
    """`max_pi V^pi(initial)` of a soft MDP, differentiable by Danskin.

    The solver runs on a stop-gradient copy; its soft-greedy policy is held fixed and evaluated
    exactly, so derivatives (in the MDP and through it in `x` and the other player's logits)
    never pass through the solver and are exact at the optimum.
    """
    frozen = jax.tree_util.tree_map(lax.stop_gradient, mdp)
    sol = soft_value_iteration(frozen, lax.stop_gradient(temperature),
                               linear_solver=linear_solver, **solver_options)
    policy = lax.stop_gradient(sol.policy)
    values = policy_evaluation(mdp, policy, temperature, linear_solver=linear_solver).v
    return jnp.dot(mdp.initial.astype(values.dtype), values)


def nikaido_isoda_gap(game: TabularGame, x, mu_logits: Array, nu_logits: Array, temperature,
                      incentive_fn: Callable[[TabularGame, Any], TabularGame] | None = None, *,
                      init_q_max: Array | None = None, init_q_min: Array | None = None,
                      linear_solver: str = "auto", **solver_options) -> Array:
    """Nikaido-Isoda gap `max_nu' J_x(mu, nu') - min_mu' J_x(mu', nu) >= 0` of `(mu, nu)`.

    SPEC 6: `mu = softmax(mu_logits)` is the min player (`A` actions), `nu = softmax(nu_logits)`
    the max player (`B` actions), `J_x` the regularized value (module docstring) of the game
    `apply_incentive(game, x, incentive_fn)`. Each inner optimum is a single-agent soft MDP
    solved by `soft_value_iteration`: nu's best response to mu in `max_player_mdp`, mu's best
    response to nu in `min_player_mdp` (the maximization of `-J`). The gap is zero exactly at
    the regularized Nash equilibrium (for an initial distribution reaching every state;
    otherwise at any pair that is an equilibrium on the reachable states).

    Differentiable in `x`, `mu_logits` and `nu_logits`: by Danskin's theorem the best responses
    are held fixed (no derivative through the solvers), which is the exact gradient when the
    inner problems are solved to tolerance.

    Args:
      game: the `TabularGame` before incentives.
      x: incentive (any pytree understood by `incentive_fn`; by default `[S, A, B]` or None).
      mu_logits: `[S, A]` min player's logits.
      nu_logits: `[S, B]` max player's logits.
      temperature: `lam > 0`.
      incentive_fn: optional `(game, x) -> TabularGame`; default adds `x` to the rewards.
      init_q_max: optional `[S, B]` warm start of nu's best-response solve (in
        `max_player_mdp`), e.g. the previous iteration's table.
      init_q_min: optional `[S, A]` warm start of mu's best-response solve (in
        `min_player_mdp`). With `num_sweeps=K` in `solver_options` the best responses are the
        soft-greedy policies after `K` sweeps from these tables (PBRL's approximate inner
        optima; the gap may then be slightly negative).
      linear_solver: method of the policy-evaluation solves.
      **solver_options: passed to `soft_value_iteration` (`tol`, `max_iters`, `num_sweeps`;
        an `init_q` here is used by both solves, so it needs `A = B`).

    Returns:
      scalar gap.

    Raises:
      InvalidArgumentError: temperature <= 0, logits or `x` with the wrong shape.
      InvalidMDPError: inconsistent game shapes.
    """
    check_temperature(temperature)
    check_game_shapes(game)
    g = apply_incentive(game, x, incentive_fn)
    check_game_shapes(g)
    num_states, num_a, num_b = g.rewards.shape
    mu = jax.nn.softmax(_check_logits("mu_logits", mu_logits, (num_states, num_a)), axis=-1)
    nu = jax.nn.softmax(_check_logits("nu_logits", nu_logits, (num_states, num_b)), axis=-1)
    options_max, options_min = dict(solver_options), dict(solver_options)
    warm_starts = (("init_q_max", init_q_max, (num_states, num_b), options_max),
                   ("init_q_min", init_q_min, (num_states, num_a), options_min))
    for name, table, shape, options in warm_starts:
        if table is None:
            continue
        if "init_q" in solver_options:
            raise InvalidArgumentError(f"{name}: pass either {name} or init_q, not both")
        got = tuple(getattr(table, "shape", ()))
        if got != shape:
            player = "nu's [S, B]" if name == "init_q_max" else "mu's [S, A]"
            raise InvalidArgumentError(
                f"{name}: expected {player} best-response Q table, shape {shape}, got {got}")
        options["init_q"] = table
    best_max = _best_response_value(max_player_mdp(g, mu, temperature), temperature,
                                    linear_solver, options_max)          # max_nu' J(mu, nu')
    best_min = -_best_response_value(min_player_mdp(g, nu, temperature), temperature,
                                     linear_solver, options_min)         # min_mu' J(mu', nu)
    return best_max - best_min


# --------------------------------------------------------------------------------------------
# The regularized Nash equilibrium
# --------------------------------------------------------------------------------------------

def _stage_value(q, log_mu, log_nu, lam):
    """`[S]` regularized stage payoff `mu^T Q nu - lam H(mu) + lam H(nu)`."""
    mu, nu = jnp.exp(log_mu), jnp.exp(log_nu)
    return (jnp.einsum("sa,sab,sb->s", mu, q, nu) + lam * jnp.sum(mu * log_mu, -1)
            - lam * jnp.sum(nu * log_nu, -1))


def _stage_residual(q, log_mu, log_nu, lam):
    """Largest log-probability distance of each player from its stage best response:
    `mu -> softmax(-Q nu / lam)` (minimizer), `nu -> softmax(Q^T mu / lam)` (maximizer)."""
    mu, nu = jnp.exp(log_mu), jnp.exp(log_nu)
    br_mu = jax.nn.log_softmax(-jnp.einsum("sab,sb->sa", q, nu) / lam, axis=-1)
    br_nu = jax.nn.log_softmax(jnp.einsum("sab,sa->sb", q, mu) / lam, axis=-1)
    return jnp.maximum(jnp.max(jnp.abs(log_mu - br_mu)), jnp.max(jnp.abs(log_nu - br_nu)))


def _extragradient(q, log_mu, log_nu, lam, num_steps):
    """`num_steps` entropy-regularized extragradient steps on every stage game `Q(s)`.

    The predictive update of Cen, Wei & Chi (2021), in log space with step `eta(s) =
    1 / (lam + 2 max |Q(s) - mean Q(s)|)`; linear convergence at rate `1 - eta lam` per step.
    mu (the minimizer) moves along `-Q nu`, nu (the maximizer) along `+Q^T mu`; centering `Q`
    shifts every logit of a state equally, which the softmax ignores.
    """
    centered = q - jnp.mean(q, axis=(-2, -1), keepdims=True)
    eta = 1.0 / (lam + 2.0 * jnp.max(jnp.abs(centered), axis=(-2, -1)))
    keep = (1.0 - eta * lam)[:, None]
    eta = eta[:, None]

    def step(_, carry):
        lmu, lnu = carry
        mu, nu = jnp.exp(lmu), jnp.exp(lnu)
        lmu_bar = jax.nn.log_softmax(keep * lmu - eta * jnp.einsum("sab,sb->sa", centered, nu), -1)
        lnu_bar = jax.nn.log_softmax(keep * lnu + eta * jnp.einsum("sab,sa->sb", centered, mu), -1)
        mu_bar, nu_bar = jnp.exp(lmu_bar), jnp.exp(lnu_bar)
        lmu = jax.nn.log_softmax(keep * lmu - eta * jnp.einsum("sab,sb->sa", centered, nu_bar), -1)
        lnu = jax.nn.log_softmax(keep * lnu + eta * jnp.einsum("sab,sa->sb", centered, mu_bar), -1)
        return lmu, lnu

    return lax.fori_loop(0, num_steps, step, (log_mu, log_nu))


class _SolverConfig(NamedTuple):
    """Static options of the equilibrium solver (hashable: a `nondiff_argnums` of custom_vjp)."""

    num_iters: int
    inner_iters: int
    tol: float | None


def _shapley_sweeps(params, init, cfg: _SolverConfig):
    """The solver's sweeps: `(v [S], log mu [S, A], log nu [S, B], residual, sweeps)`.

    `params = (rewards, transitions, gamma, keep, lam)` (arrays), `init = (v, log mu, log nu)`.
    Without `cfg.tol`, exactly `cfg.num_iters` sweeps (`fori_loop`, so `differentiation="unroll"`
    can backpropagate through it) and `residual = max |V_n - V_{n-1}|`. With `cfg.tol`, sweeps
    stop once `max(|V_n - V_{n-1}|, stage_residual) <= tol * max(1, max |V|)` or after
    `cfg.num_iters` sweeps (`while_loop`), and `residual` is that larger error.
    """
    rewards, transitions, gamma, keep, lam = params

    def stage_q(v):
        return rewards + gamma * keep[:, None, None] * jnp.einsum("sabt,t->sab", transitions, v)

    def sweep(v, lmu, lnu):
        q = stage_q(v)
        lmu, lnu = _extragradient(q, lmu, lnu, lam, cfg.inner_iters)
        return _stage_value(q, lmu, lnu, lam), lmu, lnu, q

    v0, lmu0, lnu0 = init
    if cfg.tol is None:
        def body(_, carry):
            v, lmu, lnu, _ = carry
            v_new, lmu, lnu, _ = sweep(v, lmu, lnu)
            return v_new, lmu, lnu, jnp.max(jnp.abs(v_new - v))

        v, lmu, lnu, residual = lax.fori_loop(
            0, cfg.num_iters, body, (v0, lmu0, lnu0, jnp.asarray(jnp.inf, v0.dtype)))
        return v, lmu, lnu, residual, jnp.asarray(cfg.num_iters, jnp.int32)

    def cond(carry):
        v, _, _, error, it = carry
        return (error > cfg.tol * jnp.maximum(1.0, jnp.max(jnp.abs(v)))) & (it < cfg.num_iters)

    def body_tol(carry):
        v, lmu, lnu, _, it = carry
        v_new, lmu, lnu, q = sweep(v, lmu, lnu)
        # Both parts: the values settled, and the stage games are solved at the Q they came from.
        error = jnp.maximum(jnp.max(jnp.abs(v_new - v)), _stage_residual(q, lmu, lnu, lam))
        return v_new, lmu, lnu, error, it + 1

    init_carry = (v0, lmu0, lnu0, jnp.asarray(jnp.inf, v0.dtype), jnp.asarray(0, jnp.int32))
    v, lmu, lnu, residual, sweeps = lax.while_loop(cond, body_tol, init_carry)
    return v, lmu, lnu, residual, sweeps


def _shapley_map(z, params):
    """The regularized Nash fixed-point map `T(z)` in `z = (V [S], log mu [S, A], log nu [S, B])`.

    `Q = r + gamma keep P V`, `log mu' = log_softmax(-Q nu / lam)`, `log nu' = log_softmax(Q^T mu
    / lam)`, `V' = mu^T Q nu + lam mu.log mu - lam nu.log nu`, the input policies read through
    `softmax` (so `T` ignores a constant shift of a state's logits: those directions are in the
    kernel of `dT/dz` and `I - dT/dz` stays invertible; on the normalized logits it is the
    derivative of the equilibrium conditions, invertible because the regularized stage games are
    strongly convex-concave and the value map is a `gamma`-contraction).
    """
    rewards, transitions, gamma, keep, lam = params
    v, lmu, lnu = z
    lmu, lnu = jax.nn.log_softmax(lmu, axis=-1), jax.nn.log_softmax(lnu, axis=-1)
    q = rewards + gamma * keep[:, None, None] * jnp.einsum("sabt,t->sab", transitions, v)
    mu, nu = jnp.exp(lmu), jnp.exp(lnu)
    lmu_new = jax.nn.log_softmax(-jnp.einsum("sab,sb->sa", q, nu) / lam, axis=-1)
    lnu_new = jax.nn.log_softmax(jnp.einsum("sab,sa->sb", q, mu) / lam, axis=-1)
    return _stage_value(q, lmu, lnu, lam), lmu_new, lnu_new


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _implicit_equilibrium(cfg: _SolverConfig, params, init):
    return _shapley_sweeps(params, init, cfg)


def _implicit_equilibrium_fwd(cfg, params, init):
    out = _shapley_sweeps(params, init, cfg)
    return out, (params, out[:3])


def _implicit_equilibrium_bwd(cfg, saved, cotangents):
    """One adjoint solve `(I - dT/dz)^T w = g` at the fixed point, then
    `params_bar = w^T dT/dparams`.

    `dT/dz` is formed densely by `jacfwd` (`n = S (1 + A + B)` tangents of `T`, each
    `O(S^2 A B)`), then one dense solve (`core.linear.dense_solve`, `O(n^3)`): for `S = 10`,
    `A = B = 3`, `n = 70`. The
    cotangents of `residual` and `sweeps` are ignored (they are diagnostics), and the warm start
    gets a zero cotangent (the fixed point does not depend on it).
    """
    del cfg
    params, z = saved
    flat_z, unravel = ravel_pytree(z)
    g, _ = ravel_pytree(tuple(cotangents[:3]))

    def flat_map(flat, p):
        return ravel_pytree(_shapley_map(unravel(flat), p))[0]

    jac = jax.jacfwd(flat_map)(flat_z, params)
    eye = jnp.eye(flat_z.shape[0], dtype=jac.dtype)
    w = dense_solve((eye - jac).T, g.astype(jac.dtype))
    _, vjp = jax.vjp(lambda p: flat_map(flat_z, p), params)
    (params_bar,) = vjp(w.astype(flat_z.dtype))
    return params_bar, jax.tree_util.tree_map(jnp.zeros_like, z)


_implicit_equilibrium.defvjp(_implicit_equilibrium_fwd, _implicit_equilibrium_bwd)


def _warm_start(init, shapes, dtype):
    """`(v, log mu, log nu)` from a `GameEquilibrium` (or None: zeros and uniform policies)."""
    num_states, num_a, num_b = shapes
    if init is None:
        return (jnp.zeros(num_states, dtype),
                jnp.full((num_states, num_a), -jnp.log(num_a), dtype),
                jnp.full((num_states, num_b), -jnp.log(num_b), dtype))
    if not isinstance(init, GameEquilibrium):
        raise InvalidArgumentError(
            f"init: expected a GameEquilibrium (a previous solution) or None, got "
            f"{type(init).__name__}")
    expected = {"v": (num_states,), "mu_logits": (num_states, num_a),
                "nu_logits": (num_states, num_b)}
    for name, shape in expected.items():
        got = tuple(getattr(getattr(init, name), "shape", ()))
        if got != shape:
            raise InvalidArgumentError(
                f"init.{name}: expected shape {shape} to match the game's rewards "
                f"[S, A, B] = {shapes}, got {got}")
    # Only the values and policies are reused; normalizing keeps the iteration in log space.
    return (lax.stop_gradient(init.v).astype(dtype),
            jax.nn.log_softmax(lax.stop_gradient(init.mu_logits).astype(dtype), axis=-1),
            jax.nn.log_softmax(lax.stop_gradient(init.nu_logits).astype(dtype), axis=-1))


def solve_game_equilibrium(game: TabularGame, temperature, num_iters: int = 500, *,
                           inner_iters: int = 20, init: GameEquilibrium | None = None,
                           tol: float | None = None,
                           differentiation: str = "implicit") -> GameEquilibrium:
    """Regularized Nash equilibrium by soft minimax (Shapley) value iteration, differentiable.

    Each of the `num_iters` outer sweeps forms `Q = r + gamma (1 - terminal) P V` and solves every
    stage game `min_mu max_nu mu^T Q(s) nu - lam H(mu) + lam H(nu)` (mu minimizes, nu maximizes;
    each player's entropy is a bonus in its own objective) approximately by
    `inner_iters` extragradient steps, warm-started from the previous sweep's policies; `V(s)` is
    the stage payoff at those policies. The outer map is a `gamma`-contraction, and the warm-started
    inner iterations keep converging as `Q` settles, so the error decays like
    `max(gamma, (1 - eta lam)^inner_iters)` per sweep (`eta` as in the extragradient step); the
    returned `residual` and `stage_residual` report where it stopped. Small `lam` relative to the
    payoff range slows the inner solver (rate `1 - eta lam`): raise `inner_iters` there, and
    raise `num_iters` to about `30 / (1 - gamma)` for discounts close to 1.
    Measured accuracy in float64 on 5 random games (`S = 6`, `A = 3`, `B = 2`, payoffs in
    `[-1, 1]`, `gamma = 0.9`, default iterations) for `lam` from 1 down to 0.01: value residual
    below 1e-15, `stage_residual` from 1e-15 (`lam = 1`) to 6e-12 (`lam = 0.01`, round-off of
    `Q / lam`), Nikaido-Isoda gap at the result below 1e-14 in absolute value.

    Warm start: `init` (a previous `GameEquilibrium`, e.g. of the previous leader iterate) starts
    the sweeps from its values and policies; with `tol` the loop then stops as soon as
    `max(|V_n - V_{n-1}|, stage_residual) <= tol * max(1, max |V|)` (at most `num_iters` sweeps),
    so a nearby solution costs a few sweeps instead of `num_iters`.

    Differentiation (`differentiation="implicit"`, the default): the derivative of the exact
    fixed point `z* = T(z*)` in `z = (V, log mu, log nu)` (`T` the map above with exact stage
    best responses), by the implicit function theorem: a `custom_vjp` whose backward pass is one
    dense adjoint solve `(I - dT/dz)^T w = g` with `n = S (1 + A + B)` unknowns (the Jacobian
    by `n` forward tangents of `T`, `O(n S^2 A B)`, then `O(n^3)` for the solve; `n = 70` for
    `S = 10`, `A = B = 3`), independent of the number of sweeps. Measured on the 2-core CPU
    machine (float64, `jit`, under load): `S = 8`, `A = B = 3` (`n = 56`): backward about 2 ms
    beside 19 ms for a cold forward solve to 1e-10; `S = 30`, `A = B = 4` (`n = 270`): about
    105 ms beside 56 ms (the `O(n^3)` elimination dominates; measured when the solve was a
    plain-XLA elimination, now LAPACK on CPU; use a matrix-free adjoint for larger games). Gradients reach `rewards`,
    `transitions`, `discount`, `temperature` (and through `rewards`/`transitions` an incentive
    `x`); none reach `init` or `initial` (the equilibrium does not depend on them). Exact to
    the solver's accuracy (the backward pass linearizes at the returned point). Reverse mode only
    (`jax.grad`/`vjp`; `jvp`/`jacfwd` of a custom_vjp are refused by JAX).
    `differentiation="unroll"` backpropagates through the sweeps instead (needs `tol=None`): the
    derivative of the truncated iterate, for checks.

    Args:
      game: the `TabularGame`.
      temperature: `lam > 0` (may be traced).
      num_iters: outer sweeps (the cap when `tol` is given).
      inner_iters: extragradient steps per stage game and sweep.
      init: optional warm start, a `GameEquilibrium` of a game with the same shapes.
      tol: optional early-stopping tolerance (None: exactly `num_iters` sweeps).
      differentiation: `"implicit"` or `"unroll"`.

    Returns:
      `GameEquilibrium`.

    Raises:
      InvalidArgumentError: temperature <= 0, bad `num_iters`, `inner_iters`, `tol`, `init` or
        `differentiation` (the message names it).
      InvalidMDPError: inconsistent game shapes.
    """
    check_temperature(temperature)
    check_game_shapes(game)
    for name, value, low in (("num_iters", num_iters, 1), ("inner_iters", inner_iters, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not np.isfinite(tol) or tol <= 0):
        raise InvalidArgumentError(f"tol: expected a number > 0 or None, got {tol!r}")
    if differentiation not in DIFFERENTIATION_MODES:
        raise InvalidArgumentError(
            f"differentiation: expected one of {DIFFERENTIATION_MODES}, got {differentiation!r}")
    if differentiation == "unroll" and tol is not None:
        raise InvalidArgumentError(
            "tol: differentiation='unroll' needs tol=None (a loop run to tolerance cannot be "
            "backpropagated through)")
    dtype = jnp.result_type(game.rewards.dtype, float)
    shapes = tuple(game.rewards.shape)
    params = (game.rewards.astype(dtype), game.transitions.astype(dtype),
              jnp.asarray(game.discount, dtype), game.continuation().astype(dtype),
              jnp.asarray(temperature, dtype))
    init_z = _warm_start(init, shapes, dtype)
    cfg = _SolverConfig(int(num_iters), int(inner_iters), None if tol is None else float(tol))
    if differentiation == "implicit":
        v, lmu, lnu, residual, sweeps = _implicit_equilibrium(cfg, params, init_z)
    else:
        v, lmu, lnu, residual, sweeps = _shapley_sweeps(params, init_z, cfg)
    rewards, transitions, gamma, keep, lam = params
    q = rewards + gamma * keep[:, None, None] * jnp.einsum("sabt,t->sab", transitions, v)
    return GameEquilibrium(mu_logits=lmu, nu_logits=lnu, mu_policy=jnp.exp(lmu),
                           nu_policy=jnp.exp(lnu), q=q, v=v, residual=residual,
                           stage_residual=_stage_residual(q, lmu, lnu, lam), num_sweeps=sweeps)


__all__ = [
    "GameEquilibrium",
    "TabularGame",
    "apply_incentive",
    "check_game_shapes",
    "game_value",
    "max_player_mdp",
    "min_player_mdp",
    "nikaido_isoda_gap",
    "solve_game_equilibrium",
    "validate_game",
]
