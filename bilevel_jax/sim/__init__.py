"""Simulator bilevel problems (SPEC 9): gymnax worlds configured by the leader's `x`.

    problem = bj.SimulatorProblem(env=..., env_params=..., follower_reward=..., leader_reward=...)
    traj = bj.sim.rollout(key, problem, x, context, policy, num_envs=16, num_steps=128)

`as_simulator` turns any tabular `BilevelProblem` into one, so every model-free method can be
checked against `exact`.
"""

from bilevel_jax.sim import spaces
from bilevel_jax.sim.problem import (InvalidSimulatorError, SimulatorProblem, Step, check_simulator,
                                     reference_model, validate_simulator)
from bilevel_jax.sim.rollout import (RolloutCarry, Trajectory, discounted_returns, env_step, reset,
                                     rollout, step_rewards, transition_log_probs)
from bilevel_jax.sim.tabular import (TabularEnv, TabularEnvParams, TabularEnvState, as_simulator,
                                     successor_log_prob)

__all__ = ["InvalidSimulatorError", "RolloutCarry", "SimulatorProblem", "Step", "TabularEnv",
           "TabularEnvParams", "TabularEnvState", "Trajectory", "as_simulator", "check_simulator",
           "discounted_returns", "env_step", "reference_model", "reset", "rollout", "spaces",
           "step_rewards", "successor_log_prob", "transition_log_probs", "validate_simulator"]
