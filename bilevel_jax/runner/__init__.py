"""Experiment runner: YAML configs with sweeps, compiled batched runs, run directories, reports.

    from bilevel_jax.runner import load_config, run_experiment
    result = run_experiment(load_config("configs/quickstart.yaml", ["iterations=100"]))

The command line (`bilevel-jax run | list | report`) is `bilevel_jax.cli`.
"""

from bilevel_jax.runner.config import (
    ConfigError,
    apply_overrides,
    config_hash,
    dump_config,
    grid_points,
    load_config,
    parse_override,
    point_config,
    resolve_config,
    split_sweep_keys,
)
from bilevel_jax.runner.fields import Field
from bilevel_jax.runner.problems import build_problem, problem_names, register_problem
from bilevel_jax.runner.run import RunResult, check_resume, make_optimizer, run_experiment

__all__ = ["ConfigError", "Field", "RunResult", "apply_overrides", "build_problem", "check_resume",
           "config_hash", "dump_config", "grid_points", "load_config", "make_optimizer",
           "parse_override", "point_config", "problem_names", "register_problem",
           "resolve_config", "run_experiment", "split_sweep_keys"]
