"""`problem.name: rlhf_minatar`: RLHF on a gymnax environment (SPEC 7.4 on simulators;
bilevel_jax.algorithms.rlhf_sim), run by `algorithm.name: pbrl` (`rlhf_sim_pbrl`, the value
penalty with the follower's policy network as `y`, `algorithm.learner` the best response) or
`decoupled` (`rlhf_sim_decoupled`: fit the reward on the pairs, then train `algorithm.learner`,
soft PPO, on it). `problem.true_reward: true` with `decoupled` runs the ceiling instead: the
learner trained on the environment's own reward (`rlhf_sim_true_reward`, no labels).

The leader's `x0` is the reward model's linen initialization with key `seed` (a CNN for the
MinAtar frames, or an MLP over the flattened observation); `x0_noise` perturbs it per seed.
The environment's reward is hidden from the follower; only the synthetic annotator reads it.

`algorithm.track_objective` here is the held-out `preference_accuracy` (the objective, the
true return of the iteration's rollout, costs nothing). Evaluating it is a CNN over more frames
than a PPO update's rollout, so the configs evaluate it on a schedule: `track_every: k` computes
it every k-th iteration and over the final window, and reports it (and `objective`) as NaN on
the other iterations; `true_return` is reported on every iteration.
"""

from __future__ import annotations

from bilevel_jax.runner.fields import ConfigError, Field
from bilevel_jax.runner.problems.registry import register_problem

ENVS = ("Breakout-MinAtar", "SpaceInvaders-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar")

RLHF_MINATAR_FIELDS = {
    "env": Field("str", "Breakout-MinAtar", choices=ENVS, doc="the gymnax environment"),
    "seed": Field("int", 0, low=0, high=2**63 - 1, doc="seed of the reward model's init"),
    "reward_model": Field("str", "cnn", choices=("cnn", "mlp"),
                          doc="r_x(obs, a): a small CNN on the frames, or an MLP"),
    "channels": Field("int", 16, low=1, doc="cnn: channels of its one 3x3 convolution"),
    "hidden_width": Field("int", 64, low=1, doc="width of the reward model's dense layer(s)"),
    "noise": Field("float", 0.0, low=0, traced=True,
                   doc="annotator noise: P(s1 > s2) = sigmoid(gap / noise) (0: noiseless)"),
    "temperature": Field("float", 0.01, low=0, low_open=True,
                         doc="follower's entropy temperature lam"),
    "discount": Field("float", 0.99, low=0, high=1, high_open=True, doc="follower's discount"),
    "segment_length": Field("int", 25, low=1, doc="steps per compared segment"),
    "num_envs": Field("int", 16, low=1, doc="environments of the rollouts the pairs come from"),
    "num_steps": Field("int", 128, low=1, doc="steps of those rollouts (>= segment_length)"),
    "initial_pairs": Field("int", 576, low=0, doc="labelled pairs from the initial policy"),
    "warmup_epochs": Field("int", 500, low=0, doc="reward-model steps on the initial pairs"),
    "pairs_per_epoch": Field("int", 16, low=1, doc="new labelled pairs per iteration"),
    "buffer_size": Field("int", 3000, low=1, doc="FIFO buffer of the last labelled pairs"),
    "heldout_pairs": Field("int", 256, low=1, doc="held-out pairs for preference_accuracy"),
    "fit_batch_size": Field("int", None, low=1, nullable=True,
                            doc="pairs per reward step, drawn from the buffer (null: the "
                                "whole buffer, the paper's)"),
    "max_episode_steps": Field("int", None, low=1, nullable=True,
                               doc="time limit of the episodes (null: the environment's)"),
    "true_reward": Field("bool", False,
                         doc="decoupled only: train the learner on the environment's reward "
                             "(the ceiling; no labels)"),
}


def check_rlhf_minatar(section: dict) -> None:
    for name in ("initial_pairs", "pairs_per_epoch"):
        if section[name] > section["buffer_size"]:
            raise ConfigError(f"problem.buffer_size: expected an int >= problem.{name} "
                              f"({section[name]}), got {section['buffer_size']}")
    if section["segment_length"] > section["num_steps"]:
        raise ConfigError(f"problem.segment_length: expected at most problem.num_steps "
                          f"({section['num_steps']}), got {section['segment_length']}")


def build_rlhf_minatar(section: dict):
    import gymnax
    import jax

    from bilevel_jax.algorithms.rlhf_sim import rlhf_sim_problem
    from bilevel_jax.preferences_sim import cnn_reward_model, mlp_reward_model

    env, params = gymnax.make(section["env"])
    obs_shape = env.observation_space(params).shape
    num_actions = env.action_space(params).n
    if section["reward_model"] == "cnn":
        model = cnn_reward_model(obs_shape, num_actions, channels=(section["channels"],),
                                 hidden=(section["hidden_width"],))
    else:
        model = mlp_reward_model(obs_shape, num_actions, hidden=(section["hidden_width"],) * 2)
    problem = rlhf_sim_problem(
        env, model, env_params=params, temperature=section["temperature"],
        discount=section["discount"], noise=section["noise"],
        segment_length=section["segment_length"], num_envs=section["num_envs"],
        num_steps=section["num_steps"], initial_pairs=section["initial_pairs"],
        warmup_epochs=section["warmup_epochs"], pairs_per_epoch=section["pairs_per_epoch"],
        buffer_size=section["buffer_size"], heldout_pairs=section["heldout_pairs"],
        max_episode_steps=section["max_episode_steps"],
        fit_batch_size=section["fit_batch_size"])
    return problem, model.init(jax.random.key(section["seed"]))


def make_rlhf_minatar_algorithm(config: dict, optimizer, section: dict):
    from bilevel_jax.algorithms.rlhf_sim import (rlhf_sim_decoupled, rlhf_sim_pbrl,
                                                 rlhf_sim_true_reward)
    from bilevel_jax.algorithms.sample_pbrl import SamplePBRLConfig
    from bilevel_jax.learners import make_learner

    learner = make_learner(section["learner"], **(section["learner_options"] or {}))
    true_reward = config["problem"]["true_reward"]
    if section["name"] == "pbrl":
        if true_reward:
            raise ConfigError("problem.true_reward: the ceiling runs with algorithm.name: "
                              "decoupled, got pbrl")
        cfg = SamplePBRLConfig(num_envs=section["num_envs"], num_steps=section["num_steps"],
                               policy_hidden=tuple(section["policy_hidden"] or ()),
                               policy_activation=section["policy_activation"],
                               baseline_hidden=tuple(section["baseline_hidden"] or ()),
                               baseline_learning_rate=section["baseline_learning_rate"],
                               baseline_steps=section["baseline_steps"], score_terms=False)
        return rlhf_sim_pbrl(optimizer, learner, cfg, rho_0=section["rho_0"],
                             rho_max=section["rho_max"],
                             ramp_iters=section["ramp_iters"] or config["iterations"],
                             track_accuracy=section["track_objective"])
    if section["name"] == "decoupled":
        if true_reward:
            return rlhf_sim_true_reward(learner, track_accuracy=section["track_objective"])
        return rlhf_sim_decoupled(optimizer, learner, fit_steps=section["fit_steps"],
                                  track_accuracy=section["track_objective"])
    raise ConfigError(f"algorithm.name: problem 'rlhf_minatar' runs one of ['pbrl', "
                      f"'decoupled'], got {section['name']!r}")


register_problem("rlhf_minatar", build_rlhf_minatar, fields=RLHF_MINATAR_FIELDS,
                 check=check_rlhf_minatar, algorithms=("pbrl", "decoupled"),
                 make_algorithm=make_rlhf_minatar_algorithm,
                 doc="RLHF on a gymnax MinAtar game (SPEC 7.4 on simulators): reward network x, "
                     "soft PPO follower, Bradley-Terry loss on segment pairs from its rollouts")
