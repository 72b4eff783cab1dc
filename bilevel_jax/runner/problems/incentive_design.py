"""`problem.name: incentive_design`: incentive design with a zero-sum lower level (SPEC 7.5,
bilevel_jax.envs.incentive_design), run by its own algorithms (bilevel_jax.algorithms.incentive):

* `algorithm.name: ascent`: exact hypergradient ascent through the equilibrium (needs
  `estimator.name: exact`, the default; other estimators are for single-follower problems);
* `algorithm.name: pbrl`: PBRL with the Nikaido-Isoda penalty (`algorithm.penalty: value`, the
  default: the NI gap is the sum of the two players' value penalties; `bellman` is refused),
  `rho_0`, `rho_max`, `ramp_iters` (null: iterations), `inner_sweeps`, `track_objective`.
"""

from __future__ import annotations

from bilevel_jax.runner.fields import ConfigError, Field
from bilevel_jax.runner.problems.registry import register_problem

INCENTIVE_FIELDS = {
    "seed": Field("int", 0, low=0,
                  doc="numpy seed of the instance (game, designer target, features)"),
    "num_states": Field("int", 8, low=1, doc="states S"),
    "min_actions": Field("int", 3, low=1, doc="actions A of mu, the minimizing player"),
    "max_actions": Field("int", 3, low=1, doc="actions B of nu, the maximizing player"),
    "num_features": Field("int", None, low=1, nullable=True,
                          doc="x in R^d through random payoff features (null: x [S, A, B] "
                              "added to the payoff)"),
    "discount": Field("float", 0.9, low=0, high=1, high_open=True, traced=True,
                      doc="the players' discount gamma"),
    "designer_discount": Field("float", 0.9, low=0, high=1, high_open=True, traced=True,
                               doc="the designer's discount gammabar"),
    "temperature": Field("float", 0.2, low=0, low_open=True, traced=True,
                         doc="the players' entropy temperature lam"),
    "cost": Field("float", 0.1, low=0, traced=True, doc="weight c of the incentive cost c ||x||^2"),
    "solver_iters": Field("int", 500, low=1, doc="equilibrium solver: cap on outer sweeps"),
    "inner_iters": Field("int", 20, low=1,
                         doc="equilibrium solver: extragradient steps per stage game and sweep"),
    "solver_tol": Field("float", None, low=0, low_open=True, nullable=True,
                        doc="equilibrium solver: stopping tolerance (null: 1e-10 in float64, "
                            "1e-5 in float32)"),
    "dtype": Field("str", "float64", choices=("float32", "float64"),
                   doc="float64 turns on jax_enable_x64 for the run"),
}


def build_incentive_design(section: dict):
    import jax.numpy as jnp

    from bilevel_jax.envs.incentive_design import incentive_design_problem

    options = dict(section)
    dtype = jnp.float64 if options.pop("dtype") == "float64" else jnp.float32
    return incentive_design_problem(
        options.pop("seed"), options.pop("num_states"), options.pop("min_actions"),
        options.pop("max_actions"), dtype=dtype, **options)


def apply_incentive_design(problem, values: dict, section: dict):
    del section
    if not values:
        return problem
    values = dict(values)
    if "discount" in values:
        problem = problem.replace(game=problem.game.replace(discount=values.pop("discount")))
    return problem.replace(**values) if values else problem


def make_incentive_algorithm(config: dict, optimizer, section: dict):
    from bilevel_jax.algorithms.incentive import equilibrium_ascent, ni_pbrl

    if section["name"] == "ascent":
        estimator = config["estimator"]["name"]
        if estimator != "exact":
            raise ConfigError(
                f"estimator.name: problem 'incentive_design' runs ascent with the exact "
                f"hypergradient through the equilibrium only; expected 'exact', got {estimator!r}")
        return equilibrium_ascent(optimizer)
    if section["penalty"] != "value":
        raise ConfigError(
            f"algorithm.penalty: problem 'incentive_design' penalizes the Nikaido-Isoda gap (the "
            f"sum of the players' value penalties); expected 'value', got {section['penalty']!r}")
    return ni_pbrl(optimizer, rho_0=section["rho_0"], rho_max=section["rho_max"],
                   ramp_iters=section["ramp_iters"] or config["iterations"],
                   inner_sweeps=section["inner_sweeps"],
                   track_objective=section["track_objective"])


register_problem("incentive_design", build_incentive_design, fields=INCENTIVE_FIELDS,
                 apply_traced=apply_incentive_design, algorithms=("ascent", "pbrl"),
                 make_algorithm=make_incentive_algorithm,
                 doc="incentive design with an entropy-regularized zero-sum Markov game at the "
                     "lower level (SPEC 7.5); designer F = target play at equilibrium - c ||x||^2")
