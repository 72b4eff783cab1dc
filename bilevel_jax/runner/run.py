"""Runs a resolved config: every grid point x seed, one compiled program per structural group.

    result = run_experiment(load_config("configs/quickstart.yaml"))

* The sweep's grid is split by its structural keys (estimator or algorithm names, integer
  options, ...): each combination of their values is one group, compiled once. Inside a group the
  runs (grid points x seeds) are one `vmap`, split over every device (`run_mesh`; after
  `jax.distributed.initialize`, every process's devices), each device running its own slice, and
  the traced keys (learning rate, temperature, ...) are per-run scalars. With several processes,
  process 0 alone prints and writes the run directory.
* Iterations run in chunks of `chunk_size` (one `lax.scan` each). After every chunk the host
  checks for NaN or inf, appends the metrics, writes the checkpoint atomically and advances the
  progress bar. `resume=True` continues from the checkpoint; since the compiled programs, keys and
  states are the same, the numbers equal those of an uninterrupted run.
* `track_every: k` (a tracking schedule): within each chunk, every maximal run of tracked
  iterations (`i % k == 0`, and the final window the summary averages) and of untracked ones is
  its own compiled program; the untracked one is the algorithm built with
  `track_objective: false`, run on the tracked build's state, reporting `objective` as NaN. The
  schedule depends only on the iteration index, so `resume` continues it exactly.
* At the end: `metrics.csv`, `summary.json`, `plots/*.png`, `config.yaml` in the run directory.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from bilevel_jax.runner import io as rio
from bilevel_jax.runner.config import (
    config_hash,
    dump_config,
    format_point,
    grid_points,
    point_config,
    split_sweep_keys,
)
from bilevel_jax.runner.fields import show_value
from bilevel_jax.runner.plots import Curve, plot_metric
from bilevel_jax.runner.problems import build_problem, problem_spec
from bilevel_jax.runner.results import (final_window, format_table, point_label, summarize,
                                         summary_rows)

RUN_FILES = ("config.yaml", "metrics.csv", "summary.json", rio.CHECKPOINT,
             *rio.LEGACY_CHECKPOINTS)


@dataclass
class RunResult:
    directory: str
    summary: dict
    seconds: float
    compile_seconds: float
    loop_seconds: float = 0.0       # the compiled chunks alone (no init, compile or writing)
    loop_iterations: int = 0        # iterations those chunks ran in this invocation


# --------------------------------------------------------------------------------------------
# Building optimizers and algorithms from (partly traced) config values
# --------------------------------------------------------------------------------------------

def make_optimizer(section: dict, iterations: int, traced: dict | None = None):
    """The optax optimizer of an `optimizer` section; `traced` overrides numeric fields."""
    import optax

    traced = traced or {}
    value = {**section, **traced}
    lr = value["learning_rate"]
    warmup = section["warmup_steps"]
    if section["schedule"] == "constant":
        main = lr
    else:
        steps = section["decay_steps"] or max(iterations - warmup, 1)
        if section["schedule"] == "linear":
            main = optax.linear_schedule(lr, lr * value["end_fraction"], steps)
        else:
            main = optax.cosine_decay_schedule(lr, steps, alpha=value["end_fraction"])
    if warmup:
        after = main if callable(main) else optax.constant_schedule(main)
        schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
    else:
        schedule = main
    if section["name"] == "sgd":
        momentum = value["momentum"]
        if "momentum" in traced or momentum > 0:
            optimizer = optax.sgd(schedule, momentum=momentum, nesterov=section["nesterov"])
        else:
            optimizer = optax.sgd(schedule)
    else:
        optimizer = optax.adam(schedule, b1=value["b1"], b2=value["b2"], eps=section["eps"])
    clip = value["clip_norm"]
    if clip is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(clip), optimizer)
    return optimizer


def make_algorithm(config: dict, optimizer, traced: dict | None = None):
    from bilevel_jax.algorithms import hypergradient_ascent, pbrl

    section = {**config["algorithm"], **(traced or {})}
    custom = problem_spec(config["problem"]["name"]).make_algorithm
    if custom is not None:
        return custom(config, optimizer, section)
    if section["name"] == "ascent":
        name = config["estimator"]["name"]
        return hypergradient_ascent(name, optimizer, track_objective=section["track_objective"],
                                    **config["estimator"][name])
    return pbrl(optimizer, penalty=section["penalty"], rho_0=section["rho_0"],
                rho_max=section["rho_max"],
                ramp_iters=section["ramp_iters"] or config["iterations"],
                inner_sweeps=section["inner_sweeps"], track_objective=section["track_objective"],
                # the simulator form's options (ignored on tabular problems); null widths: linear
                learner=section["learner"], learner_options=section["learner_options"],
                num_envs=section["num_envs"], num_steps=section["num_steps"],
                policy_hidden=tuple(section["policy_hidden"] or ()),
                policy_activation=section["policy_activation"],
                baseline_hidden=tuple(section["baseline_hidden"] or ()),
                baseline_learning_rate=section["baseline_learning_rate"],
                baseline_steps=section["baseline_steps"], score_terms=section["score_terms"])


def tracking_is_free(config: dict) -> bool:
    """True when the exact objective costs nothing extra (ascent with an estimator whose own
    objective is exact: `exact`, zero-order with model values, on a tabular problem): a
    tracking schedule then has no untracked build and every iteration reports `F`."""
    from bilevel_jax.estimators import make_estimator
    from bilevel_jax.estimators.base import reports_exact_objective

    spec = problem_spec(config["problem"]["name"])
    if config["algorithm"]["name"] != "ascent" or spec.make_algorithm is not None:
        return False
    name = config["estimator"]["name"]
    return reports_exact_objective(make_estimator(name, **config["estimator"][name]),
                                   spec.simulator)


def make_untracked_algorithm(config: dict, optimizer, traced: dict | None = None):
    """The algorithm built with `algorithm.track_objective: false`: the untracked partner of a
    `track_every` schedule (`bilevel_jax.algorithms.train.untracked_variant` runs it on the
    tracked build's state and reports the tracked metrics as NaN)."""
    untracked = dict(config, algorithm=dict(config["algorithm"], track_objective=False))
    return make_algorithm(untracked, optimizer, traced)


def make_build(config: dict, problem, traced_keys: list[str]):
    """`build(hparams) -> (problem, algorithm)` for `batched_fns`; `hparams[key]` are traced.

    With `track_every` set (and tracking not free, `tracking_is_free`), `(problem, algorithm,
    untracked)`: the untracked build runs the schedule's untracked iterations.
    """
    spec = problem_spec(config["problem"]["name"])
    scheduled = config.get("track_every") is not None and not tracking_is_free(config)

    def described(algorithm):
        if spec.leader_metrics is None:
            return algorithm
        from bilevel_jax.algorithms.base import with_leader_metrics  # noqa: PLC0415 - jax
        return with_leader_metrics(algorithm, spec.leader_metrics)

    def build(hparams):
        by_section: dict[str, dict] = {"problem": {}, "optimizer": {}, "algorithm": {}}
        for key in traced_keys:
            section, name = key.split(".", 1)
            by_section[section][name] = hparams[key]
        section = {k: v for k, v in config["problem"].items() if k != "name"}
        built = spec.apply_traced(problem, by_section["problem"], section)
        optimizer = make_optimizer(config["optimizer"], config["iterations"],
                                   by_section["optimizer"])
        algorithm = described(make_algorithm(config, optimizer, by_section["algorithm"]))
        if not scheduled:
            return built, algorithm
        untracked = described(make_untracked_algorithm(config, optimizer, by_section["algorithm"]))
        return built, algorithm, untracked

    return build


# --------------------------------------------------------------------------------------------
# Groups: one compiled program per combination of structural values
# --------------------------------------------------------------------------------------------

@dataclass
class Group:
    index: int
    structural: dict                        # structural key -> value
    points: list[int]                       # grid point indices
    runs: list[tuple[int, int]]             # (point, seed)
    template: dict                          # resolved config of the group's first point
    hparam_keys: list[str]
    hparams: dict = field(default_factory=dict)     # key -> np.ndarray [runs]
    x0: Any = None                          # pytree with a leading run axis
    seeds: np.ndarray | None = None
    seconds: float = 0.0
    iterations_timed: int = 0
    state: Any = None
    metrics: dict = field(default_factory=dict)     # name -> list of [runs, n] arrays
    padded: int = 0
    programs: dict = field(default_factory=dict)    # (length, tracked) -> compiled chunk
    problem: Any = None
    hparams_device: Any = None


def make_groups(config: dict) -> tuple[list[dict], list[Group], list[str], list[str]]:
    points = grid_points(config) or [{}]
    traced, structural = split_sweep_keys(config)
    groups: dict[tuple, Group] = {}
    for index, values in enumerate(points):
        signature = tuple((k, repr(values[k])) for k in structural)
        if signature not in groups:
            groups[signature] = Group(
                index=len(groups), structural={k: values[k] for k in structural}, points=[],
                runs=[], template=point_config(config, values),
                hparam_keys=[k for k in traced if k != "x0_noise"])
        group = groups[signature]
        group.points.append(index)
        group.runs += [(index, seed) for seed in config["seeds"]]
    return points, list(groups.values()), traced, structural


def _float_dtype(config: dict):
    return np.float64 if config["problem"].get("dtype") == "float64" else np.float32


def _prepare_inputs(config: dict, points: list[dict], group: Group) -> None:
    """Host-side per-run inputs: traced hyperparameters, perturbed x0, seeds."""
    import jax

    dtype = _float_dtype(config)
    problem, x0 = build_problem(group.template["problem"])
    group.problem = problem
    for key in group.hparam_keys:
        group.hparams[key] = np.asarray([points[p][key] for p, _ in group.runs], dtype)
    noise = [points[p].get("x0_noise", config["x0_noise"]) for p, _ in group.runs]

    def perturbed(leaf):
        leaf = np.asarray(leaf)
        out = []
        for (p, seed), scale in zip(group.runs, noise):
            if scale:
                rng = np.random.default_rng([abs(int(seed)), 0 if seed >= 0 else 1, 17])
                out.append(leaf + scale * rng.standard_normal(leaf.shape).astype(leaf.dtype))
            else:
                out.append(leaf)
        return np.stack(out)

    group.x0 = jax.tree_util.tree_map(perturbed, x0)
    group.seeds = np.asarray([seed for _, seed in group.runs], np.int64)


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    extra = size - array.shape[0]
    if extra <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], extra, axis=0)], axis=0)


def _is_key(leaf) -> bool:
    import jax
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _state_to_host(state, runs: int) -> list[np.ndarray]:
    import jax

    from bilevel_jax.algorithms import runs_to_host

    # Every process gathers the whole state (a collective); PRNG keys come back as key data.
    return [leaf[:runs] for leaf in jax.tree_util.tree_leaves(runs_to_host(state))]


def _state_from_host(leaves: list[np.ndarray], shapes, padded: int, mesh):
    import jax
    import jax.numpy as jnp

    from bilevel_jax.algorithms import shard_runs

    flat, treedef = jax.tree_util.tree_flatten(shapes)
    if len(flat) != len(leaves):
        raise rio.CheckpointError(f"--resume: the checkpoint's state has {len(leaves)} arrays, "
                                  f"this config's algorithm {len(flat)}; run without --resume "
                                  f"to start over")
    restored = []
    for index, (spec, saved) in enumerate(zip(flat, leaves)):
        saved = _pad(np.asarray(saved), padded)
        # A PRNG key is saved as its key data (uint32 [..., 2] for threefry).
        expected = jax.eval_shape(jax.random.key_data, spec) if _is_key(spec) else spec
        if saved.shape != tuple(expected.shape) or saved.dtype != expected.dtype:
            raise rio.CheckpointError(
                f"--resume: the checkpoint's state[{index}] is {saved.shape} {saved.dtype}, "
                f"this config's algorithm expects {tuple(expected.shape)} {expected.dtype}; run "
                f"without --resume to start over")
        data = jnp.asarray(saved)
        restored.append(jax.random.wrap_key_data(data) if _is_key(spec) else data)
    return shard_runs(jax.tree_util.tree_unflatten(treedef, restored), mesh)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def _describe(config: dict, points: list[dict], groups: list[Group], structural: list[str],
              devices: int) -> str:
    problem = config["problem"]
    what = problem["name"]
    if problem["name"] == "random":
        what = (f"random problem ({problem['num_states']} states, {problem['num_actions']} "
                f"actions, dim_x {problem['dim_x']}, {problem['num_contexts']} contexts)")
    n_seeds = len(config["seeds"])
    programs = f"{len(groups)} compiled program{'s' if len(groups) > 1 else ''}"
    if structural:
        programs += f" (one per {', '.join(structural)})"
    return (f"{config['name']}: {what}\n"
            f"  {len(points)} grid point{'s' if len(points) > 1 else ''} x {n_seeds} "
            f"seed{'s' if n_seeds > 1 else ''} = {len(points) * n_seeds} runs, "
            f"{config['iterations']} iterations, {programs}, {devices} "
            f"device{'s' if devices > 1 else ''}")


def _first_nonfinite(groups: list[Group], chunk_metrics: list[dict], offset: int):
    """`(iteration, group, run index)` of the earliest NaN/inf in this chunk, or None."""
    best = None
    for group, metrics in zip(groups, chunk_metrics):
        bad = np.asarray(metrics["nonfinite"]).astype(bool)
        if not bad.any():
            continue
        runs, its = np.nonzero(bad)
        order = np.lexsort((runs, its))
        it, run = int(its[order[0]]), int(runs[order[0]])
        if best is None or offset + it < best[0]:
            best = (offset + it, group, run)
    return best


def clear_run_files(directory: str) -> bool:
    """Removes a previous run's files from `directory`; True if there were any."""
    found = False
    for name in RUN_FILES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.unlink(path)
            found = True
    plots = os.path.join(directory, "plots")
    if os.path.isdir(plots):
        for name in os.listdir(plots):
            if name.endswith(".png"):
                os.unlink(os.path.join(plots, name))
                found = True
    return found


def device_layout() -> dict:
    """`{"devices", "processes"}` of this run (after `jax.distributed.initialize`, all of them)."""
    import jax
    return {"devices": jax.device_count(), "processes": jax.process_count()}


def _check_groups(checkpoint: dict, config: dict, directory: str) -> None:
    """The checkpoint holds one state and metrics `[runs, done]` per compiled group of `config`."""
    _, groups, _, _ = make_groups(config)
    saved = checkpoint["groups"]

    def refuse(detail: str):
        return rio.CheckpointError(f"--resume: the checkpoint in {directory} does not fit this "
                                   f"config ({detail}); run without --resume to start over")

    if len(saved) != len(groups):
        raise refuse(f"{len(saved)} compiled groups, expected {len(groups)}")
    for group, entry in zip(groups, saved):
        runs = len(group.runs)
        for i, leaf in enumerate(entry["state"]):
            if leaf.shape[0] != runs:
                raise refuse(f"groups[{group.index}].state[{i}] has {leaf.shape[0]} runs, "
                             f"expected {runs}")
        for name, values in entry["metrics"].items():
            if values.shape != (runs, checkpoint["done"]):
                raise refuse(f"groups[{group.index}].metrics[{name!r}] is {values.shape}, "
                             f"expected [runs, done] = {(runs, checkpoint['done'])}")


def check_resume(config: dict) -> dict | None:
    """The validated checkpoint to resume from; None when the run directory holds none.

    Raises `CheckpointError` (a `ConfigError`: exit 2 at the command line) for a file that is
    unreadable, truncated, foreign (a pickle is never loaded) or does not fit `config` (another
    config's hash, more iterations, other shapes), and for one written on another number of
    devices or processes: a sharded run's float64 states differ from an unsharded one's in the
    last bits, so resuming on another device count is refused rather than giving other numbers
    (call after `jax.distributed.initialize` in a multi-process run).
    """
    directory = config["output"]["dir"]
    checkpoint = rio.load_checkpoint(directory)
    if checkpoint is None:
        return None
    if checkpoint["config_hash"] != config_hash(config):
        raise rio.CheckpointError(
            f"--resume: the checkpoint in {directory} was written by a different config "
            f"(hash {checkpoint['config_hash']}, this config {config_hash(config)}); run without "
            f"--resume to start over, or --out another directory")
    if checkpoint["done"] > config["iterations"]:
        raise rio.CheckpointError(f"--resume: the checkpoint has {checkpoint['done']} "
                                  f"iterations, more than iterations ({config['iterations']})")
    _check_groups(checkpoint, config, directory)
    layout = device_layout()
    saved = {k: checkpoint[k] for k in layout}
    if saved != layout:
        raise rio.CheckpointError(
            f"--resume: the checkpoint in {directory} was written on {saved['devices']} "
            f"device(s) in {saved['processes']} process(es), this run has {layout['devices']} "
            f"in {layout['processes']}; resume with the same devices (e.g. XLA_FLAGS="
            f"--xla_force_host_platform_device_count={saved['devices']} on CPU), or run "
            f"without --resume to start over")
    return checkpoint


def run_experiment(config: dict, *, resume: bool = False, checkpoint: dict | None = None,
                   progress: bool = True, stream: TextIO | None = None) -> RunResult:
    """Runs every grid point x seed of a resolved config and writes the run directory.

    The run holds the directory's `RunLock` from start to end (process 0 of a multi-process run
    takes it). `resume=True` continues from the directory's checkpoint (`check_resume`, read
    under the lock) and says from which iteration; without a checkpoint there it says so and
    starts from iteration 0.

    Raises:
      RunDirectoryError: the directory is locked by another run (naming its pid), or cannot be
        created or written (nothing is written).
      CheckpointError: `resume` with a checkpoint that is unreadable, truncated, foreign, of
        another config or written on another device count (see `check_resume`).
      NonFiniteError: NaN or inf in `x` or a gradient; names the iteration, grid point and seed;
        the last good checkpoint is kept.
    """
    import jax

    stream = sys.stdout if stream is None else stream
    lock = rio.RunLock(config["output"]["dir"])
    if jax.process_index() == 0:
        lock.acquire()
    try:
        if lock.stale_pid is not None:
            state = "no longer running" if not rio.pid_alive(lock.stale_pid) else "not holding it"
            print(f"  taking over the stale lock of pid {lock.stale_pid} ({state})", file=stream)
        if resume and checkpoint is None:
            checkpoint = check_resume(config)
        return _run_locked(config, resume=resume, checkpoint=checkpoint, progress=progress,
                           stream=stream)
    finally:
        lock.release()


def _run_locked(config: dict, *, resume: bool, checkpoint: dict | None, progress: bool,
                stream: TextIO) -> RunResult:
    """`run_experiment` once the run directory is locked and the checkpoint read."""
    start = time.perf_counter()
    directory = config["output"]["dir"]

    if config["problem"].get("dtype") == "float64":
        import jax
        jax.config.update("jax_enable_x64", True)

    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from bilevel_jax.algorithms import (
        NonFiniteError,
        batched_fns,
        padded_size,
        run_mesh,
        runs_to_host,
        shard_runs,
    )
    from bilevel_jax.algorithms.train import track_segments, tracked_iterations

    points, groups, traced, structural = make_groups(config)
    devices = jax.device_count()   # every process's devices: the runs split over all of them
    mesh = run_mesh() if devices > 1 else None
    # Every process computes its runs and gathers the metrics; process 0 alone writes and prints.
    writer = jax.process_index() == 0
    if not writer:
        stream, progress = open(os.devnull, "w"), False
    print(_describe(config, points, groups, structural, devices), file=stream)

    if writer:
        os.makedirs(directory, exist_ok=True)
        rio.remove_stale_temp_files(directory)
        if checkpoint is None:
            if resume:
                print(f"  --resume: no checkpoint in {directory}; starting from iteration 0",
                      file=stream)
            if clear_run_files(directory):
                print(f"  replacing the previous run in {directory}", file=stream)

    chunk_size = min(config["chunk_size"], config["iterations"])
    iterations = config["iterations"]
    done = checkpoint["done"] if checkpoint is not None else 0
    # Which iterations solve for the exact F (track_every; the final window is the metric's).
    schedule = tracked_iterations(iterations, config.get("track_every"),
                                  final_window(iterations, config["output"]["final_fraction"]))

    def chunk_segments(start: int) -> list[tuple[int, bool]]:
        return track_segments(schedule, start, min(start + chunk_size, iterations))

    # The compiled programs the remaining chunks need: (length, tracked) of each segment.
    needed = sorted({seg for start in range(done, iterations, chunk_size)
                     for seg in chunk_segments(start)}, key=lambda seg: (-seg[0], not seg[1]))
    if checkpoint is not None:
        print(f"  --resume: continuing from iteration {done} of {iterations} "
              f"({os.path.join(directory, rio.CHECKPOINT)})", file=stream)

    # Build and compile every group's programs before the progress bar starts.
    compile_start = time.perf_counter()
    for group in groups:
        label = format_point(group.structural) if group.structural else "the program"
        if done < iterations:
            print(f"  compiling {label} ...", end="", flush=True, file=stream)
        tick = time.perf_counter()
        _prepare_inputs(config, points, group)
        runs = len(group.runs)
        group.padded = padded_size(runs, mesh)
        build = make_build(group.template, group.problem, group.hparam_keys)
        init_fn, _ = batched_fns(build, chunk_size, mesh)
        hparams = shard_runs({k: jnp.asarray(_pad(v, group.padded))
                              for k, v in group.hparams.items()}, mesh)
        x0 = shard_runs(jax.tree_util.tree_map(lambda a: jnp.asarray(_pad(a, group.padded)),
                                               group.x0), mesh)
        keys = shard_runs(jax.vmap(jax.random.key)(jnp.asarray(_pad(group.seeds, group.padded))),
                          mesh)
        group.hparams_device = hparams
        if checkpoint is None:
            group.state = init_fn(hparams, x0, keys)   # laid out over the mesh like the inputs
        else:
            saved = checkpoint["groups"][group.index]
            shapes = jax.eval_shape(init_fn, hparams, x0, keys)
            group.state = _state_from_host(saved["state"], shapes, group.padded, mesh)
            group.metrics = {k: [v] for k, v in saved["metrics"].items()}
        free = tracking_is_free(group.template)     # no untracked build: one program per length
        for length, tracked in needed:
            if free and (length, True) in group.programs:
                group.programs[length, tracked] = group.programs[length, True]
                continue
            _, program = batched_fns(build, length, mesh, tracked=tracked)
            group.programs[length, tracked] = program.lower(hparams, group.state).compile()
            if free:
                group.programs[length, True] = group.programs[length, tracked]
        if done < iterations:
            print(f" {time.perf_counter() - tick:.1f} s", file=stream, flush=True)
    if done >= iterations:
        print(f"  the checkpoint holds all {iterations} iterations: writing the results",
              file=stream)
    compile_seconds = time.perf_counter() - compile_start

    def save(done_now: int) -> None:
        payload = {"config_hash": config_hash(config), "done": done_now, "groups": [
            {"state": _state_to_host(g.state, len(g.runs)),
             "metrics": {k: np.concatenate(v, axis=1) if v else v for k, v in g.metrics.items()}}
            for g in groups]}
        payload.update(device_layout())     # resuming on other devices is refused
        if writer:
            rio.save_checkpoint(directory, payload)

    if writer:   # after the checkpoint's state was accepted: a refused resume writes nothing
        rio.atomic_write_text(os.path.join(directory, "config.yaml"), dump_config(config))
    if checkpoint is None:
        save(0)
    bar = tqdm(total=iterations, initial=done, unit="it", desc=config["name"], file=sys.stderr,
               dynamic_ncols=True, disable=not progress, smoothing=0.1, mininterval=0.25)
    try:
        while done < iterations:
            segments = chunk_segments(done)
            size = sum(length for length, _ in segments)
            new_states, chunk_metrics = [], []
            for group in groups:
                tick = time.perf_counter()
                state, parts = group.state, []
                for segment in segments:
                    state, part = group.programs[segment](group.hparams_device, state)
                    parts.append(part)
                # Every process gets every run's metrics, so all stop alike on NaN or inf.
                parts = [runs_to_host(part) for part in parts]
                metrics = {k: np.concatenate([p[k] for p in parts], axis=1)[:len(group.runs)]
                           for k in parts[0]}
                jax.block_until_ready(state)
                group.seconds += time.perf_counter() - tick
                group.iterations_timed += size
                new_states.append(state)
                chunk_metrics.append(metrics)
            bad = _first_nonfinite(groups, chunk_metrics, done)
            if bad is not None:
                bar.close()
                iteration, group, run = bad
                point, seed = group.runs[run]
                where = format_point(points[point]) if points[point] else "(the only grid point)"
                raise NonFiniteError(
                    f"NaN or inf in x or the gradient at iteration {iteration}, grid point "
                    f"{where}, seed {seed}. The last good checkpoint (after {done} "
                    f"iterations) is kept in {os.path.join(directory, rio.CHECKPOINT)}")
            for group, state, metrics in zip(groups, new_states, chunk_metrics):
                group.state = state
                for name, values in metrics.items():
                    group.metrics.setdefault(name, []).append(values)
            done += size
            save(done)
            bar.update(size)
    finally:
        bar.close()

    summary = write_results(config, points, groups, directory, write=writer)
    seconds = time.perf_counter() - start
    ms = {p: 1000 * g.seconds / g.iterations_timed for g in groups for p in g.points
          if g.iterations_timed}
    header, rows = summary_rows(summary, ms_per_iter=ms if ms else None)
    print("", file=stream)
    print(format_table(header, rows), file=stream)
    print(f"\n{summary['statistic']}.", file=stream)
    if ms:
        print("ms/it: wall time per iteration of the compiled program running the row's group "
              "of runs (all its grid points x seeds at once).", file=stream)
    print(f"Run directory: {directory} (config.yaml, metrics.csv, summary.json, plots/, "
          f"{rio.CHECKPOINT}); {seconds:.1f} s in all, {compile_seconds:.1f} s compiling.",
          file=stream)
    return RunResult(directory, summary, seconds, compile_seconds,
                     loop_seconds=sum(g.seconds for g in groups),
                     loop_iterations=max((g.iterations_timed for g in groups), default=0))


def write_results(config: dict, points: list[dict], groups: list[Group], directory: str,
                  write: bool = True) -> dict:
    """metrics.csv, summary.json, plots/*.png (all atomic) from the groups' metrics.

    `write=False` (processes other than 0 of a multi-process run) only returns the summary.
    """
    seeds = config["seeds"]
    iterations = config["iterations"]
    sweep_keys = list(config["sweep"])
    from bilevel_jax.algorithms import METRICS

    names: list[str] = [m for m in METRICS if m != "nonfinite"]
    for group in groups:
        names += [m for m in group.metrics if m not in names and m != "nonfinite"]
    # curves[point][metric] -> [seeds, iterations]
    curves = {p: {m: np.full((len(seeds), iterations), np.nan, np.float64) for m in names}
              for p in range(len(points))}
    dtypes = {}
    for group in groups:
        merged = {k: np.concatenate(v, axis=1) for k, v in group.metrics.items()}
        for row, (point, seed) in enumerate(group.runs):
            s = seeds.index(seed)
            for metric in names:
                if metric in merged:
                    curves[point][metric][s] = merged[metric][row]
                    dtypes[metric] = merged[metric].dtype
    names = [m for m in names if m in dtypes]

    header = ["run", "point", *sweep_keys, "seed", "iteration", *names]
    iteration_text = [str(i) for i in range(iterations)]

    def rows():
        for point, values in enumerate(points):
            ids = [show_value(values[k]) for k in sweep_keys]
            for s, seed in enumerate(seeds):
                run = point * len(seeds) + s
                columns = [rio.format_column(curves[point][m][s].astype(dtypes[m])) for m in names]
                prefix = [str(run), str(point), *ids, str(seed)]
                for i in range(iterations):
                    yield prefix + [iteration_text[i]] + [c[i] for c in columns]

    summary = summarize(name=config["name"], config_hash=config_hash(config),
                        iterations=iterations, seeds=list(seeds), sweep_keys=sweep_keys,
                        points=points, metric_names=names, curves=curves,
                        final_fraction=config["output"]["final_fraction"])
    if not write:
        return summary
    rio.atomic_write_csv(os.path.join(directory, "metrics.csv"), header, rows())
    rio.atomic_write_json(os.path.join(directory, "summary.json"), summary)
    if config["output"]["plots"]:
        legend = sweep_keys[0] if len(sweep_keys) == 1 else None
        for metric in names:
            plot_metric(os.path.join(directory, "plots", f"{metric}.png"), metric,
                        [Curve(point_label(values, sweep_keys) if sweep_keys else config["name"],
                               curves[p][metric]) for p, values in enumerate(points)],
                        title=f"{config['name']}: {metric} (mean ± SE over {len(seeds)} "
                              f"seed{'s' if len(seeds) > 1 else ''})",
                        legend_title=legend)
    return summary
