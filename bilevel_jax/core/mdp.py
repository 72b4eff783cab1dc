"""Tabular MDPs: the `TabularMDP` pytree, dense and sparse transition kernels, validation.

Conventions (SPEC 1): `transitions[s, a, s'] = P(s'|s, a)`, `rewards[s, a]`, `initial[s]`,
optional boolean `terminal[s]`. Acting in a terminal state earns `r(s, a)` and ends the episode,
so every backup is `r(s, a) + gamma * (1 - terminal[s]) * sum_s' P(s'|s, a) V(s')`.

All transition algebra used by the solvers goes through three functions that accept either a
dense `[S, A, S]` array or a `SparseTransitions`:

* `expected_next(P, v)`   -> `[S, A]`, `sum_s' P(s'|s, a) v(s')`
* `pushforward(P, w)`     -> `[S]`,    `sum_{s, a} w(s, a) P(s'|s, a)` (the transpose)
* `policy_matrix(P, pi)`  -> `[S, S]`, `sum_a pi(a|s) P(s'|s, a)` (dense; small problems only)
"""

from __future__ import annotations

import functools
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bilevel_jax.errors import InvalidMDPError

Array = jax.Array


@struct.dataclass
class SparseTransitions:
    """Fixed-branching transition kernel for MDPs with a handful of successors per (s, a).

    `P(indices[s, a, k] | s, a) = probs[s, a, k]`; repeated indices add up; padding entries carry
    probability 0 (any valid index). Memory is `S * A * B` instead of `S * A * S`.

    Attributes:
      indices: int `[S, A, B]`, successor states in `[0, S)`.
      probs: float `[S, A, B]`, non-negative, each `(s, a)` row sums to 1.
    """

    indices: Array
    probs: Array

    @property
    def num_states(self) -> int:
        return self.indices.shape[-3]

    @property
    def branching(self) -> int:
        return self.indices.shape[-1]

    def todense(self) -> Array:
        """Returns the dense `[S, A, S]` kernel (for tests and small problems)."""
        num_states = self.num_states
        one_hot = jax.nn.one_hot(self.indices, num_states, dtype=self.probs.dtype)
        return jnp.einsum("sak,sakt->sat", self.probs, one_hot)

    @classmethod
    def from_dense(cls, transitions, branching: int | None = None) -> "SparseTransitions":
        """Converts a dense kernel eagerly (host-side), keeping every non-zero successor.

        `branching` defaults to the largest number of non-zeros in any row; a smaller value
        that would drop probability mass raises `InvalidMDPError`.
        """
        dense = np.asarray(transitions)
        if dense.ndim != 3 or dense.shape[0] != dense.shape[2]:
            raise InvalidMDPError(
                f"transitions: expected a dense array of shape [S, A, S], got {dense.shape}")
        nonzero = dense != 0
        needed = max(int(nonzero.sum(-1).max()), 1)
        branching = needed if branching is None else branching
        if branching < needed:
            raise InvalidMDPError(
                f"transitions: a row has {needed} successors, more than branching={branching}")
        # Sorting puts each row's non-zeros first (stable, so successor order is kept).
        order = np.argsort(~nonzero, axis=-1, kind="stable")[..., :branching]
        probs = np.take_along_axis(dense, order, axis=-1)
        return cls(indices=jnp.asarray(order, dtype=jnp.int32), probs=jnp.asarray(probs))


Transitions = Union[Array, SparseTransitions]


@struct.dataclass
class TabularMDP:
    """A finite MDP as a pytree: works under `jit`, `vmap` and `grad`.

    Attributes:
      transitions: `[S, A, S]` array, or `SparseTransitions` with `[S, A, B]` fields.
      rewards: `[S, A]`.
      discount: scalar in `[0, 1)` (a leaf, so it can be traced and vmapped).
      initial: `[S]`, the start-state distribution.
      terminal: optional bool `[S]`; `None` means no terminal states.
    """

    transitions: Transitions
    rewards: Array
    discount: Any
    initial: Array
    terminal: Array | None = None

    @property
    def num_states(self) -> int:
        return self.rewards.shape[-2]

    @property
    def num_actions(self) -> int:
        return self.rewards.shape[-1]

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.transitions, SparseTransitions)

    def continuation(self) -> Array:
        """`(1 - terminal[s])` as a float `[S]` vector (all ones without terminal states)."""
        dtype = self.rewards.dtype
        if self.terminal is None:
            return jnp.ones(self.rewards.shape[:-1], dtype)
        return 1.0 - jnp.asarray(self.terminal, dtype)


def expected_next(transitions: Transitions, values: Array) -> Array:
    """`sum_s' P(s'|s, a) values(s', ...)`: `[S, ...]` -> `[S, A, ...]` (trailing axes ride along)."""
    if isinstance(transitions, SparseTransitions):
        if values.ndim == 1:
            # XLA (CPU) fuses the producer of a gathered vector into the gather and recomputes it
            # per gathered element: a logsumexp feeding this made soft VI sweeps ~20x slower. A
            # scatter is never fused into its consumers, so this copy computes `values` once.
            values = jnp.zeros_like(values).at[jnp.arange(values.shape[0])].set(
                values, unique_indices=True, indices_are_sorted=True)
        gathered = values[transitions.indices]                       # [S, A, B, ...]
        probs = transitions.probs.reshape(transitions.probs.shape + (1,) * (values.ndim - 1))
        if transitions.branching <= 8:
            # Unrolled: XLA (CPU) sums a short axis element by element, ~3x slower.
            terms = [probs[:, :, k] * gathered[:, :, k] for k in range(transitions.branching)]
            return functools.reduce(jnp.add, terms)
        return jnp.sum(probs * gathered, axis=2)
    return jnp.tensordot(transitions, values, axes=1)


def pushforward(transitions: Transitions, weights: Array) -> Array:
    """`sum_{s, a} weights(s, a) P(s'|s, a)`: `[S, A]` -> `[S]` (transpose of `expected_next`)."""
    if isinstance(transitions, SparseTransitions):
        mass = transitions.probs * weights[..., None]
        out = jnp.zeros(transitions.num_states, mass.dtype)
        return out.at[transitions.indices.reshape(-1)].add(mass.reshape(-1))
    return jnp.einsum("sa,sat->t", weights, transitions)


def policy_matrix(transitions: Transitions, policy: Array) -> Array:
    """Dense `[S, S]` state-to-state kernel `sum_a policy(a|s) P(s'|s, a)`."""
    if isinstance(transitions, SparseTransitions):
        num_states = transitions.num_states
        mass = transitions.probs * policy[..., None]
        rows = jnp.broadcast_to(jnp.arange(num_states)[:, None, None], mass.shape)
        out = jnp.zeros((num_states, num_states), mass.dtype)
        return out.at[rows.reshape(-1), transitions.indices.reshape(-1)].add(mass.reshape(-1))
    return jnp.einsum("sa,sat->st", policy, transitions)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _sum_tolerance(dtype) -> float:
    """How far a probability vector may sum from 1, by floating dtype."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return 1e-9
    if dtype == np.float32:
        return 1e-5
    return 1e-2


def check_shapes(mdp: TabularMDP) -> None:
    """Static shape checks (valid under `jit`: shapes are known at trace time).

    Only trailing dimensions are checked, so batched MDPs (leading axes) pass.
    """
    rewards = mdp.rewards
    if not hasattr(rewards, "shape") or len(rewards.shape) < 2:
        raise InvalidMDPError(
            f"rewards: expected an array of shape [S, A], got {getattr(rewards, 'shape', type(rewards))}")
    num_states, num_actions = rewards.shape[-2:]
    if isinstance(mdp.transitions, SparseTransitions):
        indices, probs = mdp.transitions.indices, mdp.transitions.probs
        if len(indices.shape) < 3 or tuple(indices.shape[-3:-1]) != (num_states, num_actions):
            raise InvalidMDPError(
                f"transitions.indices: expected shape [S, A, B] = [{num_states}, {num_actions}, B] "
                f"to match rewards, got {tuple(indices.shape)}")
        if tuple(probs.shape[-3:]) != tuple(indices.shape[-3:]):
            raise InvalidMDPError(
                f"transitions.probs: expected the shape of transitions.indices "
                f"{tuple(indices.shape[-3:])}, got {tuple(probs.shape)}")
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise InvalidMDPError(
                f"transitions.indices: expected an integer dtype, got {indices.dtype}")
    else:
        shape = tuple(getattr(mdp.transitions, "shape", ()))
        if len(shape) < 3 or shape[-3:] != (num_states, num_actions, num_states):
            raise InvalidMDPError(
                f"transitions: expected shape [S, A, S] = [{num_states}, {num_actions}, "
                f"{num_states}] to match rewards [S, A], got {shape}")
    initial_shape = tuple(getattr(mdp.initial, "shape", ()))
    if len(initial_shape) < 1 or initial_shape[-1] != num_states:
        raise InvalidMDPError(
            f"initial: expected shape [S] = [{num_states}] to match rewards, got {initial_shape}")
    if mdp.terminal is not None:
        terminal_shape = tuple(getattr(mdp.terminal, "shape", ()))
        if len(terminal_shape) < 1 or terminal_shape[-1] != num_states:
            raise InvalidMDPError(
                f"terminal: expected a bool array of shape [S] = [{num_states}], got {terminal_shape}")
        if jnp.asarray(mdp.terminal).dtype != jnp.bool_:
            raise InvalidMDPError(
                f"terminal: expected dtype bool, got {jnp.asarray(mdp.terminal).dtype}")


def _check_distribution(name: str, probs: np.ndarray, allow_zero_rows: np.ndarray | None = None):
    if np.isnan(probs).any():
        raise InvalidMDPError(f"{name}: contains NaN; expected probabilities in [0, 1]")
    if (probs < 0).any():
        raise InvalidMDPError(
            f"{name}: contains negative entries (min {probs.min():.3g}); expected probabilities >= 0")
    if np.isinf(probs).any():
        raise InvalidMDPError(f"{name}: contains inf; expected probabilities in [0, 1]")
    totals = probs.sum(-1)
    bad = np.abs(totals - 1.0) > _sum_tolerance(probs.dtype)
    if allow_zero_rows is not None:
        bad &= ~(allow_zero_rows & (totals == 0))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidMDPError(
            f"{name}: expected each distribution to sum to 1 (tolerance "
            f"{_sum_tolerance(probs.dtype):g}), but the one at index {where} sums to "
            f"{float(totals[where]):.9g}")


def validate_mdp(mdp: TabularMDP) -> TabularMDP:
    """Checks an MDP eagerly (outside `jit`) and returns it unchanged.

    Raises `InvalidMDPError` naming the field for: shape mismatches between fields, negative,
    NaN or inf probabilities, transition rows or `initial` not summing to 1 (tolerance by
    dtype; rows of terminal states may also be all zero), NaN or inf rewards, a discount
    outside `[0, 1)`, successor indices out of range.
    """
    if not isinstance(mdp, TabularMDP):
        raise InvalidMDPError(f"mdp: expected a TabularMDP, got {type(mdp).__name__}")
    try:
        check_shapes(mdp)
        rewards = np.asarray(mdp.rewards)
        initial = np.asarray(mdp.initial)
        discount = np.asarray(mdp.discount)
        terminal = None if mdp.terminal is None else np.asarray(mdp.terminal)
        if isinstance(mdp.transitions, SparseTransitions):
            probs = np.asarray(mdp.transitions.probs)
            indices = np.asarray(mdp.transitions.indices)
        else:
            probs = np.asarray(mdp.transitions)
            indices = None
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        raise InvalidMDPError(
            "validate_mdp checks values and must run outside jit (got traced fields)") from err

    if not np.issubdtype(rewards.dtype, np.floating):
        raise InvalidMDPError(f"rewards: expected a floating dtype, got {rewards.dtype}")
    if not np.isfinite(rewards).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(rewards))[0])
        raise InvalidMDPError(f"rewards: expected finite values, found {rewards[where]} at {where}")
    if np.isnan(discount).any() or (discount < 0).any() or (discount >= 1).any():
        raise InvalidMDPError(f"discount: expected a value in [0, 1), got {discount}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise InvalidMDPError(f"transitions: expected floating probabilities, got {probs.dtype}")
    zero_rows_ok = None
    if terminal is not None:
        zero_rows_ok = np.broadcast_to(terminal[..., :, None], probs.shape[:-1])
    if indices is not None:
        num_states = rewards.shape[-2]
        if (indices < 0).any() or (indices >= num_states).any():
            raise InvalidMDPError(
                f"transitions.indices: expected successor indices in [0, {num_states}), got "
                f"values in [{indices.min()}, {indices.max()}]")
        _check_distribution("transitions.probs", probs, zero_rows_ok)
    else:
        _check_distribution("transitions", probs, zero_rows_ok)
    _check_distribution("initial", initial)
    return mdp
