"""Sharded sweeps: time per iteration of one fixed sweep on 1, 2 and 4 forced host devices.

    python benchmarks/scaling.py [--quick] [--json PATH]

The sweep (exact and HPGD on the quickstart's random 20-state MDP, 3 learning rates x 4 seeds:
two compiled programs of 12 runs) is built as `run_experiment` builds it, each program's runs
split over the devices (`batched_fns(..., mesh)`: `shard_map` of the vmapped chunk). Each device
count runs in its own subprocess, since XLA fixes the host device count when jax starts. The
figure is the sweep's milliseconds per iteration (both programs, the best of timed chunks after
one warm-up chunk) and `sharded_speedup_N` = t(1 device) / t(N devices).

On a CPU with C cores the ideal speedup is min(N, C): on 2 cores about 2x for 2 devices (target
>= 1.6x) and no better for 4 (target: not slower than 2). Other processes on the machine take
cores too; the environment's load average is recorded with the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

DEVICE_COUNTS = (1, 2, 4)
TARGETS = {"sharded_speedup_2": 1.6}
SWEEP = {
    "name": "scaling",
    "problem": {"name": "random", "seed": 0, "num_states": 20, "num_actions": 4, "dim_x": 8,
                "num_contexts": 2, "num_terminal": 1, "discount": 0.9, "temperature": 0.1},
    "estimator": {"name": "exact", "hpgd": {"num_envs": 16, "num_steps": 100}},
    "optimizer": {"name": "sgd", "learning_rate": 0.2, "clip_norm": 1.0},
    "seeds": 4,
    "sweep": {"estimator.name": ["exact", "hpgd"], "optimizer.learning_rate": [0.05, 0.1, 0.2]},
}


def worker(iters: int, repeats: int) -> None:
    """In a subprocess with the device count forced: prints `{program: ms per iteration}`."""
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
        for _ in range(repeats):
            start = time.perf_counter()
            state, _ = jax.block_until_ready(compiled(hparams, state))
            best = min(best, time.perf_counter() - start)
        times[group.structural["estimator.name"]] = 1e3 * best / iters
    print("RESULT " + json.dumps({"devices": jax.device_count(), "ms_per_iter": times}))


def measure(devices: int, iters: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
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


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    iters, repeats = (10, 3) if args.quick else (50, 5)
    env = common.environment()
    load = os.getloadavg()
    print(f"jax {env['jax']} on {env['device']} ({env['cpu_count']} CPU cores), load average "
          f"{load[0]:.2f}" + (" [quick]" if args.quick else ""))
    per_count = {n: measure(n, iters, repeats) for n in DEVICE_COUNTS}
    total = {n: sum(times.values()) for n, times in per_count.items()}
    results = {"environment": env, "quick": args.quick, "iterations_per_chunk": iters,
               "repeats": repeats, "load_average_before": load[0],
               "load_average_after": os.getloadavg()[0],
               "runs": 2 * 3 * SWEEP["seeds"], "ms_per_iter": {str(n): total[n] for n in total},
               "ms_per_iter_by_program": {str(n): per_count[n] for n in per_count}}
    for n in DEVICE_COUNTS[1:]:
        results[f"sharded_speedup_{n}"] = total[1] / total[n]
        for program in per_count[1]:
            results[f"sharded_speedup_{n}_{program}"] = per_count[1][program] / per_count[n][program]
    results["targets"] = {**TARGETS, "four_not_slower_than_two": True}
    results["targets_met"] = (results["sharded_speedup_2"] >= TARGETS["sharded_speedup_2"]
                              and total[4] <= total[2])

    rows = [(f"ms/it, {n} device{'s' if n > 1 else ''}", f"{total[n]:.3f}",
             ", ".join(f"{p} {t:.3f}" for p, t in per_count[n].items())) for n in DEVICE_COUNTS]
    rows += [("sharded_speedup_2", f"{results['sharded_speedup_2']:.2f}x",
              f"target >= {TARGETS['sharded_speedup_2']}x (ideal ~2x on 2 cores)"),
             ("sharded_speedup_4", f"{results['sharded_speedup_4']:.2f}x",
              "target: not slower than 2 devices (>= sharded_speedup_2 up to noise)"),
             ("targets met", str(results["targets_met"]),
              f"load average {results['load_average_before']:.2f} -> "
              f"{results['load_average_after']:.2f}")]
    common.print_table(f"sweep of {results['runs']} runs (exact and hpgd, 12 runs each), "
                       "milliseconds per iteration, compilation excluded", rows)
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
