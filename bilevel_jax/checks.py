"""Value checks shared by the problem types: they run on concrete values and pass tracers."""

from __future__ import annotations

import jax
import numpy as np


def is_concrete(tree) -> bool:
    """True when no leaf of `tree` is a tracer (so its values can be checked eagerly)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def check_unit_interval(name: str, value, error: type[Exception]) -> None:
    """Raises `error` unless a concrete `value` is a scalar in `[0, 1)` (None and tracers pass)."""
    if value is None or not is_concrete(value):
        return
    gamma = np.asarray(value, dtype=np.float64)
    if gamma.shape != () or not 0 <= gamma < 1:
        raise error(f"{name}: expected a scalar in [0, 1), got {value!r}")
