"""Followers that learn from samples (one `init`/`update`/`policy`/`value` interface)."""

from bilevel_jax.learners.base import (Learner, all_finite, available, follow, make_learner,
                                       options_of, register)
from bilevel_jax.learners import networks
from bilevel_jax.learners.soft_q_tabular import soft_q_tabular
# learner modules (each registers itself on import):
# LEARNER-IMPORTS

__all__ = ["Learner", "all_finite", "available", "follow", "make_learner", "networks",
           "options_of", "register", "soft_q_tabular"]
