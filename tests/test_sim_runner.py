"""Simulator problems from YAML: `configs/simulator_hpgd.yaml` (model-free HPGD with a soft
Q-learning follower on `simulator_random`), and zero-order by `--set`, run end to end through
`bilevel_jax.cli.main` at a few iterations; `bilevel-jax list` shows the simulator problems and
the learner options; the config refuses what a simulator problem cannot run, naming the key."""

from __future__ import annotations

import csv
import math
import os

import pytest

from bilevel_jax import cli
from bilevel_jax.runner.config import load_config

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "simulator_hpgd.yaml")
FEW = ["--set", "iterations=4", "--set", "chunk_size=2", "--set", "seeds=1"]


def _sets(*pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


ZERO_ORDER = _sets("estimator.name=zero_order", "estimator.zero_order.learner=soft_q_tabular",
                  "estimator.zero_order.learner_options={num_envs: 8, num_updates: 50}",
                  "estimator.zero_order.num_envs=8", "estimator.zero_order.num_steps=50",
                  "estimator.zero_order.smoothing=0.5")


@pytest.mark.parametrize("method, overrides, samples", [
    # with the exact F solved on the tabular source (bj.sim.reference_model)
    ("hpgd", _sets("algorithm.track_objective=true"), 8 * 100),
    ("zero_order", ZERO_ORDER, 2 * 8 * 50)])
def test_simulator_config_runs_end_to_end(tmp_path, capsys, method, overrides, samples):
    out = tmp_path / "run"
    assert cli.main(["run", CONFIG, *FEW, *overrides, "--out", str(out), "--no-progress"]) == 0
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]
    grads = [float(r["grad_norm"]) for r in rows]
    # Finite, and moving x (zero-order may give exactly 0 at a step: with common random
    # numbers, a small u z can leave every sampled action, hence both returns, unchanged).
    assert all(math.isfinite(g) for g in grads) and any(g > 0 for g in grads), grads
    assert all(float(r["samples"]) == samples for r in rows)
    # zero-order: its F estimate (the mean discounted leader return); hpgd: the reference's F
    assert all(math.isfinite(float(r["objective"])) for r in rows)
    assert "simulator_random" in capsys.readouterr().out


def test_list_shows_the_simulator_problems_and_learner_options(capsys):
    assert cli.main(["list"]) == 0
    text = " ".join(capsys.readouterr().out.split())      # the listing wraps its lines
    for word in ("simulator_random", "simulator_four_rooms", "observation=one_hot",
                 "max_episode_steps=null", "learner=soft_dqn", "learner_options=null",
                 "critic_hidden=[64, 64]", "shifted=warm", "configs/simulator_hpgd.yaml"):
        assert word in text, word


def test_yaml_estimator_options_reach_the_estimator():
    config = load_config(CONFIG, ["estimator.hpgd.critic_hidden=[8, 4]"])
    hpgd = config["estimator"]["hpgd"]
    assert hpgd["critic_hidden"] == [8, 4]
    assert hpgd["learner"] == "soft_q_tabular"
    assert hpgd["learner_options"] == {"num_envs": 8, "num_updates": 100, "step_exponent": 0.6}


@pytest.mark.parametrize("overrides, message", [
    (["estimator.name=exact"], "estimator.name: problem 'simulator_random' is a simulator"),
    (["algorithm.name=pbrl", "algorithm.penalty=bellman"],
     "algorithm.penalty: problem 'simulator_random' is a simulator problem"),
    (["estimator.hpgd.learner=no_such"], "estimator.hpgd: learner: expected one of"),
    (["estimator.hpgd.learner_options={bogus: 1}"], "estimator.hpgd: learner_options: "),
    (["estimator.hpgd.learner_options=3"], "estimator.hpgd.learner_options: expected a mapping"),
    (["estimator.hpgd.critic_hidden=[16, 0]"],
     "estimator.hpgd.critic_hidden[1]: expected an int >= 1, got 0"),
    (["estimator.hpgd.critic_hidden=[]"], "estimator.hpgd.critic_hidden: expected a non-empty"),
    (["problem.observation=pixels"], "problem.observation: expected one of"),
    (["estimator.name=zero_order", "estimator.zero_order.shifted=cold"],
     "estimator.zero_order.shifted: expected one of"),
])
def test_refusals_name_the_key(tmp_path, capsys, overrides, message):
    out = tmp_path / "refused"
    assert cli.main(["run", CONFIG, *_sets(*overrides), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_track_objective_refused_on_a_simulator_without_a_reference(tmp_path, capsys):
    path = tmp_path / "tax.yaml"
    path.write_text("problem: {name: tax_design, reference_bins: null}\n"
                    "estimator: {name: hpgd, hpgd: {learner: soft_dqn}}\n"
                    "algorithm: {name: ascent, track_objective: true}\n"
                    "iterations: 2\n")
    out = tmp_path / "refused"
    assert cli.main(["run", str(path), "--out", str(out)]) == 2
    assert "algorithm.track_objective: problem 'tax_design' is a simulator problem without a " \
           "tabular reference" in capsys.readouterr().err
    assert not out.exists()


def test_python_train_on_a_simulator_reports_no_exact_objective():
    """`bj.train` on a simulator problem without a `reference`, with the default
    `track_objective=True`, runs (no model to solve for F: `objective` is the estimator's own
    or NaN) and moves x."""
    import jax
    import numpy as np
    import optax

    import bilevel_jax as bj
    from bilevel_jax.envs.random_mdp import random_bilevel_problem

    tabular, x0 = random_bilevel_problem(0, num_states=5, num_actions=3, temperature=0.5)
    simulator = bj.as_simulator(tabular).replace(reference=None)
    result = bj.train(simulator, "hpgd", optax.sgd(0.1), 3, jax.random.key(0),
                      x0=x0, chunk_size=3, learner="soft_q_tabular", num_envs=8, num_steps=32,
                      learner_options={"num_envs": 4, "num_updates": 50})
    assert np.all(np.isnan(result.metrics["objective"]))
    assert np.all(np.isfinite(result.metrics["grad_norm"]))
    assert not np.allclose(np.asarray(result.state["x"]), np.asarray(x0))
