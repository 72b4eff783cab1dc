"""Contexts shared by the tabular and the simulator problems (SPEC 3): a finite set with
probabilities, or a sampler."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax.checks import is_concrete

Array = jax.Array


class ContextsMixin:
    """Methods of a problem with fields `contexts`, `context_probs`, `context_sampler`."""

    @property
    def num_contexts(self) -> int:
        if self.contexts is None:
            return 1
        return jax.tree_util.tree_leaves(self.contexts)[0].shape[0]

    def probs(self) -> Array:
        """`[K]` context probabilities (uniform when not given)."""
        if self.context_probs is None:
            return jnp.full((self.num_contexts,), 1.0 / self.num_contexts)
        return jnp.asarray(self.context_probs)

    def context(self, index) -> Any:
        """The context with index `index` (None for a context-free problem)."""
        if self.contexts is None:
            return None
        return jax.tree_util.tree_map(lambda leaf: leaf[index], self.contexts)

    def sample_context(self, key: Array) -> Any:
        """Draws a context: by `context_probs` over `contexts`, or from `context_sampler`."""
        return self.draw_context(key)[1]

    def draw_context(self, key: Array) -> tuple[Any, Any]:
        """`(index, context)`: the index into `contexts` (0 without a table: a sampled or absent
        context) and the context drawn as `sample_context` draws it."""
        if self.contexts is None:
            return 0, (self.context_sampler(key) if self.context_sampler is not None else None)
        index = jax.random.choice(key, self.num_contexts, p=self.probs())
        return index, self.context(index)


def check_contexts(problem, error: type[Exception]) -> None:
    """Raises `error` naming `contexts` or `context_probs` when they are malformed."""
    if problem.contexts is None and problem.context_sampler is None and problem.context_probs is not None:
        if np.shape(problem.context_probs) != (1,):
            raise error("context_probs: given without contexts; expected None")
    if problem.contexts is not None:
        sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None
                 for leaf in jax.tree_util.tree_leaves(problem.contexts)}
        if None in sizes or len(sizes) != 1:
            raise error(
                f"contexts: expected every leaf to have the same leading axis K, got sizes {sizes}")
    if problem.context_probs is not None:
        shape = np.shape(problem.context_probs)
        if shape != (problem.num_contexts,):
            raise error(f"context_probs: expected shape [K] = [{problem.num_contexts}], got {shape}")
        if is_concrete(problem.context_probs):
            probs = np.asarray(problem.context_probs, dtype=np.float64)
            if np.isnan(probs).any() or (probs < 0).any() or abs(probs.sum() - 1) > 1e-5:
                raise error(
                    f"context_probs: expected non-negative probabilities summing to 1, got {probs}")
