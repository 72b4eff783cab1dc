"""bilevel_jax: bilevel reinforcement learning in JAX.

A leader chooses parameters `x` of the MDPs its followers act in; each follower best-responds
with an entropy-regularized optimal policy; the leader optimizes its own objective of the
followers' behaviour. This package holds the tabular MDP core (`core`), environments (`envs`),
and, as they land, hypergradient estimators, leader algorithms and the experiment runner.
"""

from bilevel_jax.core.evaluation import PolicyEvaluation, policy_evaluation, visitation
from bilevel_jax.core.linear import LinearSolverOptions, solve_policy_system, solve_q_system
from bilevel_jax.core.mdp import (
    SparseTransitions,
    TabularMDP,
    expected_next,
    policy_matrix,
    pushforward,
    validate_mdp,
)
from bilevel_jax.core.rollout import Trajectory, sample_trajectories
from bilevel_jax.core.soft_vi import (
    SoftVISolution,
    soft_bellman_operator,
    soft_greedy_policy,
    soft_value,
    soft_value_iteration,
    value_iteration,
)
from bilevel_jax.errors import BilevelJaxError, InvalidArgumentError, InvalidMDPError
from bilevel_jax.problem import (
    BilevelProblem,
    InvalidProblemError,
    check_problem,
    leader_objective,
    validate_problem,
)
from bilevel_jax import algorithms, estimators
from bilevel_jax.algorithms import Algorithm, NonFiniteError, TrainResult, pbrl, train
from bilevel_jax.games import TabularGame, nikaido_isoda_gap, solve_game_equilibrium, validate_game
from bilevel_jax.games import GameEquilibrium
from bilevel_jax.algorithms.incentive import equilibrium_ascent, ni_pbrl
from bilevel_jax.envs.incentive_design import (IncentiveDesignProblem, designer_objective,
                                               incentive_design_problem)
from bilevel_jax.penalties import bellman_penalty, value_penalty
from bilevel_jax.algorithms.rlhf import rlhf_decoupled, rlhf_pbrl
from bilevel_jax.envs.preference import PreferenceEnv, preference_gridworld, random_preference_env
from bilevel_jax.preferences import (RLHFProblem, TrajectoryPairs, annotate, linear_reward_model,
                                     mlp_reward_model, preference_nll, rlhf_problem, sample_pairs)
from bilevel_jax.estimators import Estimator, hypergradient, make_estimator

# `learners` and `sim` import gymnax, which builds jax arrays at import time and so starts the
# XLA backend; `jax.distributed.initialize` (`bilevel-jax run --distributed`) must run before
# that, so these load on first use.
_LAZY = {"learners": ("bilevel_jax.learners", None), "sim": ("bilevel_jax.sim", None),
         "Learner": ("bilevel_jax.learners", "Learner"),
         "make_learner": ("bilevel_jax.learners", "make_learner"),
         "InvalidSimulatorError": ("bilevel_jax.sim", "InvalidSimulatorError"),
         "SimulatorProblem": ("bilevel_jax.sim", "SimulatorProblem"),
         "as_simulator": ("bilevel_jax.sim", "as_simulator"),
         "validate_simulator": ("bilevel_jax.sim", "validate_simulator"),
         "preferences_sim": ("bilevel_jax.preferences_sim", None),
         "RLHFSimProblem": ("bilevel_jax.algorithms.rlhf_sim", "RLHFSimProblem"),
         "rlhf_sim_problem": ("bilevel_jax.algorithms.rlhf_sim", "rlhf_sim_problem"),
         "rlhf_sim_pbrl": ("bilevel_jax.algorithms.rlhf_sim", "rlhf_sim_pbrl"),
         "rlhf_sim_decoupled": ("bilevel_jax.algorithms.rlhf_sim", "rlhf_sim_decoupled"),
         "rlhf_sim_true_reward": ("bilevel_jax.algorithms.rlhf_sim", "rlhf_sim_true_reward")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bilevel_jax' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "InvalidSimulatorError",
    "Learner",
    "SimulatorProblem",
    "as_simulator",
    "learners",
    "make_learner",
    "sim",
    "validate_simulator",
    "BilevelJaxError",
    "Algorithm",
    "BilevelProblem",
    "NonFiniteError",
    "TrainResult",
    "algorithms",
    "pbrl",
    "train",
    "TabularGame",
    "GameEquilibrium",
    "IncentiveDesignProblem",
    "designer_objective",
    "equilibrium_ascent",
    "incentive_design_problem",
    "ni_pbrl",
    "PreferenceEnv",
    "RLHFProblem",
    "TrajectoryPairs",
    "annotate",
    "linear_reward_model",
    "mlp_reward_model",
    "preference_gridworld",
    "preference_nll",
    "random_preference_env",
    "rlhf_decoupled",
    "rlhf_pbrl",
    "rlhf_problem",
    "sample_pairs",
    "bellman_penalty",
    "nikaido_isoda_gap",
    "solve_game_equilibrium",
    "validate_game",
    "value_penalty",
    "Estimator",
    "InvalidProblemError",
    "check_problem",
    "estimators",
    "hypergradient",
    "leader_objective",
    "make_estimator",
    "validate_problem",
    "InvalidArgumentError",
    "InvalidMDPError",
    "LinearSolverOptions",
    "PolicyEvaluation",
    "SoftVISolution",
    "SparseTransitions",
    "TabularMDP",
    "Trajectory",
    "expected_next",
    "policy_evaluation",
    "policy_matrix",
    "pushforward",
    "sample_trajectories",
    "soft_bellman_operator",
    "soft_greedy_policy",
    "soft_value",
    "soft_value_iteration",
    "solve_policy_system",
    "solve_q_system",
    "validate_mdp",
    "value_iteration",
    "visitation",
]
