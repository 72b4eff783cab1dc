"""The problems a config can name (`problem.name`), each with its typed fields.

    register_problem("random", build_random, fields=RANDOM_FIELDS, check=check_random)

A builder takes the resolved `problem` section (a dict with every field, defaults filled) and
returns `(problem, x0)`: a `BilevelProblem` and the leader's starting parameters. It runs on the
host, once per compiled program. Fields marked `traced=True` may be swept inside one compiled
program: the runner passes their per-run values as traced scalars to `apply_traced(problem,
values, section)` (default: `problem.replace(**values)`, right for the `BilevelProblem` leaves
`temperature` and `leader_discount`; a problem whose traced fields live in closures rebuilds
itself from `section`). Every other field is structural: a sweep over it compiles
one program per value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from bilevel_jax.runner.fields import ConfigError, Field


def _replace(problem, values: dict, section: dict):
    del section
    return problem.replace(**values) if values else problem


@dataclass(frozen=True)
class ProblemSpec:
    name: str
    builder: Callable[[dict], tuple[Any, Any]]
    fields: dict[str, Field]
    check: Callable[[dict], None] | None = None
    apply_traced: Callable[[Any, dict, dict], Any] = _replace
    doc: str = ""


_PROBLEMS: dict[str, ProblemSpec] = {}


def register_problem(name: str, builder: Callable[[dict], tuple[Any, Any]], *,
                     fields: dict[str, Field], check: Callable[[dict], None] | None = None,
                     apply_traced: Callable[[Any, dict, dict], Any] = _replace, doc: str = "") -> None:
    """Makes `problem.name: NAME` available in configs.

    Args:
      builder: `section -> (problem, x0)`.
      fields: the section's keys (besides `name`), each a typed `Field` with its default.
      check: `section -> None`, raising `ConfigError` naming `problem.KEY` for combinations of
        values that are refused (runs before anything is built).
      apply_traced: `(problem, {field: traced scalar}, section) -> problem` for the `traced`
        fields.
    """
    if "name" in fields:
        raise ValueError("fields: 'name' is reserved for the problem's name")
    _PROBLEMS[name] = ProblemSpec(name, builder, dict(fields), check, apply_traced, doc)


def problem_names() -> tuple[str, ...]:
    return tuple(sorted(_PROBLEMS))


def problem_spec(name: str) -> ProblemSpec:
    return _PROBLEMS[name]


def build_problem(section: dict):
    """`(problem, x0)` for a resolved `problem` section."""
    spec = _PROBLEMS[section["name"]]
    return spec.builder({k: v for k, v in section.items() if k != "name"})


# --------------------------------------------------------------------------------------------
# random: Garnet-style random bilevel problems (bilevel_jax.envs.random_mdp)
# --------------------------------------------------------------------------------------------

RANDOM_FIELDS = {
    "seed": Field("int", 0, doc="numpy seed of the problem (rewards, transitions, features, x0)"),
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


def check_random(section: dict) -> None:
    if section["branching"] is not None and section["branching"] > section["num_states"]:
        raise ConfigError(f"problem.branching: expected an int <= problem.num_states "
                          f"({section['num_states']}), got {section['branching']}")
    if section["num_terminal"] >= section["num_states"]:
        raise ConfigError(f"problem.num_terminal: expected an int < problem.num_states "
                          f"({section['num_states']}), got {section['num_terminal']}")
    if section["sparse"] and section["branching"] is None:
        raise ConfigError("problem.sparse: true needs problem.branching (an int); got branching null")


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


# --------------------------------------------------------------------------------------------
# four_rooms: the CB-RL reward-shaping benchmark (SPEC 7.1, bilevel_jax.envs.four_rooms)
# --------------------------------------------------------------------------------------------

FOUR_ROOMS_FIELDS = {
    "beta": Field("float", 1.0, low=0, traced=True, doc="weight of the incentive cost at the goal"),
    "temperature": Field("float", 0.001, low=0, low_open=True, traced=True,
                         doc="follower entropy temperature lam"),
    "leader_discount": Field("float", 0.99, low=0, high=1, high_open=True, traced=True,
                             doc="leader discount"),
    "discount": Field("float", 0.99, low=0, high=1, high_open=True, doc="follower discount"),
    "slip_prob": Field("float", 0.44, low=0, high=1,
                       doc="probability that a move slips to one of the other three"),
    "sparse": Field("bool", True, doc="SparseTransitions kernel (branching 4) or dense"),
}


def _four_rooms(section: dict, beta, temperature, leader_discount):
    from bilevel_jax.envs.four_rooms import four_rooms_problem

    problem, _ = four_rooms_problem(beta=beta, temperature=temperature,
                                    leader_discount=leader_discount,
                                    discount=section["discount"],
                                    slip_prob=section["slip_prob"], sparse=section["sparse"])
    return problem


def build_four_rooms(section: dict):
    import jax.numpy as jnp

    problem = _four_rooms(section, section["beta"], section["temperature"],
                          section["leader_discount"])
    # x0 = 0; the paper's N(0, 0.01^2) initialization is the config's x0_noise: 0.01.
    return problem, jnp.zeros(105, jnp.float32)


def apply_four_rooms(problem, values: dict, section: dict):
    # beta lives inside the reward closures, so traced values rebuild the problem.
    if not values:
        return problem
    merged = dict(section, **values)
    return _four_rooms(section, merged["beta"], merged["temperature"], merged["leader_discount"])


register_problem("four_rooms", build_four_rooms, fields=FOUR_ROOMS_FIELDS,
                 apply_traced=apply_four_rooms,
                 doc="Four-Rooms reward shaping of the CB-RL paper (SPEC 7.1), x in R^105")
