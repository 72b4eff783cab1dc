"""The Four-Rooms map of the CB-RL reward-shaping benchmark (SPEC 7.1).

13 x 13 map, 104 free cells, start `(4, 1)`, goals `(1, 9)` and `(11, 11)` (terminal), slip
kernel: the intended move with probability 0.56, each other move with 0.44 / 3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bilevel_jax.core.mdp import SparseTransitions, TabularMDP
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


# --------------------------------------------------------------------------------------------
# The reward-shaping bilevel problem (SPEC 7.1)
# --------------------------------------------------------------------------------------------

INCENTIVE_BUDGET = 0.2
LEADER_TARGET = (8, 4)


def incentive(x, goal_state, num_states: int, budget: float = INCENTIVE_BUDGET):
    """`c = -budget * softmax(x)[:S]` with `c(goal) = 0`; `x` has `S + 1` entries (one slack)."""
    weights = jax.nn.softmax(x)[:num_states]
    return -budget * weights * (1.0 - jax.nn.one_hot(goal_state, num_states, dtype=weights.dtype))


def four_rooms_problem(*, beta=1.0, temperature=0.001, slip_prob: float = SLIP_PROB,
                       discount: float = 0.99, leader_discount: float = 0.99,
                       sparse: bool = True, dtype=jnp.float32):
    """The CB-RL reward-shaping problem as a `BilevelProblem`, and the paper's `x` shape.

    Follower (context = goal): reward `1{s = goal} + c(s)`, terminal goal, start `(4, 1)`.
    Leader: reward `1{s = (8, 4)} - beta * 1{s = goal} * ||c||_1`, discount `leader_discount`.
    `beta` and `temperature` may be traced scalars (swept under `vmap`).

    Returns:
      `(problem, num_params)` with `num_params = 105`; initialize `x ~ N(0, 0.01^2)`.
    """
    from bilevel_jax.problem import BilevelProblem

    layout = four_rooms_layout()
    num_states = layout.num_states
    transitions = grid_transitions(layout, slip_prob, sparse=sparse, dtype=dtype)
    initial = jnp.zeros(num_states, dtype).at[layout.state(START)].set(1.0)
    target = jax.nn.one_hot(layout.state(LEADER_TARGET), num_states, dtype=dtype)
    goals = jnp.asarray([layout.state(g) for g in GOALS], jnp.int32)

    def follower(x, context):
        goal = jax.nn.one_hot(context, num_states, dtype=dtype)
        c = incentive(x, context, num_states)
        rewards = jnp.broadcast_to((goal + c)[:, None], (num_states, 4))
        return TabularMDP(transitions=transitions, rewards=rewards, discount=discount,
                          initial=initial, terminal=goal > 0)

    def leader_reward(x, context):
        goal = jax.nn.one_hot(context, num_states, dtype=dtype)
        cost = jnp.sum(jnp.abs(incentive(x, context, num_states)))
        return jnp.broadcast_to((target - beta * goal * cost)[:, None], (num_states, 4))

    problem = BilevelProblem(follower=follower, leader_reward=leader_reward,
                             leader_discount=leader_discount, temperature=temperature,
                             contexts=goals, context_probs=jnp.full((2,), 0.5, dtype))
    return problem, num_states + 1


def initial_incentive_params(key, num_params: int = 105, dtype=jnp.float32):
    """The paper's initialization `x ~ N(0, 0.01^2)`."""
    return 0.01 * jax.random.normal(key, (num_params,), dtype)


# --------------------------------------------------------------------------------------------
# Simulator (gymnax style) sharing the tabular model's kernel
# --------------------------------------------------------------------------------------------

@struct.dataclass
class FourRoomsParams:
    """Explicit environment parameters (a pytree).

    Attributes:
      kernel: `SparseTransitions` `[S, 4, 4]` (the same object the tabular model uses).
      rewards: `[S]` state reward (e.g. `1{goal} + c`).
      goal: int state index (terminal).
      start: int state index.
      max_steps_in_episode: time limit.
    """

    kernel: SparseTransitions
    rewards: jax.Array
    goal: jax.Array
    start: jax.Array
    max_steps_in_episode: int = struct.field(pytree_node=False, default=200)


@struct.dataclass
class FourRoomsState:
    state: jax.Array    # int, current cell's state index
    time: jax.Array     # int, steps taken in this episode


class FourRooms:
    """Gymnax-style Four-Rooms: `reset(key, params)`, `step(key, state, action, params)`.

    Observations are state indices. Acting in the goal earns its reward and ends the episode
    (SPEC 1), as does reaching `max_steps_in_episode`; `step` then auto-resets to the start.
    Successors are drawn by inverse CDF over the shared kernel's 4 stored moves.
    """

    def __init__(self, slip_prob: float = SLIP_PROB):
        self.layout = four_rooms_layout()
        self.slip_prob = slip_prob

    @property
    def num_actions(self) -> int:
        return 4

    def default_params(self, goal=GOALS[0], incentive_values=None,
                       max_steps_in_episode: int = 200) -> FourRoomsParams:
        num_states = self.layout.num_states
        goal_state = self.layout.state(goal)
        rewards = jnp.zeros(num_states, jnp.float32).at[goal_state].set(1.0)
        if incentive_values is not None:
            rewards = rewards + incentive_values
        return FourRoomsParams(
            kernel=grid_transitions(self.layout, self.slip_prob, sparse=True),
            rewards=rewards, goal=jnp.asarray(goal_state, jnp.int32),
            start=jnp.asarray(self.layout.state(START), jnp.int32),
            max_steps_in_episode=max_steps_in_episode)

    def reset(self, key, params: FourRoomsParams):
        del key
        state = FourRoomsState(state=params.start, time=jnp.zeros((), jnp.int32))
        return state.state, state

    def step(self, key, state: FourRoomsState, action, params: FourRoomsParams):
        """Returns `(obs, state, reward, done, info)`; `info["next_state"]` is the successor
        before any reset."""
        cdf = jnp.cumsum(params.kernel.probs[state.state, action])
        move = jnp.sum(cdf <= jax.random.uniform(key) * cdf[-1]).astype(jnp.int32)
        successor = params.kernel.indices[state.state, action, move]
        reward = params.rewards[state.state]
        terminated = state.state == params.goal
        truncated = state.time + 1 >= params.max_steps_in_episode
        done = terminated | truncated
        next_state = FourRoomsState(state=jnp.where(done, params.start, successor),
                                    time=jnp.where(done, 0, state.time + 1))
        info = {"next_state": successor, "terminated": terminated, "truncated": truncated}
        return next_state.state, next_state, reward, done, info
