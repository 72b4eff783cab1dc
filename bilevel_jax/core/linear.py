"""Linear solves with the policy kernel `(I - gamma P_pi)`, the one system behind policy
evaluation, visitation and the implicit derivative of soft value iteration.

`P_pi(s, s') = (1 - terminal[s]) sum_a pi(a|s) P(s'|s, a)`. The solve is registered with
`lax.custom_linear_solve`, so it is differentiable (in the right-hand side, the policy, the
transitions, the discount) and transposable (reverse mode) whichever method computes it:

* `"direct"`: builds the dense `[S, S]` matrix and factorizes it, `O(S^3)`: small problems.
* `"richardson"`: `y <- b + gamma P_pi y` (a gamma-contraction) until the update is below
  `tol`; matrix-free, so it serves sparse and large MDPs.
* `"gmres"`: restarted GMRES (matrix-free), far fewer products than Richardson when gamma is
  close to 1.
* `"auto"`: `"direct"` up to `DIRECT_MAX_STATES` states, `"gmres"` beyond.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bilevel_jax.core.mdp import TabularMDP, expected_next, policy_matrix, pushforward
from bilevel_jax.errors import InvalidArgumentError

Array = jax.Array

DIRECT_MAX_STATES = 2048
METHODS = ("auto", "direct", "richardson", "gmres")


class LinearSolverOptions(NamedTuple):
    """Static options of the `(I - gamma P_pi)` solves (hashable: usable as a jit static)."""

    method: str = "auto"
    tol: float | None = None        # None: by dtype (1e-12 in float64, 1e-6 in float32)
    max_iters: int = 100_000       # Richardson sweeps, or GMRES restarts x restart length
    restart: int = 32              # GMRES Krylov dimension


def default_tolerance(dtype) -> float:
    return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def resolve_method(method: str, num_states: int) -> str:
    if method not in METHODS:
        raise InvalidArgumentError(f"linear solver method: expected one of {METHODS}, got {method!r}")
    if method == "auto":
        return "direct" if num_states <= DIRECT_MAX_STATES else "gmres"
    return method


def _eliminate(system: Array, rhs: Array) -> Array:
    """`system^{-1} rhs` (`[n, n]`, `[n]`) by Gaussian elimination with partial pivoting in plain
    XLA ops, `n` steps of `O(n^2)`.

    Pivoting is not needed for `I - gamma P_pi` (diagonally dominant) but is for other systems
    solved here, e.g. the equilibrium adjoint `I - dT/dz` of `bilevel_jax.games`, whose policy
    blocks scale like `|Q| / lam`.
    """
    size = system.shape[-1]
    rows = jnp.arange(size)

    def forward(k, carry):
        a, b = carry
        pivot = jnp.argmax(jnp.where(rows >= k, jnp.abs(a[:, k]), -1.0))
        order = jnp.where(rows == k, pivot, jnp.where(rows == pivot, k, rows))
        a, b = a[order], b[order]
        factors = jnp.where(rows > k, a[:, k] / a[k, k], 0.0)
        return a - factors[:, None] * a[k][None, :], b - factors * b[k]

    upper, y = lax.fori_loop(0, size, forward, (system, rhs))

    def backward(i, x):
        k = size - 1 - i
        return x.at[k].set((y[k] - jnp.dot(jnp.where(rows > k, upper[k], 0.0), x)) / upper[k, k])

    return lax.fori_loop(0, size, backward, jnp.zeros_like(rhs))


@jax.custom_batching.custom_vmap
def dense_solve(system: Array, rhs: Array) -> Array:
    """`system^{-1} rhs` by LAPACK; batched (under `vmap`) one LAPACK solve after another on CPU,
    by `_eliminate` elsewhere.

    jaxlib's batched CPU LU (`ParallelBatchMap` over a thread pool) deadlocks when it runs inside
    XLA's own parallel work (seen with vmapped PBRL on Four-Rooms: threads parked in
    `lapack_sgetrf_ffi`), so a batch never reaches it: on CPU, `lax.map` of unbatched solves is
    ~2.5x faster than the elimination in XLA ops (144 systems of 104 states: 36 ms against 92).
    """
    return jnp.linalg.solve(system, rhs)


@jax.custom_batching.custom_vmap
def _solve_each(system: Array, rhs: Array) -> Array:
    """`[B, S, S], [B, S] -> [B, S]`, one unbatched LAPACK solve per system."""
    return lax.map(lambda pair: jnp.linalg.solve(*pair), (system, rhs))


@_solve_each.def_vmap
def _solve_each_batched(axis_size, in_batched, system, rhs):
    # An enclosing vmap would batch the LAPACK call inside lax.map: fold its axis into B instead.
    system = system if in_batched[0] else jnp.broadcast_to(system, (axis_size,) + system.shape)
    rhs = rhs if in_batched[1] else jnp.broadcast_to(rhs, (axis_size,) + rhs.shape)
    solved = _solve_each(system.reshape((-1,) + system.shape[-2:]), rhs.reshape((-1, rhs.shape[-1])))
    return solved.reshape(rhs.shape), True


@dense_solve.def_vmap
def _dense_solve_batched(axis_size, in_batched, system, rhs):
    system_batched, rhs_batched = in_batched
    if not system_batched:
        system = jnp.broadcast_to(system, (axis_size,) + system.shape)
    if not rhs_batched:
        rhs = jnp.broadcast_to(rhs, (axis_size,) + rhs.shape)
    solved = lax.platform_dependent(system, rhs, cpu=_solve_each, default=jax.vmap(_eliminate))
    return solved, True


def _richardson(apply_contraction, b: Array, tol: float, max_iters: int) -> Array:
    """Solves `y = b + C(y)` for a contraction `C` by fixed-point iteration."""

    def cond(carry):
        _, delta, it = carry
        return (delta > tol) & (it < max_iters)

    def body(carry):
        y, _, it = carry
        y_new = b + apply_contraction(y)
        scale = jnp.maximum(1.0, jnp.max(jnp.abs(y_new)))
        return y_new, jnp.max(jnp.abs(y_new - y)) / scale, it + 1

    y0 = b
    init = (y0, jnp.asarray(jnp.inf, b.dtype), jnp.asarray(0, jnp.int32))
    y, _, _ = lax.while_loop(cond, body, init)
    return y


def solve_policy_system(mdp: TabularMDP, policy: Array, b: Array, *, transpose: bool = False,
                        options: LinearSolverOptions = LinearSolverOptions()) -> Array:
    """Solves `(I - gamma P_pi) y = b`, or `(I - gamma P_pi)^T y = b` with `transpose=True`.

    Args:
      mdp: the MDP (dense or sparse transitions; `rewards` and `initial` are not used).
      policy: `[S, A]` action probabilities.
      b: `[S]` right-hand side.
      transpose: solve the transposed system (used for visitation and adjoints).
      options: solver choice and tolerances.

    Returns:
      `y`, `[S]`.
    """
    gamma = jnp.asarray(mdp.discount, b.dtype)
    keep = mdp.continuation().astype(b.dtype)
    transitions = mdp.transitions
    method = resolve_method(options.method, mdp.num_states)
    tol = default_tolerance(b.dtype) if options.tol is None else options.tol

    def forward(y):   # gamma P_pi y
        return gamma * keep * jnp.sum(policy * expected_next(transitions, y), axis=-1)

    def backward(z):  # gamma P_pi^T z
        return gamma * pushforward(transitions, policy * (keep * z)[:, None])

    def dense_system():
        kernel = keep[:, None] * policy_matrix(transitions, policy)
        return jnp.eye(kernel.shape[0], dtype=b.dtype) - gamma * kernel.astype(b.dtype)

    def make_solve(contraction, transposed):
        def solve(_, rhs):
            if method == "direct":
                system = dense_system()
                return dense_solve(system.T if transposed else system, rhs)
            if method == "richardson":
                return _richardson(contraction, rhs, tol, options.max_iters)
            y, _ = jax.scipy.sparse.linalg.gmres(
                lambda v: v - contraction(v), rhs, tol=tol, atol=0.0,
                restart=options.restart, maxiter=max(1, options.max_iters // options.restart),
                solve_method="batched")
            return y
        return solve

    def matvec(y):
        return y - forward(y)

    def vecmat(z):
        return z - backward(z)

    if transpose:
        return lax.custom_linear_solve(vecmat, b, make_solve(backward, True),
                                       make_solve(forward, False))
    return lax.custom_linear_solve(matvec, b, make_solve(forward, False),
                                   make_solve(backward, True))


def solve_q_system(mdp: TabularMDP, policy: Array, rhs: Array,
                   options: LinearSolverOptions = LinearSolverOptions()) -> Array:
    """Solves `(I - gamma C P Pi) x = rhs` in `S * A` space through the `S x S` system.

    With `C = diag(1 - terminal)`, `(I - gamma C P Pi)^{-1} = I + gamma C P (I - gamma P_pi)^{-1} Pi`,
    so `x = rhs + gamma (1 - terminal) * P y` where `(I - gamma P_pi) y = sum_a pi rhs`.
    This is the Jacobian system of the soft Bellman fixed point (SPEC 4).

    Args:
      rhs: `[S, A]`.

    Returns:
      `x`, `[S, A]`.
    """
    gamma = jnp.asarray(mdp.discount, rhs.dtype)
    keep = mdp.continuation().astype(rhs.dtype)
    y = solve_policy_system(mdp, policy, jnp.sum(policy * rhs, axis=-1), options=options)
    return rhs + gamma * keep[:, None] * expected_next(mdp.transitions, y)
