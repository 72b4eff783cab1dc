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

A problem whose leader is not a `BilevelProblem` (RLHF, a game at the lower level) brings its own
algorithms: `algorithms` lists the `algorithm.name` values it accepts and `make_algorithm(config,
optimizer, algorithm_section)` builds them (`algorithm_section` has the traced values filled in).
Without it, the generic `ascent` (any estimator) and `pbrl` of `bilevel_jax.algorithms` run.

A `simulator=True` problem builds a `bj.SimulatorProblem` (no model): the config then accepts
only the model-free estimators (`check_problem_for`'s) and no exact objective tracking
(`simulator_<name>` in `problems/simulator.py` wraps every tabular problem this way).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from bilevel_jax.runner.fields import ConfigError, Field


GENERIC_ALGORITHMS = ("ascent", "pbrl")


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
    algorithms: tuple[str, ...] = GENERIC_ALGORITHMS
    make_algorithm: Callable[[dict, Any, dict], Any] | None = None
    simulator: bool = False
    has_reference: Callable[[dict], bool] | None = None
    leader_metrics: Callable[[Any], dict] | None = None


_PROBLEMS: dict[str, ProblemSpec] = {}


def register_problem(name: str, builder: Callable[[dict], tuple[Any, Any]], *,
                     fields: dict[str, Field], check: Callable[[dict], None] | None = None,
                     apply_traced: Callable[[Any, dict, dict], Any] = _replace, doc: str = "",
                     algorithms: tuple[str, ...] = GENERIC_ALGORITHMS,
                     make_algorithm: Callable[[dict, Any, dict], Any] | None = None,
                     simulator: bool = False,
                     has_reference: Callable[[dict], bool] | None = None,
                     leader_metrics: Callable[[Any], dict] | None = None) -> None:
    """Makes `problem.name: NAME` available in configs.

    Args:
      builder: `section -> (problem, x0)`.
      fields: the section's keys (besides `name`), each a typed `Field` with its default.
      check: `section -> None`, raising `ConfigError` naming `problem.KEY` for combinations of
        values that are refused (runs before anything is built).
      apply_traced: `(problem, {field: traced scalar}, section) -> problem` for the `traced`
        fields.
      algorithms: the `algorithm.name` values this problem runs.
      make_algorithm: `(config, optimizer, algorithm_section) -> Algorithm`, for problems that
        bring their own algorithms (None: the generic `ascent` and `pbrl`).
      simulator: the builder returns a `bj.SimulatorProblem` (see the module doc).
      has_reference: `section -> bool` for a simulator problem built with a tabular `reference`
        (`bj.sim.reference_model`): then `algorithm.track_objective: true` reports its exact F.
      leader_metrics: `x -> {name: scalar}`, readable functions of the leader's variable (the
        tax rates of `2 sigmoid(w)`) recorded at every iteration beside the standard metrics,
        at the `x` the iteration's gradient was taken at (so iteration 0 holds `x0`'s).
    """
    if "name" in fields:
        raise ValueError("fields: 'name' is reserved for the problem's name")
    _PROBLEMS[name] = ProblemSpec(name, builder, dict(fields), check, apply_traced, doc,
                                  tuple(algorithms), make_algorithm, simulator, has_reference,
                                  leader_metrics)


def problem_names() -> tuple[str, ...]:
    return tuple(sorted(_PROBLEMS))


def problem_spec(name: str) -> ProblemSpec:
    return _PROBLEMS[name]


def build_problem(section: dict):
    """`(problem, x0)` for a resolved `problem` section."""
    spec = _PROBLEMS[section["name"]]
    return spec.builder({k: v for k, v in section.items() if k != "name"})




def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


def check_fits(path: str, needed: int, what: str, hint: str) -> None:
    """Raises `ConfigError` naming `path` when `needed` bytes exceed this machine's memory.

    For a problem's `check`: refuses what cannot be allocated before anything is built.
    """
    total = memory_bytes()
    if total is not None and needed > total:
        raise ConfigError(f"{path}: {what} need about {_gib(needed)}, more than this machine's "
                          f"{_gib(total)} of memory; {hint}")
