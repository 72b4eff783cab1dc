"""Model-free PBRL on simulator problems (`bj.sim.as_simulator` of a random tabular problem)
against the tabular penalties: with a linear policy on one-hot observations (a table of logits,
`kernel[s] + bias`) and the exact best response (`soft_vi_tabular`), the sampled value penalty
and its gradients in `x` and `y`, and the leader's part `f(x, pi_y)` with its gradients, agree
with `bj.penalties.value_penalty`, `policy_objective` and their `jax.grad` within 4 SE (rewards
and transitions depending on `x`); the algorithm trains under `jit` from YAML
(`configs/simulator_pbrl.yaml` through the runner); bad options are refused naming the field.

Speed: 4 states, 3 actions, one context; every batch of 200 estimates is one jitted `vmap`
compiled once for both cases (the context says whether `x` enters the transitions, as in
`test_sample_hpgd.py`), with `unsafe_rbg` keys.
"""

from __future__ import annotations

import csv
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax import cli
from bilevel_jax.algorithms import sample_pbrl
from bilevel_jax.algorithms.pbrl import policy_objective, rho_schedule
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.learners import make_learner
from bilevel_jax.problem import leader_objective
from helpers import switchable_transitions_problem

SE = 4.0
NUM_ESTIMATES = 200
S, A = 4, 3
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "simulator_pbrl.yaml")
# A linear (table) policy and baseline; the window covers the horizon (0.7^40 ~ 6e-7).
CFG = sample_pbrl.SamplePBRLConfig(num_envs=16, num_steps=40, policy_hidden=(),
                                   baseline_hidden=(), baseline_steps=0)
LEARNER = make_learner("soft_vi_tabular")


_PROBLEM, _X, _SIMULATOR = switchable_transitions_problem(num_states=S, num_actions=A, dim_x=3,
                                                          temperature=0.5, discount=0.7,
                                                          leader_discount=0.7)
# Tabular logits away from pi* (a penalty of order 1) and the same policy as flax parameters.
_Y = jnp.asarray(np.random.default_rng(1).normal(size=(1, S, A)))
_POLICY = {"params": {"Dense_0": {"kernel": _Y.astype(jnp.float32),
                                  "bias": jnp.zeros((1, A), jnp.float32)}}}
_, _FOLLOWER = sample_pbrl.init_follower(_SIMULATOR, _X, jax.random.key(0), LEARNER, CFG)


def _with_flag(tree, x_in_transitions: bool):
    return tree.replace(contexts=dict(tree.contexts,
                                      x_in_transitions=jnp.full(1, x_in_transitions)))


@jax.jit
def _batch(simp, leader_weight, penalty_weight, keys):
    """`[n, ...]` estimates: grad x, grad kernel `[S, A]`, grad bias `[A]`, p, f, F."""
    def one(key):
        grads, _, info = sample_pbrl.estimate(simp, _X, _POLICY, _FOLLOWER, key, LEARNER, CFG,
                                              leader_weight=leader_weight,
                                              penalty_weight=penalty_weight)
        dense = grads["y"]["params"]["Dense_0"]
        return (grads["x"], dense["kernel"][0], dense["bias"][0], info["penalty"],
                info["policy_objective"], info["objective"])
    return jax.vmap(one)(keys)


@jax.jit
def _exact(problem):
    """The tabular values and gradients at `(x, y)`: p, grad_x p, grad_y p, f, grad f, F."""
    p, (gx, gy) = jax.value_and_grad(bj.penalties.value_penalty, argnums=(1, 2))(problem, _X, _Y)
    f, (fx, fy) = jax.value_and_grad(policy_objective, argnums=(1, 2))(problem, _X, _Y)
    return p, gx, gy[0], f, fx, fy[0], leader_objective(problem, _X)


def _z(estimates, exact):
    """Per-coordinate (mean - exact) / SE, SE from the estimates (ddof=1)."""
    est = np.asarray(estimates, np.float64)
    se = est.std(0, ddof=1) / np.sqrt(est.shape[0])
    assert np.all(se > 0)
    return (est.mean(0) - np.asarray(exact)) / se


def _keys(seed):
    return jax.random.split(jax.random.key(seed, impl="unsafe_rbg"), NUM_ESTIMATES)


@pytest.mark.parametrize("x_in_transitions", [False, True], ids=["rewards", "transitions"])
def test_value_penalty_and_its_gradients_match_the_tabular_penalty(x_in_transitions):
    problem = _with_flag(_PROBLEM, x_in_transitions)
    simp = _with_flag(_SIMULATOR, x_in_transitions)
    gx, g_kernel, g_bias, p, _, _ = _batch(simp, 0.0, 1.0, _keys(1 + x_in_transitions))
    exact_p, exact_gx, exact_gy, *_ = _exact(problem)
    assert float(exact_p) > 1.0          # a penalty of order 1, not the trivial zero at pi*
    for name, est, exact in [("penalty", p, exact_p), ("grad_x", gx, exact_gx),
                             ("grad_y kernel", g_kernel, exact_gy),
                             ("grad_y bias", g_bias, exact_gy.sum(0))]:
        z = _z(est, exact)
        assert np.all(np.abs(z) < SE), (name, z, np.asarray(est).mean(0), exact)
    if x_in_transitions:
        # The score terms matter: the reward-only gradient is rejected by the same test.
        reward_only = _exact(_with_flag(_PROBLEM, False))[1]
        assert np.max(np.abs(_z(gx, reward_only))) > SE


def test_leader_part_matches_the_policy_objective():
    """`leader_weight=1, penalty_weight=0`: the estimate of `grad (-f)`, and `f`, `F`."""
    problem = _with_flag(_PROBLEM, True)
    gx, g_kernel, _, _, f, big_f = _batch(_with_flag(_SIMULATOR, True), 1.0, 0.0, _keys(7))
    _, _, _, exact_f, exact_gx, exact_gy, exact_big_f = _exact(problem)
    for name, est, exact in [("f", f, exact_f), ("F", big_f, exact_big_f),
                             ("grad_x", gx, -exact_gx), ("grad_y", g_kernel, -exact_gy)]:
        z = _z(est, exact)
        assert np.all(np.abs(z) < SE), (name, z, np.asarray(est).mean(0), exact)


@pytest.mark.parametrize("options, problem_kind, field", [
    (dict(penalty="bellman"), "simulator", "penalty"),
    (dict(learner="no_such"), "simulator", "learner"),
    (dict(learner_options={"bogus": 1}, learner="soft_vi_tabular"), "simulator", "learner"),
    (dict(learner=3), None, "learner"),
    (dict(learner_options=[1]), None, "learner_options"),
    (dict(num_envs=0), None, "num_envs"),
    (dict(num_steps=1.5), None, "num_steps"),
    (dict(policy_hidden=(8, 0)), None, "policy_hidden"),
    (dict(baseline_hidden="wide"), None, "baseline_hidden"),
    (dict(baseline_steps=-1), None, "baseline_steps"),
    (dict(policy_activation="gelu"), None, "policy_activation"),
    (dict(baseline_learning_rate=0.0), None, "baseline_learning_rate"),
    (dict(score_terms="yes"), None, "score_terms"),
    (dict(learner="soft_vi_tabular"), "sampler", "contexts"),
    (dict(learner="soft_vi_tabular", score_terms=True), "no_log_prob", "score_terms"),
])
def test_bad_options_are_refused_naming_the_field(options, problem_kind, field):
    def build():
        algorithm = bj.pbrl(optax.sgd(0.1), **options)
        simp = _SIMULATOR
        if problem_kind == "sampler":
            simp = simp.replace(contexts=None, context_probs=None,
                                context_sampler=lambda key: dict(_PROBLEM.contexts))
        elif problem_kind == "no_log_prob":
            simp = simp.replace(transition_log_prob=None)
        if problem_kind is not None:
            state = algorithm.init(simp, _X, jax.random.key(0))
            algorithm.step(simp, state)

    with pytest.raises(InvalidArgumentError, match=rf"^({field}:|options of {field} )"):
        build()


def test_shipped_config_trains_through_the_runner(tmp_path, capsys):
    """The jitted training loop (`lax.scan` of the vmapped step) from YAML, with the exact
    best response: finite metrics, the tabular `rho` ramp, the penalty falls from the
    near-uniform start."""
    out = tmp_path / "run"
    iters = 16
    sets = [f"iterations={iters}", f"chunk_size={iters}", "seeds=1",
            "algorithm.learner=soft_vi_tabular", "algorithm.learner_options=null"]
    argv = ["run", CONFIG, *[a for s in sets for a in ("--set", s)], "--out", str(out),
            "--no-progress"]
    assert cli.main(argv) == 0
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["iteration"]) for r in rows] == list(range(iters))
    for name in ("objective", "grad_norm", "penalty", "policy_objective", "best_response_gap",
                 "penalized_objective", "baseline_loss"):
        assert all(math.isfinite(float(r[name])) for r in rows), name
    assert all(float(r["samples"]) == 2 * 8 * 64 for r in rows)
    np.testing.assert_allclose([float(r["rho"]) for r in rows],
                               rho_schedule(jnp.arange(iters), 1.0, 20.0, iters), rtol=1e-5)
    penalty = [float(r["penalty"]) for r in rows]
    assert np.mean(penalty[-4:]) < 0.5 * np.mean(penalty[:2]), penalty
    assert "simulator_random" in capsys.readouterr().out


def test_yaml_refusals_and_listing(tmp_path, capsys):
    from bilevel_jax.runner.config import load_config

    config = load_config(CONFIG)
    assert config["algorithm"]["name"] == "pbrl"
    assert config["algorithm"]["learner_options"] == {"num_envs": 8, "num_updates": 100,
                                                      "step_exponent": 0.6}
    assert config["algorithm"]["policy_hidden"] is None
    for overrides, message in [
            (["algorithm.penalty=bellman"], "algorithm.penalty: problem 'simulator_random' is"),
            (["algorithm.learner=no_such"], "algorithm.learner: expected one of"),
            (["algorithm.learner_options={bogus: 1}"], "algorithm.learner_options: "),
            (["algorithm.policy_hidden=[0]"], "algorithm.policy_hidden[0]: expected an int >= 1")]:
        out = tmp_path / "refused"
        argv = ["run", CONFIG, *[a for s in overrides for a in ("--set", s)], "--out", str(out)]
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err, overrides
        assert not out.exists()
    assert cli.main(["list"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in ("pbrl", "learner=soft_dqn", "policy_hidden=[64, 64]", "baseline_steps=10",
                 "configs/simulator_pbrl.yaml"):
        assert word in text, word
