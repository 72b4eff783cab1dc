"""`bilevel-jax` end to end, through subprocesses on a tiny config: the run directory, resume
after `kill -9` (identical numbers), sharded over 4 host devices vs one device, list, report, and
a refused config (exit 2, nothing written).

The tiny config sweeps a structural key (estimator.name: two compiled programs) and a traced key
(optimizer.learning_rate) over 3 seeds, so each program holds 6 runs (padded to 8 on 4 devices).
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from bilevel_jax import cli
from bilevel_jax.runner import io as rio

ITERATIONS, CHUNK = 120, 3
TINY = {
    "name": "tiny",
    "problem": {"name": "random", "num_states": 6, "num_actions": 3, "dim_x": 3,
                "num_contexts": 2, "num_terminal": 1, "dtype": "float64"},
    "estimator": {"name": "amd", "amd": {"num_sweeps": 4}, "unrolled": {"num_sweeps": 4}},
    "optimizer": {"name": "sgd", "learning_rate": 0.2, "clip_norm": 1.0},
    "iterations": ITERATIONS,
    "chunk_size": CHUNK,
    "seeds": 3,
    "sweep": {"estimator.name": ["amd", "unrolled"], "optimizer.learning_rate": [0.1, 0.3]},
}
RUNS = 2 * 2 * 3


def bilevel_jax(*args, devices=None, cache=None, **kwargs):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_ENABLE_X64") and not k.startswith("JAX_COMPILATION_CACHE")
           and not k.startswith("JAX_PERSISTENT_CACHE")}
    env["JAX_PLATFORMS"] = "cpu"
    if cache:   # JAX's persistent compilation cache: later runs load the reference's programs
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = [sys.executable, "-m", "bilevel_jax.cli", *args]
    if kwargs.pop("popen", False):
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return root, str(path)


@pytest.fixture(scope="module")
def reference(work):
    """One uninterrupted run on one device (with plots)."""
    root, config = work
    out = root / "reference"
    result = bilevel_jax("run", config, "--out", str(out), cache=root / "xla-cache")
    assert result.returncode == 0, result.stderr
    return out, result


def read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def test_run_writes_the_run_directory(reference, work):
    out, result = reference
    assert "4 grid points x 3 seeds = 12 runs" in result.stdout
    assert "2 compiled programs (one per estimator.name)" in result.stdout
    assert "estimator.name  optimizer.learning_rate  F(x0)" in result.stdout
    assert f"Run directory: {out}" in result.stdout
    assert "it/s" in result.stderr and f"{ITERATIONS}/{ITERATIONS}" in result.stderr  # progress bar
    assert sorted(os.listdir(out)) == ["checkpoint.msgpack", "config.yaml", "metrics.csv",
                                       "plots", "summary.json"]   # the lock file is gone
    assert sorted(os.listdir(out / "plots")) == ["follower_residual.png", "grad_norm.png",
                                                 "objective.png", "samples.png"]

    header, rows = read_csv(out / "metrics.csv")
    assert header == ["run", "point", "estimator.name", "optimizer.learning_rate", "seed",
                      "iteration", "objective", "grad_norm", "follower_residual", "samples"]
    assert len(rows) == RUNS * ITERATIONS
    assert rows[0][:6] == ["0", "0", "amd", "0.1", "0", "0"]
    assert rows[-1][:6] == [str(RUNS - 1), "3", "unrolled", "0.3", "2", str(ITERATIONS - 1)]
    values = np.array([[float(v) for v in row[6:]] for row in rows])
    assert np.isfinite(values).all()

    with open(out / "summary.json") as handle:
        summary = json.load(handle)
    assert summary["sweep_keys"] == ["estimator.name", "optimizer.learning_rate"]
    assert [p["values"] for p in summary["points"]] == [
        {"estimator.name": n, "optimizer.learning_rate": lr}
        for n in ("amd", "unrolled") for lr in (0.1, 0.3)]
    objective = values[:, 0].reshape(4, 3, ITERATIONS)
    window = summary["final_window"]
    assert window == 12
    for point, expected in zip(summary["points"], objective[:, :, -window:].mean(axis=2)):
        final = point["final"]["objective"]
        np.testing.assert_allclose(final["per_seed"], expected, rtol=1e-6)  # float32 text
        assert final["mean"] == pytest.approx(expected.mean())
        assert final["se"] == pytest.approx(expected.std(ddof=1) / np.sqrt(3))

    # config.yaml is the fully resolved config: it resolves to itself
    from bilevel_jax.runner.config import load_config
    resolved = load_config(str(out / "config.yaml"))
    assert resolved["optimizer"]["momentum"] == 0.0 and resolved["seeds"] == [0, 1, 2]
    assert resolved["output"]["dir"] == str(out)

    pandas = pytest.importorskip("pandas")
    frame = pandas.read_csv(out / "metrics.csv")
    assert frame.shape == (RUNS * ITERATIONS, len(header))


def test_resume_after_kill_equals_uninterrupted_run(reference, work, capsys):
    root, config = work
    out = root / "killed"
    process = bilevel_jax("run", config, "--out", str(out), popen=True, cache=root / "xla-cache")
    checkpoint = out / rio.CHECKPOINT
    done = 0
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if checkpoint.exists():
            done = rio.load_checkpoint(str(out))["done"]
            if done >= CHUNK:
                break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert CHUNK <= done < ITERATIONS
    assert not (out / "metrics.csv").exists()

    result = bilevel_jax("run", config, "--out", str(out), "--resume", "--no-progress",
                         cache=root / "xla-cache")
    assert result.returncode == 0, result.stderr
    assert "compiling" in result.stdout and "replacing" not in result.stdout
    ref_dir, _ = reference
    for name in ("metrics.csv", "summary.json"):
        assert (out / name).read_bytes() == (ref_dir / name).read_bytes(), name

    # resuming a finished run (in-process) only rewrites the results
    os.unlink(out / "metrics.csv")
    assert cli.main(["run", config, "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "the checkpoint holds all 120 iterations" in capsys.readouterr().out
    assert (out / "metrics.csv").read_bytes() == (ref_dir / "metrics.csv").read_bytes()


def test_sharded_over_4_devices_equals_one_device(reference, work):
    root, config = work
    out = root / "sharded"
    result = bilevel_jax("run", config, "--out", str(out), "--no-progress",
                         "--set", "output.plots=false", devices=4)
    assert result.returncode == 0, result.stderr
    assert "4 devices" in result.stdout
    ref_dir, _ = reference
    header, ref_rows = read_csv(ref_dir / "metrics.csv")
    header_s, rows = read_csv(out / "metrics.csv")
    assert header_s == header
    assert [r[:6] for r in rows] == [r[:6] for r in ref_rows]
    # XLA vectorizes a batch of 6 runs and of 2 runs per device differently, so the float64
    # states differ in the last bits (~1e-13 after 120 iterations); the metrics are float32, so
    # they agree to a float32 rounding at most (in practice, bit for bit).
    np.testing.assert_allclose(np.array([[float(v) for v in r[6:]] for r in rows]),
                               np.array([[float(v) for v in r[6:]] for r in ref_rows]),
                               rtol=1e-6, atol=1e-9)


def test_report_compares_runs(reference, work, capsys):
    root, _ = work
    ref_dir, _ = reference
    other = root / "other"
    shutil.copytree(ref_dir, other, dirs_exist_ok=True)
    out = root / "report"
    assert cli.main(["report", str(ref_dir), str(other), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].split() == ["run", "estimator.name", "optimizer.learning_rate", "F(x0)",
                                "objective", "grad_norm", "follower_residual", "samples/it"]
    assert len(lines[2:10]) == 8 and lines[2].split()[:3] == ["reference", "amd", "0.1"]
    assert lines[9].split()[:3] == ["other", "unrolled", "0.3"]
    assert "mean and standard error" in printed
    assert sorted(os.listdir(out)) == ["follower_residual.png", "grad_norm.png",
                                       "objective.png", "samples.png", "table.txt"]
    assert cli.main(["report", str(ref_dir), "--out", str(out), "--metric", "nope"]) == 2


def test_list_and_refused_config(work):
    root, _ = work
    result = bilevel_jax("list")
    assert result.returncode == 0, result.stderr
    for word in ("random", "exact", "hpgd", "amd", "zero_order", "ascent", "pbrl",
                 "configs/quickstart.yaml", "configs/pbrl_random.yaml"):
        assert word in result.stdout
    bad = root / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(TINY, optimizer={"learning_rate": 0.1, "clip": 1})))
    out = root / "refused"
    result = bilevel_jax("run", str(bad), "--out", str(out))
    assert result.returncode == 2
    assert "optimizer.clip: unknown key; expected one of" in result.stderr
    assert not out.exists()
