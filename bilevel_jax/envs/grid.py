"""Slippery grid worlds from ASCII maps, as exact tabular models (dense or sparse).

Cells are `(row, col)`; `x` marks a wall, anything else a free cell. Actions are up, right,
down, left (`(-1, 0), (0, 1), (1, 0), (0, -1)`); a move into a wall (or off the map) stays put.
With probability `1 - slip_prob` the intended move happens, otherwise one of the other three,
uniformly. States are the free cells in row-major order.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from bilevel_jax.core.mdp import SparseTransitions
from bilevel_jax.errors import InvalidArgumentError

MOVES = np.array([(-1, 0), (0, 1), (1, 0), (0, -1)], dtype=np.int32)
ACTION_NAMES = ("up", "right", "down", "left")


@dataclasses.dataclass(frozen=True, eq=False)
class GridLayout:
    """A grid map.

    Attributes:
      walls: bool `[H, W]`.
      cells: int `[S, 2]`, `(row, col)` of each state.
      index: int `[H, W]`, state of each cell, -1 on walls.
    """

    walls: np.ndarray
    cells: np.ndarray
    index: np.ndarray

    @classmethod
    def from_walls(cls, walls) -> "GridLayout":
        walls = np.asarray(walls, dtype=bool)
        if walls.ndim != 2 or walls.all():
            raise InvalidArgumentError(
                f"walls: expected a 2-D boolean map with at least one free cell, got shape {walls.shape}")
        cells = np.argwhere(~walls).astype(np.int32)
        index = -np.ones(walls.shape, dtype=np.int32)
        index[cells[:, 0], cells[:, 1]] = np.arange(len(cells), dtype=np.int32)
        return cls(walls=walls, cells=cells, index=index)

    @classmethod
    def from_ascii(cls, text: str) -> "GridLayout":
        rows = [line for line in text.strip("\n").splitlines()]
        width = max(len(line) for line in rows)
        walls = np.array([[ch == "x" for ch in line.ljust(width, "x")] for line in rows])
        return cls.from_walls(walls)

    @classmethod
    def open(cls, height: int, width: int) -> "GridLayout":
        """An `height x width` room with no inner walls."""
        return cls.from_walls(np.zeros((height, width), dtype=bool))

    @property
    def num_states(self) -> int:
        return len(self.cells)

    def state(self, cell) -> int:
        """State index of a `(row, col)` free cell."""
        row, col = cell
        if not (0 <= row < self.walls.shape[0] and 0 <= col < self.walls.shape[1]) \
                or self.index[row, col] < 0:
            raise InvalidArgumentError(f"cell: {tuple(cell)} is not a free cell of the map")
        return int(self.index[row, col])

    def move_targets(self) -> np.ndarray:
        """`[S, 4]` state reached by each move (the same state when blocked)."""
        height, width = self.walls.shape
        target = self.cells[:, None, :] + MOVES[None, :, :]
        inside = ((target[..., 0] >= 0) & (target[..., 0] < height)
                  & (target[..., 1] >= 0) & (target[..., 1] < width))
        clipped = np.clip(target, 0, [height - 1, width - 1])
        free = inside & ~self.walls[clipped[..., 0], clipped[..., 1]]
        own = np.arange(self.num_states, dtype=np.int32)[:, None]
        return np.where(free, self.index[clipped[..., 0], clipped[..., 1]], own).astype(np.int32)

    def to_grid(self, values, fill=np.nan) -> np.ndarray:
        """Scatters a per-state vector `[S]` onto the `[H, W]` map (walls get `fill`)."""
        grid = np.full(self.walls.shape, fill, dtype=np.float64)
        grid[self.cells[:, 0], self.cells[:, 1]] = np.asarray(values)
        return grid


def slip_kernel(slip_prob: float, dtype=jnp.float32) -> np.ndarray:
    """`[4, 4]` probability of executing move `m` when action `a` is chosen."""
    if not 0.0 <= slip_prob <= 1.0:
        raise InvalidArgumentError(f"slip_prob: expected a probability in [0, 1], got {slip_prob}")
    kernel = np.full((4, 4), slip_prob / 3.0)
    np.fill_diagonal(kernel, 1.0 - slip_prob)
    return kernel.astype(dtype)


def grid_transitions(layout: GridLayout, slip_prob: float, *, sparse: bool = True,
                     dtype=jnp.float32):
    """The slippery-move kernel of `layout`: `SparseTransitions` with branching 4, or dense."""
    targets = layout.move_targets()                                    # [S, 4 moves]
    kernel = slip_kernel(slip_prob, np.float64)                        # [4 actions, 4 moves]
    num_states = layout.num_states
    indices = np.broadcast_to(targets[:, None, :], (num_states, 4, 4))
    probs = np.broadcast_to(kernel[None], (num_states, 4, 4))
    if sparse:
        return SparseTransitions(indices=jnp.asarray(indices, jnp.int32),
                                 probs=jnp.asarray(probs, dtype))
    dense = np.zeros((num_states, 4, num_states))
    rows = np.arange(num_states)[:, None, None]
    acts = np.arange(4)[None, :, None]
    np.add.at(dense, (np.broadcast_to(rows, indices.shape), np.broadcast_to(acts, indices.shape),
                      indices), probs)
    return jnp.asarray(dense, dtype)
