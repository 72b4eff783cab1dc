"""Scaling out: each device computes only its own runs, and a sweep splits over processes.

* 2 forced host devices (a subprocess: the device count is fixed when jax starts): the compiled
  init and chunk of an exact and an HPGD program hold no collective, every parameter and result
  is one device's slice of the runs, and the numbers equal the 1-device program's.
* 2 processes on CPU (`bilevel-jax run --distributed`, gloo), an HPGD sweep: the metrics equal
  those of one process, and only process 0 writes.

The tiny sweep is float64, so the per-device batches (half the runs) agree with the whole batch
to the last bits of float64 at worst; metrics are written as float32.
"""

import csv
import io
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "name": "tiny",
    "problem": {"name": "random", "num_states": 6, "num_actions": 3, "dim_x": 3,
                "num_contexts": 2, "num_terminal": 1, "dtype": "float64"},
    "estimator": {"name": "exact", "hpgd": {"num_envs": 4, "num_steps": 12}},
    # Not tracking F(x) every iteration saves compile time; the exact estimator's own dense
    # solves (the CPU `lax.map` the partitioner could not split) are still there.
    "algorithm": {"name": "ascent", "track_objective": False},
    "optimizer": {"name": "sgd", "learning_rate": 0.2, "clip_norm": 1.0},
    "iterations": 6,
    "chunk_size": 3,
    "seeds": 3,
    "sweep": {"estimator.name": ["exact", "hpgd"], "optimizer.learning_rate": [0.1, 0.3]},
    "output": {"plots": False},
}

COLLECTIVES = r"\b(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)"

SHARDED_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from bilevel_jax.algorithms import batched_fns, padded_size, run_mesh, runs_to_host, shard_runs
    from bilevel_jax.runner import run as R
    from bilevel_jax.runner.config import resolve_config

    assert jax.device_count() == 2, jax.devices()
    config = resolve_config(json.loads(sys.argv[1]))
    points, groups, _, _ = R.make_groups(config)
    mesh = run_mesh()
    for group in groups:
        R._prepare_inputs(config, points, group)
        build = R.make_build(group.template, group.problem, group.hparam_keys)
        results = []
        for m in (None, mesh):
            n = padded_size(len(group.runs), m)
            init, chunk = batched_fns(build, config["chunk_size"], m)
            hp = shard_runs({k: R._pad(v, n) for k, v in group.hparams.items()}, m)
            x0 = shard_runs(jax.tree_util.tree_map(lambda a: R._pad(a, n), group.x0), m)
            keys = shard_runs(jax.vmap(jax.random.key)(jnp.asarray(R._pad(group.seeds, n))), m)
            init_c = init.lower(hp, x0, keys).compile()
            state = init_c(hp, x0, keys)
            chunk_c = chunk.lower(hp, state).compile()
            if m is not None:
                for name, compiled in (("init", init_c), ("chunk", chunk_c)):
                    hlo = compiled.as_text()
                    found = sorted(set(re.findall(sys.argv[2], hlo)))
                    assert not found, (group.structural, name, found)
                    # The entry computation is one device's program: every parameter and
                    # result has n / 2 runs, never the whole batch.
                    entry = next(l for l in hlo.splitlines() if l.startswith("ENTRY"))
                    dims = [int(s.split(",")[0]) for s in re.findall(r"\\w+\\[([\\d,]+)\\]", entry)]
                    assert dims and set(dims) == {n // 2}, (group.structural, name, entry[:500])
            assert len(state["x"].sharding.device_set) == (1 if m is None else 2)
            metrics = []
            for _ in range(2):
                state, chunk_metrics = chunk_c(hp, state)
                metrics.append(runs_to_host(chunk_metrics))
            results.append((runs_to_host(state), metrics))
        (state_1, metrics_1), (state_2, metrics_2) = results
        runs = len(group.runs)
        for a, b in zip(jax.tree_util.tree_leaves((state_1, metrics_1)),
                        jax.tree_util.tree_leaves((state_2, metrics_2))):
            np.testing.assert_allclose(np.asarray(a)[:runs], np.asarray(b)[:runs],
                                       rtol=1e-12, atol=1e-13)
    print("SHARDED_OK")
""")


def cpu_env(devices: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_ENABLE_X64") and not k.startswith("JAX_COMPILATION_CACHE")
           and not k.startswith("JAX_PERSISTENT_CACHE")}
    env["JAX_PLATFORMS"] = "cpu"
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def test_two_devices_compute_only_their_own_runs_and_match_one_device():
    import json

    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, json.dumps(TINY), COLLECTIVES],
                         env=cpu_env(devices=2), capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED_OK" in out.stdout


def read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def metric_values(rows, first: int) -> np.ndarray:
    """The metric columns as floats (an empty cell, e.g. the untracked objective, is NaN)."""
    return np.array([[float(v) if v else np.nan for v in r[first:]] for r in rows])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one_process_and_only_process_0_writes(tmp_path):
    from bilevel_jax.runner.config import load_config
    from bilevel_jax.runner.run import run_experiment

    # One program (HPGD: per-run PRNG keys, split over the processes with the runs).
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "estimator": {**TINY["estimator"], "name": "hpgd"},
                                    "sweep": {"optimizer.learning_rate": [0.1, 0.3]}}))
    address = f"127.0.0.1:{free_port()}"
    # Process 1 is given its own --out: it must stay unwritten (process 0 writes the results).
    outs = [tmp_path / "distributed", tmp_path / "process-1"]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "bilevel_jax.cli", "run", str(path), "--out", str(outs[i]),
         "--no-progress", "--distributed", "--coordinator", address, "--num-processes", "2",
         "--process-id", str(i)],
        env=cpu_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]

    # The 1-process reference runs here meanwhile (its compilation overlaps theirs).
    config = load_config(str(path))
    config["output"]["dir"] = str(tmp_path / "reference")
    run_experiment(config, progress=False, stream=io.StringIO())

    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=240)
            results.append((proc.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process run did not finish in 240 s")
    finally:
        for proc in procs:   # never leave a process waiting on its peer
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for code, stdout, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "6 runs" in results[0][1] and "2 devices" in results[0][1]
    assert "Run directory" not in results[1][1]
    assert not outs[1].exists()

    header, ref_rows = read_csv(tmp_path / "reference" / "metrics.csv")
    header_d, rows = read_csv(outs[0] / "metrics.csv")
    assert header_d == header and len(rows) == 2 * 3 * 6
    first = header.index("iteration") + 1
    assert [r[:first] for r in rows] == [r[:first] for r in ref_rows]
    # float64 states of 3 runs per device vs 6 on one device: the same to the last bits (only
    # the ~1e-12 follower residuals may differ there).
    values, ref_values = metric_values(rows, first), metric_values(ref_rows, first)
    assert np.isfinite(values[:, header[first:].index("grad_norm")]).all()
    np.testing.assert_allclose(values, ref_values, rtol=1e-6, atol=1e-12)
    assert sorted(os.listdir(outs[0])) == sorted(os.listdir(tmp_path / "reference"))


def test_distributed_flags_need_distributed(tmp_path, capsys):
    from bilevel_jax import cli

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    assert cli.main(["run", str(path), "--out", str(out), "--num-processes", "2"]) == 2
    assert "--num-processes: only with --distributed" in capsys.readouterr().err
    assert not out.exists()
