"""Any tabular bilevel problem as a simulator: the model-free methods' check against `exact`.

`TabularEnv` is a gymnax environment over a `TabularMDP` kernel (dense or sparse): the state is
an integer, the observation its one-hot vector (or the integer itself), and SPEC 1's terminal
convention holds: acting in a terminal state earns `r(s, a)` and ends the episode.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

from bilevel_jax.core.mdp import SparseTransitions, TabularMDP
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.sim.problem import SimulatorProblem, Step

Array = jax.Array

_NO_TIME_LIMIT = 2**30


@struct.dataclass
class TabularEnvState(environment.EnvState):
    state: Array  # int, the current state's index


@struct.dataclass
class TabularEnvParams(environment.EnvParams):
    """The MDP as environment params: `transitions` `[S, A, S]` or `SparseTransitions`,
    `rewards` `[S, A]`, `initial` `[S]`, `terminal` bool `[S]`, `discount`."""

    transitions: Any = None
    rewards: Any = None
    initial: Any = None
    terminal: Any = None
    discount: Any = 0.99
    max_steps_in_episode: int = struct.field(pytree_node=False, default=_NO_TIME_LIMIT)

    @classmethod
    def from_mdp(cls, mdp: TabularMDP, max_steps_in_episode: int = _NO_TIME_LIMIT):
        terminal = (jnp.zeros(mdp.num_states, bool) if mdp.terminal is None
                    else jnp.asarray(mdp.terminal, bool))
        return cls(transitions=mdp.transitions, rewards=mdp.rewards, initial=mdp.initial,
                   terminal=terminal, discount=mdp.discount,
                   max_steps_in_episode=max_steps_in_episode)


def successor_log_prob(transitions, state: Array, action: Array, next_state: Array) -> Array:
    """`log P(next_state | state, action)` for a dense or sparse kernel."""
    if isinstance(transitions, SparseTransitions):
        match = transitions.indices[state, action] == next_state
        return jnp.log(jnp.sum(jnp.where(match, transitions.probs[state, action], 0.0)))
    return jnp.log(transitions[state, action, next_state])


class TabularEnv(environment.Environment):
    """A gymnax environment over a tabular kernel (`TabularEnvParams`).

    The sizes `S`, `A` come from the params (`rewards` `[S, A]`), so one environment object
    serves every `x` and context.

    Args:
      observation: "one_hot" (float `[S]`, the rewards' dtype) or "index" (int `[]`).
    """

    def __init__(self, observation: str = "one_hot"):
        if observation not in ("one_hot", "index"):
            raise InvalidArgumentError(
                f"observation: expected 'one_hot' or 'index', got {observation!r}")
        self.observation = observation

    @property
    def name(self) -> str:
        return "Tabular"

    def action_space(self, params: TabularEnvParams):
        return spaces.Discrete(params.rewards.shape[-1])

    def observation_space(self, params: TabularEnvParams):
        num_states = params.rewards.shape[-2]
        if self.observation == "index":
            return spaces.Discrete(num_states)
        return spaces.Box(0.0, 1.0, (num_states,), params.rewards.dtype)

    def get_obs(self, state: TabularEnvState, params: TabularEnvParams = None, key=None):
        if self.observation == "index":
            return state.state
        return jax.nn.one_hot(state.state, params.rewards.shape[-2], dtype=params.rewards.dtype)

    def reset_env(self, key, params: TabularEnvParams):
        start = jax.random.categorical(key, jnp.log(params.initial)).astype(jnp.int32)
        state = TabularEnvState(time=jnp.zeros((), jnp.int32), state=start)
        return self.get_obs(state, params), state

    def step_env(self, key, state: TabularEnvState, action, params: TabularEnvParams):
        s, a = state.state, jnp.asarray(action, jnp.int32)
        if isinstance(params.transitions, SparseTransitions):
            move = jax.random.categorical(key, jnp.log(params.transitions.probs[s, a]))
            successor = params.transitions.indices[s, a, move]
        else:
            successor = jax.random.categorical(key, jnp.log(params.transitions[s, a]))
        next_state = TabularEnvState(time=state.time + 1, state=successor.astype(jnp.int32))
        reward = params.rewards[s, a]
        terminated = params.terminal[s]
        return self.get_obs(next_state, params), next_state, reward, terminated, {}

    def is_terminated(self, state, params):
        return params.terminal[state.state]


def as_simulator(problem: BilevelProblem, *, observation: str = "one_hot",
                 max_episode_steps: int | None = None) -> SimulatorProblem:
    """`problem` as a `SimulatorProblem` over `TabularEnv`: the same kernel, terminal states,
    rewards and leader rewards as functions of `x`, and `log P_x(s'|s,a)` for score terms.

    The follower's discount is read from `problem.follower(x, context).discount` (through the
    env params). `d_x mu` (an initial distribution depending on `x`) has no score term here.
    `problem` itself is the result's `reference` (the exact `F` for reports).
    """
    if not isinstance(problem, BilevelProblem):
        raise InvalidArgumentError(f"problem: expected a BilevelProblem, got {type(problem).__name__}")

    def env_params(x, context):
        return TabularEnvParams.from_mdp(problem.follower(x, context))

    def follower_reward(x, context, step: Step):
        return problem.follower(x, context).rewards[step.state.state, step.action]

    def leader_reward(x, context, step: Step):
        return problem.leader_reward(x, context)[step.state.state, step.action]

    def transition_log_prob(x, context, state, action, next_state):
        return successor_log_prob(problem.follower(x, context).transitions, state.state,
                                  action, next_state.state)

    return SimulatorProblem(
        env=TabularEnv(observation), env_params=env_params, follower_reward=follower_reward,
        leader_reward=leader_reward, transition_log_prob=transition_log_prob,
        temperature=problem.temperature, discount=None, leader_discount=problem.leader_discount,
        contexts=problem.contexts, context_probs=problem.context_probs,
        context_sampler=problem.context_sampler, max_episode_steps=max_episode_steps,
        reference=problem)
