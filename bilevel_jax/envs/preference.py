"""Environments for RLHF experiments (SPEC 7.4): a tabular MDP whose reward is hidden from the
learner, plus reward features.

A `PreferenceEnv` holds the environment MDP (its `rewards` ARE the hidden true reward `r_true`,
used only by the synthetic annotator and by the evaluation metrics) and features `phi [S, A, d]`
from which reward models `r_x(s, a) = model(x, phi(s, a))` are built.

Two families:

* `preference_gridworld`: an open `size x size` slippery grid (bilevel_jax.envs.grid) with
  random (or fixed) starts, an absorbing (or terminal) goal cell (`goal_reward` per step) and
  hazard cells (`hazard_reward` per step spent in them). The true reward depends on the state
  only. Features:
    - `"onehot"`: one-hot of (cell, action), `d = S * A`: the true reward is linear in them
      (every `[S, A]` table is), so a linear reward model is well specified;
    - `"state"`: one-hot of the cell, `d = S`: also well specified (`r_true` ignores the action);
    - `"rbf"`: Gaussian bumps of the cell coordinates on a `rbf_centers x rbf_centers` lattice,
      times a one-hot of the action, `d = rbf_centers^2 * A`: smooth features that cannot
      represent the goal and hazard indicators exactly, so a linear model is MISSPECIFIED.
* `random_preference_env`: a Garnet-style random MDP (bilevel_jax.envs.random_mdp, one context);
  its features are the random follower-reward features of that generator. With
  `realizable=True` the true reward is `phi @ w_true` (well specified for a linear model); with
  `realizable=False` it is the generator's independent base reward table, generically outside
  the span of `d < S * A` features (misspecified).

`linear_fit_residual(env)` measures the specification numerically: the relative least-squares
residual `min_w ||phi w - r_true|| / ||r_true||` (0 when well specified).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bilevel_jax.core.mdp import TabularMDP
from bilevel_jax.envs.grid import GridLayout, grid_transitions
from bilevel_jax.errors import InvalidArgumentError

Array = jax.Array

GRID_FEATURES = ("onehot", "state", "rbf")


@struct.dataclass
class PreferenceEnv:
    """An environment with a hidden true reward and reward features.

    Attributes:
      mdp: the environment `TabularMDP`; `mdp.rewards` `[S, A]` is the hidden true reward.
      features: `[S, A, d]` reward features.
    """

    mdp: TabularMDP
    features: Array

    @property
    def true_reward(self) -> Array:
        """`[S, A]` hidden true reward (the annotator's)."""
        return self.mdp.rewards

    @property
    def num_features(self) -> int:
        return self.features.shape[-1]


def linear_fit_residual(env: PreferenceEnv) -> float:
    """Relative residual `min_w ||phi w - r_true|| / ||r_true||` (host-side, float64).

    0 (to round-off) means the true reward is linear in the features: a linear reward model is
    well specified. Bradley-Terry labels only identify returns up to a constant per trajectory
    length, so this is a sufficient (not necessary) condition for the learned reward to rank
    trajectories like the true one.
    """
    phi = np.asarray(env.features, np.float64)
    r = np.asarray(env.true_reward, np.float64).reshape(-1)
    design = phi.reshape(-1, phi.shape[-1])
    w, *_ = np.linalg.lstsq(design, r, rcond=None)
    return float(np.linalg.norm(design @ w - r) / max(np.linalg.norm(r), 1e-300))


def _check_cell(name: str, cell, size: int) -> tuple[int, int]:
    try:
        row, col = (int(v) for v in cell)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name}: expected a (row, col) pair, got {cell!r}") from None
    if not (0 <= row < size and 0 <= col < size):
        raise InvalidArgumentError(
            f"{name}: expected a cell of the {size}x{size} grid, got {(row, col)}")
    return row, col


def default_hazards(size: int) -> tuple[tuple[int, int], ...]:
    """Cells with both coordinates odd (for size 5: (1,1), (1,3), (3,1), (3,3)), leaving the
    border and the middle row/column free, so every corner connects to every other."""
    return tuple((r, c) for r in range(1, size - 1, 2) for c in range(1, size - 1, 2))


def preference_gridworld(size: int = 5, *, start="uniform", goal=None, hazards=None,
                         slip_prob: float = 0.1, discount: float = 0.9,
                         goal_reward: float = 1.0, hazard_reward: float = -1.0,
                         goal_terminal: bool = False, features: str = "onehot",
                         rbf_centers: int = 3,
                         rbf_width: float | None = None, sparse: bool = False,
                         dtype=jnp.float32) -> PreferenceEnv:
    """An open `size x size` slippery grid with starts, an absorbing (or terminal) goal and
    hazard cells.

    Default map (size 5; S the start if `start=(0, 0)`, H hazard, G goal)::

        S . . . .
        . H . H .
        . . . . .
        . H . H .
        . . . . G

    True reward `r_true(s, a)`: `goal_reward` at the goal, `hazard_reward` at each hazard, 0
    elsewhere, for every action. Moves: up, right, down, left; the intended move with
    probability `1 - slip_prob`, else one of the other three.

    The goal is absorbing by default (every action stays there, earning `goal_reward` each
    step; no terminal state): every trajectory then lasts exactly `H` steps, so Bradley-Terry
    labels cannot see (and need not fix) an additive constant in `r_x`, and such a constant
    changes no policy's ranking in an MDP without terminal states. With `goal_terminal=True` the goal is terminal (acting
    there earns `goal_reward` and ends the episode, SPEC 1); then trajectories differ in
    length, the constant is only identified through the rare ones that end, and a reward
    model with a positive offset makes the soft-optimal policy avoid the goal (staying alive
    pays more than ending): a known pitfall of learning rewards from fixed-horizon
    comparisons, kept available for experiments.

    Args:
      size: side of the grid (>= 2).
      start: `(row, col)` start cell (a point mass), or `"uniform"`: uniform over the cells
        that are neither the goal nor a hazard (random starts let short trajectories of a
        poor policy still reach the goal sometimes, so its reward can be learned).
      goal: `(row, col)` of the goal (default: the opposite corner).
      hazards: iterable of `(row, col)` hazard cells (default: `default_hazards(size)`, minus
        start and goal).
      features: `"onehot"` (cell x action, d = S A), `"state"` (cell, d = S) or `"rbf"` (RBF of
        the cell x action, d = rbf_centers^2 A; misspecified), see the module docstring.
      rbf_centers: lattice side of the RBF centers; `rbf_width`: their standard deviation in
        cells (default: the lattice spacing).
      sparse: `SparseTransitions` (branching 4) instead of a dense kernel.

    Returns:
      a `PreferenceEnv`.

    Raises:
      InvalidArgumentError: naming the offending argument.
    """
    if not isinstance(size, (int, np.integer)) or size < 2:
        raise InvalidArgumentError(f"size: expected an int >= 2, got {size!r}")
    if features not in GRID_FEATURES:
        raise InvalidArgumentError(f"features: expected one of {GRID_FEATURES}, got {features!r}")
    if not isinstance(rbf_centers, (int, np.integer)) or rbf_centers < 1:
        raise InvalidArgumentError(f"rbf_centers: expected an int >= 1, got {rbf_centers!r}")
    if not 0.0 <= discount < 1.0:
        raise InvalidArgumentError(f"discount: expected a value in [0, 1), got {discount!r}")
    if isinstance(start, str):
        if start != "uniform":
            raise InvalidArgumentError(
                f"start: expected a (row, col) cell or 'uniform', got {start!r}")
        start = None
    else:
        start = _check_cell("start", start, size)
    goal = _check_cell("goal", (size - 1, size - 1) if goal is None else goal, size)
    if goal == start:
        raise InvalidArgumentError(f"goal: expected a cell other than start {start}, got {goal}")
    if hazards is None:
        hazards = [h for h in default_hazards(size) if h not in (start, goal)]
    hazards = [_check_cell(f"hazards[{i}]", h, size) for i, h in enumerate(hazards)]
    if goal in hazards:
        raise InvalidArgumentError(f"hazards: the goal {goal} cannot be a hazard")

    layout = GridLayout.open(size, size)
    num_states, num_actions = layout.num_states, 4
    state_reward = np.zeros(num_states)
    for cell in hazards:
        state_reward[layout.state(cell)] = hazard_reward
    goal_state = layout.state(goal)
    state_reward[goal_state] = goal_reward
    rewards = np.repeat(state_reward[:, None], num_actions, axis=1)
    if start is None:
        initial = np.ones(num_states)
        initial[[layout.state(cell) for cell in hazards] + [goal_state]] = 0.0
        if initial.sum() == 0:
            raise InvalidArgumentError("start: 'uniform' needs a cell that is neither the goal "
                                       "nor a hazard")
        initial /= initial.sum()
    else:
        initial = np.zeros(num_states)
        initial[layout.state(start)] = 1.0
    terminal = np.zeros(num_states, bool)
    terminal[goal_state] = goal_terminal

    action_onehot = np.eye(num_actions)
    if features == "onehot":
        phi = np.eye(num_states * num_actions).reshape(num_states, num_actions, -1)
    elif features == "state":
        phi = np.repeat(np.eye(num_states)[:, None, :], num_actions, axis=1)
    else:
        lattice = np.linspace(0.0, size - 1.0, rbf_centers)
        centers = np.stack(np.meshgrid(lattice, lattice, indexing="ij"), -1).reshape(-1, 2)
        width = rbf_width
        if width is None:
            width = (size - 1.0) / max(rbf_centers - 1, 1)
        if not width > 0:
            raise InvalidArgumentError(f"rbf_width: expected a number > 0, got {rbf_width!r}")
        dist2 = np.sum((layout.cells[:, None, :] - centers[None]) ** 2, axis=-1)    # [S, C]
        bumps = np.exp(-dist2 / (2.0 * width ** 2))
        phi = np.einsum("sc,ab->sacb", bumps, action_onehot).reshape(num_states, num_actions, -1)

    transitions = grid_transitions(layout, slip_prob, sparse=sparse, dtype=dtype)
    if not goal_terminal:
        # An absorbing goal: every action stays there (and earns goal_reward every step).
        if sparse:
            transitions = transitions.replace(
                indices=transitions.indices.at[goal_state].set(goal_state))
        else:
            transitions = transitions.at[goal_state].set(
                jax.nn.one_hot(goal_state, num_states, dtype=dtype)[None, :])
    mdp = TabularMDP(transitions=transitions, rewards=jnp.asarray(rewards, dtype),
                     discount=discount, initial=jnp.asarray(initial, dtype),
                     terminal=jnp.asarray(terminal) if goal_terminal else None)
    return PreferenceEnv(mdp=mdp, features=jnp.asarray(phi, dtype))


def random_preference_env(seed: int, num_states: int = 10, num_actions: int = 3,
                          dim: int = 4, *, branching: int | None = None, num_terminal: int = 0,
                          discount: float = 0.9, realizable: bool = True,
                          dtype=jnp.float32) -> PreferenceEnv:
    """A random MDP (the Garnet generator of bilevel_jax.envs.random_mdp, one context).

    Features are that generator's follower-reward features (`d_x r`, entries `N(0, 1/d)`);
    transitions and the initial distribution are its own. True reward: `phi @ w_true` with
    `w_true ~ N(0, I_d)` when `realizable` (a linear model is well specified), else the
    generator's base reward table `r0 + shift` (generically not linear in the `d < S A`
    features: misspecified).
    """
    from bilevel_jax.envs.random_mdp import random_bilevel_problem

    for name, value, low in (("num_states", num_states, 2), ("num_actions", num_actions, 1),
                             ("dim", dim, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
    if not 0.0 <= discount < 1.0:
        raise InvalidArgumentError(f"discount: expected a value in [0, 1), got {discount!r}")
    problem, _ = random_bilevel_problem(seed, num_states, num_actions, dim, num_contexts=1,
                                        branching=branching, num_terminal=num_terminal,
                                        discount=discount, dtype=dtype)
    context = problem.context(0)
    zero = jnp.zeros(dim, dtype)
    base = problem.follower(zero, context)
    # The generator's rewards are r0 + phi x + shift: its features are the Jacobian in x.
    phi = jax.jacfwd(lambda x: problem.follower(x, context).rewards)(zero)
    if realizable:
        w_true = np.random.default_rng([int(seed), 7]).normal(size=dim)
        rewards = phi @ jnp.asarray(w_true, dtype)
    else:
        rewards = base.rewards
    return PreferenceEnv(mdp=base.replace(rewards=jnp.asarray(rewards, dtype)),
                         features=jnp.asarray(phi, dtype))


__all__ = ["GRID_FEATURES", "PreferenceEnv", "default_hazards", "linear_fit_residual",
           "preference_gridworld", "random_preference_env"]
