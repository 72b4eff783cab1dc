"""The tracking schedule (`track_every`): untracked iterations skip the solve for the exact F and
report NaN, tracked ones report what a fully tracked run reports (to the follower solver's
tolerance: the tracked solve's warm start differs, its fixed point does not; bitwise where the
objective is solved from scratch, as PBRL's), everything else is bitwise the same, the
final-window metric is unchanged, bad values are refused, and a resumed run crosses schedule
boundaries (bitwise equal to the uninterrupted scheduled run)."""

import json
import os

import jax
import numpy as np
import optax
import pytest
import yaml

from bilevel_jax import cli
from bilevel_jax.algorithms import hypergradient_ascent, pbrl, train
from bilevel_jax.algorithms.train import (check_track_every, track_segments,
                                          tracked_iterations)
from bilevel_jax.envs.random_mdp import random_bilevel_problem
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.runner import io as rio
from bilevel_jax.runner.config import ConfigError, resolve_config
from bilevel_jax.runner.run import run_experiment


@pytest.fixture(scope="module")
def problem():
    return random_bilevel_problem(0, num_states=6, num_actions=3, dim_x=4, num_terminal=1,
                                  temperature=0.2)


def test_schedule_helpers():
    tracked = tracked_iterations(24, 5, 6)
    assert list(np.nonzero(tracked)[0]) == [0, 5, 10, 15, *range(18, 24)]
    assert tracked_iterations(7, None, 1).all()
    assert track_segments(tracked, 3, 12) == [(2, False), (1, True), (4, False), (1, True),
                                              (1, False)]
    assert track_segments(tracked, 16, 24) == [(2, False), (6, True)]
    for bad in (0, -3, 1.5, True, "4"):
        with pytest.raises(InvalidArgumentError, match="track_every: expected an int >= 1"):
            check_track_every(bad)


def test_train_schedule_equals_full_tracking_where_tracked(problem):
    pb, x0 = problem
    # Ready algorithms, so that both runs share the compiled tracked chunk.
    tracked_build = hypergradient_ascent("amd", optax.sgd(0.2), num_sweeps=3)
    untracked_build = hypergradient_ascent("amd", optax.sgd(0.2), num_sweeps=3,
                                           track_objective=False)
    full = train(pb, tracked_build, None, 20, jax.random.key(3), x0=x0, chunk_size=5)
    sched = train(pb, tracked_build, None, 20, jax.random.key(3), x0=x0, chunk_size=5,
                  track_every=5, final_window=5, untracked=untracked_build)
    tracked = tracked_iterations(20, 5, 5)          # chunks: T1 U4 | T1 U4 | T1 U4 | T5
    f_full, f_sched = full.metrics["objective"], sched.metrics["objective"]
    assert np.isnan(f_sched[~tracked]).all() and np.isfinite(f_full).all()
    assert f_full.dtype == np.float32     # reported in float32: solves of float64 agree to it
    np.testing.assert_allclose(f_sched[tracked], f_full[tracked], rtol=1e-6)
    for name in ("grad_norm", "follower_residual", "samples"):
        np.testing.assert_array_equal(sched.metrics[name], full.metrics[name], err_msg=name)
    np.testing.assert_array_equal(sched.state["x"], full.state["x"])
    np.testing.assert_allclose(np.mean(f_sched[-5:]), np.mean(f_full[-5:]), rtol=1e-6)


def test_pbrl_schedule_with_its_untracked_build(problem):
    pb, x0 = problem
    options = dict(rho_0=1.0, rho_max=10.0, ramp_iters=20, inner_sweeps=3)
    full = train(pb, pbrl(optax.sgd(0.1), **options), None, 12, jax.random.key(0), x0=x0,
                 chunk_size=4)
    sched = train(pb, pbrl(optax.sgd(0.1), **options), None, 12, jax.random.key(0), x0=x0,
                  chunk_size=4, track_every=4, final_window=4,
                  untracked=pbrl(optax.sgd(0.1), track_objective=False, **options))
    tracked = tracked_iterations(12, 4, 4)
    for name in ("objective", "best_response_gap"):
        assert np.isnan(sched.metrics[name][~tracked]).all(), name
    np.testing.assert_array_equal(sched.metrics["objective"][tracked],
                                  full.metrics["objective"][tracked])
    # (the gap is ~1e-16 at x0, a difference of two equal values: other compiled programs may
    # round it differently)
    np.testing.assert_allclose(sched.metrics["best_response_gap"][tracked],
                               full.metrics["best_response_gap"][tracked], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(sched.metrics["penalty"], full.metrics["penalty"], rtol=1e-6,
                               atol=1e-12)
    with pytest.raises(InvalidArgumentError, match="untracked"):
        train(pb, pbrl(optax.sgd(0.1), **options), None, 4, jax.random.key(0), x0=x0,
              track_every=2)


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------

def _config(out, **extra):
    raw = {"name": "sched", "problem": {"name": "random", "num_states": 6, "num_actions": 3,
                                        "dim_x": 4, "temperature": 0.2},
           "estimator": {"name": "amd", "amd": {"num_sweeps": 3}},
           "optimizer": {"learning_rate": 0.2}, "iterations": 16, "chunk_size": 4, "seeds": 2,
           "x0_noise": 0.01, "sweep": {"optimizer.learning_rate": [0.1, 0.3]},
           "output": {"dir": str(out), "final_fraction": 0.25, "plots": False}, **extra}
    return resolve_config(raw)


def _columns(directory):
    with open(os.path.join(directory, "metrics.csv")) as handle:
        header = handle.readline().strip().split(",")
        rows = [line.rstrip("\n").split(",") for line in handle]
    return {name: [row[i] for row in rows] for i, name in enumerate(header)}


class _Stop(Exception):
    pass


def test_runner_schedule_metric_and_resume_across_boundaries(tmp_path, monkeypatch):
    quiet = open(os.devnull, "w")
    full = run_experiment(_config(tmp_path / "full"), progress=False, stream=quiet)

    # The scheduled run (T1 U3 | T1 U3 | T1 U3 | T4) is killed after the checkpoint at
    # iteration 8, then resumed across the schedule's boundaries (a tracked and an untracked
    # segment, then the final window).
    save = rio.save_checkpoint

    def save_then_stop(directory, payload):
        save(directory, payload)
        if payload["done"] == 8:
            raise _Stop

    out = tmp_path / "resumed"
    monkeypatch.setattr(rio, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stop):
        run_experiment(_config(out, track_every=4), progress=False, stream=quiet)
    monkeypatch.setattr(rio, "save_checkpoint", save)
    assert rio.load_checkpoint(str(out))["done"] == 8
    sched = run_experiment(_config(out, track_every=4), resume=True, progress=False,
                           stream=quiet)

    a, b = _columns(out), _columns(tmp_path / "full")
    tracked = tracked_iterations(16, 4, 4)[np.asarray(a["iteration"], int)]
    objective = np.asarray([float(v) if v else np.nan for v in a["objective"]])
    assert np.isnan(objective[~tracked]).all() and all(b["objective"])
    reference = np.asarray([float(v) for v in b["objective"]])
    np.testing.assert_allclose(objective[tracked], reference[tracked], rtol=1e-5, atol=1e-6)
    for name in a:              # the trajectory itself is bitwise the same
        if name != "objective":
            assert a[name] == b[name], name
    for p, q in zip(sched.summary["points"], full.summary["points"]):
        assert p["initial"]["objective"] == q["initial"]["objective"]    # both solve from 0
        for metric in p["final"]:
            if metric == "objective":
                np.testing.assert_allclose(p["final"][metric]["per_seed"],
                                           q["final"][metric]["per_seed"], rtol=1e-5, atol=1e-6)
            else:
                assert p["final"][metric] == q["final"][metric], metric
    assert json.loads((out / "summary.json").read_text())["final_window"] == 4


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "often"])
def test_config_refuses_bad_track_every(value):
    with pytest.raises(ConfigError, match="^track_every: expected"):
        resolve_config({"track_every": value})


def test_config_refusals_and_cli_exit_2(tmp_path, capsys):
    with pytest.raises(ConfigError, match="track_every: a schedule of tracked iterations needs "
                                          "algorithm.track_objective: true"):
        resolve_config({"track_every": 5, "algorithm": {"track_objective": False}})
    assert resolve_config({"track_every": 5})["track_every"] == 5
    assert resolve_config({})["track_every"] is None
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"iterations": 2, "track_every": 0}))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "track_every: expected an int >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_zero_order_tracking_is_free_only_on_a_tabular_problem():
    """Zero-order's model-valued objective is exact on a tabular problem (no untracked build
    needed), sampled on a simulator: there the schedule skips the reference solve."""
    from bilevel_jax.runner.run import tracking_is_free

    zero_order = {"estimator": {"name": "zero_order"}, "track_every": 5}
    assert tracking_is_free(resolve_config({**zero_order, "problem": {"name": "random"}}))
    assert not tracking_is_free(resolve_config({**zero_order,
                                                "problem": {"name": "simulator_random"}}))
