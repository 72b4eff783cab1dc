"""`problem.name: four_rooms`: the CB-RL reward-shaping benchmark (SPEC 7.1,
bilevel_jax.envs.four_rooms)."""

from __future__ import annotations

from bilevel_jax.runner.fields import Field
from bilevel_jax.runner.problems.registry import register_problem

FOUR_ROOMS_FIELDS = {
    "beta": Field("float", 1.0, low=0, traced=True, doc="weight of the incentive cost at the goal"),
    "temperature": Field("float", 0.001, low=0, low_open=True, traced=True,
                         doc="follower entropy temperature lam"),
    "leader_discount": Field("float", 0.99, low=0, high=1, high_open=True, traced=True,
                             doc="leader discount"),
    "discount": Field("float", 0.99, low=0, high=1, high_open=True, doc="follower discount"),
    "slip_prob": Field("float", 0.44, low=0, high=1,
                       doc="probability that a move slips to one of the other three"),
    "sparse": Field("bool", True, doc="SparseTransitions kernel (branching 4) or dense"),
}


def _four_rooms(section: dict, beta, temperature, leader_discount):
    from bilevel_jax.envs.four_rooms import four_rooms_problem

    problem, _ = four_rooms_problem(beta=beta, temperature=temperature,
                                    leader_discount=leader_discount,
                                    discount=section["discount"],
                                    slip_prob=section["slip_prob"], sparse=section["sparse"])
    return problem


def build_four_rooms(section: dict):
    import jax.numpy as jnp

    problem = _four_rooms(section, section["beta"], section["temperature"],
                          section["leader_discount"])
    # x0 = 0; the paper's N(0, 0.01^2) initialization is the config's x0_noise: 0.01.
    return problem, jnp.zeros(105, jnp.float32)


def apply_four_rooms(problem, values: dict, section: dict):
    # beta lives inside the reward closures, so traced values rebuild the problem.
    if not values:
        return problem
    merged = dict(section, **values)
    return _four_rooms(section, merged["beta"], merged["temperature"], merged["leader_discount"])


register_problem("four_rooms", build_four_rooms, fields=FOUR_ROOMS_FIELDS,
                 apply_traced=apply_four_rooms,
                 doc="Four-Rooms reward shaping of the CB-RL paper (SPEC 7.1), x in R^105")
