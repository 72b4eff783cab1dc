"""Leader algorithms: hypergradient ascent with any estimator, PBRL, and the training drivers."""

from bilevel_jax.algorithms.ascent import hypergradient_ascent
from bilevel_jax.algorithms.base import METRICS, Algorithm
from bilevel_jax.algorithms.incentive import equilibrium_ascent, ni_pbrl
from bilevel_jax.algorithms.pbrl import pbrl, policy_objective
from bilevel_jax.algorithms.rlhf import rlhf_decoupled, rlhf_pbrl
from bilevel_jax.algorithms.train import (
    NonFiniteError,
    TrainResult,
    batched_fns,
    chunk_fn,
    initialize_distributed,
    pad_runs,
    padded_size,
    run_mesh,
    runs_to_host,
    shard_runs,
    train,
)

ALGORITHMS = {"ascent": hypergradient_ascent, "pbrl": pbrl}

__all__ = ["ALGORITHMS", "Algorithm", "METRICS", "NonFiniteError", "TrainResult", "batched_fns",
           "chunk_fn", "equilibrium_ascent", "hypergradient_ascent", "initialize_distributed",
           "ni_pbrl", "pad_runs", "padded_size", "pbrl", "policy_objective", "rlhf_decoupled",
           "rlhf_pbrl", "run_mesh",
           "runs_to_host", "shard_runs", "train"]
