"""Training drivers: chunks of iterations as one compiled `lax.scan`, batches of runs as one
`vmap`, the batch axis sharded over every local device.

Between chunks (never inside the compiled loop) the host reports progress, appends metrics,
writes checkpoints and checks for NaN or inf.
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
from bilevel_jax.estimators.base import Estimator
from bilevel_jax.problem import check_problem


class NonFiniteError(BilevelJaxError, FloatingPointError):
    """A NaN or inf appeared in `x` or in a gradient; the message names iteration and run."""


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
          **estimator_options) -> TrainResult:
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

    Returns:
      `TrainResult(state, metrics, chunk_seconds)`; `metrics[name]` has shape `[num_iters]`.

    Raises:
      NonFiniteError: naming the first iteration with a NaN or inf in `x` or the gradient. The
        last finite state is `error.last_good_state`.
    """
    check_problem(problem, x0)
    if not isinstance(num_iters, int) or num_iters < 1:
        raise InvalidArgumentError(f"num_iters: expected an int >= 1, got {num_iters!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    if isinstance(method, Algorithm):
        algorithm = method
    else:
        if optimizer is None:
            raise InvalidArgumentError("optimizer: expected an optax optimizer for ascent, got None")
        algorithm = hypergradient_ascent(method, optimizer, **estimator_options)
    state = algorithm.init(problem, x0, key)
    history, seconds, done = [], [], 0
    while done < num_iters:
        size = min(chunk_size, num_iters - done)
        start = time.perf_counter()
        new_state, metrics = jax.block_until_ready(
            _run_chunk(problem, state, algorithm=algorithm, size=size))
        seconds.append(time.perf_counter() - start)
        metrics = jax.tree_util.tree_map(np.asarray, metrics)
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
# Batches of runs (seeds x hyperparameters): one vmap, sharded over the local devices
# --------------------------------------------------------------------------------------------

def run_mesh(devices=None) -> Mesh:
    """A 1-D `Mesh` over `devices` (default: every local device) with axis name `"runs"`."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("runs",))


def shard_runs(tree, mesh: Mesh | None):
    """Places every leaf's leading (run) axis across the mesh; unchanged without a mesh."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec("runs"))
    return jax.device_put(tree, sharding)


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


def batched_fns(build: Callable[[Any], tuple[Any, Algorithm]], chunk_size: int):
    """`(init, chunk)` over a batch of runs.

    `build(hparams) -> (problem, algorithm)` is called inside the vmapped, traced function, so
    the hyperparameters (learning rate, temperature, rho, ...) may be traced scalars.

    * `init(hparams [R], x0 [R, ...], keys [R]) -> states [R, ...]`
    * `chunk(hparams [R], states [R, ...]) -> (states, metrics [R, chunk_size])`
    """
    def init_one(hp, x0, key):
        problem, algorithm = build(hp)
        return algorithm.init(problem, x0, key)

    def chunk_one(hp, state):
        problem, algorithm = build(hp)
        return chunk_fn(algorithm, problem, chunk_size)(state)

    return jax.jit(jax.vmap(init_one)), jax.jit(jax.vmap(chunk_one))


def initialize_distributed(**kwargs) -> None:
    """Initializes `jax.distributed` for multi-host runs (call once per host before anything
    else); every host then runs its share of the batch on its local devices."""
    jax.distributed.initialize(**kwargs)
