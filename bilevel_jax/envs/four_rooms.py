"""The Four-Rooms map of the CB-RL reward-shaping benchmark (SPEC 7.1).

13 x 13 map, 104 free cells, start `(4, 1)`, goals `(1, 9)` and `(11, 11)` (terminal), slip
kernel: the intended move with probability 0.56, each other move with 0.44 / 3.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bilevel_jax.core.mdp import TabularMDP
from bilevel_jax.envs.grid import GridLayout, grid_transitions

FOUR_ROOMS_MAP = """\
xxxxxxxxxxxxx
x     x     x
x     x     x
x           x
x     x     x
x     x     x
xx xxxx     x
x     xxx xxx
x     x     x
x     x     x
x           x
x     x     x
xxxxxxxxxxxxx
"""

START = (4, 1)
GOALS = ((1, 9), (11, 11))
SLIP_PROB = 0.44


def four_rooms_layout() -> GridLayout:
    return GridLayout.from_ascii(FOUR_ROOMS_MAP)


def four_rooms_mdp(goal=GOALS[0], *, slip_prob: float = SLIP_PROB, discount: float = 0.99,
                   sparse: bool = True, dtype=jnp.float32) -> TabularMDP:
    """Follower MDP with reward `1{s = goal}` (no incentive), terminal goal, fixed start."""
    layout = four_rooms_layout()
    num_states = layout.num_states
    goal_state = layout.state(goal)
    rewards = np.zeros((num_states, 4))
    rewards[goal_state] = 1.0
    initial = np.zeros(num_states)
    initial[layout.state(START)] = 1.0
    terminal = np.zeros(num_states, dtype=bool)
    terminal[goal_state] = True
    return TabularMDP(
        transitions=grid_transitions(layout, slip_prob, sparse=sparse, dtype=dtype),
        rewards=jnp.asarray(rewards, dtype), discount=discount,
        initial=jnp.asarray(initial, dtype), terminal=jnp.asarray(terminal))
