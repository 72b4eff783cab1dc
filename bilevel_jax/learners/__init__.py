"""Followers that learn from samples (one `init`/`update`/`policy`/`value` interface)."""

from bilevel_jax.learners.base import (Learner, all_finite, available, follow, make_learner,
                                       options_of, register)
from bilevel_jax.learners import networks
from bilevel_jax.learners.soft_q_tabular import soft_q_tabular
# learner modules (each registers itself on import):
# LEARNER-IMPORTS
from bilevel_jax.learners.soft_dqn import soft_dqn  # noqa: F401
from bilevel_jax.learners.soft_ppo import soft_ppo  # noqa: F401
from bilevel_jax.learners.soft_vi_tabular import soft_vi_tabular  # noqa: F401

__all__ = ["Learner", "all_finite", "available", "follow", "make_learner", "networks",
           "options_of", "register", "soft_dqn", "soft_ppo", "soft_q_tabular",
           "soft_vi_tabular"]
