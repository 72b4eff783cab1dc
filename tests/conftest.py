"""Test configuration: the whole suite runs with float64 enabled.

float32 tests build float32 arrays explicitly. The tests directory is put on `sys.path` so the
modules `reference` (the independent NumPy implementation) and `helpers` import directly.
"""

import os
import sys

# XLA's CPU backend at optimization level 1, set before jax starts its backend: most of the
# suite's time is compilation, and level 1 compiles faster and here also ran the heavy tests
# faster. Measured on 2 cores with -n 2: the whole suite 584 s, against 737 s at the default
# level; level 0 took 912 s, because unoptimized loops made the statistical tests crawl. An
# XLA_FLAGS that sets a level itself is kept as given.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=1").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
