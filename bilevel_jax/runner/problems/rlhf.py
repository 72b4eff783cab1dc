"""`problem.name: rlhf`: RLHF as bilevel RL (SPEC 7.4; bilevel_jax.preferences), run by
`algorithm.name: pbrl` (bilevel_jax.algorithms.rlhf.rlhf_pbrl) or `decoupled` (fit the reward
model, then solve the RL problem: rlhf_decoupled).

The leader's `x0` is the reward model's initial parameters (zeros for the linear model, the
linen initialization with key `seed` for the MLP); `x0_noise` perturbs it per seed.
"""

from __future__ import annotations

from bilevel_jax.runner.fields import ConfigError, Field
from bilevel_jax.runner.problems.registry import register_problem

RLHF_FIELDS = {
    "env": Field("str", "grid", choices=("grid", "random"),
                 doc="environment: the preference gridworld or a random MDP"),
    "seed": Field("int", 0, low=0, high=2**63 - 1,
                  doc="seed of the random MDP and of the MLP's initialization"),
    "size": Field("int", 5, low=2, doc="grid: side of the square grid"),
    "slip_prob": Field("float", 0.1, low=0, high=1, doc="grid: probability that a move slips"),
    "features": Field("str", "onehot", choices=("onehot", "state", "rbf"),
                      doc="grid: reward features (onehot, state: well specified; rbf: not)"),
    "random_start": Field("bool", True,
                          doc="grid: start uniformly on safe cells (false: the corner (0, 0))"),
    "goal_terminal": Field("bool", False,
                           doc="grid: a terminal goal (false: an absorbing goal)"),
    "num_states": Field("int", 10, low=2, doc="random: states S"),
    "num_actions": Field("int", 3, low=1, doc="random: actions A"),
    "dim": Field("int", 4, low=1, doc="random: reward features d"),
    "branching": Field("int", None, low=1, nullable=True,
                       doc="random: successors per (s, a) (null: dense rows)"),
    "realizable": Field("bool", True,
                        doc="random: true reward linear in the features (false: misspecified)"),
    "reward_model": Field("str", "linear", choices=("linear", "mlp"),
                          doc="reward model r_x: linear in the features or a flax MLP"),
    "hidden_width": Field("int", 32, low=1, doc="mlp: width of each hidden layer"),
    "hidden_layers": Field("int", 2, low=1, doc="mlp: number of hidden (tanh) layers"),
    "noise": Field("float", 0.0, low=0, traced=True,
                   doc="annotator noise: P(tau1 > tau2) = sigmoid(gap / noise) (0: noiseless)"),
    "horizon": Field("int", 12, low=1, doc="trajectory length H of the compared pairs"),
    "temperature": Field("float", 0.1, low=0, low_open=True, traced=True,
                         doc="lower-level entropy temperature lam"),
    "discount": Field("float", 0.9, low=0, high=1, high_open=True,
                      doc="lower-level discount (also of the true return metric)"),
    "initial_pairs": Field("int", 32, low=0, doc="labelled pairs from the initial policy"),
    "warmup_epochs": Field("int", 20, low=0, doc="reward-model steps on the initial pairs"),
    "pairs_per_epoch": Field("int", 16, low=1, doc="new labelled pairs per iteration"),
    "buffer_size": Field("int", 512, low=1, doc="FIFO buffer of the last labelled pairs"),
    "heldout_pairs": Field("int", 256, low=1,
                           doc="held-out pairs (initial policy) for preference_accuracy"),
    "dtype": Field("str", "float32", choices=("float32", "float64"),
                   doc="float64 turns on jax_enable_x64 for the run"),
}


def check_rlhf(section: dict) -> None:
    for name in ("initial_pairs", "pairs_per_epoch"):
        if section[name] > section["buffer_size"]:
            raise ConfigError(f"problem.buffer_size: expected an int >= problem.{name} "
                              f"({section[name]}), got {section['buffer_size']}")
    if (section["env"] == "random" and section["branching"] is not None
            and section["branching"] > section["num_states"]):
        raise ConfigError(f"problem.branching: expected an int <= problem.num_states "
                          f"({section['num_states']}), got {section['branching']}")


def build_rlhf(section: dict):
    import jax
    import jax.numpy as jnp

    from bilevel_jax.envs.preference import preference_gridworld, random_preference_env
    from bilevel_jax.preferences import linear_reward_model, mlp_reward_model, rlhf_problem

    dtype = jnp.float64 if section["dtype"] == "float64" else jnp.float32
    if section["env"] == "grid":
        env = preference_gridworld(
            section["size"], start="uniform" if section["random_start"] else (0, 0),
            slip_prob=section["slip_prob"], discount=section["discount"],
            goal_terminal=section["goal_terminal"], features=section["features"], dtype=dtype)
    else:
        env = random_preference_env(
            section["seed"], section["num_states"], section["num_actions"], section["dim"],
            branching=section["branching"], discount=section["discount"],
            realizable=section["realizable"], dtype=dtype)
    if section["reward_model"] == "linear":
        model = linear_reward_model(env.num_features, dtype=dtype)
    else:
        model = mlp_reward_model(env.num_features,
                                 (section["hidden_width"],) * section["hidden_layers"],
                                 dtype=dtype)
    problem = rlhf_problem(
        env, model, temperature=section["temperature"], noise=section["noise"],
        horizon=section["horizon"], initial_pairs=section["initial_pairs"],
        warmup_epochs=section["warmup_epochs"], pairs_per_epoch=section["pairs_per_epoch"],
        buffer_size=section["buffer_size"], heldout_pairs=section["heldout_pairs"])
    return problem, model.init(jax.random.key(section["seed"]))


def make_rlhf_algorithm(config: dict, optimizer, section: dict):
    from bilevel_jax.algorithms.rlhf import rlhf_decoupled, rlhf_pbrl

    if section["name"] == "pbrl":
        return rlhf_pbrl(optimizer, penalty=section["penalty"], rho_0=section["rho_0"],
                         rho_max=section["rho_max"],
                         ramp_iters=section["ramp_iters"] or config["iterations"],
                         inner_sweeps=section["inner_sweeps"],
                         track_objective=section["track_objective"])
    if section["name"] == "decoupled":
        return rlhf_decoupled(optimizer, fit_steps=section["fit_steps"],
                              track_objective=section["track_objective"])
    raise ConfigError(f"algorithm.name: problem 'rlhf' runs one of ['pbrl', 'decoupled'], "
                      f"got {section['name']!r}")


register_problem("rlhf", build_rlhf, fields=RLHF_FIELDS, check=check_rlhf,
                 algorithms=("pbrl", "decoupled"), make_algorithm=make_rlhf_algorithm,
                 doc="RLHF as bilevel RL (SPEC 7.4): reward model x, soft-optimal policy, "
                     "Bradley-Terry loss on pairs from the policy")
