"""Sharded sweeps: time per iteration of one fixed sweep on 1, 2 and 4 forced host devices.

    python benchmarks/scaling.py [--quick] [--json PATH]

The sweep: exact and HPGD (16 x 100 sampled transitions per step) on the quickstart's random
20-state MDP, 64 seeds each with a perturbed x0 (`x0_noise`): two compiled programs of 64 runs,
built as `run_experiment` builds them, each program's runs split over the devices
(`batched_fns(..., mesh)`: `shard_map` of the vmapped chunk). Each device count runs in its own
subprocess, since XLA fixes the host device count when jax starts. The figure is the sweep's
milliseconds per iteration (both programs; the best of many timed chunks after a warm-up chunk)
and `sharded_speedup_N` = t(1 device) / t(N devices). Extra `XLA_FLAGS` of the caller apply to
every device count.

On a CPU with C cores the ideal speedup is min(N, C): on 2 cores about 2x for 2 devices (target
>= 1.6x) and no better for 4 (target: not slower than 2). Why this sweep:
- A device's program costs about its number of runs only from about 8 runs up (measured on one
  core: HPGD 11.1, 5.1, 2.7, 1.4 ms per iteration for 64, 32, 16, 8 runs, but 6 runs cost as
  much as 8, and 16 runs 2.6 ms against 1.7 for 6): with a few runs per device each device's
  fixed cost per iteration dominates, and 4 devices on 2 cores are slower than 2.
- A vmapped solver loop runs as long as its slowest run, so the runs are seeds, which converge
  alike; a device holding all the large learning rates would set the pace.
The machines are shared: every device count is measured in 3 rounds (2 with --quick),
alternating, and the best is kept; the cores other processes kept busy meanwhile are recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

DEVICE_COUNTS = (1, 2, 4)
TARGETS = {"sharded_speedup_2": 1.6}
# 4 devices on 2 cores "not slower than 2": within the run-to-run noise of the figures on this
# shared machine (about 4% between two runs of the 2-device figure).
NOISE = 0.05
SWEEP = {
    "name": "scaling",
    "problem": {"name": "random", "seed": 0, "num_states": 20, "num_actions": 4, "dim_x": 8,
                "num_contexts": 2, "num_terminal": 1, "discount": 0.9, "temperature": 0.1},
    "estimator": {"name": "exact", "hpgd": {"num_envs": 16, "num_steps": 100}},
    "optimizer": {"name": "sgd", "learning_rate": 0.2, "clip_norm": 1.0},
    "seeds": 64,
    "x0_noise": 0.1,
    "sweep": {"estimator.name": ["exact", "hpgd"]},
}


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds of this process) so far (Linux)."""
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except OSError:
        return float("nan"), own
    idle = fields[3] + fields[4]   # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own


def worker(iters: int, repeats: int) -> None:
    """In a subprocess with the device count forced: prints, per program, the best ms per
    iteration and the cores other processes kept busy meanwhile (on average over the timing)."""
    import jax
    import jax.numpy as jnp

    from bilevel_jax.algorithms import batched_fns, padded_size, run_mesh, shard_runs
    from bilevel_jax.runner import run as runner
    from bilevel_jax.runner.config import resolve_config

    config = resolve_config({**SWEEP, "iterations": iters, "chunk_size": iters})
    points, groups, _, _ = runner.make_groups(config)
    mesh = run_mesh() if jax.device_count() > 1 else None
    times = {}
    for group in groups:
        runner._prepare_inputs(config, points, group)
        size = padded_size(len(group.runs), mesh)
        build = runner.make_build(group.template, group.problem, group.hparam_keys)
        init, chunk = batched_fns(build, iters, mesh)
        hparams = shard_runs({k: runner._pad(v, size) for k, v in group.hparams.items()}, mesh)
        x0 = shard_runs(jax.tree_util.tree_map(lambda a: runner._pad(a, size), group.x0), mesh)
        keys = shard_runs(jax.vmap(jax.random.key)(jnp.asarray(runner._pad(group.seeds, size))),
                          mesh)
        state = init(hparams, x0, keys)
        compiled = chunk.lower(hparams, state).compile()
        state, _ = jax.block_until_ready(compiled(hparams, state))   # warm follower states
        best = float("inf")
        busy, own = cpu_seconds()
        begin = time.perf_counter()
        for _ in range(repeats):
            start = time.perf_counter()
            state, _ = jax.block_until_ready(compiled(hparams, state))
            best = min(best, time.perf_counter() - start)
        busy_after, own_after = cpu_seconds()
        others = (busy_after - busy - (own_after - own)) / (time.perf_counter() - begin)
        times[group.structural["estimator.name"]] = (1e3 * best / iters, max(others, 0.0))
    print("RESULT " + json.dumps({"devices": jax.device_count(), "ms_per_iter": times}))


def extra_xla_flags() -> list[str]:
    """The caller's `XLA_FLAGS` but its device count: they apply to every device count alike."""
    return [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]


def measure(devices: int, iters: int, repeats: int, cache: str) -> dict:
    """`{program: (best ms per iteration, cores other processes used)}` from a worker with
    `devices` forced host devices."""
    env = dict(os.environ)
    # Later rounds load the programs from JAX's persistent cache instead of compiling again.
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
                   [*extra_xla_flags(), f"--xla_force_host_platform_device_count={devices}"]),
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import scaling; "
            f"scaling.worker({iters}, {repeats})")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{devices} devices: the worker failed:\n{out.stderr[-3000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["devices"] == devices, result
    return result["ms_per_iter"]


def best_of_rounds(rounds: int, iters: int, repeats: int) -> tuple[dict, dict]:
    """`{devices: {program: best ms per iteration}}` and, for the round that gave it, the cores
    other processes used meanwhile; the device counts alternate, round after round."""
    best: dict = {}
    others: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(rounds):
            for n in DEVICE_COUNTS:
                for program, (ms, busy) in measure(n, iters, repeats, cache).items():
                    if ms < best.get(n, {}).get(program, float("inf")):
                        best.setdefault(n, {})[program] = ms
                        others.setdefault(n, {})[program] = busy
    return best, others


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    # Many short timed chunks: the best of them is one the other processes left alone.
    iters, repeats, rounds = (10, 30, 2) if args.quick else (20, 40, 3)
    env = common.environment()
    load = os.getloadavg()
    print(f"jax {env['jax']} on {env['device']} ({env['cpu_count']} CPU cores), load average "
          f"{load[0]:.2f}" + (" [quick]" if args.quick else ""))
    per_count, others = best_of_rounds(rounds, iters, repeats)
    total = {n: sum(times.values()) for n, times in per_count.items()}
    results = {"environment": env, "quick": args.quick, "iterations_per_chunk": iters,
               "repeats": repeats, "rounds": rounds, "xla_flags": extra_xla_flags(),
               "load_average_before": load[0],
               "load_average_after": os.getloadavg()[0],
               "runs": 2 * SWEEP["seeds"], "ms_per_iter": {str(n): total[n] for n in total},
               "ms_per_iter_by_program": {str(n): per_count[n] for n in per_count},
               "other_processes_cores": {str(n): others[n] for n in others}}
    for n in DEVICE_COUNTS[1:]:
        results[f"sharded_speedup_{n}"] = total[1] / total[n]
        for program, ms in per_count[1].items():
            results[f"sharded_speedup_{n}_{program}"] = ms / per_count[n][program]
    results["four_over_two_ms"] = total[4] / total[2]
    results["targets"] = {**TARGETS, "four_over_two_ms_at_most": 1 + NOISE}
    results["targets_met"] = (results["sharded_speedup_2"] >= TARGETS["sharded_speedup_2"]
                              and results["four_over_two_ms"] <= 1 + NOISE)

    rows = [(f"ms/it, {n} device{'s' if n > 1 else ''}", f"{total[n]:.3f}",
             ", ".join(f"{p} {t:.3f}" for p, t in per_count[n].items())
             + "; other processes: " + ", ".join(f"{c:.1f}" for c in others[n].values())
             + f" of {env['cpu_count']} cores") for n in DEVICE_COUNTS]
    rows += [("sharded_speedup_2", f"{results['sharded_speedup_2']:.2f}x",
              f"target >= {TARGETS['sharded_speedup_2']}x (ideal ~2x on 2 cores)"),
             ("sharded_speedup_4", f"{results['sharded_speedup_4']:.2f}x",
              f"target: not slower than 2 devices (t4 / t2 = {results['four_over_two_ms']:.3f}, "
              f"at most {1 + NOISE:.2f}: the noise)"),
             ("targets met", str(results["targets_met"]),
              f"load average {results['load_average_before']:.2f} -> "
              f"{results['load_average_after']:.2f}")]
    common.print_table(f"sweep of {results['runs']} runs (exact and hpgd, {SWEEP['seeds']} each), "
                       "milliseconds per iteration, compilation excluded", rows)
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
