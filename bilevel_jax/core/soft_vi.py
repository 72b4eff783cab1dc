"""Entropy-regularized (soft) value iteration with implicit differentiation (SPEC 2 and 4).

    Q*(s, a) = r(s, a) + gamma (1 - terminal[s]) sum_s' P(s'|s, a) V*(s')
    V*(s)    = lam * logsumexp_a(Q*(s, a) / lam),     pi*(a|s) = softmax(Q*(s, .) / lam)

`jax.grad`/`jax.jacfwd` of anything computed from the solution differentiate the fixed point,
not the sweeps: the solver is a `jax.custom_jvp` whose tangent is one linear solve with the
Jacobian `I - gamma C P Pi*` (transposed automatically for reverse mode), so the backward cost is
one solve however many sweeps the forward pass took. Derivatives flow to `rewards`,
`transitions` (dense array or sparse `probs`), `initial`, `discount` and `temperature`.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from bilevel_jax.checks import is_concrete
from bilevel_jax.core.linear import LinearSolverOptions, solve_q_system
from bilevel_jax.core.mdp import TabularMDP, check_shapes, expected_next, validate_mdp
from bilevel_jax.errors import InvalidArgumentError

Array = jax.Array

DIFFERENTIATION_MODES = ("implicit", "unroll")


@struct.dataclass
class SoftVISolution:
    """Result of `soft_value_iteration`.

    Attributes:
      q: `[S, A]` soft-optimal action values.
      v: `[S]` soft values, `lam * logsumexp(q / lam)` (`max` for hard value iteration).
      policy: `[S, A]` the soft-greedy policy `softmax(q / lam)` (greedy one-hot when hard).
      residual: scalar, `max |T(q) - q|` at the last sweep.
      num_iters: int scalar, sweeps performed.
    """

    q: Array
    v: Array
    policy: Array
    residual: Array
    num_iters: Array


def _logsumexp_last(z: Array) -> Array:
    """`jax.nn.logsumexp(z, axis=-1)`, unrolled over a short last axis (actions): XLA (CPU)
    reduces a short minor axis element by element, ~2x slower than elementwise ops on slices."""
    size = z.shape[-1]
    if size > 8:
        return jax.nn.logsumexp(z, axis=-1)
    columns = [z[..., i] for i in range(size)]
    amax = functools.reduce(jnp.maximum, columns)
    amax = lax.stop_gradient(jnp.where(jnp.isfinite(amax), amax, 0.0))
    return jnp.log(functools.reduce(jnp.add, [jnp.exp(c - amax) for c in columns])) + amax


def soft_value(q: Array, temperature) -> Array:
    """`lam * logsumexp(q / lam)` over the last axis (stable for small `lam`); `max` if `lam` is None."""
    if temperature is None:
        return jnp.max(q, axis=-1)
    return temperature * _logsumexp_last(q / temperature)


def soft_greedy_policy(q: Array, temperature) -> Array:
    """`softmax(q / lam)` over the last axis; the greedy one-hot policy if `lam` is None."""
    if temperature is None:
        return jax.nn.one_hot(jnp.argmax(q, axis=-1), q.shape[-1], dtype=q.dtype)
    return jax.nn.softmax(q / temperature, axis=-1)


def soft_bellman_operator(q: Array, mdp: TabularMDP, temperature) -> Array:
    """`T(q) = r + gamma (1 - terminal) P soft_value(q)`, `[S, A] -> [S, A]`."""
    gamma = jnp.asarray(mdp.discount, q.dtype)
    keep = mdp.continuation().astype(q.dtype)
    next_values = expected_next(mdp.transitions, soft_value(q, temperature)).astype(q.dtype)
    return mdp.rewards + gamma * keep[:, None] * next_values


class _Config(NamedTuple):
    hard: bool
    tol: float
    max_iters: int
    num_sweeps: int | None
    linear: LinearSolverOptions


def _sweep(mdp, temperature, q):
    q_new = soft_bellman_operator(q, mdp, temperature)
    return q_new, jnp.max(jnp.abs(q_new - q))


def _iterate(mdp: TabularMDP, temperature, init_q: Array, cfg: _Config):
    """Plain sweeps: to tolerance (`while_loop`) or a fixed number (`scan`, differentiable)."""
    if cfg.num_sweeps is not None:
        def body(q, _):
            q_new, residual = _sweep(mdp, temperature, q)
            return q_new, residual

        q, residuals = lax.scan(body, init_q, None, length=cfg.num_sweeps)
        residual = residuals[-1] if cfg.num_sweeps > 0 else jnp.asarray(jnp.inf, init_q.dtype)
        return q, residual, jnp.asarray(cfg.num_sweeps, jnp.int32)

    def cond(carry):
        q, residual, it = carry
        scale = jnp.maximum(1.0, jnp.max(jnp.abs(q)))
        return (residual > cfg.tol * scale) & (it < cfg.max_iters)

    def body(carry):
        q, _, it = carry
        q_new, residual = _sweep(mdp, temperature, q)
        return q_new, residual, it + 1

    init = (init_q, jnp.asarray(jnp.inf, init_q.dtype), jnp.asarray(0, jnp.int32))
    return lax.while_loop(cond, body, init)


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _fixed_point(mdp: TabularMDP, temperature, init_q: Array, cfg: _Config):
    # `temperature` is a placeholder array when `cfg.hard` (custom_jvp needs array arguments).
    return _iterate(mdp, None if cfg.hard else temperature, init_q, cfg)


@_fixed_point.defjvp
def _fixed_point_jvp(cfg, primals, tangents):
    mdp, temperature, init_q = primals
    mdp_dot, temperature_dot, _ = tangents
    q, residual, num_iters = _fixed_point(mdp, temperature, init_q, cfg)
    q = lax.stop_gradient(q)
    lam = None if cfg.hard else temperature
    lam_dot = None if cfg.hard else temperature_dot
    # Tangent of the fixed point: (I - dT/dq)^{-1} (dT/dparams . dparams), dT/dq = gamma C P Pi*.
    if cfg.hard:
        _, rhs = jax.jvp(lambda m: soft_bellman_operator(q, m, None), (mdp,), (mdp_dot,))
    else:
        _, rhs = jax.jvp(lambda m, t: soft_bellman_operator(q, m, t), (mdp, lam), (mdp_dot, lam_dot))
    policy = soft_greedy_policy(q, lam)
    q_dot = solve_q_system(mdp, policy, rhs.astype(q.dtype), cfg.linear)
    residual_dot = jnp.zeros_like(residual)
    iters_dot = np.zeros(num_iters.shape, jax.dtypes.float0)
    return (q, residual, num_iters), (q_dot, residual_dot, iters_dot)


def check_temperature(temperature) -> None:
    """Raises `InvalidArgumentError` (a `ValueError`) for a concrete temperature that is not > 0."""
    try:
        values = np.asarray(temperature, dtype=np.float64)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return  # traced (e.g. swept under vmap): cannot be checked here
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"temperature: expected a positive number, got {temperature!r}") from err
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InvalidArgumentError(
            f"temperature: expected a finite value > 0, got {temperature!r} "
            "(use value_iteration for the unregularized problem)")


def _solve(mdp, temperature, init_q, tol, max_iters, num_sweeps, differentiation, linear_solver,
           hard, validate):
    check_shapes(mdp)
    if validate and is_concrete(mdp):
        validate_mdp(mdp)     # eager calls: the values too (under jit only shapes are known)
    if differentiation not in DIFFERENTIATION_MODES:
        raise InvalidArgumentError(
            f"differentiation: expected one of {DIFFERENTIATION_MODES}, got {differentiation!r}")
    if num_sweeps is not None and (not isinstance(num_sweeps, (int, np.integer)) or num_sweeps < 0):
        raise InvalidArgumentError(f"num_sweeps: expected an int >= 0 or None, got {num_sweeps!r}")
    if differentiation == "unroll" and num_sweeps is None:
        raise InvalidArgumentError(
            "differentiation='unroll' needs a fixed num_sweeps (a loop run to tolerance cannot be "
            "backpropagated through)")
    if not isinstance(max_iters, (int, np.integer)) or max_iters < 1:
        raise InvalidArgumentError(f"max_iters: expected an int >= 1, got {max_iters!r}")
    dtype = jnp.result_type(mdp.rewards.dtype, float)
    if init_q is None:
        init_q = jnp.zeros(mdp.rewards.shape, dtype)
    elif tuple(init_q.shape) != tuple(mdp.rewards.shape):
        raise InvalidArgumentError(
            f"init_q: expected shape {tuple(mdp.rewards.shape)} (that of rewards), got {tuple(init_q.shape)}")
    if tol is None:
        tol = 1e-12 if dtype == jnp.float64 else 1e-6
    if isinstance(linear_solver, str):
        linear_solver = LinearSolverOptions(method=linear_solver)
    cfg = _Config(hard=hard, tol=float(tol), max_iters=int(max_iters),
                  num_sweeps=None if num_sweeps is None else int(num_sweeps), linear=linear_solver)
    lam = None if hard else jnp.asarray(temperature, dtype)
    init_q = jnp.asarray(init_q, dtype)
    if differentiation == "unroll":
        q, residual, num_iters = _iterate(mdp, lam, init_q, cfg)
    elif hard:
        q, residual, num_iters = _fixed_point(mdp, jnp.zeros((), dtype), init_q, cfg)
    else:
        q, residual, num_iters = _fixed_point(mdp, lam, init_q, cfg)
    return SoftVISolution(q=q, v=soft_value(q, lam), policy=soft_greedy_policy(q, lam),
                          residual=residual, num_iters=num_iters)


def soft_value_iteration(mdp: TabularMDP, temperature, *, init_q: Array | None = None,
                         tol: float | None = None, max_iters: int = 100_000,
                         num_sweeps: int | None = None, differentiation: str = "implicit",
                         linear_solver: str | LinearSolverOptions = "auto",
                         validate: bool = True) -> SoftVISolution:
    """Solves the entropy-regularized Bellman equation of `mdp` at temperature `lam`.

    An eager call on a concrete `mdp` checks its values as `validate_mdp` does (probabilities
    non-negative and summing to 1, `initial` a distribution, discount in `[0, 1)`, sparse
    indices in range, finite rewards) unless `validate=False`. Under `jit`, `vmap` or `grad`
    (traced fields) only the shapes are checked: validate the MDP eagerly beforehand.

    Args:
      mdp: a `TabularMDP` (dense or sparse transitions).
      temperature: `lam > 0` (scalar; may be traced, e.g. vmapped over a sweep).
      init_q: optional `[S, A]` warm start (default zeros).
      tol: stop when `max |T(q) - q| <= tol * max(1, max |q|)`; default 1e-12 (float64) or
        1e-6 (float32).
      max_iters: cap on sweeps when running to tolerance.
      num_sweeps: if given, run exactly this many sweeps (`lax.scan`) instead.
      differentiation: `"implicit"` (derivative of the exact fixed point, cost of one linear
        solve) or `"unroll"` (backpropagate through the `num_sweeps` sweeps: the derivative of
        the truncated iterate).
      linear_solver: method of the adjoint solve (`"auto"`, `"direct"`, `"richardson"`,
        `"gmres"`) or `LinearSolverOptions`.
      validate: check a concrete MDP's values (eager calls only; a few numpy reductions).

    Returns:
      `SoftVISolution` with `q [S, A]`, `v [S]`, `policy [S, A]`, `residual`, `num_iters`.

    Raises:
      InvalidArgumentError: temperature <= 0, bad options.
      InvalidMDPError: fields with inconsistent shapes; in an eager call, invalid values.
    """
    check_temperature(temperature)
    return _solve(mdp, temperature, init_q, tol, max_iters, num_sweeps, differentiation,
                  linear_solver, hard=False, validate=validate)


def value_iteration(mdp: TabularMDP, *, init_q: Array | None = None, tol: float | None = None,
                    max_iters: int = 100_000, num_sweeps: int | None = None,
                    differentiation: str = "implicit",
                    linear_solver: str | LinearSolverOptions = "auto",
                    validate: bool = True) -> SoftVISolution:
    """Ordinary (unregularized) value iteration: the `lam -> 0` limit of `soft_value_iteration`.

    `v = max_a q`, `policy` is greedy one-hot. Implicit derivatives hold wherever the greedy
    action is unique (the fixed point is then locally linear in the MDP). Eager calls validate
    a concrete MDP's values unless `validate=False`; under `jit` only shapes are checked.
    """
    return _solve(mdp, None, init_q, tol, max_iters, num_sweeps, differentiation, linear_solver,
                  hard=True, validate=validate)
