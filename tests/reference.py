"""Independent NumPy float64 reference for the tabular MDP maths (SPEC sections 1, 2 and 4).

Written from the specification only; it deliberately does NOT import `bilevel_jax`, so that the
tests compare the library against a second implementation rather than against itself.

Conventions: `P[s, a, s']`, `r[s, a]`, `mu[s]`, optional bool `terminal[s]`. Acting in a terminal
state earns `r(s, a)` and the episode ends, so every backup is
`r(s, a) + gamma * (1 - terminal[s]) * sum_s' P(s'|s, a) V(s')`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


# ----------------------------------------------------------------------------------------------
# Random MDPs
# ----------------------------------------------------------------------------------------------

class RefMDP(NamedTuple):
    """A random MDP in plain NumPy float64.

    `P` is always the dense `[S, A, S]` kernel. When generated with `branching=b`, `indices` and
    `probs` (`[S, A, b]`) hold the same kernel in sparse form (`P = scatter(indices, probs)`).
    """

    P: np.ndarray
    rewards: np.ndarray
    discount: float
    initial: np.ndarray
    terminal: np.ndarray | None = None
    indices: np.ndarray | None = None
    probs: np.ndarray | None = None


def dense_from_sparse(indices: np.ndarray, probs: np.ndarray, num_states: int) -> np.ndarray:
    """Scatters a fixed-branching kernel into a dense `[S, A, S]` one (repeated indices add)."""
    S, A, _ = indices.shape
    dense = np.zeros((S, A, num_states))
    s_idx = np.broadcast_to(np.arange(S)[:, None, None], indices.shape)
    a_idx = np.broadcast_to(np.arange(A)[None, :, None], indices.shape)
    np.add.at(dense, (s_idx, a_idx, indices), probs)
    return dense


def random_mdp(rng: np.random.Generator, num_states: int, num_actions: int, *,
               discount: float = 0.9, num_terminal: int = 0, branching: int | None = None,
               alpha: float = 1.0, reward_scale: float = 1.0, zero_terminal_rows: bool = False,
               initial_support: int | None = None, duplicate_indices: bool = False) -> RefMDP:
    """A random MDP with Dirichlet transition rows.

    Args:
      rng: NumPy generator.
      num_states, num_actions: sizes.
      discount: gamma.
      num_terminal: how many (randomly chosen) terminal states; 0 gives `terminal=None`.
      branching: if given, every (s, a) row has exactly `branching` successors (chosen without
        replacement unless `duplicate_indices`) with Dirichlet weights; the sparse form is kept.
      alpha: Dirichlet concentration.
      reward_scale: rewards are uniform in `[-reward_scale, reward_scale]`.
      zero_terminal_rows: make the transition rows of terminal states all zero (allowed).
      initial_support: if given, `initial` puts mass on only this many states.
      duplicate_indices: with `branching`, draw successors with replacement (repeats add up).
    """
    S, A = num_states, num_actions
    rewards = rng.uniform(-reward_scale, reward_scale, size=(S, A))
    indices = probs = None
    if branching is None:
        P = rng.dirichlet(alpha * np.ones(S), size=(S, A))
    else:
        indices = np.empty((S, A, branching), dtype=np.int64)
        for s in range(S):
            for a in range(A):
                indices[s, a] = rng.choice(S, size=branching, replace=duplicate_indices)
        probs = rng.dirichlet(alpha * np.ones(branching), size=(S, A))
        P = dense_from_sparse(indices, probs, S)
    terminal = None
    if num_terminal > 0:
        terminal = np.zeros(S, dtype=bool)
        terminal[rng.choice(S, size=num_terminal, replace=False)] = True
        if zero_terminal_rows:
            P = P.copy()
            P[terminal] = 0.0
            if probs is not None:
                probs = probs.copy()
                probs[terminal] = 0.0
    if initial_support is None:
        initial = rng.dirichlet(np.ones(S))
    else:
        initial = np.zeros(S)
        support = rng.choice(S, size=initial_support, replace=False)
        initial[support] = rng.dirichlet(np.ones(initial_support))
    return RefMDP(P=P, rewards=rewards, discount=float(discount), initial=initial,
                  terminal=terminal, indices=indices, probs=probs)


# ----------------------------------------------------------------------------------------------
# Bellman maths
# ----------------------------------------------------------------------------------------------

def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable `log sum exp` along `axis`."""
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return z / np.sum(z, axis=axis, keepdims=True)


def continuation(terminal: np.ndarray | None, num_states: int) -> np.ndarray:
    if terminal is None:
        return np.ones(num_states)
    return 1.0 - np.asarray(terminal, dtype=np.float64)


def soft_v(q: np.ndarray, lam: float | None) -> np.ndarray:
    return np.max(q, axis=-1) if lam is None else lam * logsumexp(q / lam, axis=-1)


def soft_bellman(q, P, r, gamma, lam, terminal=None):
    """`T(q) = r + gamma (1 - terminal) P soft_v(q)`; hard max when `lam is None`."""
    keep = continuation(terminal, r.shape[0])
    return r + gamma * keep[:, None] * (P @ soft_v(q, lam))


def policy_kernel(P, pi, terminal=None) -> np.ndarray:
    """`P_pi(s, s') = (1 - terminal[s]) sum_a pi(a|s) P(s'|s, a)`."""
    keep = continuation(terminal, pi.shape[0])
    return keep[:, None] * np.einsum("sa,sat->st", pi, P)


def _newton_polish(q, P, r, gamma, lam, terminal, max_steps=30):
    """Newton steps on `T(q) - q = 0` (Jacobian `gamma C P Pi`), to machine precision.

    Stops as soon as a step no longer halves the residual (round-off level reached).
    """
    S, A = r.shape
    keep = continuation(terminal, S)
    residual = soft_bellman(q, P, r, gamma, lam, terminal) - q
    size = np.max(np.abs(residual))
    for _ in range(max_steps):
        if size == 0.0:
            break
        pi = softmax(q / lam, axis=-1)
        # J[(s,a), (t,b)] = gamma keep[s] P(t|s,a) pi(b|t)
        J = gamma * keep[:, None, None, None] * P[:, :, :, None] * pi[None, None, :, :]
        J = J.reshape(S * A, S * A)
        step = np.linalg.solve(np.eye(S * A) - J, residual.reshape(-1))
        q_new = q + step.reshape(S, A)
        residual_new = soft_bellman(q_new, P, r, gamma, lam, terminal) - q_new
        size_new = np.max(np.abs(residual_new))
        if size_new <= size:
            q = q_new
        if not size_new < 0.5 * size:
            break
        residual, size = residual_new, size_new
    return q


def soft_value_iteration(P, r, gamma, lam, terminal=None, *, tol=1e-6, max_iters=1_000_000,
                         polish=True):
    """Soft value iteration from `q = 0`; returns `(q, v, pi)`.

    Sweeps until `max |T(q) - q| <= tol * max(1, max |q|)`, then (if `polish`) a few Newton steps
    take the fixed point to machine precision.
    """
    q = np.zeros_like(r, dtype=np.float64)
    for _ in range(max_iters):
        q_new = soft_bellman(q, P, r, gamma, lam, terminal)
        done = np.max(np.abs(q_new - q)) <= tol * max(1.0, np.max(np.abs(q_new)))
        q = q_new
        if done:
            break
    if polish:
        q = _newton_polish(q, P, r, gamma, lam, terminal)
    v = soft_v(q, lam)
    pi = softmax(q / lam, axis=-1)
    return q, v, pi


def soft_sweeps(P, r, gamma, lam, terminal=None, *, num_sweeps, init_q=None):
    """Exactly `num_sweeps` soft Bellman sweeps from `init_q` (default zeros)."""
    q = np.zeros_like(r, dtype=np.float64) if init_q is None else np.array(init_q, np.float64)
    for _ in range(num_sweeps):
        q = soft_bellman(q, P, r, gamma, lam, terminal)
    return q


def value_iteration(P, r, gamma, terminal=None, *, tol=1e-4, max_iters=1_000_000):
    """Hard value iteration followed by policy iteration to the exact fixed point.

    Returns `(q, v, pi)` with `pi` the greedy one-hot policy.
    """
    S, A = r.shape
    q = np.zeros_like(r, dtype=np.float64)
    for _ in range(max_iters):
        q_new = soft_bellman(q, P, r, gamma, None, terminal)
        done = np.max(np.abs(q_new - q)) <= tol * max(1.0, np.max(np.abs(q_new)))
        q = q_new
        if done:
            break
    greedy = np.argmax(q, axis=-1)
    for _ in range(100):   # policy iteration: exact evaluation, greedy improvement
        pi = np.eye(A)[greedy]
        q, _ = policy_evaluation(P, r, gamma, pi, 0.0, terminal)
        new_greedy = np.argmax(q, axis=-1)
        if np.array_equal(new_greedy, greedy):
            break
        greedy = new_greedy
    pi = np.eye(A)[greedy]
    return q, np.max(q, axis=-1), pi


def policy_evaluation(P, r, gamma, pi, lam=0.0, terminal=None):
    """Soft values of a fixed policy: returns `(q, v)`.

    `V = (I - gamma P_pi)^{-1} r_pi`, `r_pi(s) = sum_a pi(a|s) (r(s,a) - lam log pi(a|s))`
    (with `0 log 0 = 0`); `Q = r + gamma (1 - terminal) P V`.
    """
    S = r.shape[0]
    keep = continuation(terminal, S)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(pi > 0, pi * np.log(np.where(pi > 0, pi, 1.0)), 0.0)
    r_pi = np.sum(pi * r, axis=-1) - lam * np.sum(plogp, axis=-1)
    v = np.linalg.solve(np.eye(S) - gamma * policy_kernel(P, pi, terminal), r_pi)
    q = r + gamma * keep[:, None] * np.einsum("sat,t->sa", P, v)
    return q, v


def visitation(P, gamma, pi, mu, terminal=None):
    """`d = mu^T (I - gamma P_pi)^{-1}`, unnormalized discounted state visitation `[S]`."""
    S = mu.shape[0]
    return np.linalg.solve((np.eye(S) - gamma * policy_kernel(P, pi, terminal)).T, mu)


# ----------------------------------------------------------------------------------------------
# Finite differences
# ----------------------------------------------------------------------------------------------

def central_jacobian(fn, x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Central finite-difference Jacobian of `fn: array -> array`, shape `out.shape + x.shape`."""
    x = np.asarray(x, np.float64)
    out0 = np.asarray(fn(x))
    jac = np.zeros(out0.shape + x.shape)
    for idx in np.ndindex(*x.shape):
        xp = x.copy()
        xm = x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        jac[(Ellipsis,) + idx] = (np.asarray(fn(xp)) - np.asarray(fn(xm))) / (2 * eps)
    return jac
