"""Experiment configs: YAML validated against a typed schema before anything runs.

    config = load_config("configs/quickstart.yaml", ["optimizer.learning_rate=0.3"])

Top level (every key optional; defaults are filled in and written to the run's `config.yaml`):

    name:        str (default: the file's stem)       output:     {dir, final_fraction, plots}
    problem:     {name: random, ...its fields}         iterations: int >= 1
    estimator:   {name: exact, <estimator>: {...its options}}
    algorithm:   {name: ascent | pbrl, ...}            chunk_size: int >= 1
    optimizer:   {name: sgd | adam, learning_rate, ..., clip_norm, schedule, ...}
    seeds:       int in [1, 100000] (seeds 0..n-1) or a list of distinct int64s, distinct
                 modulo 2**32 too (jax.random.key keeps 32 bits without x64)
    x0_noise:    number >= 0 (per-seed Gaussian perturbation of the problem's x0)
    track_every: null (report the exact F every iteration) or int k >= 1: only iterations
                 i % k == 0 and the final window (output.final_fraction) solve for F, the
                 others report it as NaN (needs algorithm.track_objective: true)
    sweep:       {key.path: [values, ...], ...}     grid = product of the lists; x seeds

Refusals raise `ConfigError` naming the key path: unknown keys (in any section), wrong types,
out-of-range values, bad sweep keys or values, refused combinations
(`algorithm.rho_0 > algorithm.rho_max`, an estimator rejecting its options, ...) and problems too
big for this machine's memory (estimated before anything is allocated); files that are not
UTF-8 text or repeat a key in a mapping (`UniqueKeyLoader`) are refused with the line.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import itertools
import json
import os
from typing import Any, Iterable

import yaml

from bilevel_jax.runner.fields import ConfigError, Field, show_value
from bilevel_jax.runner.problems import problem_names, problem_spec

__all__ = ["ConfigError", "load_config", "resolve_config", "parse_override", "apply_overrides",
           "grid_points", "point_config", "config_hash", "dump_config", "field_for",
           "split_sweep_keys", "estimator_fields", "ALGORITHM_FIELDS", "OPTIMIZER_FIELDS",
           "OUTPUT_FIELDS", "TOP_FIELDS"]

ALGORITHM_NAMES = ("ascent", "pbrl", "decoupled")
MAX_GRID_POINTS = 100_000
MAX_SEEDS = 100_000
SEED_RANGE = (-2**63, 2**63 - 1)    # int64, the runner's array of seeds for jax.random.key

TOP_FIELDS = {
    "name": Field("str", None, nullable=True, doc="run name (default: the config file's stem)"),
    "iterations": Field("int", 200, low=1, doc="outer (leader) iterations of every run"),
    "chunk_size": Field("int", 50, low=1,
                        doc="iterations per compiled chunk; progress and checkpoints in between"),
    "x0_noise": Field("float", 0.0, low=0, traced=True,
                      doc="std of a per-seed Gaussian perturbation of x0 (0: every seed starts at x0)"),
    "track_every": Field("int", None, low=1, nullable=True,
                         doc="tracking schedule of the exact F (algorithm.track_objective): null "
                             "tracks every iteration; k tracks iterations i with i % k == 0 and "
                             "every iteration of the final window (output.final_fraction), the "
                             "others report F as NaN and skip its solve"),
}

ALGORITHM_FIELDS = {
    "name": Field("str", "ascent", choices=ALGORITHM_NAMES,
                  doc="ascent: hypergradient ascent with the estimator; pbrl: penalty method; "
                      "decoupled: fit the reward model, then solve the follower (rlhf only)"),
    "track_objective": Field("bool", True, doc="report the exact F(x) every iteration "
                                               "(on track_every's schedule if set)"),
    "penalty": Field("str", "value", choices=("value", "bellman"), doc="pbrl: the penalty"),
    "rho_0": Field("float", 1.0, low=0, low_open=True, traced=True, doc="pbrl: initial rho"),
    "rho_max": Field("float", 100.0, low=0, low_open=True, traced=True, doc="pbrl: final rho"),
    "ramp_iters": Field("int", None, low=1, nullable=True,
                        doc="pbrl: iterations of the geometric rho ramp (null: iterations)"),
    "inner_sweeps": Field("int", 10, low=1, doc="pbrl: soft sweeps per iteration for V*"),
    # pbrl on a simulator problem (bilevel_jax.algorithms.sample_pbrl); ignored on tabular ones
    "learner": Field("str", "soft_dqn",
                     doc="pbrl (simulator): the best-response learner for V* and pi*"),
    "learner_options": Field("mapping", None, nullable=True,
                             doc="pbrl (simulator): options of the learner (null: its defaults)"),
    "num_envs": Field("int", 16, low=1, doc="pbrl (simulator): environments per rollout"),
    "num_steps": Field("int", 128, low=1, doc="pbrl (simulator): steps per rollout"),
    "policy_hidden": Field("int_list", [64, 64], low=1, nullable=True,
                           doc="pbrl (simulator): policy network widths (null: linear policy)"),
    "policy_activation": Field("str", "tanh", choices=("tanh", "relu"),
                               doc="pbrl (simulator): policy network activation"),
    "baseline_hidden": Field("int_list", [64, 64], low=1, nullable=True,
                             doc="pbrl (simulator): learned baseline widths (null: linear)"),
    "baseline_learning_rate": Field("float", 1e-3, low=0, low_open=True,
                                    doc="pbrl (simulator): the baseline's Adam step size"),
    "baseline_steps": Field("int", 10, low=0,
                            doc="pbrl (simulator): baseline fitting steps per iteration"),
    "score_terms": Field("bool", None, nullable=True,
                         doc="pbrl (simulator): d_x log p terms (null: when x enters the dynamics)"),
    "fit_steps": Field("int", 1, low=1,
                       doc="decoupled: reward-model gradient steps on the buffer per iteration"),
}

OPTIMIZER_FIELDS = {
    "name": Field("str", "sgd", choices=("sgd", "adam"), doc="optax optimizer"),
    "learning_rate": Field("float", 0.1, low=0, low_open=True, traced=True,
                           doc="(peak) learning rate"),
    "momentum": Field("float", 0.0, low=0, high=1, high_open=True, traced=True,
                      doc="sgd: momentum (0: plain sgd)"),
    "nesterov": Field("bool", False, doc="sgd: Nesterov momentum"),
    "b1": Field("float", 0.9, low=0, high=1, high_open=True, traced=True, doc="adam: b1"),
    "b2": Field("float", 0.999, low=0, high=1, high_open=True, traced=True, doc="adam: b2"),
    "eps": Field("float", 1e-8, low=0, low_open=True, doc="adam: eps"),
    "clip_norm": Field("float", None, low=0, low_open=True, nullable=True, traced=True,
                       doc="clip the gradient's global norm (null: no clipping)"),
    "schedule": Field("str", "constant", choices=("constant", "linear", "cosine"),
                      doc="learning-rate schedule after the warmup"),
    "warmup_steps": Field("int", 0, low=0, doc="linear warmup from 0 to learning_rate"),
    "decay_steps": Field("int", None, low=1, nullable=True,
                         doc="length of the decay (null: iterations - warmup_steps)"),
    "end_fraction": Field("float", 0.0, low=0, high=1,
                          doc="learning rate at the end of the decay, as a fraction"),
}

OUTPUT_FIELDS = {
    "dir": Field("str", None, nullable=True, doc="run directory (null: runs/<name>); --out overrides"),
    "final_fraction": Field("float", 0.1, low=0, low_open=True, high=1,
                            doc="final metrics = mean over this last fraction of iterations"),
    "plots": Field("bool", True, doc="write plots/*.png"),
}

TOP_KEYS = ("name", "problem", "estimator", "algorithm", "optimizer", "iterations", "chunk_size",
            "seeds", "x0_noise", "track_every", "output", "sweep")
NOT_SWEEPABLE = ("problem.name", "problem.dtype")

# Choices of estimator options that the factories only check once traced.
_OPTION_CHOICES = {
    ("exact", "linear_solver"): ("auto", "direct", "richardson", "gmres"),
    ("hpgd", "oracle"): ("exact", "warm", "soft_q_learning", "multilevel"),
    ("hpgd", "baseline"): ("advantage", "none"),
    ("hpgd", "contexts"): ("sample", "all"),
    ("zero_order", "values"): ("model", "rollout"),
    ("zero_order", "shifted"): ("warm", "fresh"),
}


# --------------------------------------------------------------------------------------------
# Estimator options: typed from the registered factories' signatures
# --------------------------------------------------------------------------------------------

def estimator_names() -> tuple[str, ...]:
    from bilevel_jax.estimators import available
    return available()


@functools.lru_cache(maxsize=None)
def _estimator_fields_cached(name: str, factory) -> dict[str, Field]:
    fields = {}
    for param in inspect.signature(factory).parameters.values():
        if param.kind not in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
            continue
        if param.default is inspect.Parameter.empty:
            continue
        default = param.default
        annotation = param.annotation if isinstance(param.annotation, str) else getattr(
            param.annotation, "__name__", "")
        tokens = {t.strip() for t in str(annotation).split("|")} if annotation != inspect.Parameter.empty else set()
        nullable = default is None or "None" in tokens
        if "dict" in tokens:
            # Options handed on whole (e.g. `learner_options`); their receiver checks them.
            fields[param.name] = Field("mapping", default, nullable=nullable)
            continue
        if (isinstance(default, tuple) and default
                and all(isinstance(v, int) and not isinstance(v, bool) for v in default)):
            # Widths and the like (e.g. `critic_hidden`); a list keeps the config plain YAML.
            fields[param.name] = Field("int_list", list(default), low=1)
            continue
        if "bool" in tokens or isinstance(default, bool):
            kind = "bool"
        elif "float" in tokens or isinstance(default, float):
            kind = "float"
        elif "int" in tokens or isinstance(default, int):
            kind = "int"
        elif "str" in tokens or isinstance(default, str):
            kind = "str"
        else:
            continue  # not configurable from YAML
        low, low_open = None, False
        if kind == "int" and (default is None or default >= 1):
            low = 1
        elif kind == "int" and default == 0:
            low = 0
        elif kind == "float" and (default is None or default > 0):
            low, low_open = 0, True
        fields[param.name] = Field(kind, default, low=low, low_open=low_open, nullable=nullable,
                                   choices=_OPTION_CHOICES.get((name, param.name)))
    return fields


def estimator_fields(name: str) -> dict[str, Field]:
    """The typed options of the registered estimator `name` (from its factory's signature)."""
    from bilevel_jax.estimators import base
    return _estimator_fields_cached(name, base._REGISTRY[name])


# --------------------------------------------------------------------------------------------
# Reading, overrides
# --------------------------------------------------------------------------------------------

class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping gives the same key twice (PyYAML would keep the last one silently)."""

    def __init__(self, key, line: int, first_line: int):
        super().__init__(problem=f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line

    def __str__(self) -> str:
        return (f"line {self.line}: duplicate key {self.key!r} (first given at line "
                f"{self.first_line}); expected each key once per mapping")


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping with a repeated key (merge keys `<<` aside)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_lines: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in first_lines:
                        raise DuplicateKeyError(key, line, first_lines[key])
                except TypeError:
                    continue        # unhashable: SafeLoader refuses it with its own message
                first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """`yaml.safe_load` refusing duplicate keys (`DuplicateKeyError`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        raw = load_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (byte {err.start} is not UTF-8); expected a "
                          f"YAML config") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, "
                          f"got {type(raw).__name__}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`"a.b=value"` -> `("a.b", yaml.safe_load("value"))`."""
    path, sep, value = text.partition("=")
    path = path.strip()
    if not sep or not path or any(not part for part in path.split(".")):
        raise ConfigError(f"--set {text}: expected key.path=value")
    try:
        return path, load_yaml(value) if value.strip() else None
    except DuplicateKeyError as err:
        raise ConfigError(f"--set {text}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text}: the value is not valid YAML ({err})") from None


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """A copy of `raw` with each `key.path=value` set (`sweep.a.b=[...]` sets the sweep of `a.b`)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        parts = path.split(".")
        if parts[0] == "sweep" and len(parts) > 1:
            sweep = raw.get("sweep")
            if sweep is None:
                sweep = raw["sweep"] = {}
            if not isinstance(sweep, dict):
                raise ConfigError(f"--set {text}: sweep is not a mapping")
            sweep[".".join(parts[1:])] = value
            continue
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {'.'.join(parts[:depth + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return raw


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------

def _mapping(path: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {show_value(value)}")
    return value


def _resolve_fields(path: str, raw: Any, fields: dict[str, Field], extra: tuple = ()) -> dict:
    raw = _mapping(path, raw)
    for key in raw:
        if key not in fields and key not in extra:
            raise ConfigError(f"{path}.{key}: unknown key; expected one of "
                              f"{sorted(list(fields) + list(extra))}")
    return {key: field.coerce(f"{path}.{key}", raw.get(key, field.default))
            for key, field in fields.items()}


def _check_seed_range(seeds: list[int]) -> None:
    low, high = SEED_RANGE
    for i, seed in enumerate(seeds):
        if not low <= seed <= high:
            raise ConfigError(f"seeds[{i}]: expected an int in [{low}, {high}] (a 64-bit PRNG "
                              f"seed), got {seed}")


def _check_seed_collisions(seeds: list[int]) -> None:
    """Without jax_enable_x64, `jax.random.key` keeps a seed's low 32 bits: refuse seeds that
    would share a key (e.g. 0 and 4294967296)."""
    first: dict[int, int] = {}
    for i, seed in enumerate(seeds):
        j = first.setdefault(seed % 2**32, i)
        if j != i:
            raise ConfigError(
                f"seeds[{i}]: {seed} has the low 32 bits of seeds[{j}] = {seeds[j]}, so both "
                f"runs would get the same PRNG key (jax.random.key keeps 32 bits without "
                f"jax_enable_x64); expected seeds that differ modulo 2**32")


def _resolve_seeds(value: Any) -> list[int]:
    expected = ("seeds: expected an int >= 1 (seeds 0, 1, ..., n-1) or a non-empty list of "
                "distinct ints")
    if isinstance(value, bool):
        raise ConfigError(f"{expected}, got {show_value(value)}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{expected}, got {value}")
        if value > MAX_SEEDS:
            raise ConfigError(f"seeds: expected at most {MAX_SEEDS} seeds, got {value}")
        return list(range(value))
    if isinstance(value, list) and value and all(
            isinstance(s, int) and not isinstance(s, bool) for s in value) and len(set(value)) == len(value):
        if len(value) > MAX_SEEDS:
            raise ConfigError(f"seeds: expected at most {MAX_SEEDS} seeds, got {len(value)}")
        _check_seed_range(value)
        _check_seed_collisions(value)
        return list(value)
    raise ConfigError(f"{expected}, got {value!r}")


def _raw_sweep(raw: dict) -> dict[str, list]:
    sweep = raw.get("sweep")
    if sweep is None:
        return {}
    if not isinstance(sweep, dict):
        raise ConfigError(f"sweep: expected a mapping of key paths to lists of values, "
                          f"got {show_value(sweep)}")
    for key, values in sweep.items():
        if not isinstance(key, str):
            raise ConfigError(f"sweep: expected key paths (strings) as keys, got {key!r}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key}: expected a non-empty list of values, "
                              f"got {show_value(values)}")
    return sweep


def field_for(config: dict, key: str) -> Field | None:
    """The `Field` of the sweepable key path `key` in a (resolved) config, or None."""
    if key in NOT_SWEEPABLE:
        return None
    parts = key.split(".")
    if len(parts) == 1:
        return TOP_FIELDS["x0_noise"] if key == "x0_noise" else None
    section = parts[0]
    if section == "problem" and len(parts) == 2:
        name = config.get("problem", {}).get("name")
        if name in problem_names():
            return problem_spec(name).fields.get(parts[1])
        return None
    if section == "estimator":
        if parts[1:] == ["name"]:
            return Field("str", "exact", choices=estimator_names())
        if len(parts) == 3 and parts[1] in estimator_names():
            return estimator_fields(parts[1]).get(parts[2])
        return None
    if section == "algorithm" and len(parts) == 2:
        return ALGORITHM_FIELDS.get(parts[1])
    if section == "optimizer" and len(parts) == 2:
        return OPTIMIZER_FIELDS.get(parts[1])
    return None


def resolve_config(raw: dict, *, default_name: str = "run") -> dict:
    """The fully resolved config (every default filled in) of a raw mapping; raises `ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{key}: unknown key; expected one of {list(TOP_KEYS)}")
    sweep_raw = _raw_sweep(raw)

    config: dict[str, Any] = {}
    name = TOP_FIELDS["name"].coerce("name", raw.get("name"))
    config["name"] = name if name else default_name

    # problem
    problem_raw = _mapping("problem", raw.get("problem"))
    name_field = Field("str", "random", choices=problem_names())
    problem_name = name_field.coerce("problem.name", problem_raw.get("name", "random"))
    spec = problem_spec(problem_name)
    config["problem"] = {"name": problem_name,
                         **_resolve_fields("problem", problem_raw, spec.fields, extra=("name",))}

    # estimator: the name, plus an options section per estimator that is given or used
    estimator_raw = _mapping("estimator", raw.get("estimator"))
    names = estimator_names()
    est_name = Field("str", "exact", choices=names).coerce(
        "estimator.name", estimator_raw.get("name", "exact"))
    for key in estimator_raw:
        if key != "name" and key not in names:
            raise ConfigError(f"estimator.{key}: unknown key; expected 'name' or the options "
                              f"section of an estimator, one of {list(names)}")
    used = [est_name]
    if "estimator.name" in sweep_raw:
        for i, value in enumerate(sweep_raw["estimator.name"]):
            used.append(Field("str", choices=names).coerce(f"sweep.estimator.name[{i}]", value))
    for key in sweep_raw:
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "estimator" and parts[1] in names and parts[1] not in used:
            raise ConfigError(f"sweep.{key}: estimator {parts[1]!r} is not run by this config "
                              f"(estimator.name: {est_name}; sweep it with sweep.estimator.name)")
    estimator = {"name": est_name}
    for est in dict.fromkeys(used + [k for k in estimator_raw if k != "name"]):
        estimator[est] = _resolve_fields(f"estimator.{est}", estimator_raw.get(est),
                                         estimator_fields(est))
    config["estimator"] = estimator

    config["algorithm"] = _resolve_fields("algorithm", raw.get("algorithm"), ALGORITHM_FIELDS)
    config["optimizer"] = _resolve_fields("optimizer", raw.get("optimizer"), OPTIMIZER_FIELDS)
    for key in ("iterations", "chunk_size", "track_every"):
        config[key] = TOP_FIELDS[key].coerce(key, raw.get(key, TOP_FIELDS[key].default))
    config["seeds"] = _resolve_seeds(raw.get("seeds", 1))
    config["x0_noise"] = TOP_FIELDS["x0_noise"].coerce("x0_noise", raw.get("x0_noise", 0.0))
    config["output"] = _resolve_fields("output", raw.get("output"), OUTPUT_FIELDS)
    if config["output"]["dir"] is None:
        config["output"]["dir"] = os.path.join("runs", config["name"])
    elif not config["output"]["dir"].strip():
        raise ConfigError("output.dir: expected a directory path or null, got an empty string")

    # sweep: key paths of fields, each with a non-empty list of distinct valid values
    sweep = {}
    for key, values in sweep_raw.items():
        field = field_for(config, key)
        if field is None:
            raise ConfigError(
                f"sweep.{key}: not a sweepable key path; expected a field of problem (except "
                f"name, dtype), estimator (name or <estimator>.<option>), algorithm, optimizer, "
                f"or x0_noise, e.g. optimizer.learning_rate")
        coerced = [field.coerce(f"sweep.{key}[{i}]", v) for i, v in enumerate(values)]
        for i, value in enumerate(coerced):
            if value in coerced[:i]:
                raise ConfigError(f"sweep.{key}[{i}]: duplicate value {show_value(value)}")
        sweep[key] = coerced
    size = 1
    for values in sweep.values():
        size *= len(values)
    if size > MAX_GRID_POINTS:
        raise ConfigError(f"sweep: expected at most {MAX_GRID_POINTS} grid points, got {size}")
    config["sweep"] = sweep
    _check_points(config)
    return config


def _check_points(config: dict) -> None:
    """Combinations refused at any grid point (messages name the grid point when swept)."""
    from bilevel_jax.estimators import make_estimator

    seen_problem, seen_estimator = set(), set()
    for values in grid_points(config):
        point = point_config(config, values)
        where = f" (at grid point {format_point(values)})" if values else ""
        algorithm = point["algorithm"]
        accepted = problem_spec(point["problem"]["name"]).algorithms
        if algorithm["name"] not in accepted:
            raise ConfigError(f"algorithm.name: problem {point['problem']['name']!r} runs one of "
                              f"{list(accepted)}, got {algorithm['name']!r}{where}")
        if config["track_every"] is not None and not algorithm["track_objective"]:
            raise ConfigError(f"track_every: a schedule of tracked iterations needs "
                              f"algorithm.track_objective: true; expected null with "
                              f"track_objective false, got {config['track_every']}{where}")
        if algorithm["name"] == "pbrl" and algorithm["rho_0"] > algorithm["rho_max"]:
            raise ConfigError(f"algorithm.rho_0: expected a number <= algorithm.rho_max "
                              f"({algorithm['rho_max']}), got {algorithm['rho_0']}{where}")
        problem = point["problem"]
        signature = json.dumps(problem, sort_keys=True)
        if signature not in seen_problem:
            seen_problem.add(signature)
            check = problem_spec(problem["name"]).check
            if check is not None:
                try:
                    check({k: v for k, v in problem.items() if k != "name"})
                except ConfigError as err:
                    raise ConfigError(f"{err}{where}") from None
        simulator = problem_spec(problem["name"]).simulator
        if simulator:
            _check_simulator_point(point, where)
        if algorithm["name"] == "ascent":
            name = point["estimator"]["name"]
            options = point["estimator"][name]
            signature = json.dumps([name, options, simulator], sort_keys=True)
            if signature not in seen_estimator:
                seen_estimator.add(signature)
                try:
                    make_estimator(name, **options)
                    if simulator:
                        _check_learner(name, options)
                except (ValueError, TypeError) as err:
                    raise ConfigError(f"estimator.{name}: {err}{where}") from None


def _check_simulator_pbrl(point: dict, where: str) -> None:
    """PBRL on a simulator problem: the value penalty only, a buildable learner."""
    algorithm = point["algorithm"]
    if algorithm["penalty"] != "value":
        raise ConfigError(f"algorithm.penalty: problem {point['problem']['name']!r} is a "
                          f"simulator problem; PBRL there supports only 'value' (the Bellman "
                          f"penalty needs a model), got {algorithm['penalty']!r}{where}")
    try:
        _check_learner("pbrl", algorithm)
    except ConfigError as err:
        raise ConfigError(f"algorithm.{err}{where}") from None


def _check_simulator_point(point: dict, where: str) -> None:
    """A simulator problem has no model: a model-free estimator, no exact objective."""
    from bilevel_jax.estimators import base

    name = point["estimator"]["name"]
    if point["algorithm"]["name"] == "pbrl":
        _check_simulator_pbrl(point, where)
    elif name not in base._SIMULATOR_METHODS:
        raise ConfigError(f"estimator.name: problem {point['problem']['name']!r} is a simulator "
                          f"problem (no model); expected a model-free method, one of "
                          f"{sorted(base._SIMULATOR_METHODS)}, got {name!r}{where}")
    spec = problem_spec(point["problem"]["name"])
    if point["algorithm"]["track_objective"] and (
            spec.has_reference is None or not spec.has_reference(point["problem"])):
        raise ConfigError(f"algorithm.track_objective: problem {point['problem']['name']!r} is a "
                          f"simulator problem without a tabular reference model to solve for "
                          f"the exact F; expected false, got true{where}")


def _check_learner(name: str, options: dict) -> None:
    """The estimator's follower learner is built on first use: build it here, so that a bad
    `learner` / `learner_options` is refused before anything runs (imports gymnax, which a
    simulator problem needs anyway)."""
    if "learner" not in options:
        return
    from bilevel_jax.learners import make_learner

    try:
        make_learner(options["learner"], **(options.get("learner_options") or {}))
    except ValueError as err:
        key = "learner" if str(err).startswith("learner:") else "learner_options"
        message = str(err).removeprefix("learner: ")
        raise ConfigError(f"{key}: {message}") from None


def load_config(path: str, overrides: Iterable[str] = ()) -> dict:
    """Reads, overrides (`key.path=value` strings) and resolves a config file."""
    raw = apply_overrides(read_yaml(path), overrides)
    return resolve_config(raw, default_name=os.path.splitext(os.path.basename(path))[0])


# --------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------

def grid_points(config: dict) -> list[dict]:
    """Every combination of the sweep's values (first key slowest), as `{key: value}` dicts."""
    sweep = config.get("sweep") or {}
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def point_config(config: dict, values: dict) -> dict:
    """The config of one grid point: a deep copy with each swept key set to its value."""
    point = copy.deepcopy(config)
    for key, value in values.items():
        parts = key.split(".")
        node = point
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    point["sweep"] = {}
    return point


def format_point(values: dict) -> str:
    return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in values.items()) + "}"


@functools.lru_cache(maxsize=None)
def _pbrl_accepts_traced_rho() -> bool:
    import jax
    import optax

    from bilevel_jax.algorithms import pbrl

    def probe(rho):
        pbrl(optax.sgd(1.0), rho_0=rho, rho_max=rho)
        return rho

    try:
        jax.eval_shape(probe, 1.0)
        return True
    except jax.errors.JAXTypeError:
        return False
    except Exception:  # noqa: BLE001 - any failure means: pass concrete values
        return False


def split_sweep_keys(config: dict) -> tuple[list[str], list[str]]:
    """`(traced, structural)` swept keys.

    Traced keys vary inside one compiled program; each combination of structural values gets its
    own program. A key is traced when its field is (`Field.traced`), every swept value is a number,
    and the code consuming it accepts a traced scalar.
    """
    traced, structural = [], []
    points = [point_config(config, v) for v in grid_points(config)] or [config]
    hpgd_horizon_static = any(
        p["algorithm"]["name"] == "ascent" and p["estimator"]["name"] == "hpgd"
        and p["estimator"]["hpgd"].get("unbiased") and p["estimator"]["hpgd"].get("horizon") is None
        for p in points)
    for key, values in (config.get("sweep") or {}).items():
        field = field_for(config, key)
        ok = field is not None and field.traced and all(v is not None for v in values)
        if key in ("algorithm.rho_0", "algorithm.rho_max") and ok:
            ok = _pbrl_accepts_traced_rho()
        if key == "problem.leader_discount" and hpgd_horizon_static:
            ok = False  # unbiased HPGD derives its rollout horizon from a concrete discount
        (traced if ok else structural).append(key)
    return traced, structural


# --------------------------------------------------------------------------------------------
# Serialization
# --------------------------------------------------------------------------------------------

HASH_EXCLUDE = ("name", "output")


def config_hash(config: dict) -> str:
    """Hash of everything that determines the numbers (not the name or the output section)."""
    payload = {k: v for k, v in config.items() if k not in HASH_EXCLUDE}
    if payload.get("track_every", 0) is None:
        del payload["track_every"]     # the default: hashes of configs from before the option
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
