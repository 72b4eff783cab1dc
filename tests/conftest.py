"""Test configuration: the whole suite runs with float64 enabled.

float32 tests build float32 arrays explicitly. The tests directory is put on `sys.path` so the
modules `reference` (the independent NumPy implementation) and `helpers` import directly.
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
