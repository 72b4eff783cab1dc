"""Hypergradient estimators behind one `init`/`update` interface (see `base`)."""

from bilevel_jax.estimators.base import Estimator, available, hypergradient, make_estimator, register
from bilevel_jax.estimators.exact import exact, unrolled
from bilevel_jax.estimators.amd import amd
from bilevel_jax.estimators.zero_order import zero_order
from bilevel_jax.estimators.hpgd import hpgd
from bilevel_jax.estimators.naive import naive

__all__ = ["Estimator", "amd", "available", "hpgd", "exact", "hypergradient", "make_estimator",
           "naive", "register", "unrolled", "zero_order"]
