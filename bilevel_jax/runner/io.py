"""Atomic file writes (temp file in the same directory + `os.replace`) and the checkpoint format.

A process killed at any moment (even `kill -9`) leaves either the previous file or the new one,
never half a file; stray `.NAME.*.tmp` files of a killed write are removed by the next run.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import pickle
import tempfile
from typing import Any

import numpy as np

CHECKPOINT = "checkpoint.pkl"
CHECKPOINT_FORMAT = 1


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


def remove_stale_temp_files(directory: str) -> None:
    for pattern in (".*.tmp", os.path.join("plots", ".*.tmp")):
        for path in glob.glob(os.path.join(directory, pattern)):
            try:
                os.unlink(path)
            except OSError:
                pass


def save_checkpoint(directory: str, payload: dict) -> None:
    payload = dict(payload, format=CHECKPOINT_FORMAT)
    atomic_write_bytes(os.path.join(directory, CHECKPOINT),
                       pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoint(directory: str) -> dict | None:
    path = os.path.join(directory, CHECKPOINT)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as handle:
        payload = pickle.load(handle)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of this version of bilevel_jax")
    return payload


def format_column(values: np.ndarray) -> list[str]:
    """Shortest round-trip text of each float32/64 value; NaN is written as an empty cell."""
    return ["" if v != v else str(v) for v in np.asarray(values)]
