"""`problem.name: simulator_<name>`: a registered tabular problem as a simulator problem.

    problem: {name: simulator_random, num_states: 5, observation: one_hot, max_episode_steps: null}

Every tabular problem registered before this module loads (one without its own algorithms) gets
a twin whose builder returns `bj.sim.as_simulator(problem)`: the same fields (the tabular
problem's, flat, with their defaults and checks) plus `observation` and `max_episode_steps`.
Only the model-free estimators run on it (`hpgd`, `zero_order`: the config refuses the others),
under `algorithm.name: ascent` (with `algorithm.track_objective: true` the exact `F` of each
iterate is solved on the tabular source, `bj.sim.reference_model`, which no estimator sees), and the model-free PBRL (`algorithm.name: pbrl`, value penalty; see
`bilevel_jax.algorithms.sample_pbrl`). Since the simulator and the tabular problem share their model, a run
on the twin can be compared with the tabular run of the same config.
"""

from __future__ import annotations

import dataclasses

from bilevel_jax.runner.fields import Field
from bilevel_jax.runner.problems.registry import (_PROBLEMS, _replace, problem_spec,
                                                  register_problem)

SIMULATOR_FIELDS = {
    "observation": Field("str", "one_hot", choices=("one_hot", "index"),
                         doc="simulator: what the follower observes (one-hot vector or index)"),
    "max_episode_steps": Field("int", None, low=1, nullable=True,
                               doc="simulator: time limit of the episodes (null: none)"),
}

# The tabular problem's traced fields that stay traced on the simulator: the `SimulatorProblem`
# leaves of the same name (others live in the model's closures, so a sweep recompiles).
_SHARED_LEAVES = ("temperature", "leader_discount")


def _simulator_fields(spec) -> dict[str, Field]:
    clash = set(spec.fields) & set(SIMULATOR_FIELDS)
    if clash:
        raise ValueError(f"problem {spec.name!r}: fields {sorted(clash)} clash with the "
                         f"simulator's own")
    keep_traced = spec.apply_traced is _replace
    fields = {key: (field if field.traced and keep_traced and key in _SHARED_LEAVES
                    else dataclasses.replace(field, traced=False))
              for key, field in spec.fields.items()}
    return {**fields, **SIMULATOR_FIELDS}


def register_simulator_of(name: str) -> str:
    """Registers `simulator_<name>` for the tabular problem `name`; returns the new name."""
    spec = problem_spec(name)

    def split(section: dict) -> tuple[dict, dict]:
        inner = {k: v for k, v in section.items() if k not in SIMULATOR_FIELDS}
        return inner, {k: section[k] for k in SIMULATOR_FIELDS}

    def build(section: dict):
        from bilevel_jax.sim import as_simulator  # noqa: PLC0415 - gymnax, after jax.distributed

        inner, options = split(section)
        problem, x0 = spec.builder(inner)
        return as_simulator(problem, **options), x0

    def check(section: dict) -> None:
        if spec.check is not None:
            spec.check(split(section)[0])

    def apply_traced(problem, values: dict, section: dict):
        del section
        return problem.replace(**values) if values else problem

    simulator_name = f"simulator_{name}"
    register_problem(simulator_name, build, fields=_simulator_fields(spec),
                     check=check if spec.check is not None else None,
                     apply_traced=apply_traced, algorithms=("ascent", "pbrl"), simulator=True,
                     has_reference=lambda section: True,
                     doc=f"{name} as a simulator problem (bj.sim.as_simulator; model-free "
                         f"estimators: hpgd, zero_order; model-free pbrl)")
    return simulator_name


SIMULATOR_PROBLEMS = tuple(
    register_simulator_of(name) for name in sorted(_PROBLEMS)
    if _PROBLEMS[name].make_algorithm is None and not _PROBLEMS[name].simulator)
