"""Garnet-style random bilevel problems (SPEC 7.6): the workhorse for tests and benchmarks.

Follower rewards are linear in `x` (`r_x = r0 + Phi x`), transitions optionally depend on `x`
through logits (`P_x(.|s, a) = softmax(log P0 + D x)` over each row's successors), contexts
(`{"shift": [K, S, A], "leader": [K, S, A]}`) shift the follower reward and carry the
leader's reward table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax.core.mdp import SparseTransitions, TabularMDP
from bilevel_jax.problem import BilevelProblem


def random_bilevel_problem(seed: int, num_states: int = 10, num_actions: int = 4,
                           dim_x: int = 8, *, num_contexts: int = 2,
                           branching: int | None = None, transition_dependent: bool = False,
                           num_terminal: int = 0, discount: float = 0.9,
                           leader_discount: float = 0.9, temperature: float = 0.1,
                           sparse: bool = False, dtype=jnp.float64):
    """Builds a random `BilevelProblem` and a starting `x` (host-side, numpy RNG `seed`).

    Args:
      branching: successors per `(s, a)` (None: all states, dense Dirichlet rows).
      transition_dependent: transitions depend on `x` through their logits.
      num_terminal: number of terminal states (the last states).
      sparse: represent transitions as `SparseTransitions` (needs `branching`).

    Returns:
      `(problem, x0)` with `x0` of shape `[dim_x]`.
    """
    rng = np.random.default_rng(seed)
    S, A, n, K = num_states, num_actions, dim_x, num_contexts
    width = S if branching is None else branching
    succ = np.stack([np.stack([rng.choice(S, size=width, replace=False) for _ in range(A)])
                     for _ in range(S)]) if branching is not None else np.broadcast_to(
                         np.arange(S), (S, A, S))
    base_logits = np.log(rng.dirichlet(np.ones(width), size=(S, A)))
    feature_r = rng.normal(size=(S, A, n)) / np.sqrt(n)
    feature_p = rng.normal(size=(S, A, width, n)) / np.sqrt(n) if transition_dependent else None
    reward0 = rng.normal(size=(S, A))
    context_shift = rng.normal(size=(K, S, A)) * 0.5
    leader_tables = rng.normal(size=(K, S, A))
    initial = rng.dirichlet(np.ones(S))
    terminal = np.zeros(S, dtype=bool)
    if num_terminal:
        terminal[S - num_terminal:] = True

    as_array = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    succ_j = jnp.asarray(succ, jnp.int32)
    base_logits_j, feature_r_j, reward0_j = map(as_array, (base_logits, feature_r, reward0))
    feature_p_j = None if feature_p is None else as_array(feature_p)
    initial_j = as_array(initial)
    terminal_j = jnp.asarray(terminal) if num_terminal else None

    def follower(x, context):
        logits = base_logits_j if feature_p_j is None else base_logits_j + feature_p_j @ x
        probs = jax.nn.softmax(logits, axis=-1)
        if sparse:
            transitions = SparseTransitions(indices=succ_j, probs=probs)
        elif branching is None:
            transitions = probs
        else:
            transitions = SparseTransitions(indices=succ_j, probs=probs).todense()
        return TabularMDP(transitions=transitions, rewards=reward0_j + feature_r_j @ x + context["shift"],
                          discount=discount, initial=initial_j, terminal=terminal_j)

    def leader_reward(x, context):
        del x
        return context["leader"]

    probs = rng.dirichlet(np.ones(K) * 2.0)
    problem = BilevelProblem(follower=follower, leader_reward=leader_reward,
                             leader_discount=leader_discount, temperature=temperature,
                             contexts={"shift": as_array(context_shift), "leader": as_array(leader_tables)},
                             context_probs=as_array(probs))
    x0 = as_array(rng.normal(size=n) * 0.1)
    return problem, x0
