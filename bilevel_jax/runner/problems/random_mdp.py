"""`problem.name: random`: Garnet-style random bilevel problems (bilevel_jax.envs.random_mdp)."""

from __future__ import annotations

from bilevel_jax.runner.fields import ConfigError, Field
from bilevel_jax.runner.problems.registry import check_fits, register_problem

RANDOM_FIELDS = {
    "seed": Field("int", 0, low=0,
                  doc="numpy seed of the problem (rewards, transitions, features, x0)"),
    "num_states": Field("int", 20, low=2, doc="states S"),
    "num_actions": Field("int", 4, low=1, doc="actions A"),
    "dim_x": Field("int", 8, low=1, doc="leader parameters (follower reward r0 + Phi x)"),
    "num_contexts": Field("int", 2, low=1, doc="contexts K (follower reward shift, leader reward)"),
    "branching": Field("int", None, low=1, nullable=True,
                       doc="successors per (s, a); null: every state (dense Dirichlet rows)"),
    "transition_dependent": Field("bool", False, doc="transitions depend on x through logits"),
    "num_terminal": Field("int", 0, low=0, doc="terminal states (the last ones)"),
    "discount": Field("float", 0.9, low=0, high=1, high_open=True, doc="follower discount"),
    "leader_discount": Field("float", 0.9, low=0, high=1, high_open=True, traced=True,
                             doc="leader discount"),
    "temperature": Field("float", 0.1, low=0, low_open=True, traced=True,
                         doc="follower entropy temperature"),
    "sparse": Field("bool", False, doc="SparseTransitions (needs branching)"),
    "dtype": Field("str", "float32", choices=("float32", "float64"),
                   doc="float64 turns on jax_enable_x64 for the run"),
}


def random_problem_bytes(section: dict) -> int:
    """About the memory `random_bilevel_problem` and a follower solve allocate (a lower bound).

    The float64 numpy draws (Dirichlet rows, their logs, features), their device copies, the
    follower's dense `[S, A, S]` kernel (built through a one-hot `[S, A, B, S]` from `branching`
    successors) unless `sparse`, and the `[S, S]` state kernel of the linear solves.
    """
    S, A, n, K = (section[k] for k in ("num_states", "num_actions", "dim_x", "num_contexts"))
    width = S if section["branching"] is None else section["branching"]
    item = 8 if section["dtype"] == "float64" else 4
    rows = S * A * width * (1 + (n if section["transition_dependent"] else 0))
    tables = rows + S * A * n + (2 * K + 1) * S * A
    dense = 0 if section["sparse"] else S * A * S * (1 if section["branching"] is None else width)
    return 8 * (tables + S * A * width) + item * (tables + dense + S * S)


def check_random(section: dict) -> None:
    if section["branching"] is not None and section["branching"] > section["num_states"]:
        raise ConfigError(f"problem.branching: expected an int <= problem.num_states "
                          f"({section['num_states']}), got {section['branching']}")
    if section["num_terminal"] >= section["num_states"]:
        raise ConfigError(f"problem.num_terminal: expected an int < problem.num_states "
                          f"({section['num_states']}), got {section['num_terminal']}")
    if section["sparse"] and section["branching"] is None:
        raise ConfigError("problem.sparse: true needs problem.branching (an int); got branching null")
    check_fits("problem.num_states", random_problem_bytes(section),
               f"{section['num_states']} states x {section['num_actions']} actions",
               "expected fewer states, or problem.branching with problem.sparse: true")


def build_random(section: dict):
    import jax.numpy as jnp

    from bilevel_jax.envs.random_mdp import random_bilevel_problem

    options = dict(section)
    dtype = jnp.float64 if options.pop("dtype") == "float64" else jnp.float32
    return random_bilevel_problem(
        options.pop("seed"), options.pop("num_states"), options.pop("num_actions"),
        options.pop("dim_x"), dtype=dtype, **options)


register_problem("random", build_random, fields=RANDOM_FIELDS, check=check_random,
                 doc="Garnet-style random bilevel problem (follower rewards linear in x)")


