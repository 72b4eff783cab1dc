"""The run directory and bad input (issue 16, sections 3 and 4).

* Bad input, table-driven: each case is (input, expected exit code, expected words) and must
  leave every file as it was (nothing written), with no traceback.
* The run directory: the lock (a second process refused with the holder's pid, a stale lock
  taken over), only the runner's own temp files cleaned, the data-only checkpoint (a planted
  pickle refused without running it, truncated, foreign, mis-shaped, another device count),
  SIGTERM -> exit 130 with the checkpoint kept, and resume giving the uninterrupted numbers.
* The Python API: eager `soft_value_iteration` and `hypergradient` validate values unless
  `validate=False`; traced calls check shapes only.

Runs are tiny (3 states, a handful of iterations) and in-process through `cli.main`, except
the one that is a second process (the lock and SIGTERM).
"""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import bilevel_jax as bj
from bilevel_jax import cli
from bilevel_jax.runner import io as rio
from bilevel_jax.runner.config import load_config
from bilevel_jax.runner.run import check_resume

ITERATIONS, CHUNK = 6, 2
TINY = {"name": "tiny",
        "problem": {"num_states": 3, "num_actions": 2, "dim_x": 2, "num_contexts": 1},
        "estimator": {"name": "amd", "amd": {"num_sweeps": 2}},
        "iterations": ITERATIONS, "chunk_size": CHUNK, "seeds": 2, "output": {"plots": False}}
SUMMARY = {"name": "r", "config_hash": "0" * 16, "iterations": 2, "seeds": [0],
           "sweep_keys": [], "metrics": ["objective"], "final_window": 1, "statistic": "final",
           "points": [{"point": 0, "values": {}, "label": "run", "runs": [0],
                       "final": {"objective": {"mean": 1.0, "se": None, "per_seed": [1.0]}},
                       "initial": {"objective": 1.0}}]}
METRICS_CSV = "run,point,seed,iteration,objective\n0,0,0,0,1.0\n0,0,0,1,1.0\n"


def write(path, text) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def snapshot(root) -> dict:
    """Every file under `root` with its size and modification time."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            found[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def run_dir(root, name, metrics_csv=METRICS_CSV, summary=SUMMARY) -> str:
    """A finished run directory for `report` (hand-written summary.json and metrics.csv)."""
    write(root / name / "summary.json", summary if isinstance(summary, str) else json.dumps(summary))
    write(root / name / "metrics.csv", metrics_csv)
    return str(root / name)


@pytest.fixture
def work(tmp_path):
    tiny = write(tmp_path / "tiny.yaml", yaml.safe_dump(TINY))
    files = {
        "tiny": tiny,
        "binary": write(tmp_path / "binary.yaml", bytes(range(256)) * 4),
        "nul": write(tmp_path / "nul.yaml", b"iterations: 3\x00\n"),
        "dup": write(tmp_path / "dup.yaml", "iterations: 3\nseeds: 2\niterations: 4\n"),
        "dup_nested": write(tmp_path / "dup_nested.yaml",
                            "problem:\n  num_states: 3\n  num_states: 4\n"),
        "file": write(tmp_path / "notes.txt", "a user's file\n"),
        "out": str(tmp_path / "out"),
        "run": run_dir(tmp_path, "run"),
        "no_column": run_dir(tmp_path, "no_column", "run,point,seed,iteration\n0,0,0,0\n"),
        "text_cell": run_dir(tmp_path, "text_cell", METRICS_CSV + "0,0,0,1,lots\n"),
        "int_cell": run_dir(tmp_path, "int_cell", METRICS_CSV + "0,0,zero,1,1.0\n"),
        "short_row": run_dir(tmp_path, "short_row", METRICS_CSV + "0,0,0\n"),
        "long_row": run_dir(tmp_path, "long_row", METRICS_CSV + "0,0,0,1,1.0,2.0\n"),
        "empty_csv": run_dir(tmp_path, "empty_csv", ""),
        "binary_csv": run_dir(tmp_path, "binary_csv", bytes(range(128, 256))),
        "bad_summary": run_dir(tmp_path, "bad_summary", summary={"name": "r", "seeds": [0]}),
        "summary_not_json": run_dir(tmp_path, "summary_not_json", summary="{points: "),
    }
    return tmp_path, files


# (id, argv from the files, expected exit code, expected words in stderr)
BAD_INPUT = [
    ("binary-config", lambda f: ["run", f["binary"], "--out", f["out"]], 2,
     ["binary.yaml: not a text file", "expected a YAML config"]),
    ("nul-in-config", lambda f: ["run", f["nul"], "--out", f["out"]], 2,
     ["nul.yaml: not valid YAML"]),
    ("seed-negative", lambda f: ["run", f["tiny"], "--out", f["out"], "--set", "problem.seed=-1"],
     2, ["problem.seed: expected an int >= 0, got -1"]),
    ("seeds-beyond-prng-range",
     lambda f: ["run", f["tiny"], "--out", f["out"], "--set", "seeds=[1, 99999999999999999999]"],
     2, ["seeds[1]: expected an int in [-9223372036854775808, 9223372036854775807]",
         "99999999999999999999"]),
    ("seeds-collide-after-32-bit-cut",
     lambda f: ["run", f["tiny"], "--out", f["out"], "--set", "seeds=[0, 4294967296]"], 2,
     ["seeds[1]: 4294967296 has the low 32 bits of seeds[0] = 0", "same PRNG key"]),
    ("seeds-collide-negative",
     lambda f: ["run", f["tiny"], "--out", f["out"], "--set", "seeds=[4294967295, -1]"], 2,
     ["seeds[1]: -1 has the low 32 bits of seeds[0] = 4294967295"]),
    ("seeds-too-many", lambda f: ["run", f["tiny"], "--out", f["out"], "--set", "seeds=10000000000"],
     2, ["seeds: expected at most 100000 seeds"]),
    ("states-beyond-memory",
     lambda f: ["run", f["tiny"], "--out", f["out"], "--set", "problem.num_states=200000"], 2,
     ["problem.num_states: 200000 states x 2 actions need about", "GiB, more than this "
      "machine's", "of memory"]),
    ("duplicate-yaml-key", lambda f: ["run", f["dup"], "--out", f["out"]], 2,
     ["dup.yaml: line 3: duplicate key 'iterations' (first given at line 1)"]),
    ("duplicate-nested-yaml-key", lambda f: ["run", f["dup_nested"], "--out", f["out"]], 2,
     ["dup_nested.yaml: line 3: duplicate key 'num_states'"]),
    ("duplicate-key-in-set",
     lambda f: ["run", f["tiny"], "--out", f["out"], "--set", "problem={seed: 1, seed: 2}"], 2,
     ["--set problem={seed: 1, seed: 2}: line 1: duplicate key 'seed'"]),
    ("out-empty", lambda f: ["run", f["tiny"], "--out", ""], 2,
     ["--out: expected a directory path, got an empty string"]),
    ("output-dir-empty", lambda f: ["run", f["tiny"], "--set", "output.dir=''"], 2,
     ["output.dir: expected a directory path or null, got an empty string"]),
    ("out-is-a-file", lambda f: ["run", f["tiny"], "--out", f["file"]], 2,
     ["output.dir: expected a directory, got the file"]),
    ("out-under-a-file", lambda f: ["run", f["tiny"], "--out", os.path.join(f["file"], "run")],
     2, ["output.dir: cannot create the run directory", "Not a directory"]),
    ("out-unwritable", lambda f: ["run", f["tiny"], "--out", "/proc/bilevel-jax-run"], 2,
     ["output.dir: cannot create the run directory '/proc/bilevel-jax-run'"]),
    ("output-dir-unwritable",
     lambda f: ["run", f["tiny"], "--set", "output.dir=/proc/bilevel-jax-run"], 2,
     ["output.dir: cannot create the run directory '/proc/bilevel-jax-run'"]),
    ("report-out-is-a-file", lambda f: ["report", f["run"], "--out", f["file"]], 2,
     ["--out: expected a directory, got the file"]),
    ("report-out-empty", lambda f: ["report", f["run"], "--out", ""], 2,
     ["--out: expected a directory path, got an empty string"]),
    ("report-out-unwritable", lambda f: ["report", f["run"], "--out", "/proc/bilevel-jax-rep"],
     2, ["--out: cannot create the directory '/proc/bilevel-jax-rep'"]),
    ("report-missing-column", lambda f: ["report", f["no_column"]], 2,
     ["metrics.csv: missing columns ['objective']"]),
    ("report-text-cell", lambda f: ["report", f["text_cell"]], 2,
     ["metrics.csv: line 4: column 'objective': expected a number or empty, got 'lots'"]),
    ("report-int-cell", lambda f: ["report", f["int_cell"]], 2,
     ["metrics.csv: line 4: column 'seed': expected an int, got 'zero'"]),
    ("report-short-row", lambda f: ["report", f["short_row"]], 2,
     ["metrics.csv: line 4: expected 5 cells"]),
    ("report-long-row", lambda f: ["report", f["long_row"]], 2,
     ["metrics.csv: line 4: expected 5 cells"]),
    ("report-empty-csv", lambda f: ["report", f["empty_csv"]], 2,
     ["metrics.csv: missing columns"]),
    ("report-binary-csv", lambda f: ["report", f["binary_csv"]], 2,
     ["metrics.csv: cannot read"]),
    ("report-bad-summary", lambda f: ["report", f["bad_summary"]], 2,
     ["summary.json: iterations: expected an int, got NoneType"]),
    ("report-summary-not-json", lambda f: ["report", f["summary_not_json"]], 2,
     ["summary.json: cannot read"]),
]


@pytest.mark.parametrize("argv, code, words", [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_refused_and_writes_nothing(work, capsys, argv, code, words):
    root, files = work
    before = snapshot(root)
    assert cli.main(argv(files)) == code
    err = capsys.readouterr().err
    assert err.startswith("bilevel-jax: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert snapshot(root) == before
    assert not os.path.exists(files["out"]) and not os.path.exists("/proc/bilevel-jax-run")


def test_merge_keys_are_not_duplicates(tmp_path):
    path = write(tmp_path / "merge.yaml", "base: &b {learning_rate: 0.3}\n")
    from bilevel_jax.runner.config import load_yaml
    assert load_yaml(open(path).read() + "optimizer:\n  <<: *b\n  learning_rate: 0.2\n") == {
        "base": {"learning_rate": 0.3}, "optimizer": {"learning_rate": 0.2}}


# --------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------

def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted in-process run, started over a stale lock and stray temp files."""
    root = tmp_path_factory.mktemp("hardening")
    config = write(root / "tiny.yaml", yaml.safe_dump(TINY))
    out = root / "reference"
    stale = dead_pid()
    write(out / rio.LOCK, f"{stale}\n")
    own = [".metrics.csv.ab12cd34.tmp", f".{rio.CHECKPOINT}.zz_99xy0.tmp"]
    users = [".notes.txt.ab12cd34.tmp", ".mine.tmp", "notes.txt"]
    for name in own + users:
        write(out / name, "x")
    import io
    from contextlib import redirect_stdout
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert cli.main(["run", config, "--out", str(out), "--no-progress"]) == 0
    return root, config, out, printed.getvalue(), stale, own, users


def test_stale_lock_is_taken_over_and_released(reference):
    _, _, out, printed, stale, _, _ = reference
    assert f"taking over the stale lock of pid {stale} (no longer running)" in printed
    assert not (out / rio.LOCK).exists()


def test_startup_cleanup_removes_only_the_runners_temp_files(reference):
    _, _, out, _, _, own, users = reference
    assert not any((out / name).exists() for name in own)
    assert all((out / name).exists() for name in users)


def test_temp_file_patterns():
    assert rio.is_temp_file_of(".metrics.csv.a1b2c3d4.tmp", "metrics.csv")
    assert rio.is_temp_file_of(".objective.png.a1b2c3d_.tmp", "*.png")
    assert not rio.is_temp_file_of(".metrics.csv.tmp", "metrics.csv")
    assert not rio.is_temp_file_of(".metrics.csv.a1b2c3d4.tmp", "summary.json")
    assert not rio.is_temp_file_of(".notes.txt.a1b2c3d4.tmp", "*.png")


def test_lock_in_one_process_refuses_a_second_holder(tmp_path):
    with rio.RunLock(str(tmp_path / "run")):
        assert (tmp_path / "run" / rio.LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(rio.RunDirectoryError, match=f"in use by another bilevel-jax run "
                                                        f"\\(pid {os.getpid()}"):
            rio.RunLock(str(tmp_path / "run")).acquire()
    assert not (tmp_path / "run" / rio.LOCK).exists()
    with rio.RunLock(str(tmp_path / "run")) as again:   # released: free again
        assert again.stale_pid is None


class Planted:
    """Unpickling this creates `path`: a checkpoint that is loaded with pickle runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _reencoded(out, **changes) -> bytes:
    payload = rio.load_checkpoint(str(out))
    payload.pop("format")
    for key, change in changes.items():
        payload[key] = change(payload[key])
    return rio.encode_checkpoint(payload)


def _reshaped(groups):
    state = groups[0]["state"]
    index = max(range(len(state)), key=lambda i: state[i].ndim)   # a [runs, ...] float leaf
    state[index] = np.concatenate([state[index], state[index][:, -1:]], axis=-1)
    return groups


# (id, the checkpoint's bytes from the reference run directory and the marker path,
#  file name, expected words)
BAD_CHECKPOINTS = [
    ("planted-pickle", lambda out, marker: pickle.dumps({"done": 2, "x": Planted(marker)}),
     rio.CHECKPOINT, ["not a bilevel_jax checkpoint (a pickle, which is never loaded)"]),
    ("legacy-pickle-file", lambda out, marker: pickle.dumps(Planted(marker)), "checkpoint.pkl",
     ["checkpoint.pkl: a pickle checkpoint of an older bilevel_jax; pickles are never loaded"]),
    ("truncated", lambda out, marker: (out / rio.CHECKPOINT).read_bytes()[:-40], rio.CHECKPOINT,
     ["truncated or corrupted"]),
    ("header-only", lambda out, marker: (out / rio.CHECKPOINT).read_bytes()[:30], rio.CHECKPOINT,
     ["truncated or corrupted"]),
    ("random-bytes", lambda out, marker: np.random.default_rng(0).bytes(4096), rio.CHECKPOINT,
     ["not a bilevel_jax checkpoint (another format)"]),
    ("empty", lambda out, marker: b"", rio.CHECKPOINT, ["not a bilevel_jax checkpoint"]),
    ("not-a-mapping", lambda out, marker: rio._MAGIC + _digest_body(b"\x93\x01\x02\x03"),
     rio.CHECKPOINT, ["expected a mapping with the keys"]),
    ("done-not-an-int", lambda out, marker: _reencoded(out, done=lambda d: "two"),
     rio.CHECKPOINT, ["done: expected an int >= 0, got 'two'"]),
    ("mis-shaped-state", lambda out, marker: _reencoded(out, groups=_reshaped), rio.CHECKPOINT,
     ["--resume: the checkpoint's state[", "this config's algorithm expects"]),
    ("fewer-runs", lambda out, marker: _reencoded(out, groups=lambda g: [dict(
        g[0], state=[leaf[:1] for leaf in g[0]["state"]])]), rio.CHECKPOINT,
     ["does not fit this config (groups[0].state[0] has 1 runs, expected 2)"]),
    ("other-device-count", lambda out, marker: _reencoded(out, devices=lambda d: d + 3),
     rio.CHECKPOINT, ["device(s) in 1 process(es), this run has", "resume with the same devices",
                      "xla_force_host_platform_device_count="]),
    ("other-config", lambda out, marker: _reencoded(out, config_hash=lambda h: "f" * 16),
     rio.CHECKPOINT, ["was written by a different config"]),
]


def _digest_body(body: bytes) -> bytes:
    import hashlib
    return hashlib.sha256(body).digest() + body


@pytest.mark.parametrize("make, name, words", [case[1:] for case in BAD_CHECKPOINTS],
                         ids=[case[0] for case in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_refused_without_running_it(reference, tmp_path, capsys, make, name,
                                                      words):
    _, config, ref_out, _, _, _, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    marker = str(tmp_path / "pickle-ran")
    data = make(out, marker)
    if name != rio.CHECKPOINT:
        os.unlink(out / rio.CHECKPOINT)
    write(out / name, data)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli.main(["run", config, "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bilevel-jax: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert not os.path.exists(marker)
    assert snapshot(tmp_path) == before


def test_checkpoint_round_trip_and_sigterm_resume_equals_uninterrupted_run(reference, tmp_path,
                                                                           monkeypatch, capsys):
    """SIGTERM after the first chunk's checkpoint: exit 130, the checkpoint kept; --resume
    says where it continues and ends with the uninterrupted run's bytes."""
    _, config, ref_out, _, _, _, _ = reference
    out = tmp_path / "run"
    save = rio.save_checkpoint

    def save_then_sigterm(directory, payload):
        save(directory, payload)
        if payload["done"] == CHUNK:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)      # the handler raises here

    monkeypatch.setattr(rio, "save_checkpoint", save_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(["run", config, "--out", str(out), "--no-progress"]) == 130
    assert "terminated (SIGTERM); continue with --resume" in capsys.readouterr().err
    monkeypatch.setattr(rio, "save_checkpoint", save)
    assert signal.getsignal(signal.SIGTERM) is handler   # the run's handler is gone
    checkpoint = rio.load_checkpoint(str(out))
    assert checkpoint["done"] == CHUNK and not (out / "metrics.csv").exists()
    assert not (out / rio.LOCK).exists()

    reference_checkpoint = rio.load_checkpoint(str(ref_out))
    again = rio.decode_checkpoint(rio.encode_checkpoint(
        {k: v for k, v in reference_checkpoint.items() if k != "format"}))
    for saved, loaded in zip(reference_checkpoint["groups"], again["groups"]):
        for a, b in zip(saved["state"], loaded["state"]):
            assert a.dtype == b.dtype and np.array_equal(a, b)

    assert cli.main(["run", config, "--out", str(out), "--resume", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"--resume: continuing from iteration {CHUNK} of {ITERATIONS}" in printed
    for name in ("metrics.csv", "summary.json"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name


def test_resume_without_checkpoint_says_so_and_starts_over(tmp_path, capsys):
    config = write(tmp_path / "one.yaml", yaml.safe_dump(dict(TINY, iterations=2, seeds=1)))
    assert cli.main(["run", config, "--out", str(tmp_path / "run"), "--resume",
                     "--no-progress"]) == 0
    assert f"--resume: no checkpoint in {tmp_path / 'run'}; starting from iteration 0" in (
        capsys.readouterr().out)


def bilevel_jax_process(*args):
    # This process's environment: the same devices, so that its checkpoint may be resumed here.
    return subprocess.Popen([sys.executable, "-m", "bilevel_jax.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_process_is_refused_and_sigterm_keeps_the_checkpoint(tmp_path, capsys):
    long = dict(TINY, iterations=1_000_000, chunk_size=1)
    config = write(tmp_path / "long.yaml", yaml.safe_dump(long))
    out = tmp_path / "run"
    process = bilevel_jax_process("run", config, "--out", str(out), "--no-progress")
    try:
        deadline = time.monotonic() + 120
        checkpoint = None
        while process.poll() is None and time.monotonic() < deadline:
            if (out / rio.CHECKPOINT).exists():
                checkpoint = rio.load_checkpoint(str(out))
                if checkpoint["done"] >= 1:
                    break
            time.sleep(0.02)
        assert process.poll() is None and checkpoint is not None, process.stderr.read()
        assert (out / rio.LOCK).read_text() == f"{process.pid}\n"

        before = snapshot(out)
        assert cli.main(["run", config, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another bilevel-jax run (pid {process.pid}" in err
        assert {k: v for k, v in snapshot(out).items() if k.endswith(".yaml")} == {
            k: v for k, v in before.items() if k.endswith(".yaml")}

        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "terminated (SIGTERM); continue with --resume" in stderr
    assert "Traceback" not in stderr
    assert not (out / rio.LOCK).exists()
    kept = check_resume(load_config(config, ["output.dir=" + str(out)]))
    assert kept["done"] >= checkpoint["done"] >= 1


# --------------------------------------------------------------------------------------------
# The Python API: eager calls validate values, traced calls check shapes only
# --------------------------------------------------------------------------------------------

def tiny_mdp(sparse: bool = False) -> bj.TabularMDP:
    rng = np.random.default_rng(0)
    dense = rng.dirichlet(np.ones(3), size=(3, 2))
    transitions = (bj.SparseTransitions.from_dense(dense) if sparse
                   else jnp.asarray(dense))
    return bj.TabularMDP(transitions=transitions, rewards=jnp.asarray(rng.normal(size=(3, 2))),
                         discount=0.9, initial=jnp.asarray([0.2, 0.3, 0.5]))


def _sparse_index(mdp):
    return mdp.replace(transitions=mdp.transitions.replace(
        indices=mdp.transitions.indices.at[1, 0, 0].set(3)))


# (id, breaker of a valid MDP, sparse, the field named)
BAD_MDPS = [
    ("rows-not-summing-to-1", lambda m: m.replace(transitions=m.transitions * 1.01), False,
     "transitions: expected each distribution to sum to 1"),
    ("negative-probability", lambda m: m.replace(
        transitions=m.transitions.at[0, 0].set(jnp.asarray([1.5, -0.5, 0.0]))), False,
     "transitions: contains negative entries"),
    ("initial-not-a-distribution", lambda m: m.replace(initial=m.initial * 2), False,
     "initial: expected each distribution to sum to 1"),
    ("discount-one", lambda m: m.replace(discount=1.0), False, "discount: expected a value in"),
    ("discount-negative", lambda m: m.replace(discount=-0.5), False, "discount: expected"),
    ("sparse-index-out-of-range", _sparse_index, True,
     "transitions.indices: expected successor indices in [0, 3)"),
    ("nan-reward", lambda m: m.replace(rewards=m.rewards.at[1, 1].set(jnp.nan)), False,
     "rewards: expected finite values"),
    ("inf-reward", lambda m: m.replace(rewards=m.rewards.at[0, 1].set(jnp.inf)), False,
     "rewards: expected finite values"),
]


@pytest.mark.parametrize("breaker, sparse, words", [case[1:] for case in BAD_MDPS],
                         ids=[case[0] for case in BAD_MDPS])
def test_eager_soft_value_iteration_validates_values(breaker, sparse, words):
    bad = breaker(tiny_mdp(sparse))
    with pytest.raises(bj.InvalidMDPError, match=re.escape(words)):
        bj.soft_value_iteration(bad, 0.5)
    with pytest.raises(bj.InvalidMDPError, match=words.split(":")[0]):
        bj.value_iteration(bad)


def test_validate_false_and_jit_check_shapes_only():
    bad = tiny_mdp().replace(transitions=tiny_mdp().transitions * 1.01)
    assert np.isfinite(bj.soft_value_iteration(bad, 0.5, validate=False).v).all()
    assert np.isfinite(jax.jit(lambda m: bj.soft_value_iteration(m, 0.5).v)(bad)).all()
    with pytest.raises(bj.InvalidMDPError, match="initial"):     # shapes: still checked
        jax.jit(lambda m: bj.soft_value_iteration(m, 0.5).v)(bad.replace(initial=jnp.ones(4)))


def tiny_problem(follower):
    leader = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)))
    return bj.BilevelProblem(follower=follower, leader_reward=lambda x, c: leader + 0 * x[0],
                             leader_discount=0.9, temperature=0.5)


# A trivial estimator: `hypergradient` runs no solver, so only its own checks are tested.
IDENTITY = bj.Estimator(init=lambda problem, x: jnp.zeros(()),
                        update=lambda problem, x, state, key: (x, state, {}))


@pytest.mark.parametrize("breaker, sparse, words", [case[1:] for case in BAD_MDPS],
                         ids=[case[0] for case in BAD_MDPS])
def test_eager_hypergradient_validates_values(breaker, sparse, words):
    def follower(x, context):
        mdp = breaker(tiny_mdp(sparse))
        return mdp.replace(rewards=mdp.rewards + x[0])

    problem, x = tiny_problem(follower), jnp.zeros(2)
    with pytest.raises(bj.InvalidMDPError,
                       match=re.escape(f"follower(x, contexts[0]): {words.split(':')[0]}:")):
        bj.hypergradient(problem, x, IDENTITY)
    grad, _ = bj.hypergradient(problem, x, IDENTITY, validate=False)
    assert grad.shape == (2,)


def test_hypergradient_under_jit_checks_shapes_only():
    bad = tiny_mdp().replace(transitions=tiny_mdp().transitions * 1.01)
    problem = tiny_problem(lambda x, c: bad.replace(rewards=bad.rewards + x[0]))
    grad = jax.jit(lambda x: bj.hypergradient(problem, x, IDENTITY)[0])(jnp.zeros(2))
    assert grad.shape == (2,)

    def closing_over_a_tracer(scale):   # problem and x concrete, the follower traced
        follower = lambda x, c: bad.replace(rewards=bad.rewards * scale)  # noqa: E731
        return bj.hypergradient(problem.replace(follower=follower), np.zeros(2), IDENTITY)[0]

    assert jax.jit(closing_over_a_tracer)(1.0).shape == (2,)
