"""Training drivers: chunks of iterations as one compiled `lax.scan`, batches of runs as one
`vmap`, the batch axis split over every device (of every process) by `shard_map`.

Between chunks (never inside the compiled loop) the host reports progress, appends metrics,
writes checkpoints and checks for NaN or inf.

Tracking schedule (`track_every`): solving for the exact `F` to report it can cost more than the
step itself. With `track_every=k` only iterations `i` with `i % k == 0` and every iteration of
the final window (the iterations a final metric averages, e.g. SPEC 7.1's last 10%) are
*tracked*; the others run an *untracked* build of the algorithm (same state pytree, same metrics
pytree, `TRACKED_METRICS` set to NaN) that never solves for `F`. The schedule is applied per
chunk, not per iteration: each maximal run of tracked or untracked iterations is its own
compiled `lax.scan` (a `lax.cond` on a batched predicate would run both branches under `vmap`).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bilevel_jax.algorithms.ascent import hypergradient_ascent
from bilevel_jax.algorithms.base import Algorithm
from bilevel_jax.errors import BilevelJaxError, InvalidArgumentError
from bilevel_jax.estimators.base import (Estimator, check_problem_for, is_simulator,
                                         make_estimator, reports_exact_objective)


class NonFiniteError(BilevelJaxError, FloatingPointError):
    """A NaN or inf appeared in `x` or in a gradient; the message names iteration and run."""


# Metrics that only tracked iterations report (NaN on untracked ones under a schedule).
TRACKED_METRICS = ("objective", "best_response_gap")


def check_track_every(track_every, name: str = "track_every") -> None:
    """Raises `InvalidArgumentError` naming `name` unless `track_every` is None or an int >= 1."""
    if track_every is None:
        return
    if isinstance(track_every, bool) or not isinstance(track_every, (int, np.integer)) \
            or track_every < 1:
        raise InvalidArgumentError(f"{name}: expected an int >= 1 (track every k-th iteration "
                                   f"and the final window) or None (every iteration), got "
                                   f"{track_every!r}")


def tracked_iterations(num_iters: int, track_every: int | None, final_window: int) -> np.ndarray:
    """`bool [num_iters]`: which iterations solve for (and report) the exact objective.

    Every iteration when `track_every` is None; else `i % track_every == 0` (iteration 0
    included, so `F(x0)` is reported) and the last `final_window` iterations.
    """
    check_track_every(track_every)
    if track_every is None:
        return np.ones(num_iters, bool)
    index = np.arange(num_iters)
    return (index % track_every == 0) | (index >= num_iters - final_window)


def track_segments(tracked: np.ndarray, start: int, stop: int) -> list[tuple[int, bool]]:
    """`[(size, is_tracked), ...]`: iterations `[start, stop)` as maximal runs of one kind."""
    segments: list[tuple[int, bool]] = []
    for i in range(start, stop):
        kind = bool(tracked[i])
        if segments and segments[-1][1] == kind:
            segments[-1] = (segments[-1][0] + 1, kind)
        else:
            segments.append((1, kind))
    return segments


def untracked_variant(untracked: Algorithm) -> Algorithm:
    """`untracked` (an algorithm built without objective tracking, e.g.
    `track_objective=False`) as the partner of its tracked build in a schedule: it runs on the
    tracked build's state (top-level dict keys its step does not return, like a tracking solve's
    warm start, are carried over unchanged) and reports `TRACKED_METRICS` as NaN."""

    def step(problem, state):
        new_state, metrics = untracked.step(problem, state)
        if isinstance(state, dict) and isinstance(new_state, dict):
            new_state = {**{k: v for k, v in state.items() if k not in new_state}, **new_state}
        before = jax.tree_util.tree_structure(state)
        after = jax.tree_util.tree_structure(new_state)
        if before != after:
            raise InvalidArgumentError(
                f"track_every: the untracked build of the algorithm returns a state of another "
                f"structure than the tracked build's ({after} vs {before}); the schedule needs "
                f"both to share one state pytree")
        metrics = {k: (jnp.full_like(v, jnp.nan) if k in TRACKED_METRICS else v)
                   for k, v in metrics.items()}
        return new_state, metrics

    return Algorithm(untracked.init, step)


class TrainResult(NamedTuple):
    state: Any                 # final algorithm state (x is state["x"])
    metrics: dict              # name -> [num_iters] (or [runs, num_iters]) numpy arrays
    chunk_seconds: list        # wall time of each chunk


@partial(jax.jit, static_argnames=("algorithm", "size"))
def _run_chunk(problem, state, *, algorithm: Algorithm, size: int):
    # The problem is a traced argument (not a closure) so that repeated `train` calls with the
    # same algorithm reuse one compilation.
    return chunk_fn(algorithm, problem, size)(state)


def chunk_fn(algorithm: Algorithm, problem, chunk_size: int) -> Callable:
    """`state -> (state, metrics [chunk_size])`: one chunk of iterations as a `lax.scan`."""
    def run(state):
        return jax.lax.scan(lambda s, _: algorithm.step(problem, s), state, None,
                            length=chunk_size)
    return run


def _first_nonfinite(metrics: dict, offset: int, run_names=None) -> str | None:
    bad = np.asarray(metrics["nonfinite"])
    if not bad.any():
        return None
    if bad.ndim == 1:
        return f"iteration {offset + int(np.argmax(bad))}"
    run, it = np.unravel_index(int(np.argmax(bad.reshape(-1))), bad.shape)
    name = run_names[run] if run_names is not None else f"run {run}"
    return f"iteration {offset + int(it)} of {name}"


def train(problem, method: Estimator | Algorithm | str, optimizer: optax.GradientTransformation | None,
          num_iters: int, key: jax.Array, *, x0, chunk_size: int = 100,
          callback: Callable[[int, Any, dict], None] | None = None,
          track_every: int | None = None, final_window: int | None = None,
          untracked: Algorithm | None = None, **estimator_options) -> TrainResult:
    """Runs `num_iters` leader iterations from `x0`.

    Args:
      problem: a `BilevelProblem`.
      method: an estimator (or its name; then `estimator_options` configure it) for
        hypergradient ascent with `optimizer`, or a ready `Algorithm` (e.g. `pbrl(...)`, in which
        case `optimizer` is ignored and may be None).
      num_iters: outer iterations.
      key: PRNG key of the run.
      x0: initial leader parameters (any pytree).
      chunk_size: iterations per compiled chunk; `callback(iterations_done, state, metrics)` runs
        on the host after each chunk (progress, logging, checkpoints).
      track_every: None (every iteration reports the exact objective) or `k`: only iterations
        `i % k == 0` and the last `final_window` do (`tracked_iterations`); the others run an
        untracked build (no solve for `F`) and report `TRACKED_METRICS` as NaN. With an
        estimator whose objective is exact anyway (`exact`, model zero-order) it changes nothing.
      final_window: iterations tracked at the end under `track_every` (default: the last 10%,
        `ceil(0.1 num_iters)`, the window of SPEC 7.1's metric).
      untracked: with a ready `Algorithm` and `track_every`, its untracked build (e.g.
        `pbrl(..., track_objective=False)`); refused without one.

    Returns:
      `TrainResult(state, metrics, chunk_seconds)`; `metrics[name]` has shape `[num_iters]`.

    Raises:
      NonFiniteError: naming the first iteration with a NaN or inf in `x` or the gradient. The
        last finite state is `error.last_good_state`.
    """
    track_objective = estimator_options.pop("track_objective", True)
    if isinstance(method, Algorithm):
        # A ready Algorithm checks what it needs itself (model or not); here only the form.
        needs = Estimator(None, None, simulator=True)
    else:
        needs = make_estimator(method, **estimator_options)
    check_problem_for(problem, x0, needs, method if isinstance(method, str) else "method")
    if not isinstance(num_iters, int) or num_iters < 1:
        raise InvalidArgumentError(f"num_iters: expected an int >= 1, got {num_iters!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    check_track_every(track_every)
    if final_window is None:
        final_window = max(1, int(np.ceil(0.1 * num_iters)))
    elif isinstance(final_window, bool) or not isinstance(final_window, int) or final_window < 0:
        raise InvalidArgumentError(f"final_window: expected an int >= 0, got {final_window!r}")
    if isinstance(method, Algorithm):
        algorithm = method
        if track_every is not None and untracked is None:
            raise InvalidArgumentError(
                "untracked: track_every with a ready Algorithm needs its untracked build "
                "(e.g. pbrl(..., track_objective=False)), got None")
    else:
        if optimizer is None:
            raise InvalidArgumentError("optimizer: expected an optax optimizer for ascent, got None")
        if track_every is not None and not track_objective:
            raise InvalidArgumentError("track_every: needs track_objective=True (a schedule of "
                                       "tracked iterations), got track_objective=False")
        algorithm = hypergradient_ascent(method, optimizer, track_objective=track_objective,
                                         **estimator_options)
        if (track_every is not None and untracked is None
                and not reports_exact_objective(needs, is_simulator(problem))):
            # (an estimator whose objective is exact anyway reports it on every iteration)
            untracked = hypergradient_ascent(method, optimizer, track_objective=False,
                                             **estimator_options)
    plain = {True: algorithm, False: algorithm}
    if track_every is not None and untracked is not None:
        plain[False] = untracked_variant(untracked)
    schedule = tracked_iterations(num_iters, track_every, final_window)
    state = algorithm.init(problem, x0, key)
    history, seconds, done = [], [], 0
    while done < num_iters:
        size = min(chunk_size, num_iters - done)
        start = time.perf_counter()
        parts, new_state = [], state
        for length, is_tracked in track_segments(schedule, done, done + size):
            new_state, part = _run_chunk(problem, new_state, algorithm=plain[is_tracked],
                                         size=length)
            parts.append(part)
        new_state = jax.block_until_ready(new_state)
        seconds.append(time.perf_counter() - start)
        metrics = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
        where = _first_nonfinite(metrics, done)
        if where is not None:
            error = NonFiniteError(f"NaN or inf in x or the gradient at {where}; "
                                   f"the last finite state is after iteration {done - 1}")
            error.last_good_state = state
            raise error
        state = new_state
        history.append(metrics)
        done += size
        if callback is not None:
            callback(done, state, metrics)
    merged = {k: np.concatenate([m[k] for m in history]) for k in history[0]}
    return TrainResult(state, merged, seconds)


# --------------------------------------------------------------------------------------------
# Batches of runs (seeds x hyperparameters): one vmap per device, the run axis split over a mesh
# --------------------------------------------------------------------------------------------

RUNS = "runs"   # the mesh axis the run batch is split over


def run_mesh(devices=None) -> Mesh:
    """A 1-D `Mesh` over `devices` with axis name `"runs"`.

    The default is every device of every process (`jax.devices()`): in a single process these
    are its local devices; after `jax.distributed.initialize` the runs split over all hosts.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (RUNS,))


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def shard_runs(tree, mesh: Mesh | None):
    """Places every leaf's leading (run) axis across the mesh; unchanged without a mesh.

    Host data (NumPy arrays, or jax arrays this process holds whole) must be the same in every
    process: each process then places only the slices its own devices hold, so the same call
    builds the global array in one process or many. Leaves already laid out so are kept as they
    are (no copy).
    """
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec(RUNS))

    def place(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            return leaf
        if _is_key(leaf):
            # Key arrays travel as their raw key data (the callback below needs NumPy).
            return jax.random.wrap_key_data(place(jax.random.key_data(leaf)),
                                            impl=jax.random.key_impl(leaf))
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, tree)


def runs_to_host(tree):
    """NumPy copies of every leaf, whole; with several processes, each gathers every slice.

    A collective across processes (every process must call it, in the same order); in one
    process a plain device-to-host copy. PRNG key leaves come back as their key data.
    """
    def fetch(leaf):
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)
    return jax.tree_util.tree_map(fetch, tree)


def padded_size(num_runs: int, mesh: Mesh | None) -> int:
    """Runs are padded (repeating the last) to a multiple of the device count."""
    if mesh is None:
        return num_runs
    devices = mesh.devices.size
    return -(-num_runs // devices) * devices


def pad_runs(tree, size: int):
    def pad(leaf):
        leaf = jnp.asarray(leaf)
        extra = size - leaf.shape[0]
        if extra == 0:
            return leaf
        return jnp.concatenate([leaf, jnp.repeat(leaf[-1:], extra, axis=0)], axis=0)
    return jax.tree_util.tree_map(pad, tree)


def per_device(fn: Callable, mesh: Mesh | None) -> Callable:
    """`fn` over a run batch, each device applying it to its own slice of every argument.

    Without `shard_map`, XLA's partitioner cannot split a batch through a sequential `lax.map`
    (the CPU dense solves) or a reshape that lays runs side by side (the HPGD rollouts): it
    all-gathers the batch and every device redoes every run. Inside `shard_map` each device runs
    exactly the single-device program on `runs / devices` runs, and nothing crosses devices:
    the runs are independent.

    `check_vma=False`: the per-device code has no collectives, so there is nothing for
    varying-axis typing to check, and with it every loop whose carry starts from a constant
    (the solvers' `while_loop`s) would need a `pcast`.
    """
    if mesh is None:
        return fn
    spec = PartitionSpec(RUNS)
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def batched_fns(build: Callable[[Any], tuple], chunk_size: int, mesh: Mesh | None = None, *,
                tracked: bool = True):
    """`(init, chunk)` over a batch of runs, split over `mesh`'s devices if one is given.

    `build(hparams) -> (problem, algorithm)` or `(problem, algorithm, untracked)` is called
    inside the vmapped, traced function, so the hyperparameters (learning rate, temperature,
    rho, ...) may be traced scalars. `tracked=False` makes `chunk` run the untracked build
    (`untracked_variant(untracked)`: no solve for the exact objective, `TRACKED_METRICS` NaN) on
    the tracked build's state; without an untracked build (None, or a 2-tuple) it runs
    `algorithm` (tracking is free, e.g. an exact estimator's own objective).

    * `init(hparams [R], x0 [R, ...], keys [R]) -> states [R, ...]`
    * `chunk(hparams [R], states [R, ...]) -> (states, metrics [R, chunk_size])`

    With a mesh, R must be a multiple of its device count (`padded_size`, `pad_runs`) and the
    outputs are laid out as `shard_runs` lays out inputs.
    """
    def init_one(hp, x0, key):
        problem, algorithm = build(hp)[:2]
        return algorithm.init(problem, x0, key)

    def chunk_one(hp, state):
        problem, algorithm, *rest = build(hp)
        untracked = rest[0] if rest else None
        if not tracked and untracked is not None:
            algorithm = untracked_variant(untracked)
        return chunk_fn(algorithm, problem, chunk_size)(state)

    return (jax.jit(per_device(jax.vmap(init_one), mesh)),
            jax.jit(per_device(jax.vmap(chunk_one), mesh)))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-process run (call once per process, before any other jax call).

    Arguments left None come from `jax.distributed.initialize`'s own detection
    (`JAX_COORDINATOR_ADDRESS`, SLURM, Open MPI, ...). Afterwards `run_mesh()` spans every
    process's devices and `run_experiment` splits each program's runs over all of them.
    """
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
