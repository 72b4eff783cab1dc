"""Atomic file writes (temp file in the same directory + `os.replace`), the run directory's lock
and the checkpoint format.

A process killed at any moment (even `kill -9`) leaves either the previous file or the new one,
never half a file; stray `.NAME.XXXXXXXX.tmp` files of a killed write of one of the runner's own
files are removed by the next run (other files in the directory are never touched).

The checkpoint is data only: a magic line, the SHA-256 of the body, and the body, flax's msgpack
serialization of plain containers (dicts, lists, strings, ints) and numpy arrays. Loading it never
runs code; a truncated, corrupted or foreign file raises `CheckpointError`.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import tempfile
from typing import Any, Iterable

import numpy as np

from bilevel_jax.runner.fields import ConfigError

CHECKPOINT = "checkpoint.msgpack"
LEGACY_CHECKPOINTS = ("checkpoint.pkl",)   # pickles of older versions: never loaded
CHECKPOINT_FORMAT = 2
LOCK = ".bilevel-jax.lock"
# The files the runner writes (patterns relative to the run directory): the only ones whose
# stray temp files `remove_stale_temp_files` removes.
RUN_FILE_PATTERNS = ("config.yaml", "metrics.csv", "summary.json", CHECKPOINT, "plots/*.png")

_MAGIC = b"bilevel-jax checkpoint\n"
_DIGEST = hashlib.sha256().digest_size
# `tempfile.NamedTemporaryFile(prefix=".NAME.", suffix=".tmp")`: 8 characters in between.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


class RunDirectoryError(ConfigError):
    """The run directory is locked by another run, or cannot be created or written."""


class CheckpointError(ConfigError):
    """A checkpoint is refused: missing parts, truncated, corrupted, foreign, or another run's."""


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("wb", dir=directory, delete=False,
                                         prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with handle:
            handle.write(data)
        os.chmod(handle.name, _FILE_MODE)   # temp files are created 0600; use the umask's mode
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value)}")


def json_safe(value: Any) -> Any:
    """NaN and inf become null (JSON has neither)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def atomic_write_json(path: str, payload: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(payload), indent=2, default=_json_default) + "\n")


def atomic_write_csv(path: str, header: list[str], rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def atomic_savefig(figure, path: str) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def is_temp_file_of(filename: str, pattern: str) -> bool:
    """True for the temp file `.NAME.XXXXXXXX.tmp` of an atomic write of a file matching `pattern`."""
    match = _TEMP_NAME.match(filename)
    return bool(match) and fnmatch.fnmatchcase(match["name"], pattern)


def remove_stale_temp_files(directory: str, patterns: Iterable[str] = RUN_FILE_PATTERNS) -> None:
    """Removes temp files left by killed atomic writes of the files matching `patterns`.

    Only those: a user's own `.something.tmp` in the directory is kept.
    """
    for pattern in patterns:
        folder, name = os.path.split(pattern)
        folder = os.path.join(directory, folder)
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            if is_temp_file_of(entry, name):
                try:
                    os.unlink(os.path.join(folder, entry))
                except OSError:
                    pass


# --------------------------------------------------------------------------------------------
# The run directory's lock
# --------------------------------------------------------------------------------------------

def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


class RunLock:
    """An exclusive lock on a run directory: `fcntl.flock` of `DIR/.bilevel-jax.lock`.

        with RunLock("runs/quickstart") as lock:
            ...    # lock.stale_pid: the pid of a run that died holding it (its lock was taken over)

    The lock file holds the holder's pid. The kernel drops a flock when its process ends in any
    way (even `kill -9`), so a lock file left by a dead run is stale: `acquire` takes it over and
    reports its pid in `stale_pid`. A live holder makes `acquire` raise `RunDirectoryError`
    naming its pid. `release` (or leaving the `with` block, also on an exception) removes the
    file and drops the lock.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK)
        self.stale_pid: int | None = None
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise RunDirectoryError(f"output.dir: cannot create the run directory "
                                    f"{self.directory!r} ({err.strerror})") from None
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_pid(fd)
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    who = f"pid {holder}" if holder is not None else "a process starting up"
                    raise RunDirectoryError(
                        f"output.dir: {self.directory} is in use by another bilevel-jax run "
                        f"({who}, lock file {self.path}); wait for it to end, or use another "
                        f"--out") from None
                raise RunDirectoryError(f"output.dir: cannot lock {self.path} "
                                        f"({err.strerror})") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)    # its holder removed the file between our open and flock: again
        previous = _read_pid(fd)
        self.stale_pid = previous if previous not in (None, os.getpid()) else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        except OSError as err:
            raise RunDirectoryError(f"output.dir: cannot write in the run directory "
                                    f"{self.directory!r} ({err.strerror})") from None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)     # while still holding the lock: nobody else removes it
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------

def _as_dict(items: list) -> dict:
    """msgpack chunks big arrays inside dicts only: lists are stored as {"0": ..., "1": ...}."""
    return {str(i): item for i, item in enumerate(items)}


def _as_list(where: str, value: Any) -> list:
    if not isinstance(value, dict) or sorted(value) != sorted(str(i) for i in range(len(value))):
        raise CheckpointError(f"{where}: expected a list, got {type(value).__name__}")
    return [value[str(i)] for i in range(len(value))]


def encode_checkpoint(payload: dict) -> bytes:
    """Bytes of a checkpoint payload `{config_hash, done, devices, processes, groups: [{state:
    [arrays], metrics: {name: array}}]}` (format and digest added)."""
    from flax import serialization

    tree = dict(payload, format=CHECKPOINT_FORMAT, groups=_as_dict([
        {"state": _as_dict([np.asarray(leaf) for leaf in group["state"]]),
         "metrics": {k: np.asarray(v) for k, v in group["metrics"].items()}}
        for group in payload["groups"]]))
    body = serialization.msgpack_serialize(tree)
    return _MAGIC + hashlib.sha256(body).digest() + body


def _shown(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array {value.shape} {value.dtype}"
    if isinstance(value, (bool, int, str, list)) and len(repr(value)) <= 200:
        return repr(value)
    return type(value).__name__


def _expect(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        raise CheckpointError(f"{where}: expected {expected}, got {_shown(value)}")


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_payload(path: str, tree: Any) -> dict:
    """The validated payload of a decoded checkpoint (groups and states as lists)."""
    keys = {"format", "config_hash", "done", "devices", "processes", "groups"}
    _expect(isinstance(tree, dict) and set(tree) == keys, path,
            f"a mapping with the keys {sorted(keys)}", tree if not isinstance(tree, dict)
            else sorted(tree))
    _expect(tree["format"] == CHECKPOINT_FORMAT, f"{path}: format", str(CHECKPOINT_FORMAT),
            tree["format"])
    _expect(isinstance(tree["config_hash"], str), f"{path}: config_hash", "a string",
            tree["config_hash"])
    for key, low in (("done", 0), ("devices", 1), ("processes", 1)):
        _expect(_is_int(tree[key], low), f"{path}: {key}", f"an int >= {low}", tree[key])
    groups = []
    for g, group in enumerate(_as_list(f"{path}: groups", tree["groups"])):
        where = f"{path}: groups[{g}]"
        _expect(isinstance(group, dict) and set(group) == {"state", "metrics"}, where,
                "a mapping with the keys ['metrics', 'state']", group)
        state = _as_list(f"{where}.state", group["state"])
        for i, leaf in enumerate(state):
            _expect(isinstance(leaf, np.ndarray) and leaf.ndim >= 1, f"{where}.state[{i}]",
                    "an array with a leading run axis", leaf)
        metrics = group["metrics"]
        _expect(isinstance(metrics, dict), f"{where}.metrics", "a mapping", metrics)
        for name, values in metrics.items():
            _expect(isinstance(values, np.ndarray) and values.ndim == 2,
                    f"{where}.metrics[{name!r}]", "an array [runs, iterations]", values)
        groups.append({"state": state, "metrics": metrics})
    return dict(tree, groups=groups)


def decode_checkpoint(data: bytes, path: str = CHECKPOINT) -> dict:
    """The validated payload of checkpoint bytes; `CheckpointError` for anything else.

    Never runs code: the body is msgpack (plain data), read only after its digest matched.
    """
    from flax import serialization

    if not data.startswith(_MAGIC):
        kind = "a pickle, which is never loaded" if data[:1] == b"\x80" else "another format"
        raise CheckpointError(f"{path}: not a bilevel_jax checkpoint ({kind}); expected a file "
                              f"written by `bilevel-jax run`")
    digest, body = data[len(_MAGIC):len(_MAGIC) + _DIGEST], data[len(_MAGIC) + _DIGEST:]
    if len(digest) < _DIGEST or hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{path}: truncated or corrupted (its SHA-256 does not match); "
                              f"run without --resume to start over")
    try:
        tree = serialization.msgpack_restore(body)
    except Exception as err:  # noqa: BLE001 - any decoding failure of plain data is a bad file
        raise CheckpointError(f"{path}: cannot decode ({type(err).__name__}: {err})") from None
    return _check_payload(path, tree)


def save_checkpoint(directory: str, payload: dict) -> None:
    atomic_write_bytes(os.path.join(directory, CHECKPOINT), encode_checkpoint(payload))


def load_checkpoint(directory: str) -> dict | None:
    """The directory's validated checkpoint; None if there is none.

    Raises `CheckpointError` for an unreadable, truncated, corrupted or foreign file, and for a
    pickle checkpoint of an older version (pickles can run code: they are never loaded).
    """
    path = os.path.join(directory, CHECKPOINT)
    if not os.path.exists(path):
        for legacy in LEGACY_CHECKPOINTS:
            if os.path.exists(os.path.join(directory, legacy)):
                raise CheckpointError(
                    f"{os.path.join(directory, legacy)}: a pickle checkpoint of an older "
                    f"bilevel_jax; pickles are never loaded (they can run code): run without "
                    f"--resume to start over")
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    return decode_checkpoint(data, path)


def format_column(values: np.ndarray) -> list[str]:
    """Shortest round-trip text of each float32/64 value; NaN is written as an empty cell."""
    return ["" if v != v else str(v) for v in np.asarray(values)]
