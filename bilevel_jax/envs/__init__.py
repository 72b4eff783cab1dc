"""Environments: grid worlds (exact tabular models) and the published benchmarks' settings."""

from bilevel_jax.envs.four_rooms import (
    FOUR_ROOMS_MAP,
    GOALS,
    START,
    FourRooms,
    FourRoomsParams,
    four_rooms_layout,
    four_rooms_mdp,
    four_rooms_problem,
    initial_incentive_params,
)
from bilevel_jax.envs.grid import GridLayout, grid_transitions, slip_kernel
from bilevel_jax.envs.preference import (
    PreferenceEnv,
    linear_fit_residual,
    preference_gridworld,
    random_preference_env,
)
from bilevel_jax.envs.incentive_design import (
    IncentiveDesignProblem,
    designer_objective,
    incentive_design_problem,
    validate_incentive_problem,
)
from bilevel_jax.envs.stackelberg import (
    GeneralSumGame,
    commitment_game,
    random_markov_game,
    soft_nash_equilibrium,
    stackelberg_problem,
    validate_general_sum_game,
)

__all__ = ["FOUR_ROOMS_MAP", "GOALS", "START", "FourRooms", "FourRoomsParams", "GridLayout",
           "four_rooms_layout", "four_rooms_mdp", "four_rooms_problem", "grid_transitions",
           "initial_incentive_params", "slip_kernel"]
__all__ += ["GeneralSumGame", "commitment_game", "random_markov_game", "soft_nash_equilibrium",
            "stackelberg_problem", "validate_general_sum_game"]
__all__ += ["IncentiveDesignProblem", "designer_objective", "incentive_design_problem",
            "validate_incentive_problem"]
__all__ += ["PreferenceEnv", "linear_fit_residual", "preference_gridworld",
            "random_preference_env"]

# `tax_design` defines a gymnax environment, and importing gymnax builds jax arrays (starting
# the XLA backend, which `jax.distributed.initialize` must precede, see `bilevel_jax/__init__`):
# its names load on first use (`bj.envs.tax_design_problem`, or `import bilevel_jax.envs.
# tax_design`).
_TAX_DESIGN = ("PREFERENCES", "TaxDesignEnv", "TaxDesignParams", "TaxDesignState", "asset_bin",
               "asset_bins", "budget", "follower_utility", "initial_tax_params",
               "joint_actions", "noise_log_density", "social_welfare", "tax_design_problem",
               "tax_design_tabular", "tax_rates")
__all__ += list(_TAX_DESIGN)


def __getattr__(name: str):
    if name in _TAX_DESIGN:
        from bilevel_jax.envs import tax_design  # noqa: PLC0415 - gymnax, on first use

        value = getattr(tax_design, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bilevel_jax.envs' has no attribute {name!r}")
