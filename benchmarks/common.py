"""Shared benchmark plumbing: timing, the in-process bandwidth baseline, table and JSON output."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer repetitions")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    return parser.parse_args()


def best_time(fn, *args, repeats: int = 5) -> float:
    """Best wall time of `fn(*args)` over `repeats` calls, after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes read + written per second by an in-place scale of a large float32 array.

    The buffer is donated so no fresh output pages are faulted in: this is the memory system's
    streaming bandwidth, the baseline the other figures are divided by.
    """
    scale = jax.jit(lambda x: x * 1.0000001, donate_argnums=0)
    x = scale(jnp.ones((num_bytes // 4,), jnp.float32))
    x.block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = scale(x)
        x.block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * num_bytes / min(times)


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """float32 matrix-product FLOP/s, the compute baseline."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    product = jax.jit(lambda a: a @ a)
    return 2 * size**3 / best_time(product, a, repeats=repeats)


def environment() -> dict:
    device = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": getattr(device, "device_kind", str(device)),
            "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "machine": platform.machine()}


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows + [("metric", "value", "note")]) for i in range(3)]
    print(f"\n{title}")
    header = ("metric", "value", "note")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def write_json(path: str | None, payload: dict) -> None:
    """Writes atomically (temp file + rename) so a killed run never leaves half a file."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(payload, handle, indent=2, default=_to_builtin)
        tmp = handle.name
    os.chmod(tmp, 0o644)   # NamedTemporaryFile makes it 0600; results are meant to be read
    os.replace(tmp, path)
    print(f"\nwrote {path}")


def _to_builtin(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value)}")


def run_job(job: dict, reuse: bool) -> dict:
    """Runs one job (or reuses its finished directory); returns its wall and compile seconds,
    and the seconds and iterations of its compiled loop alone (absent from older directories)."""
    from bilevel_jax.runner import load_config, run_experiment

    config = load_config(job["config"], job["overrides"] + [f"output.dir={job['directory']}"])
    summary_path = os.path.join(job["directory"], "summary.json")
    wall_path = os.path.join(job["directory"], "wall_seconds.json")
    if reuse and os.path.exists(summary_path):
        with open(summary_path) as handle:
            summary = json.load(handle)
        if (summary.get("iterations") == config["iterations"]
                and summary.get("seeds") == list(config["seeds"])):
            print(f"reusing {job['directory']}")
            if not os.path.exists(wall_path):
                return {"wall_seconds": math.nan, "compile_seconds": math.nan}
            with open(wall_path) as handle:
                return json.load(handle)
    print(f"running {job['key']}: {' '.join(job['overrides'])}", flush=True)
    result = run_experiment(config, progress=False)
    times = {"wall_seconds": result.seconds, "compile_seconds": result.compile_seconds,
             "loop_seconds": result.loop_seconds, "loop_iterations": result.loop_iterations}
    write_json(wall_path, times)
    return times


def mean_se(values) -> dict:
    """Mean, standard error (ddof=1) and count of the finite values."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": math.nan, "se": math.nan, "n": 0}
    se = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "se": se, "n": int(values.size)}
