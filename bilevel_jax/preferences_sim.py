"""RLHF on simulators (SPEC 7.4 on the sample forms of SPEC 9): reward models of observations,
segment pairs from rollouts, the synthetic annotator on the hidden environment reward, a FIFO
pair buffer, the Bradley-Terry loss and its score-function term.

The leader's `x` parameterizes a reward model `r_x(obs, action)` (a flax network: a small CNN
for image observations such as MinAtar's `10 x 10 x C` frames, an MLP for vector ones). The
follower acts in a gymnax environment with reward `r_x`; the environment's own reward is hidden
from it and serves only the annotator. The upper-level loss is the Bradley-Terry NLL of the
annotator's labels on pairs of fixed-length segments drawn from the CURRENT policy's rollouts:

    L(x, pi) = E_{(sigma1, sigma2) ~ pi} E_l [ -log sigmoid(s_l (R_x(sigma1) - R_x(sigma2))) ]
    R_x(sigma) = sum_{k < L} alive_k r_x(obs_k, a_k)

**Segments** (`segments_from_rollout`): a rollout `[T, N]` of `bj.sim.rollout` (auto-reset,
fresh episodes at its start); segment number `j` of the `2M` segments (pair `i` holds segments
`2i`, `2i+1`) is taken in lane `perm[j mod N]` (`perm` a random permutation of the lanes, so
segments come from distinct lanes while `2M <= N`), starting at a step drawn uniformly among the
lane's valid starts: `t0 <= T - L` with no episode end in steps `t0 .. t0 + L - 2` (the whole
segment inside one episode; its last step may end it). A lane with no valid start (every window
of `L` steps crosses an episode end) falls back to a uniform `t0 <= T - L`, and the steps after
the first episode end are not `alive` (zero reward, no action: as the tabular pairs' absorbed
steps).

**Annotator** (`annotate`): prefers `sigma1` with probability
`preferences.preference_probability(G(sigma1) - G(sigma2), noise)`, `G` the segment's sum of the
environment's reward over the alive steps (`noise = 0`: the higher return wins, ties by a coin).

**Gradients.** `grad_x L = E[grad_x loss]`; the pairs' distribution depends on the policy, so
`grad_y L = E[(loss - b) grad_y (log pi_y(sigma1) + log pi_y(sigma2))]` with
`log pi_y(sigma) = sum_k alive_k log pi_y(a_k | obs_k)` and the leave-one-out baseline of
`preferences.score_weights`. This score term is exact when the segments are whole episodes
from the initial distribution (`L` = the rollout length, no episode end inside); for segments
from the middle of episodes it omits the dependence of the segment's first state on the policy
(the actions before the segment), the convention of the issue ("log-probabilities of the
segments' actions").
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from flax import struct

from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.preferences import (BASELINES, PairBuffer, RewardModel, accuracy_of_returns,
                                     check_noise, preference_probability, score_weights)
from bilevel_jax.sim import spaces

Array = jax.Array


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def _check_hidden(name: str, hidden) -> tuple[int, ...]:
    try:
        hidden = tuple(hidden)
    except TypeError:
        raise InvalidArgumentError(f"{name}: expected a sequence of ints >= 1, got {hidden!r}") from None
    if any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1 for h in hidden):
        raise InvalidArgumentError(f"{name}: expected a sequence of ints >= 1, got {hidden!r}")
    return tuple(int(h) for h in hidden)


# --------------------------------------------------------------------------------------------
# Reward models of (observation, action)
# --------------------------------------------------------------------------------------------
# A `preferences.RewardModel(init, apply)` whose `apply(params, obs, action) -> scalar` takes ONE
# observation (any shape) and an int action: the network maps the observation to `[A]` rewards
# (one per action, like a Q-head) and the action picks one.


def _pick(out: Array, action) -> Array:
    return jnp.take(out, jnp.asarray(action, jnp.int32), axis=-1)


def mlp_reward_model(obs_shape: Sequence[int], num_actions: int, hidden=(64, 64), *,
                     dtype=jnp.float32) -> RewardModel:
    """`r_x(obs, a)`: flattened observation -> tanh MLP (`hidden`) -> `[A]` -> entry `a`.

    Params are linen variables `{"params": ...}` (default linen initializers)."""
    obs_shape = tuple(int(d) for d in obs_shape)
    num_actions = _check_int("num_actions", num_actions, 1)
    hidden = _check_hidden("hidden", hidden)

    class RewardMLP(nn.Module):
        @nn.compact
        def __call__(self, obs):
            h = jnp.asarray(obs, dtype).reshape(-1)
            for width in hidden:
                h = jnp.tanh(nn.Dense(width, dtype=dtype, param_dtype=dtype)(h))
            return nn.Dense(num_actions, dtype=dtype, param_dtype=dtype)(h)

    return _module_reward_model(RewardMLP(), obs_shape, dtype)


def _module_reward_model(module, obs_shape: tuple, dtype) -> RewardModel:
    """A linen module `obs -> [A]` as `RewardModel(init, apply(params, obs, action))`."""
    def init(key):
        return module.init(key, jnp.zeros(obs_shape, dtype))

    def apply(params, obs, action):
        return _pick(module.apply(params, obs), action)

    return RewardModel(init, apply)


class PatchConv(nn.Module):
    """`nn.Conv(features, (k, k), padding="SAME")` on one `[H, W, C]` image (stride 1, same
    `kernel [k, k, C, F]` / `bias [F]` params and init), computed as the `k*k` shifted copies
    of the padded image times the kernel, one dot.

    Why not `nn.Conv`: on XLA's CPU backend (jax 0.10.2) the kernel gradient of a convolution
    inside a loop body (`lax.scan`: every reward fit) ran 14x slower than the same gradient
    outside one (2.5 s against 0.19 s for 3,200 MinAtar frames); dots do not have that problem,
    and the shifted copies of a 10 x 10 frame are small."""

    features: int
    kernel: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image):
        k, channels = self.kernel, image.shape[-1]
        weight = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, channels, self.features), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        low = (k - 1) // 2       # SAME padding of a stride-1 convolution
        height, width = image.shape[0], image.shape[1]
        padded = jnp.pad(image, ((low, k - 1 - low), (low, k - 1 - low), (0, 0)))
        patches = jnp.concatenate([padded[i:i + height, j:j + width]
                                   for i in range(k) for j in range(k)], axis=-1)
        return patches @ weight.reshape(k * k * channels, self.features) + bias


def cnn_reward_model(obs_shape: Sequence[int], num_actions: int, channels=(16,), kernel: int = 3,
                     hidden=(64,), *, dtype=jnp.float32) -> RewardModel:
    """`r_x(obs, a)` for image observations `[H, W, C]` (MinAtar): ReLU convolutions
    (`channels`, `kernel x kernel`, stride 1, SAME padding), flatten, ReLU dense `hidden`,
    linear `[A]`, entry `a`."""
    obs_shape = tuple(int(d) for d in obs_shape)
    if len(obs_shape) != 3:
        raise InvalidArgumentError(
            f"obs_shape: expected an image shape [H, W, C] for the CNN, got {obs_shape}")
    num_actions = _check_int("num_actions", num_actions, 1)
    channels = _check_hidden("channels", channels)
    hidden = _check_hidden("hidden", hidden)
    kernel = _check_int("kernel", kernel, 1)

    class RewardCNN(nn.Module):
        @nn.compact
        def __call__(self, obs):
            h = jnp.asarray(obs, dtype)
            for i, c in enumerate(channels):
                h = nn.relu(PatchConv(c, kernel, dtype=dtype, name=f"Conv_{i}")(h))
            h = h.reshape(-1)
            for width in hidden:
                h = nn.relu(nn.Dense(width, dtype=dtype, param_dtype=dtype)(h))
            return nn.Dense(num_actions, dtype=dtype, param_dtype=dtype)(h)

    return _module_reward_model(RewardCNN(), obs_shape, dtype)


def check_reward_model(apply: Callable, params, obs, action) -> None:
    """Raises `InvalidArgumentError` naming `reward_model` unless `apply(params, obs, action)`
    (one observation, one action) is a scalar."""
    if not callable(apply):
        raise InvalidArgumentError(
            f"reward_model: expected a RewardModel or an apply(params, obs, action) function, "
            f"got {type(apply).__name__}")
    try:
        out = jax.eval_shape(apply, params, obs, action)
    except Exception as err:  # noqa: BLE001 - re-raised naming the field
        raise InvalidArgumentError(
            f"reward_model: applying it to (x, one observation, one action) failed: "
            f"{type(err).__name__}: {err}") from None
    shape = tuple(getattr(out, "shape", (None,)))
    if shape != () or not jnp.issubdtype(getattr(out, "dtype", jnp.int32), jnp.floating):
        raise InvalidArgumentError(
            f"reward_model: expected a float scalar per step (one observation, one action), got "
            f"{getattr(out, 'dtype', type(out).__name__)} of shape {shape}")


# --------------------------------------------------------------------------------------------
# Segment pairs
# --------------------------------------------------------------------------------------------

@struct.dataclass
class SegmentPairs:
    """`M` pairs of `L`-step segments; leading axes `[M, 2, L]`.

    Attributes:
      obs: observations `[M, 2, L, *obs_shape]` (the rollout's dtype).
      actions: int actions `[M, 2, L]` (0 where not alive).
      rewards: the environment's (hidden) reward `[M, 2, L]` (0 where not alive).
      alive: bool `[M, 2, L]`: the step belongs to the segment's episode.
      lane, start: int `[M, 2]`: where in the rollout each segment was taken (diagnostics).
    """

    obs: Any
    actions: Array
    rewards: Array
    alive: Array
    lane: Array
    start: Array

    @property
    def num_pairs(self) -> int:
        return self.actions.shape[0]

    @property
    def length(self) -> int:
        return self.actions.shape[-1]


def check_segment_length(segment_length, num_steps: int) -> int:
    """`segment_length` as an int in `[1, num_steps]`, or `InvalidArgumentError` naming it."""
    segment_length = _check_int("segment_length", segment_length, 1)
    if segment_length > num_steps:
        raise InvalidArgumentError(
            f"segment_length: expected at most the rollout's length num_steps = {num_steps}, got "
            f"{segment_length}")
    return segment_length


def segments_from_rollout(key: Array, traj, segment_length: int, num_pairs: int) -> SegmentPairs:
    """`num_pairs` segment pairs from a rollout `traj` (`bj.sim.rollout`, `[T, N]` leading axes;
    only `obs`, `action`, `reward`, `done` are read). See the module doc for the draw.

    Raises:
      InvalidArgumentError: `segment_length` > `T` or < 1 (named), `num_pairs` < 1, a factorized
        (tuple) action.
    """
    num_steps, num_envs = traj.done.shape[:2]
    length = check_segment_length(segment_length, num_steps)
    num_pairs = _check_int("num_pairs", num_pairs, 1)
    if traj.action.ndim != 2:
        raise InvalidArgumentError(
            f"traj.action: expected one discrete action per step, shape [T, N], got "
            f"{tuple(traj.action.shape)}")
    num_starts = num_steps - length + 1
    done = traj.done.astype(jnp.int32)                                      # [T, N]
    # ends[t, n] = number of episode ends in steps < t (exclusive prefix sum).
    ends = jnp.concatenate([jnp.zeros((1, num_envs), jnp.int32), jnp.cumsum(done, 0)], 0)
    t0 = jnp.arange(num_starts)
    inside = (ends[t0 + length - 1] - ends[t0]) == 0                        # [S0, N]
    has_valid = jnp.any(inside, axis=0)                                     # [N]
    mask = jnp.where(has_valid[None, :], inside, True)

    k_perm, k_start = jax.random.split(key)
    count = 2 * num_pairs
    perm = jax.random.permutation(k_perm, num_envs)
    lanes = perm[jnp.arange(count) % num_envs]                              # [2M]
    logits = jnp.where(mask[:, lanes].T, 0.0, -jnp.inf)                     # [2M, S0]
    starts = jax.random.categorical(k_start, logits, axis=-1)               # [2M]
    steps = starts[:, None] + jnp.arange(length)[None, :]                   # [2M, L]
    lanes_b = jnp.broadcast_to(lanes[:, None], steps.shape)
    seg_done = done[steps, lanes_b]
    alive = (jnp.cumsum(seg_done, axis=1) - seg_done) == 0                  # through the first end

    def take(a):
        return a[steps, lanes_b]

    obs = jax.tree_util.tree_map(take, traj.obs)
    actions = jnp.where(alive, take(traj.action), 0).astype(jnp.int32)
    rewards = jnp.where(alive, take(jnp.asarray(traj.reward)), 0.0)

    def layout(a):
        return a.reshape((num_pairs, 2) + a.shape[1:])

    return SegmentPairs(obs=jax.tree_util.tree_map(layout, obs), actions=layout(actions),
                        rewards=layout(rewards), alive=layout(alive),
                        lane=layout(lanes.astype(jnp.int32)), start=layout(starts.astype(jnp.int32)))


def true_returns(pairs: SegmentPairs) -> Array:
    """`[M, 2]` environment-reward returns of the segments (alive steps)."""
    return jnp.sum(jnp.where(pairs.alive, pairs.rewards, 0.0), axis=-1)


def annotate(key: Array, pairs: SegmentPairs, noise) -> Array:
    """Synthetic labels `[M]`: 1.0 where the annotator prefers segment 0 of the pair.

    `P(label = 1) = preference_probability(G(sigma1) - G(sigma2), noise)` (the tabular
    annotator's conventions). Raises `InvalidArgumentError` naming `noise` (concrete, < 0)."""
    check_noise(noise)
    g = true_returns(pairs)
    prob = preference_probability(g[:, 0] - g[:, 1], noise)
    return (jax.random.uniform(key, prob.shape, prob.dtype) < prob).astype(prob.dtype)


def _map_steps(fn, obs, actions):
    """`fn(one obs, one action)` over the leading `[M, 2, L]` axes."""
    return jax.vmap(jax.vmap(jax.vmap(fn)))(obs, actions)


def segment_returns(apply: Callable, params, pairs: SegmentPairs) -> Array:
    """`[M, 2]` model returns `R_x(sigma) = sum_k alive_k r_x(obs_k, a_k)`."""
    values = _map_steps(lambda o, a: apply(params, o, a), pairs.obs, pairs.actions)
    return jnp.sum(jnp.where(pairs.alive, values, 0.0), axis=-1)


def segment_log_probs(policy_apply: Callable, policy_params, pairs: SegmentPairs) -> Array:
    """`[M, 2]` `log pi_y(sigma) = sum_k alive_k log pi_y(a_k | obs_k)`, with
    `policy_apply(policy_params, obs) -> logits [A]` for one observation."""
    logp = _map_steps(lambda o, a: spaces.log_prob(policy_apply(policy_params, o), a),
                      pairs.obs, pairs.actions)
    return jnp.sum(jnp.where(pairs.alive, logp, 0.0), axis=-1)


def pair_losses(apply: Callable, params, pairs: SegmentPairs, labels: Array) -> Array:
    """`[M]` Bradley-Terry losses `-l log sigmoid(d) - (1 - l) log sigmoid(-d)`,
    `d = R_x(sigma1) - R_x(sigma2)` (labels may be probabilities)."""
    r = segment_returns(apply, params, pairs)
    d = r[:, 0] - r[:, 1]
    labels = labels.astype(d.dtype)
    return labels * jax.nn.softplus(-d) + (1.0 - labels) * jax.nn.softplus(d)


def bradley_terry_nll(apply: Callable, params, pairs: SegmentPairs, labels: Array,
                      weights: Array | None = None) -> Array:
    """Mean (or `weights`-weighted mean, e.g. a buffer's validity mask) of `pair_losses`."""
    losses = pair_losses(apply, params, pairs, labels)
    if weights is None:
        return jnp.mean(losses)
    weights = weights.astype(losses.dtype)
    return jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1.0)


def preference_accuracy(apply: Callable, params, pairs: SegmentPairs, true_gaps: Array) -> Array:
    """Fraction of pairs with `true_gaps != 0` where the model orders the segments as the true
    return does (model ties count 1/2); NaN when every true gap is 0."""
    return accuracy_of_returns(segment_returns(apply, params, pairs), true_gaps)


def score_surrogate(policy_apply: Callable, policy_params, pairs: SegmentPairs,
                    weights: Array) -> Array:
    """`sum_i weights_i (log pi_y(sigma_i1) + log pi_y(sigma_i2))`, weights held constant: its
    gradient in `policy_params` is the score-function term for `weights = score_weights(...)`."""
    weights = jax.lax.stop_gradient(weights)
    return jnp.sum(weights * jnp.sum(segment_log_probs(policy_apply, policy_params, pairs), -1))


def preference_gradients(apply: Callable, params, policy_apply: Callable, policy_params,
                         pairs: SegmentPairs, labels: Array, *,
                         baseline: str = "leave_one_out"):
    """Estimates of `grad_x L` and `grad_y L` from pairs drawn from `pi_y` and their labels.

    Returns `(loss, grad_x, grad_y)`: the mean loss, its gradient in the reward model's params,
    and the score term `mean_i (loss_i - b_i) grad_y (log pi_y(sigma_i1) + log pi_y(sigma_i2))`.
    """
    if baseline not in BASELINES:
        raise InvalidArgumentError(f"baseline: expected one of {BASELINES}, got {baseline!r}")

    def loss_fn(p):
        losses = pair_losses(apply, p, pairs, labels)
        return jnp.mean(losses), losses

    (loss, losses), grad_x = jax.value_and_grad(loss_fn, has_aux=True)(params)
    weights = score_weights(jax.lax.stop_gradient(losses), baseline)
    grad_y = jax.grad(lambda q: score_surrogate(policy_apply, q, pairs, weights))(policy_params)
    return loss, grad_x, grad_y


# --------------------------------------------------------------------------------------------
# FIFO buffer (ring arrays, jittable)
# --------------------------------------------------------------------------------------------

# The FIFO ring of `preferences.PairBuffer`, holding `SegmentPairs` (`[B, 2, L]` fields).
SegmentBuffer = PairBuffer


def empty_buffer(size: int, like: SegmentPairs, dtype=jnp.float32) -> SegmentBuffer:
    """A buffer of `size` slots for pairs shaped like `like` (any number of pairs)."""
    size = _check_int("buffer_size", size, 1)
    pairs = jax.tree_util.tree_map(lambda a: jnp.zeros((size,) + a.shape[1:], a.dtype), like)
    return PairBuffer(pairs=pairs, labels=jnp.zeros((size,), dtype),
                         count=jnp.zeros((), jnp.int32))


def push_pairs(buffer: SegmentBuffer, pairs: SegmentPairs, labels: Array) -> SegmentBuffer:
    """Appends `M <= B` labelled pairs, overwriting the oldest ones once full (FIFO)."""
    n, size = pairs.num_pairs, buffer.size
    if n > size:
        raise InvalidArgumentError(
            f"pairs: expected at most buffer_size = {size} pairs per push, got {n}")
    if tuple(labels.shape) != (n,):
        raise InvalidArgumentError(f"labels: expected shape [{n}], got {tuple(labels.shape)}")
    slots = (buffer.count + jnp.arange(n)) % size
    new = jax.tree_util.tree_map(lambda old, a: old.at[slots].set(a.astype(old.dtype)),
                                 buffer.pairs, pairs)
    return PairBuffer(pairs=new, labels=buffer.labels.at[slots].set(
        labels.astype(buffer.labels.dtype)), count=buffer.count + n)


def take_pairs(pairs: SegmentPairs, start: int, stop: int) -> SegmentPairs:
    """Pairs `start:stop` (static bounds)."""
    return jax.tree_util.tree_map(lambda a: a[start:stop], pairs)


# --------------------------------------------------------------------------------------------
# Episodic returns of a rollout (the true-return metric)
# --------------------------------------------------------------------------------------------

def episodic_returns(rewards: Array, time: Array, done: Array):
    """`(mean, count)`: the mean undiscounted return of the episodes that both start and end
    inside the rollout window `[T, N]` (`time == 0` at their first step, `done` at their last),
    and how many there are (`mean` NaN when none)."""
    rewards = jnp.asarray(rewards)
    dtype = jnp.result_type(rewards.dtype, jnp.float32)
    done_f = done.astype(dtype)

    def body(carry, inp):
        g, ends = carry
        r, d = inp
        g = r + (1.0 - d) * g
        ends = jnp.where(d > 0, True, ends)
        return (g, ends), (g, ends)

    init = (jnp.zeros(rewards.shape[1:], dtype), jnp.zeros(rewards.shape[1:], bool))
    _, (g, ends) = jax.lax.scan(body, init, (rewards.astype(dtype), done_f), reverse=True)
    full = (time == 0) & ends
    count = jnp.sum(full)
    mean = jnp.where(count > 0, jnp.sum(jnp.where(full, g, 0.0)) / jnp.maximum(count, 1), jnp.nan)
    return mean, count


__all__ = ["SegmentBuffer", "SegmentPairs", "annotate", "bradley_terry_nll", "check_reward_model",
           "check_segment_length", "cnn_reward_model", "empty_buffer", "episodic_returns",
           "mlp_reward_model", "pair_losses", "preference_accuracy", "preference_gradients",
           "push_pairs", "score_surrogate", "segment_log_probs", "segment_returns",
           "segments_from_rollout", "take_pairs", "true_returns"]
