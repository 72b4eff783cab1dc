"""`problem.name: stackelberg`: the Stackelberg Markov game of the PBRL paper (SPEC 7.3,
bilevel_jax.envs.stackelberg).

The leader's `x` `[S, A_L]` is the logits of its committed policy; the follower best-responds in
the induced MDP (rewards and transitions both depend on `x`). `game: random` draws a general-sum
game (Dirichlet rows, rewards uniform in [-1, 1]) from `seed`; `game: commitment` is the
hand-made one-state commitment game (2 leader x 2 follower actions) whose Stackelberg optimum
pays the leader about 63% more than its Nash equilibrium. Generic algorithms: `ascent` (any
estimator, e.g. exact, hpgd, naive) and `pbrl`.
"""

from __future__ import annotations

from bilevel_jax.runner.fields import ConfigError, Field
from bilevel_jax.runner.problems.registry import register_problem

STACKELBERG_FIELDS = {
    "game": Field("str", "random", choices=("random", "commitment"),
                  doc="random: a random general-sum game from seed; commitment: the hand-made "
                      "commitment game (1 state, 2 x 2 actions)"),
    "seed": Field("int", 0, low=0,
                  doc="numpy seed of the random game (transitions, rewards, initial)"),
    "num_states": Field("int", None, low=1, nullable=True,
                        doc="states S (null: 10 for random; the commitment game has 1)"),
    "leader_actions": Field("int", None, low=1, nullable=True,
                            doc="leader actions A_L (null: 3 for random; commitment: 2)"),
    "follower_actions": Field("int", None, low=1, nullable=True,
                              doc="follower actions A_F (null: 3 for random; commitment: 2)"),
    "discount": Field("float", 0.9, low=0, high=1, high_open=True, doc="follower discount"),
    "leader_discount": Field("float", 0.9, low=0, high=1, high_open=True, traced=True,
                             doc="leader discount"),
    "temperature": Field("float", 0.1, low=0, low_open=True, traced=True,
                         doc="follower entropy temperature lam"),
    "leader_entropy": Field("float", 0.0, low=0, traced=True,
                            doc="weight tau of the leader's entropy bonus tau H(pi_x(.|s)) "
                                "(0: the plain game)"),
    "dtype": Field("str", "float32", choices=("float32", "float64"),
                   doc="float64 turns on jax_enable_x64 for the run"),
}

RANDOM_SIZES = {"num_states": 10, "leader_actions": 3, "follower_actions": 3}
COMMITMENT_SIZES = {"num_states": 1, "leader_actions": 2, "follower_actions": 2}


def check_stackelberg(section: dict) -> None:
    if section["game"] == "commitment":
        for key, size in COMMITMENT_SIZES.items():
            if section[key] is not None and section[key] != size:
                what = key.replace("num_", "").replace("_", " ")
                raise ConfigError(
                    f"problem.{key}: the commitment game has {size} {what}; expected null or "
                    f"{size} with problem.game: commitment, got {section[key]}")


def sizes(section: dict) -> dict:
    """`num_states`, `leader_actions`, `follower_actions` with the game's defaults filled in."""
    defaults = COMMITMENT_SIZES if section["game"] == "commitment" else RANDOM_SIZES
    return {key: default if section[key] is None else section[key]
            for key, default in defaults.items()}


def build_stackelberg(section: dict):
    import jax.numpy as jnp

    from bilevel_jax.envs.stackelberg import (commitment_game, random_markov_game,
                                              stackelberg_problem)

    dtype = jnp.float64 if section["dtype"] == "float64" else jnp.float32
    if section["game"] == "commitment":
        game = commitment_game(discount=section["discount"], dtype=dtype)
    else:
        size = sizes(section)
        game = random_markov_game(size["num_states"], size["leader_actions"],
                                  size["follower_actions"], section["seed"],
                                  discount=section["discount"], dtype=dtype)
    # x0 = 0: the uniform commitment; per-seed starts come from the config's x0_noise.
    return stackelberg_problem(game, section["temperature"],
                               leader_discount=section["leader_discount"],
                               leader_entropy=section["leader_entropy"])


def apply_stackelberg(problem, values: dict, section: dict):
    """Traced `temperature` / `leader_discount` replace the problem's leaves; a traced
    `leader_entropy` replaces the context's entry (the problem's functions read it there)."""
    del section
    values = dict(values)
    if "leader_entropy" in values:
        current = problem.contexts["leader_entropy"]
        entropy = values.pop("leader_entropy")
        contexts = dict(problem.contexts,
                        leader_entropy=entropy.reshape(current.shape).astype(current.dtype))
        problem = problem.replace(contexts=contexts)
    return problem.replace(**values) if values else problem


register_problem("stackelberg", build_stackelberg, fields=STACKELBERG_FIELDS,
                 check=check_stackelberg, apply_traced=apply_stackelberg,
                 doc="Stackelberg Markov game (SPEC 7.3): the leader commits to softmax(x), "
                     "x in R^{S x A_L}")
