"""Batched trajectory sampling in a tabular MDP: one `lax.scan` over time, `num_envs` wide.

Environments auto-reset: after acting in a terminal state (SPEC 1: the reward is earned and the
episode ends) or after `max_episode_steps` steps, the next state is drawn from `initial` and the
in-episode time restarts at 0. Actions and successors are drawn by inverse CDF over the `B`
stored successors (a linear scan for small `B`, a binary search for dense rows), never by a
Gumbel draw over all `S` states.

The time loop is the cost of a rollout on CPU (a few environments wide, thousands of steps), and
XLA's per-step overhead grows with the number of loop-carried and stacked buffers. So the loop
carries one int32 vector (`time * S + state`) and stacks one int32 vector per step (that code
and the sampled outcome, packed); everything else (actions, successors, rewards, flags) is
decoded from it afterwards in vectorized passes. The uniforms of all steps are drawn up front by
`uniform_runs`, which matches `jax.random.uniform` bit for bit but is ~10x faster on CPU for
threefry keys.

`sample_runs` rolls out `R` runs (each with its own policy, and its own or a shared model) as
one loop over `R * N` lanes, each run getting exactly its `sample_trajectories` trajectory:
the form estimators use when they are vmapped over runs (see `hpgd`), where `vmap` itself
would add transposes and index arithmetic around every gather of the loop.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from bilevel_jax.core.mdp import SparseTransitions, TabularMDP, check_shapes
from bilevel_jax.errors import InvalidArgumentError

Array = jax.Array

_LINEAR_SCAN_MAX = 16
_INT32_LIMIT = 2**31

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
    """The Threefry-2x32 block cipher (20 rounds), as `jax.random`'s threefry PRNG computes it.

    jax lowers its own threefry on CPU as a rolled loop over the rounds (to save compile time),
    which makes every round a pass over memory: ~40 ns per number. Unrolled, the whole cipher
    fuses into one vectorized loop: ~4 ns per number.
    """
    def rotate_left(x, d):
        return lax.shift_left(x, jnp.uint32(d)) | lax.shift_right_logical(x, jnp.uint32(32 - d))

    keys = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for i in range(5):
        for rotation in _THREEFRY_ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ rotate_left(x2, rotation)
        x1 = x1 + keys[(i + 1) % 3]
        x2 = x2 + keys[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def _threefry_data(keys: Array) -> Array | None:
    """The `uint32 [..., 2]` data of threefry keys (typed or raw), or None for other PRNGs."""
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(keys)) != "threefry2x32":
            return None
        return jax.random.key_data(keys)
    if (keys.dtype != jnp.uint32 or keys.ndim < 1 or keys.shape[-1] != 2
            or jax.config.jax_default_prng_impl != "threefry2x32"):
        return None
    return keys


def uniform_runs(keys: Array, shape: tuple[int, ...], dtype=None, axis: int = 0) -> Array:
    """`jax.random.uniform(keys[r], shape, dtype)` for each of `R` keys, stacked at `axis`.

    Bit for bit the same numbers, computed by an unrolled threefry for threefry keys (the
    default PRNG) when jax draws its bits in the "partitionable" layout (its default) and laid
    out directly with the run axis at `axis` (no transpose); other keys or settings go through
    `jax.vmap(jax.random.uniform)` (rbg streams depend on `vmap`: these are its numbers).

    Args:
      keys: `[R]` typed keys or `[R, 2]` raw `uint32` keys.
    """
    dtype = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)
    data = _threefry_data(keys)
    size = math.prod(shape)
    if (data is None or data.ndim != 2 or not jax.config.jax_threefry_partitionable
            or dtype not in (jnp.float32, jnp.float64) or size >= 2**32):
        draws = jax.vmap(lambda k: jax.random.uniform(k, shape, dtype))(keys)
        return jnp.moveaxis(draws, 0, axis)
    num_runs = data.shape[0]
    out_shape = shape[:axis] + (num_runs,) + shape[axis:]
    counts = jnp.expand_dims(lax.iota(jnp.uint32, size).reshape(shape), axis)
    k1, k2 = (jnp.expand_dims(data[:, i], tuple(d for d in range(len(out_shape)) if d != axis))
              for i in range(2))
    counts = jnp.broadcast_to(counts, out_shape)
    bits1, bits2 = _threefry2x32(k1, k2, jnp.zeros_like(counts), counts)
    # jax.random.uniform's map from bits to [1, 2) by the mantissa, then minus 1.
    if dtype == jnp.float32:
        mantissa = lax.shift_right_logical(bits1 ^ bits2, jnp.uint32(32 - 23))
        one = jnp.uint32(0x3F800000)
    else:
        bits = ((bits1.astype(jnp.uint64) << jnp.uint64(32)) | bits2.astype(jnp.uint64))
        mantissa = lax.shift_right_logical(bits, jnp.uint64(64 - 52))
        one = jnp.uint64(0x3FF0000000000000)
    return lax.bitcast_convert_type(mantissa | one, dtype) - jnp.asarray(1.0, dtype)


@struct.dataclass
class Trajectory:
    """`num_steps x num_envs` transitions; every field is `[T, N]`.

    Attributes:
      states: state acted in at step t.
      actions: action taken.
      rewards: `r(s_t, a_t)` of the MDP.
      next_states: the sampled successor (before any reset; meaningless where `terminated`).
      dones: the episode ended after this step (terminal state or time limit).
      terminated: the episode ended because `s_t` is terminal (no successor follows).
      times: in-episode time of step t (0 at each episode's first step).
    """

    states: Array
    actions: Array
    rewards: Array
    next_states: Array
    dones: Array
    terminated: Array
    times: Array


def _inverse_cdf(cdf: Array, rows: Array, u: Array) -> Array:
    """For each `n`, the first `k` with `cdf[rows[n], k] > u[n] * cdf[rows[n], -1]`.

    `cdf` is `[R, B]`, non-decreasing along `B`. Entries of zero probability are never chosen
    (an all-zero row gives 0).
    """
    width = cdf.shape[-1]
    total = cdf[rows, width - 1]
    # Below the total even when `u * total` rounds up to it, so the result is always an entry
    # of positive probability; an all-zero row gives 0 (-1 rather than a denormal: CPUs may
    # flush those to zero).
    target = jnp.where(total > 0, jnp.minimum(u * total, jnp.nextafter(total, 0.0 * total)),
                       -1.0)
    if width <= _LINEAR_SCAN_MAX:
        return jnp.sum(cdf[rows] <= target[:, None], axis=-1).astype(jnp.int32)
    lo = jnp.zeros(rows.shape, jnp.int32)
    hi = jnp.full(rows.shape, width - 1, jnp.int32)
    for _ in range(math.ceil(math.log2(width))):
        mid = (lo + hi) // 2
        go_right = cdf[rows, mid] <= target
        lo = jnp.where(go_right, mid + 1, lo)
        hi = jnp.where(go_right, hi, mid)
    return lo


def materialize(table: Array) -> Array:
    """`table` unchanged, computed into its own buffer: use it on a small table before gathering
    many elements from it.

    XLA (CPU) fuses the producer of a gather's operand into the gather and recomputes it per
    gathered element (a softmax or logsumexp then costs ~20x more); a scatter is never fused
    into its consumers, so this copy computes the table once.
    """
    flat = table.reshape(-1)
    return jnp.zeros_like(flat).at[jnp.arange(flat.shape[0])].set(
        flat, unique_indices=True, indices_are_sorted=True).reshape(table.shape)


def concrete_value(value) -> np.ndarray | None:
    """`value` as a NumPy array when it is known at trace time (not a tracer), else None."""
    try:
        return np.asarray(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def run_rows(table: Array, run_of_lane: Array, num_runs: int) -> tuple[Array, Array]:
    """A per-run table `[Rt, rows, ...]` (`Rt` is `R`, or 1 when shared by all runs) as
    `[Rt * rows, ...]`, and each lane's row offset `[L]` into it: row `i` of the table of lane
    `l`'s run is `flat[offset[l] + i]`."""
    shared = table.shape[0] == 1
    if not shared and table.shape[0] != num_runs:
        raise InvalidArgumentError(
            f"run axis: expected {num_runs} or 1 (shared), got a table of shape {table.shape}")
    rows = table.shape[1]
    offset = jnp.zeros_like(run_of_lane) if shared else run_of_lane * rows
    return table.reshape((-1,) + table.shape[2:]), offset


def sample_trajectories(key: Array, mdp: TabularMDP, policy: Array, *, num_envs: int,
                        num_steps: int, max_episode_steps: int | None = None,
                        start_states: Array | None = None,
                        start_actions: Array | None = None) -> Trajectory:
    """Rolls out `policy` in `num_envs` parallel copies of `mdp` for `num_steps` steps.

    Args:
      key: PRNG key.
      mdp: a `TabularMDP` (dense or sparse transitions).
      policy: `[S, A]` action probabilities.
      num_envs: parallel environments `N` (static).
      num_steps: steps per environment `T` (static).
      max_episode_steps: time limit (static); `None` for none.
      start_states: optional int `[N]` first states (default: drawn from `mdp.initial`); later
        episodes always start from `mdp.initial`.
      start_actions: optional int `[N]` first actions (default: drawn from `policy`).

    Returns:
      `Trajectory` with `[T, N]` fields.
    """
    check_shapes(mdp)
    if tuple(policy.shape) != tuple(mdp.rewards.shape):
        raise InvalidArgumentError(
            f"policy: expected shape [S, A] = {tuple(mdp.rewards.shape)}, got {tuple(policy.shape)}")
    for name, value in (("start_states", start_states), ("start_actions", start_actions)):
        if value is not None and tuple(value.shape) != (num_envs,):
            raise InvalidArgumentError(
                f"{name}: expected shape [num_envs] = [{num_envs}], got {tuple(value.shape)}")
    runs = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf)[None], mdp)
    traj = sample_runs(key[None], runs, policy[None], num_envs=num_envs, num_steps=num_steps,
                       max_episode_steps=max_episode_steps,
                       start_states=None if start_states is None else start_states[None],
                       start_actions=None if start_actions is None else start_actions[None])
    return jax.tree_util.tree_map(lambda field: field[:, 0], traj)


def sample_runs(keys: Array, mdp: TabularMDP, policy: Array, *, num_envs: int, num_steps: int,
                max_episode_steps: int | None = None, start_states: Array | None = None,
                start_actions: Array | None = None, fixed_start: int | None = None,
                pack_limit: int = _INT32_LIMIT) -> Trajectory:
    """`sample_trajectories` for `R` runs at once, as one time loop over `R * N` lanes.

    Run `r` gets exactly the trajectory `sample_trajectories(keys[r], mdp_r, policy[r], ...)`
    would give, with no transposes or per-step index arithmetic that `vmap` would add (this is
    the batched form that estimators use under `vmap`).

    Args:
      keys: `[R]` PRNG keys.
      mdp: a `TabularMDP` whose array fields (`transitions` fields, `rewards`, `initial`,
        `terminal`) each have a leading run axis of size `R`, or 1 when shared by all runs
        (`discount` is not used; `terminal` may be None).
      policy: `[R, S, A]` (or `[1, S, A]`).
      start_states, start_actions: optional int `[R, N]`.
      fixed_start: (static) the state every episode starts in, when the caller knows `initial`
        is deterministic (found here only when `initial` is a concrete array).
      pack_limit: (tests) the bound on the int codes packed into one int32 per step.

    Returns:
      `Trajectory` with `[T, R, N]` fields.
    """
    for name, value in (("num_envs", num_envs), ("num_steps", num_steps)):
        if not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name}: expected an int >= 1, got {value!r}")
    if max_episode_steps is not None and (not isinstance(max_episode_steps, int)
                                          or max_episode_steps < 1):
        raise InvalidArgumentError(
            f"max_episode_steps: expected an int >= 1 or None, got {max_episode_steps!r}")
    num_runs = keys.shape[0]
    num_states, num_actions = mdp.rewards.shape[-2:]
    lanes = num_runs * num_envs
    run_of_lane = jnp.arange(lanes, dtype=jnp.int32) // num_envs
    dtype = jnp.result_type(float)
    terminal = (jnp.zeros((1, num_states), bool) if mdp.terminal is None
                else jnp.asarray(mdp.terminal, bool))
    sparse = isinstance(mdp.transitions, SparseTransitions)
    if sparse:
        # Joint inverse CDF over the A x B (action, stored successor) pairs of each state: one
        # uniform per step instead of two, the same distribution.
        branching = mdp.transitions.branching
        outcomes = num_actions * branching
        # An all-zero row (a terminal state's, allowed) samples its first entry, so that the
        # action still follows the policy (the successor is never used).
        probs = mdp.transitions.probs
        probs = jnp.where(probs.sum(-1, keepdims=True) > 0, probs,
                          jax.nn.one_hot(0, branching, dtype=probs.dtype))
        joint = policy[..., None] * probs
        joint_cdf, cdf_offset = run_rows(
            materialize(jnp.cumsum(joint.reshape(joint.shape[:2] + (outcomes,)), axis=-1)),
            run_of_lane, num_runs)
        successors, succ_offset = run_rows(
            mdp.transitions.indices.reshape(-1, num_states * outcomes), run_of_lane, num_runs)
        if start_actions is not None:
            action_cdf, action_offset = run_rows(
                jnp.cumsum(probs, -1).reshape(-1, num_states * num_actions, branching),
                run_of_lane, num_runs)
    else:
        outcomes = num_actions
        policy_cdf, policy_offset = run_rows(materialize(jnp.cumsum(policy, axis=-1)),
                                               run_of_lane, num_runs)
        transition_cdf, transition_offset = run_rows(
            materialize(jnp.cumsum(mdp.transitions, axis=-1)).reshape(
                -1, num_states * num_actions, num_states), run_of_lane, num_runs)
    terminal_table, terminal_offset = run_rows(materialize(terminal.astype(jnp.int32)),
                                                 run_of_lane, num_runs)
    initial_cdf = jnp.cumsum(mdp.initial, axis=-1)                       # [Ri, S]

    def draw_initial(u):
        """States from `initial` for uniforms `u [..., R, N]`."""
        cdf, offset = run_rows(initial_cdf[:, None], run_of_lane, num_runs)
        flat = u.reshape(-1, lanes)
        rows = jnp.broadcast_to(offset, flat.shape).reshape(-1)
        return _inverse_cdf(cdf, rows, flat.reshape(-1)).reshape(u.shape)

    key_start, key_steps, key_reset = jnp.moveaxis(
        jax.vmap(lambda k: jax.random.split(k, 3))(keys), 1, 0)
    start = (draw_initial(uniform_runs(key_start, (num_envs,), dtype)).reshape(lanes)
             if start_states is None else jnp.asarray(start_states, jnp.int32).reshape(lanes))
    uniforms = uniform_runs(key_steps, (num_steps, 1 if sparse else 2, num_envs), dtype, axis=2)
    uniforms = uniforms.reshape(num_steps, uniforms.shape[1], lanes)
    # Reset states: a constant for a (known) deterministic start, else drawn up front.
    initial = concrete_value(mdp.initial)
    reset_state = reset_states = None
    if fixed_start is not None:
        reset_state = jnp.int32(fixed_start)
    elif initial is not None and initial.shape[0] == 1 and np.max(initial) >= 1.0:
        reset_state = jnp.int32(np.argmax(initial))
    else:
        def drawn():
            return draw_initial(uniform_runs(key_reset, (num_steps, num_envs), dtype, axis=1))
        det = jnp.max(mdp.initial, axis=-1) >= 1.0                        # [Ri]
        if mdp.initial.shape[0] == 1:
            reset_states = lax.cond(
                det[0], lambda: jnp.full((num_steps, num_runs, num_envs),
                                         jnp.argmax(mdp.initial[0]), jnp.int32), drawn)
        else:
            # Per-run starts: a deterministic run takes its argmax (its draws are not used).
            fixed = jnp.argmax(mdp.initial, axis=-1).astype(jnp.int32)
            reset_states = jnp.where(det[None, :, None], fixed[None, :, None], drawn())
        reset_states = reset_states.reshape(num_steps, lanes)
    forcing = start_actions is not None
    first_actions = None if not forcing else jnp.asarray(start_actions, jnp.int32).reshape(lanes)

    # In-episode times stay below `time_bound`; `time * S + state` is the loop's one carry and
    # `code * outcomes + outcome` the one int32 stacked per step when it fits (else two rows).
    time_bound = num_steps if max_episode_steps is None else min(num_steps, max_episode_steps)
    if time_bound * num_states >= pack_limit:
        raise InvalidArgumentError(
            f"num_steps: {num_steps} steps x {num_states} states exceed the int32 codes of the "
            "rollout; pass max_episode_steps or fewer steps")
    packed = time_bound * num_states * outcomes < pack_limit

    def draw(state, u, force):
        """Outcome index: sparse `action * B + k`, dense the action (successor returned too)."""
        if sparse:
            pair = _inverse_cdf(joint_cdf, cdf_offset + state, u[0])
            if forcing:
                # A forced first action: its successor from that action's row of the kernel.
                k = _inverse_cdf(action_cdf, action_offset + state * num_actions + first_actions,
                                 u[0])
                pair = jnp.where(force, first_actions * branching + k, pair)
            return pair, successors[succ_offset + state * outcomes + pair]
        action = _inverse_cdf(policy_cdf, policy_offset + state, u[0])
        if forcing:
            action = jnp.where(force, first_actions, action)
        return action, _inverse_cdf(transition_cdf,
                                    transition_offset + state * num_actions + action, u[1])

    def step(code, inputs):
        u, force, reset = inputs
        state, time = code % num_states, code // num_states
        outcome, next_state = draw(state, u, force)
        done = terminal_table[terminal_offset + state] > 0
        if max_episode_steps is not None:
            done = done | (time + 1 >= max_episode_steps)
        reset = reset_state if reset is None else reset
        new_code = jnp.where(done, reset, (time + 1) * num_states + next_state)
        if packed and sparse:
            out = code * outcomes + outcome
        elif packed:
            out = jnp.stack([code * outcomes + outcome, next_state])
        else:
            out = jnp.stack([code, outcome] + ([] if sparse else [next_state]))
        return new_code, out

    forced = None if not forcing else jnp.zeros(num_steps, bool).at[0].set(True)
    _, out = lax.scan(step, start, (uniforms, forced, reset_states))
    if packed:
        rows = out if sparse else out[:, 0]
        codes, outcome = rows // outcomes, rows % outcomes
    else:
        codes, outcome = out[:, 0], out[:, 1]
    states, times = codes % num_states, codes // num_states
    if sparse:
        actions = outcome // branching
        next_states = successors[succ_offset + states * outcomes + outcome]
    else:
        actions = outcome
        next_states = out[:, 1] if packed else out[:, 2]
    terminated = terminal_table[terminal_offset + states] > 0
    dones = terminated
    if max_episode_steps is not None:
        dones = dones | (times + 1 >= max_episode_steps)
    rewards, reward_offset = run_rows(mdp.rewards.reshape(mdp.rewards.shape[0], -1),
                                        run_of_lane, num_runs)
    traj = Trajectory(states=states, actions=actions,
                      rewards=rewards[reward_offset + states * num_actions + actions],
                      next_states=next_states, dones=dones, terminated=terminated, times=times)
    return jax.tree_util.tree_map(lambda f: f.reshape((num_steps, num_runs, num_envs)), traj)
