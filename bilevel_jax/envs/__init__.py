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

__all__ = ["FOUR_ROOMS_MAP", "GOALS", "START", "FourRooms", "FourRoomsParams", "GridLayout",
           "four_rooms_layout", "four_rooms_mdp", "four_rooms_problem", "grid_transitions",
           "initial_incentive_params", "slip_kernel"]
