"""The problems a config can name (`problem.name`); see `registry` for how to add one."""

from bilevel_jax.runner.problems.registry import (
    GENERIC_ALGORITHMS,
    ProblemSpec,
    build_problem,
    problem_names,
    problem_spec,
    register_problem,
)
from bilevel_jax.runner.problems import four_rooms, random_mdp  # noqa: F401  (registration)
from bilevel_jax.runner.problems import stackelberg  # noqa: F401  (registration)
from bilevel_jax.runner.problems import incentive_design  # noqa: F401  (registration)
from bilevel_jax.runner.problems import rlhf  # noqa: F401  (registration)
from bilevel_jax.runner.problems import tax_design  # noqa: F401  (registration)
from bilevel_jax.runner.problems import rlhf_minatar  # noqa: F401  (registration)
# Last: it wraps every tabular problem registered above.
from bilevel_jax.runner.problems import simulator  # noqa: F401  (registration)

__all__ = ["GENERIC_ALGORITHMS", "ProblemSpec", "build_problem", "problem_names", "problem_spec",
           "register_problem"]
