"""Environments: grid worlds (exact tabular models) and the published benchmarks' settings."""

from bilevel_jax.envs.four_rooms import FOUR_ROOMS_MAP, GOALS, START, four_rooms_layout, four_rooms_mdp
from bilevel_jax.envs.grid import GridLayout, grid_transitions, slip_kernel

__all__ = ["FOUR_ROOMS_MAP", "GOALS", "START", "GridLayout", "four_rooms_layout",
           "four_rooms_mdp", "grid_transitions", "slip_kernel"]
