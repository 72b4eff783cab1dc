"""The experiment runner in-process: the config schema (every refusal names its key path), --set
overrides, the grid and its compiled groups, optimizers, summaries, and a run stopped by NaN.

End-to-end runs through the command line (subprocesses: resume after kill -9, sharding) are in
test_cli.py.
"""

import os

import numpy as np
import optax
import pytest
import yaml

from bilevel_jax import cli
from bilevel_jax.runner import io as rio
from bilevel_jax.runner import config as cfg
from bilevel_jax.runner.config import ConfigError, apply_overrides, load_config, resolve_config
from bilevel_jax.runner.results import summarize
from bilevel_jax.runner.run import make_groups, make_optimizer
from bilevel_jax.runner.problems import problem_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, payload) -> str:
    with open(path, "w") as handle:
        if isinstance(payload, str):
            handle.write(payload)
        else:
            yaml.safe_dump(payload, handle)
    return str(path)


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["quickstart", "pbrl_random"])
def test_shipped_configs_resolve(name):
    config = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert config["name"] == name
    assert config["iterations"] >= 1 and len(config["seeds"]) >= 2
    points = cfg.grid_points(config)
    assert len(points) >= 2   # a comparison
    again = resolve_config(yaml.safe_load(cfg.dump_config(config)))
    assert again == config and cfg.config_hash(again) == cfg.config_hash(config)


def test_every_shipped_config_resolves():
    import glob

    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
    assert len(paths) >= 10
    for path in paths:
        config = load_config(path)
        assert config["iterations"] >= 1, path


def test_defaults_fill_every_section():
    config = resolve_config({}, default_name="x")
    assert config["name"] == "x" and config["output"]["dir"] == os.path.join("runs", "x")
    assert config["problem"]["name"] == "random" and config["problem"]["temperature"] == 0.1
    assert config["estimator"] == {"name": "exact", "exact": {
        "tol": None, "max_iters": 100_000, "linear_solver": "auto", "warm_start": True}}
    assert config["optimizer"]["learning_rate"] == 0.1 and config["seeds"] == [0]
    assert config["sweep"] == {}


def test_ints_become_floats_and_yaml_exponents_are_numbers():
    config = resolve_config({"optimizer": {"learning_rate": 1, "clip_norm": "1e-3"}})
    assert config["optimizer"]["learning_rate"] == 1.0
    assert isinstance(config["optimizer"]["learning_rate"], float)
    assert config["optimizer"]["clip_norm"] == 1e-3


REFUSALS = [
    ({"iteratons": 5}, "iteratons: unknown key; expected one of"),
    ({"optimizer": {"learnin_rate": 0.1}}, "optimizer.learnin_rate: unknown key"),
    ({"problem": {"num_state": 5}}, "problem.num_state: unknown key"),
    ({"estimator": {"hpdg": {}}}, "estimator.hpdg: unknown key"),
    ({"estimator": {"hpgd": {"num_env": 4}}}, "estimator.hpgd.num_env: unknown key"),
    ({"output": {"plot": False}}, "output.plot: unknown key"),
    ({"iterations": "many"}, "iterations: expected an int >= 1, got 'many'"),
    ({"iterations": 2.5}, "iterations: expected an int >= 1, got 2.5"),
    ({"optimizer": {"nesterov": 1}}, "optimizer.nesterov: expected true or false, got 1"),
    ({"optimizer": [1]}, "optimizer: expected a mapping, got a list"),
    ({"problem": {"temperature": True}}, "problem.temperature: expected a number > 0, got true"),
    ({"optimizer": {"learning_rate": -1}}, "optimizer.learning_rate: expected a number > 0, got -1"),
    ({"optimizer": {"learning_rate": float("inf")}}, "optimizer.learning_rate: expected a number > 0"),
    ({"problem": {"discount": 1.0}}, "problem.discount: expected a number in [0, 1), got 1.0"),
    ({"problem": {"temperature": 0}}, "problem.temperature: expected a number > 0, got 0"),
    ({"problem": {"num_states": 1}}, "problem.num_states: expected an int >= 2, got 1"),
    ({"problem": {"name": "grid"}},
     f"problem.name: expected one of {sorted(problem_names())}, got 'grid'"),
    ({"optimizer": {"name": "adamw"}}, "optimizer.name: expected one of ['sgd', 'adam'], got 'adamw'"),
    ({"estimator": {"name": "magic"}}, "estimator.name: expected one of"),
    ({"estimator": {"hpgd": {"num_envs": 0}}}, "estimator.hpgd.num_envs: expected an int >= 1, got 0"),
    ({"estimator": {"hpgd": {"oracle": "magic"}}}, "estimator.hpgd.oracle: expected one of"),
    ({"output": {"final_fraction": 0}}, "output.final_fraction: expected a number in (0, 1], got 0"),
    ({"seeds": 0}, "seeds: expected an int >= 1"),
    ({"seeds": [1, 1]}, "seeds: expected an int >= 1"),
    ({"chunk_size": None}, "chunk_size: expected an int >= 1, got null"),
    ({"problem": {"num_states": 5, "num_terminal": 5}}, "problem.num_terminal: expected an int < problem.num_states"),
    ({"problem": {"num_states": 5, "branching": 6}}, "problem.branching: expected an int <= problem.num_states"),
    ({"problem": {"sparse": True}}, "problem.sparse: true needs problem.branching"),
    ({"algorithm": {"name": "decoupled"}},
     "algorithm.name: problem 'random' runs one of ['ascent', 'pbrl'], got 'decoupled'"),
    ({"algorithm": {"name": "pbrl", "rho_0": 10, "rho_max": 1}}, "algorithm.rho_0: expected a number <= algorithm.rho_max"),
    ({"sweep": [1]}, "sweep: expected a mapping"),
    ({"sweep": {"optimizer.learnin_rate": [0.1]}}, "sweep.optimizer.learnin_rate: not a sweepable key path"),
    ({"sweep": {"iterations": [1, 2]}}, "sweep.iterations: not a sweepable key path"),
    ({"sweep": {"problem.dtype": ["float32", "float64"]}}, "sweep.problem.dtype: not a sweepable key path"),
    ({"sweep": {"optimizer.learning_rate": []}}, "sweep.optimizer.learning_rate: expected a non-empty list"),
    ({"sweep": {"optimizer.learning_rate": 0.1}}, "sweep.optimizer.learning_rate: expected a non-empty list"),
    ({"sweep": {"optimizer.learning_rate": [0.1, -1]}}, "sweep.optimizer.learning_rate[1]: expected a number > 0, got -1"),
    ({"sweep": {"optimizer.learning_rate": [0.1, 0.1]}}, "sweep.optimizer.learning_rate[1]: duplicate value"),
    ({"sweep": {"estimator.name": ["exact", "magic"]}}, "sweep.estimator.name[1]: expected one of"),
    ({"sweep": {"estimator.hpgd.num_envs": [4, 8]}}, "sweep.estimator.hpgd.num_envs: estimator 'hpgd' is not run"),
    ({"algorithm": {"name": "pbrl"}, "sweep": {"algorithm.rho_0": [1, 1000]}},
     "algorithm.rho_0: expected a number <= algorithm.rho_max (100.0), got 1000.0 (at grid point {algorithm.rho_0: 1000.0})"),
]


@pytest.mark.parametrize("raw, message", REFUSALS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(REFUSALS)])
def test_refusals_name_the_key_path(raw, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(raw)
    assert message in str(info.value)
    assert str(info.value).startswith(message.split(":")[0])


def test_file_refusals(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="expected a mapping of keys to values at the top level"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_overrides(tmp_path):
    path = write(tmp_path / "c.yaml", {"optimizer": {"learning_rate": 0.1}, "seeds": 2})
    config = load_config(path, ["optimizer.learning_rate=0.3", "estimator.amd.num_sweeps=7",
                                "sweep.estimator.name=[exact, amd]", "problem.branching=null",
                                "output.plots=false"])
    assert config["name"] == "c"
    assert config["optimizer"]["learning_rate"] == 0.3
    assert config["estimator"]["amd"] == {"num_sweeps": 7}
    assert config["sweep"] == {"estimator.name": ["exact", "amd"]}
    assert config["output"]["plots"] is False
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["optimizer.learning_rate"])
    with pytest.raises(ConfigError, match="seeds is not a mapping"):
        apply_overrides({"seeds": 2}, ["seeds.x=1"])
    with pytest.raises(ConfigError, match="optimizer.learning_rate: expected a number > 0, got -1"):
        load_config(path, ["optimizer.learning_rate=-1"])
    with pytest.raises(ConfigError, match="optimizer.lr: unknown key"):
        load_config(path, ["optimizer.lr=1"])


# --------------------------------------------------------------------------------------------
# Grid, groups, optimizers, summaries
# --------------------------------------------------------------------------------------------

def test_grid_groups_structural_and_traced_keys():
    config = resolve_config({
        "seeds": 2,
        "estimator": {"amd": {"num_sweeps": 3}},
        "sweep": {"estimator.name": ["exact", "amd"], "optimizer.learning_rate": [0.1, 0.2, 0.3],
                  "problem.temperature": [0.1, 0.5], "optimizer.clip_norm": [None, 1.0]}})
    points, groups, traced, structural = make_groups(config)
    assert len(points) == 2 * 3 * 2 * 2
    assert traced == ["optimizer.learning_rate", "problem.temperature"]
    assert structural == ["estimator.name", "optimizer.clip_norm"]   # null is not a number
    assert [g.structural for g in groups] == [
        {"estimator.name": "exact", "optimizer.clip_norm": None},
        {"estimator.name": "exact", "optimizer.clip_norm": 1.0},
        {"estimator.name": "amd", "optimizer.clip_norm": None},
        {"estimator.name": "amd", "optimizer.clip_norm": 1.0}]
    for group in groups:
        assert len(group.points) == 6 and len(group.runs) == 12
        assert group.hparam_keys == traced
        assert group.template["estimator"]["name"] == group.structural["estimator.name"]
    # integer options are structural; x0_noise is a per-run input
    config = resolve_config({"estimator": {"name": "amd"},
                             "sweep": {"estimator.amd.num_sweeps": [2, 4], "x0_noise": [0.0, 0.1]}})
    _, groups, traced, structural = make_groups(config)
    assert structural == ["estimator.amd.num_sweeps"] and traced == ["x0_noise"]
    assert len(groups) == 2 and groups[0].hparam_keys == []


def _learning_rates(optimizer, steps):
    params = np.zeros(())
    state = optimizer.init(params)
    rates = []
    for _ in range(steps):
        updates, state = optimizer.update(np.ones(()), state, params)
        rates.append(-float(updates))
    return np.array(rates)


def test_make_optimizer_schedules_and_clipping():
    base = resolve_config({})["optimizer"]
    rates = _learning_rates(make_optimizer(dict(base, learning_rate=0.5), 10), 3)
    np.testing.assert_allclose(rates, 0.5)
    linear = dict(base, learning_rate=1.0, schedule="linear", end_fraction=0.1, warmup_steps=2)
    rates = _learning_rates(make_optimizer(linear, 12), 13)
    np.testing.assert_allclose(rates[:3], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(rates[-1], 0.1, atol=1e-6)
    cosine = dict(base, learning_rate=1.0, schedule="cosine", decay_steps=4)
    np.testing.assert_allclose(_learning_rates(make_optimizer(cosine, 100), 5),
                               [1.0, 0.853553, 0.5, 0.146447, 0.0], atol=1e-5)
    clipped = make_optimizer(dict(base, learning_rate=1.0, clip_norm=0.5), 10)
    updates, _ = clipped.update(np.full(4, 10.0), clipped.init(np.zeros(4)), np.zeros(4))
    assert np.linalg.norm(updates) == pytest.approx(0.5)
    adam = make_optimizer(dict(base, name="adam", learning_rate=0.01), 10)
    assert isinstance(adam, optax.GradientTransformation)


def test_summary_mean_and_standard_error():
    values = np.array([[0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 3.0, 5.0]])   # 2 seeds x 4 iterations
    summary = summarize(name="s", config_hash="h", iterations=4, seeds=[0, 1], sweep_keys=[],
                        points=[{}], metric_names=["objective"], curves={0: {"objective": values}},
                        final_fraction=0.5)
    final = summary["points"][0]["final"]["objective"]
    assert summary["final_window"] == 2
    assert final["per_seed"] == [2.0, 4.0]
    assert final["mean"] == 3.0 and final["se"] == pytest.approx(1.0)
    assert summary["points"][0]["initial"]["objective"] == 0.0


# --------------------------------------------------------------------------------------------
# The command line, in-process: refusals write nothing; NaN stops the run
# --------------------------------------------------------------------------------------------

def test_cli_refusals_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    bad = write(tmp_path / "bad.yaml", {"optimizer": {"learning_rate": -1}})
    assert cli.main(["run", bad, "--out", str(out)]) == 2
    assert "optimizer.learning_rate: expected a number > 0, got -1" in capsys.readouterr().err
    good = write(tmp_path / "good.yaml", {"iterations": 2})
    assert cli.main(["run", good, "--out", str(out), "--set", "sweep.optimizer.momentum=[0.5, 1]"]) == 2
    assert "sweep.optimizer.momentum[1]: expected a number in [0, 1), got 1" in capsys.readouterr().err
    assert cli.main(["run", good, "--out", str(out), "--set", "nonsense"]) == 2
    assert cli.main(["run", good, "--bogus-flag"]) == 2
    assert cli.main(["run"]) == 2
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_another_configs_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    path = write(tmp_path / "c.yaml", {"iterations": 4})
    rio.save_checkpoint(str(out), {"config_hash": "0" * 16, "done": 2, "devices": 1,
                                   "processes": 1, "groups": []})
    assert cli.main(["run", path, "--out", str(out), "--resume"]) == 2
    assert "was written by a different config" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [rio.CHECKPOINT]


def test_nonfinite_stops_with_iteration_grid_point_and_seed(tmp_path, capsys):
    config = {"name": "nan", "problem": {"num_states": 4, "num_actions": 2, "dim_x": 2},
              "estimator": {"name": "amd", "amd": {"num_sweeps": 2}},
              "optimizer": {"learning_rate": 0.1}, "iterations": 8, "chunk_size": 2, "seeds": 2,
              "sweep": {"optimizer.learning_rate": [0.1, 1e38]}}
    out = tmp_path / "run"
    code = cli.main(["run", write(tmp_path / "nan.yaml", config), "--out", str(out),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "NaN or inf in x or the gradient at iteration" in err
    assert "grid point {optimizer.learning_rate: 1e+38}, seed 0" in err
    checkpoint = rio.load_checkpoint(str(out))
    iteration = int(err.split("at iteration ")[1].split(",")[0])
    assert checkpoint["done"] == iteration - iteration % 2     # the last good chunk
    assert f"after {checkpoint['done']} iterations" in err
    assert not (out / "metrics.csv").exists() and not (out / "summary.json").exists()


def test_pbrl_run_with_traced_problem_keys_and_x0_noise(tmp_path, capsys):
    """One compiled program for a sweep of traced keys; PBRL's extra metrics; per-seed x0."""
    from bilevel_jax.runner.run import run_experiment

    config = resolve_config({
        "name": "pb", "problem": {"num_states": 4, "num_actions": 2, "dim_x": 2},
        "algorithm": {"name": "pbrl", "inner_sweeps": 2}, "optimizer": {"learning_rate": 0.05},
        "iterations": 6, "chunk_size": 3, "seeds": [3, 5], "output": {"dir": str(tmp_path / "pb"),
                                                                     "plots": False},
        "sweep": {"problem.temperature": [0.1, 0.5], "x0_noise": [0.0, 0.3]}})
    result = run_experiment(config, progress=False)
    printed = capsys.readouterr().out
    assert "1 compiled program," in printed and "penalty" in printed
    # The compiled loop's own time (what benchmarks read for steady-state speed): every
    # iteration of this invocation, within the whole run's time.
    assert result.loop_iterations == 6
    assert 0 < result.loop_seconds <= result.seconds
    summary = result.summary
    assert summary["metrics"] == ["objective", "grad_norm", "follower_residual", "samples",
                                  "best_response_gap", "penalized_objective", "penalty",
                                  "policy_objective", "rho"]
    points = summary["points"]
    assert [p["values"] for p in points] == [
        {"problem.temperature": t, "x0_noise": n} for t in (0.1, 0.5) for n in (0.0, 0.3)]
    start = {i: p["final"]["objective"]["per_seed"] for i, p in enumerate(points)}
    assert start[0][0] == start[0][1]            # no noise: both seeds start at x0 (deterministic)
    assert start[1][0] != start[1][1]            # x0_noise: each seed its own start
    assert start[0] != start[2]                  # the temperature is applied per run
    with open(tmp_path / "pb" / "metrics.csv") as handle:
        header = handle.readline().strip().split(",")
    assert header[:6] == ["run", "point", "problem.temperature", "x0_noise", "seed", "iteration"]
    assert header[-1] == "rho"
