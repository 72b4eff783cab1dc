"""RLHF as bilevel RL (SPEC 7.4): reward models, the synthetic annotator, trajectory pairs,
the Bradley-Terry loss and its gradients.

The leader's variable `x` parameterizes a reward model `r_x(s, a) = apply(x, phi)[s, a]`; the
lower level is `pi*_x`, the soft-optimal policy (temperature `lam`, discount `gamma`) of the
environment MDP with reward `r_x`. The upper-level loss is the Bradley-Terry negative
log-likelihood of the annotator's labels on pairs of trajectories DRAWN FROM THE POLICY:

    L(x, pi) = E_{tau1, tau2 ~ pi} E_{l ~ annotator} [ -log sigmoid(s_l (R_x(tau1) - R_x(tau2))) ]
    R_x(tau) = sum_{t < H} alive_t r_x(s_t, a_t),     s_l = +1 if l = 1 (tau1 preferred) else -1

Trajectories have a fixed horizon `H` and start from the MDP's initial distribution; after
acting in a terminal state the trajectory is absorbed: the later steps are not "alive", earn
zero reward and carry no action (they are stored as state 0, action 0 so that each trajectory
has exactly one representation). The annotator prefers `tau1` with probability
`sigmoid((G(tau1) - G(tau2)) / noise)`, `G` the true return (same sum with the hidden reward);
`noise = 0` is the noiseless limit (the higher return wins, ties by a fair coin).

Gradients. `L` depends on `x` through `R_x` and on the policy through the distribution of the
pairs, so with `pi = softmax(y)` (tabular logits `y [S, A]`):

    grad_x L = E[ grad_x loss ]
    grad_y L = E[ loss * (grad_y log pi(tau1) + grad_y log pi(tau2)) ],
    log pi(tau) = sum_t alive_t log pi(a_t | s_t)        (transitions do not depend on y)

The sampled estimator (`stochastic_gradients`) replaces `loss_i` in the score term by
`loss_i - b_i` with the leave-one-out baseline `b_i = mean_{j != i} loss_j` over the other
pairs of the same batch: `b_i` is independent of pair `i` (pairs are i.i.d.), so
`E[b_i * score_i] = E[b_i] E[score_i] = 0` and the estimator stays unbiased, while the large
common part of the losses (about log 2 at the start) no longer multiplies the score's noise.
`exact_preference_loss` enumerates every trajectory (tiny instances) for tests.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from bilevel_jax.core.evaluation import policy_evaluation
from bilevel_jax.core.mdp import SparseTransitions, TabularMDP, check_shapes
from bilevel_jax.core.rollout import _inverse_cdf

from bilevel_jax.core.soft_vi import check_temperature, value_iteration
from bilevel_jax.envs.preference import PreferenceEnv
from bilevel_jax.errors import InvalidArgumentError

Array = jax.Array

BASELINES = ("leave_one_out", "none")
MAX_ENUMERATED = 4096   # trajectories enumerated by `enumerate_trajectories`


# --------------------------------------------------------------------------------------------
# Reward models
# --------------------------------------------------------------------------------------------

class RewardModel(NamedTuple):
    """A reward model: `init(key) -> params`, `apply(params, phi [..., d]) -> [...]`.

    Applied to the features table `phi [S, A, d]` it gives the reward table `[S, A]`.
    """

    init: Callable[[Array], Any]
    apply: Callable[[Any, Array], Array]


def linear_reward_model(dim: int, *, init_scale: float = 0.0, dtype=jnp.float32) -> RewardModel:
    """`r_x(s, a) = phi(s, a) . w`, params `{"w": [d]}` (zeros, or `N(0, init_scale^2)`)."""
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidArgumentError(f"dim: expected an int >= 1, got {dim!r}")

    def init(key):
        if init_scale == 0:
            return {"w": jnp.zeros((dim,), dtype)}
        return {"w": init_scale * jax.random.normal(key, (dim,), dtype)}

    def apply(params, phi):
        return phi @ params["w"]

    return RewardModel(init, apply)


def mlp_reward_model(dim: int, hidden=(32, 32), *, dtype=jnp.float32) -> RewardModel:
    """A flax linen MLP `phi(s, a) -> r` (tanh hidden layers of widths `hidden`, linear output).

    Params are the linen variables `{"params": ...}`; `init(key)` uses the default linen
    initializers (so the initial rewards are small but not zero).
    """
    import flax.linen as nn

    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidArgumentError(f"dim: expected an int >= 1, got {dim!r}")
    hidden = tuple(hidden)
    if any(not isinstance(h, (int, np.integer)) or h < 1 for h in hidden):
        raise InvalidArgumentError(f"hidden: expected positive ints, got {hidden!r}")

    class RewardMLP(nn.Module):
        @nn.compact
        def __call__(self, phi):
            h = phi
            for width in hidden:
                h = jnp.tanh(nn.Dense(width, dtype=dtype, param_dtype=dtype)(h))
            return nn.Dense(1, dtype=dtype, param_dtype=dtype)(h)[..., 0]

    module = RewardMLP()

    def init(key):
        return module.init(key, jnp.zeros((dim,), dtype))

    def apply(params, phi):
        return module.apply(params, phi)

    return RewardModel(init, apply)


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------

@struct.dataclass
class RLHFProblem:
    """RLHF as a bilevel problem (a pytree: usable under `jit` and `vmap`).

    Attributes:
      env: the `PreferenceEnv` (environment MDP with the hidden true reward, features).
      reward_fn: `(x, phi [S, A, d]) -> [S, A]`, the reward model's apply (static).
      temperature: `lam > 0` of the lower level (may be traced).
      noise: annotator noise `>= 0` (0: noiseless; may be traced).
      returns: `[3]` true returns `mu . V^pi` (discount `gamma`, no entropy) of the worst, the
        uniform and the best policy; `return_fraction` normalizes with the worst and the best.
      horizon: trajectory length `H` (static).
      initial_pairs, warmup_epochs, pairs_per_epoch, buffer_size, heldout_pairs: the data
        protocol (static ints), see `bilevel_jax.algorithms.rlhf`.
    """

    env: PreferenceEnv
    returns: Array
    reward_fn: Callable[[Any, Array], Array] = struct.field(pytree_node=False)
    temperature: Any = 0.1
    noise: Any = 0.0
    horizon: int = struct.field(pytree_node=False, default=12)
    initial_pairs: int = struct.field(pytree_node=False, default=32)
    warmup_epochs: int = struct.field(pytree_node=False, default=20)
    pairs_per_epoch: int = struct.field(pytree_node=False, default=16)
    buffer_size: int = struct.field(pytree_node=False, default=512)
    heldout_pairs: int = struct.field(pytree_node=False, default=256)

    @property
    def mdp(self) -> TabularMDP:
        """The environment MDP (its rewards are the hidden true reward)."""
        return self.env.mdp

    def reward(self, x) -> Array:
        """`[S, A]` reward model table `r_x`."""
        return self.reward_fn(x, self.env.features)

    def follower_mdp(self, x) -> TabularMDP:
        """The lower level's MDP: the environment with reward `r_x`."""
        return self.env.mdp.replace(rewards=self.reward(x))

    def bilevel(self):
        """The lower level as a context-free `BilevelProblem` (follower `x -> MDP with r_x`), for
        the penalties of `bilevel_jax.penalties`. Its leader reward (the true reward) is unused
        by the penalties."""
        from bilevel_jax.problem import BilevelProblem

        return BilevelProblem(follower=lambda x, context: self.follower_mdp(x),
                              leader_reward=lambda x, context: self.env.true_reward,
                              leader_discount=self.env.mdp.discount,
                              temperature=self.temperature)

    def true_return(self, policy: Array) -> Array:
        """`mu . V^pi` of the true reward (discount `gamma`, no entropy bonus)."""
        v = policy_evaluation(self.env.mdp, policy).v
        return jnp.dot(self.env.mdp.initial.astype(v.dtype), v)

    def return_fraction(self, policy: Array) -> Array:
        """`(J(pi) - J_worst) / (J_best - J_worst)` in `[0, 1]`: 1 for an optimal policy of the
        true reward, 0 for a pessimal one (`J` = `true_return`, best and worst over all policies
        by value iteration; every policy's return lies between them)."""
        return self.normalize_return(self.true_return(policy))

    def normalize_return(self, value: Array) -> Array:
        """`(value - J_worst) / (J_best - J_worst)` (see `return_fraction`)."""
        worst, best = self.returns[0], self.returns[2]
        return (value - worst) / (best - worst)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def check_protocol(initial_pairs, warmup_epochs, pairs_per_epoch, heldout_pairs, buffer_size):
    """The data protocol's counts as ints, refused (naming the field) when out of range or when
    a push would not fit the buffer."""
    counts = (_check_int("initial_pairs", initial_pairs, 0),
              _check_int("warmup_epochs", warmup_epochs, 0),
              _check_int("pairs_per_epoch", pairs_per_epoch, 1),
              _check_int("heldout_pairs", heldout_pairs, 1),
              _check_int("buffer_size", buffer_size, 1))
    for name, value in (("initial_pairs", counts[0]), ("pairs_per_epoch", counts[2])):
        if value > counts[4]:
            raise InvalidArgumentError(
                f"buffer_size: expected an int >= {name} ({value}), got {counts[4]}")
    return counts


def check_noise(noise) -> None:
    """Raises `InvalidArgumentError` for a concrete annotator noise that is not a finite `>= 0`."""
    try:
        values = np.asarray(noise, dtype=np.float64)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return  # traced (swept under vmap): checked where it is concrete
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(f"noise: expected a number >= 0, got {noise!r}") from err
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise InvalidArgumentError(
            f"noise: expected a finite number >= 0 (0: noiseless annotator), got {noise!r}")


def rlhf_problem(env: PreferenceEnv, reward_model: RewardModel | Callable, *,
                 temperature=0.1, noise=0.0, horizon: int = 12, initial_pairs: int = 32,
                 warmup_epochs: int = 20, pairs_per_epoch: int = 16, buffer_size: int = 512,
                 heldout_pairs: int = 256) -> RLHFProblem:
    """Builds and checks an `RLHFProblem` (host-side, eager).

    Args:
      env: a `PreferenceEnv`.
      reward_model: a `RewardModel` (its `apply` is used) or an `apply(params, phi)` function.
      temperature: `lam > 0`; noise: annotator noise `>= 0`; horizon: `H >= 1`.
      initial_pairs (>= 0), warmup_epochs (>= 0), pairs_per_epoch (>= 1), buffer_size
        (>= both pair counts), heldout_pairs (>= 1): the data protocol. The PBRL paper's
        (Atari: 576, 500, 16, 3,000) is scaled to small tabular problems in the defaults
        (32, 20, 16, 512): with hundreds of initial pairs a model of ~100 parameters is
        learned before the loop starts, leaving nothing to compare; the 512-pair buffer holds
        the pairs of the last 32 iterations (the paper's, of the last ~190 reward epochs).

    Raises:
      InvalidArgumentError: naming the offending argument.
      InvalidMDPError: a malformed environment MDP.
    """
    if not isinstance(env, PreferenceEnv):
        raise InvalidArgumentError(f"env: expected a PreferenceEnv, got {type(env).__name__}")
    check_shapes(env.mdp)
    num_states, num_actions = env.mdp.rewards.shape[-2:]
    shape = tuple(getattr(env.features, "shape", ()))
    if len(shape) != 3 or shape[:2] != (num_states, num_actions):
        raise InvalidArgumentError(
            f"features: expected shape [S, A, d] = [{num_states}, {num_actions}, d], got {shape}")
    try:
        check_temperature(temperature)
    except ValueError as err:
        raise InvalidArgumentError(str(err)) from None
    check_noise(noise)
    horizon = _check_int("horizon", horizon, 1)
    initial_pairs, warmup_epochs, pairs_per_epoch, heldout_pairs, buffer_size = check_protocol(
        initial_pairs, warmup_epochs, pairs_per_epoch, heldout_pairs, buffer_size)
    apply = reward_model.apply if isinstance(reward_model, RewardModel) else reward_model
    if not callable(apply):
        raise InvalidArgumentError(
            f"reward_model: expected a RewardModel or an apply(params, phi) function, got "
            f"{type(reward_model).__name__}")

    returns = _return_range(env.mdp)
    if not float(returns[2] - returns[0]) > 1e-6 * max(1.0, float(jnp.max(jnp.abs(returns)))):
        raise InvalidArgumentError(
            "env: every policy has the same true return (the true reward cannot rank policies)")
    return RLHFProblem(env=env, returns=returns, reward_fn=apply, temperature=temperature,
                       noise=noise, horizon=horizon, initial_pairs=initial_pairs,
                       warmup_epochs=warmup_epochs, pairs_per_epoch=pairs_per_epoch,
                       buffer_size=buffer_size, heldout_pairs=heldout_pairs)


@jax.jit
def _return_range(mdp: TabularMDP) -> Array:
    """`[3]` true returns `mu . V` of the worst, the uniform and the best policy (one compiled
    program: the eager solves would each compile on their own)."""
    best = value_iteration(mdp).v
    worst = -value_iteration(mdp.replace(rewards=-mdp.rewards)).v
    num_actions = mdp.rewards.shape[-1]
    uniform = policy_evaluation(mdp, jnp.full(mdp.rewards.shape, 1.0 / num_actions,
                                              mdp.rewards.dtype)).v
    return jnp.stack([jnp.dot(mdp.initial, worst), jnp.dot(mdp.initial, uniform),
                      jnp.dot(mdp.initial, best)])


def check_params(problem: RLHFProblem, x) -> None:
    """Raises `InvalidArgumentError` naming `x` when the reward model cannot take it (shapes)."""
    expected = tuple(problem.env.true_reward.shape)
    try:
        out = jax.eval_shape(problem.reward_fn, x, problem.env.features)
    except Exception as err:  # noqa: BLE001 - re-raised naming the field
        raise InvalidArgumentError(
            f"x: the reward model cannot be applied to these parameters ({err})") from None
    if tuple(getattr(out, "shape", ())) != expected:
        raise InvalidArgumentError(
            f"x: expected reward model parameters giving an [S, A] = {expected} reward table, "
            f"got {tuple(getattr(out, 'shape', ()))}")


# --------------------------------------------------------------------------------------------
# Trajectory pairs
# --------------------------------------------------------------------------------------------

@struct.dataclass
class TrajectoryPairs:
    """`N` pairs of fixed-horizon trajectories; every field is `[N, 2, H]`.

    Attributes:
      states: int, state at step t (0 once absorbed).
      actions: int, action at step t (0 once absorbed).
      alive: bool, step t happens (no terminal state was acted in before t).
    """

    states: Array
    actions: Array
    alive: Array

    @property
    def num_pairs(self) -> int:
        return self.states.shape[-3]

    @property
    def horizon(self) -> int:
        return self.states.shape[-1]


def _check_pairs(pairs, name: str = "pairs") -> None:
    if not isinstance(pairs, TrajectoryPairs):
        raise InvalidArgumentError(f"{name}: expected TrajectoryPairs, got {type(pairs).__name__}")
    shape = tuple(pairs.states.shape)
    if len(shape) != 3 or shape[1] != 2:
        raise InvalidArgumentError(f"{name}.states: expected shape [N, 2, H], got {shape}")
    for field in ("actions", "alive"):
        other = tuple(getattr(pairs, field).shape)
        if other != shape:
            raise InvalidArgumentError(
                f"{name}.{field}: expected the shape of {name}.states {shape}, got {other}")


def _check_labels(labels, num_pairs: int, name: str = "labels") -> None:
    shape = tuple(getattr(labels, "shape", ()))
    if shape != (num_pairs,):
        raise InvalidArgumentError(
            f"{name}: expected shape [N] = [{num_pairs}] (one label per pair), got {shape}")


def sample_pairs(key: Array, mdp: TabularMDP, policy: Array, horizon: int,
                 num_pairs: int) -> TrajectoryPairs:
    """Draws `num_pairs` independent pairs of `horizon`-step trajectories of `policy`.

    Each trajectory starts from `mdp.initial`; after acting in a terminal state it is absorbed
    (`alive` false, state and action stored as 0). One `lax.scan` over time, `2 * num_pairs`
    trajectories wide, with every uniform drawn up front by one `jax.random.uniform` call.

    Args:
      key: PRNG key.
      mdp: the environment `TabularMDP` (dense or sparse).
      policy: `[S, A]` action probabilities.
      horizon: `H >= 1` (static).
      num_pairs: `N >= 1` (static).

    Returns:
      `TrajectoryPairs` with `[N, 2, H]` fields.
    """
    horizon = _check_int("horizon", horizon, 1)
    num_pairs = _check_int("num_pairs", num_pairs, 1)
    uniforms = jax.random.uniform(key, (num_pairs, 2, 2 * horizon + 1),
                        jnp.result_type(policy.dtype, float))
    return pairs_from_uniforms(uniforms, mdp, policy)


def pairs_from_uniforms(uniforms: Array, mdp: TabularMDP, policy: Array) -> TrajectoryPairs:
    """`sample_pairs` with its randomness given: `uniforms [N, 2, 2H + 1]` in `[0, 1)` (the
    start state from entry 0, then per step t the action from `1 + 2t` and the successor from
    `2 + 2t`, all by inverse CDF)."""
    check_shapes(mdp)
    if tuple(getattr(policy, "shape", ())) != tuple(mdp.rewards.shape):
        raise InvalidArgumentError(
            f"policy: expected shape [S, A] = {tuple(mdp.rewards.shape)}, got "
            f"{tuple(getattr(policy, 'shape', ()))}")
    shape = tuple(uniforms.shape)
    if len(shape) != 3 or shape[1] != 2 or shape[2] < 3 or shape[2] % 2 != 1:
        raise InvalidArgumentError(
            f"uniforms: expected shape [N, 2, 2H + 1] with H >= 1, got {shape}")
    num_pairs, horizon = shape[0], (shape[2] - 1) // 2
    num_states, num_actions = mdp.rewards.shape
    flat = uniforms.reshape(2 * num_pairs, 2 * horizon + 1)
    policy_cdf = jnp.cumsum(policy, axis=-1)
    if isinstance(mdp.transitions, SparseTransitions):
        successor_cdf = jnp.cumsum(mdp.transitions.probs, axis=-1).reshape(
            num_states * num_actions, -1)
        successors = mdp.transitions.indices.reshape(num_states * num_actions, -1)
    else:
        successor_cdf = jnp.cumsum(mdp.transitions, axis=-1).reshape(num_states * num_actions, -1)
        successors = None
    width = successor_cdf.shape[-1]
    terminal = (jnp.zeros(num_states, bool) if mdp.terminal is None
                else jnp.asarray(mdp.terminal, bool))
    rows = jnp.zeros(flat.shape[0], jnp.int32)
    start = _inverse_cdf(jnp.cumsum(mdp.initial)[None, :], rows, flat[:, 0])
    start = jnp.minimum(start, num_states - 1)

    def step(carry, u):
        state, alive = carry
        action = jnp.minimum(_inverse_cdf(policy_cdf, state, u[0]), num_actions - 1)
        row = state * num_actions + action
        # (a zero row, allowed for terminal states, would give index `width`: clamped; such a
        # successor is never alive)
        k = jnp.minimum(_inverse_cdf(successor_cdf, row, u[1]), width - 1)
        successor = k if successors is None else successors[row, k]
        alive_next = alive & ~terminal[state]
        out = (jnp.where(alive, state, 0), jnp.where(alive, action, 0), alive)
        return (jnp.where(alive_next, successor, 0), alive_next), out

    steps = flat[:, 1:].reshape(-1, horizon, 2).transpose(1, 2, 0)          # [H, 2, 2N]
    init = (start.astype(jnp.int32), jnp.ones(flat.shape[0], bool))
    _, (states, actions, alive) = lax.scan(step, init, steps)

    def layout(a):                                                          # [H, 2N] -> [N, 2, H]
        return a.T.reshape(num_pairs, 2, horizon)

    return TrajectoryPairs(states=layout(states), actions=layout(actions), alive=layout(alive))


def trajectory_returns(reward: Array, pairs: TrajectoryPairs) -> Array:
    """`[N, 2]` returns `R(tau) = sum_t alive_t reward[s_t, a_t]` of a reward table `[S, A]`."""
    values = reward[pairs.states, pairs.actions]
    return jnp.sum(jnp.where(pairs.alive, values, 0.0), axis=-1)


def trajectory_log_probs(logits: Array, pairs: TrajectoryPairs) -> Array:
    """`[N, 2]` policy part of `log pi(tau) = sum_t alive_t log pi(a_t|s_t)`,
    `pi = softmax(logits)`."""
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    values = log_pi[pairs.states, pairs.actions]
    return jnp.sum(jnp.where(pairs.alive, values, 0.0), axis=-1)


def preference_probability(gap: Array, noise) -> Array:
    """The annotator's `P(tau1 > tau2) = sigmoid(gap / noise)`; for `noise == 0`, 1 if
    `gap > 0`, 0 if `gap < 0`, 1/2 on ties. `noise` may be traced."""
    noise = jnp.asarray(noise, gap.dtype)
    soft = jax.nn.sigmoid(gap / jnp.where(noise > 0, noise, 1.0))
    hard = jnp.where(gap > 0, 1.0, jnp.where(gap < 0, 0.0, 0.5)).astype(gap.dtype)
    return jnp.where(noise > 0, soft, hard)


def annotate(key: Array, true_reward: Array, pairs: TrajectoryPairs, noise) -> Array:
    """Synthetic labels `[N]`: 1.0 where the annotator prefers `tau1`, else 0.0.

    `P(label = 1) = preference_probability(G(tau1) - G(tau2), noise)`, `G` the true return.

    Raises:
      InvalidArgumentError: `noise` (concrete) negative or not finite; malformed `pairs`.
    """
    _check_pairs(pairs)
    return labels_from_uniforms(jax.random.uniform(key, (pairs.num_pairs,), true_reward.dtype),
                                true_reward, pairs, noise)


def labels_from_uniforms(uniforms: Array, true_reward: Array, pairs: TrajectoryPairs,
                         noise) -> Array:
    """`annotate` with its randomness given: label 1 where `uniforms [N] < P(label = 1)`."""
    check_noise(noise)
    _check_pairs(pairs)
    _check_labels(uniforms, pairs.num_pairs, "uniforms")
    returns = trajectory_returns(true_reward, pairs)
    prob = preference_probability(returns[:, 0] - returns[:, 1], noise)
    return (uniforms < prob).astype(true_reward.dtype)


def sample_labelled_pairs(key: Array, mdp: TabularMDP, policy: Array, true_reward: Array,
                          noise, horizon: int, num_pairs: int):
    """`sample_pairs` and `annotate` from one draw of uniforms (one PRNG site to compile):
    returns `(pairs, labels)`."""
    horizon = _check_int("horizon", horizon, 1)
    num_pairs = _check_int("num_pairs", num_pairs, 1)
    width = 2 * horizon + 1
    u = jax.random.uniform(key, (num_pairs, 2 * width + 1), jnp.result_type(policy.dtype, float))
    pairs = pairs_from_uniforms(u[:, :2 * width].reshape(num_pairs, 2, width), mdp, policy)
    return pairs, labels_from_uniforms(u[:, -1].astype(true_reward.dtype), true_reward, pairs,
                                       noise)


def pair_losses(reward: Array, pairs: TrajectoryPairs, labels: Array) -> Array:
    """`[N]` Bradley-Terry losses `-l log sigmoid(d) - (1 - l) log sigmoid(-d)`,
    `d = R(tau1) - R(tau2)` (labels may be probabilities)."""
    returns = trajectory_returns(reward, pairs)
    d = returns[:, 0] - returns[:, 1]
    labels = labels.astype(d.dtype)
    return labels * jax.nn.softplus(-d) + (1.0 - labels) * jax.nn.softplus(d)


def bradley_terry_nll(reward: Array, pairs: TrajectoryPairs, labels: Array,
                      weights: Array | None = None) -> Array:
    """Mean (or `weights`-weighted mean, e.g. a buffer's validity mask) of `pair_losses`."""
    _check_pairs(pairs)
    _check_labels(labels, pairs.num_pairs)
    losses = pair_losses(reward, pairs, labels)
    if weights is None:
        return jnp.mean(losses)
    weights = weights.astype(losses.dtype)
    return jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1.0)


def preference_nll(problem: RLHFProblem, x, pairs: TrajectoryPairs, labels: Array,
                   weights: Array | None = None) -> Array:
    """The Bradley-Terry NLL of `labels` on `pairs` under the reward model `r_x` (a scalar,
    differentiable in `x`)."""
    return bradley_terry_nll(problem.reward(x), pairs, labels, weights)


def preference_accuracy(reward: Array, pairs: TrajectoryPairs, true_gaps: Array) -> Array:
    """Fraction of pairs with `true_gaps != 0` where `sign(R(tau1) - R(tau2)) = sign(gap)`.

    A tie of the model's returns counts 1/2 (chance). NaN when every true gap is 0.
    """
    return accuracy_of_returns(trajectory_returns(reward, pairs), true_gaps)


def accuracy_of_returns(returns: Array, true_gaps: Array) -> Array:
    """`preference_accuracy` from the model's returns `[M, 2]` of the pairs' two members."""
    d = returns[:, 0] - returns[:, 1]
    decided = true_gaps != 0
    score = jnp.where(d * true_gaps > 0, 1.0, jnp.where(d == 0, 0.5, 0.0))
    total = jnp.sum(decided)
    return jnp.where(total > 0, jnp.sum(jnp.where(decided, score, 0.0)) / jnp.maximum(total, 1),
                     jnp.nan)


def score_surrogate(logits: Array, pairs: TrajectoryPairs, weights: Array) -> Array:
    """`sum_i weights_i (log pi(tau_i1) + log pi(tau_i2))`: its gradient in `logits` is the
    score-function term when `weights` (held constant) are `(loss_i - baseline_i) / N`."""
    weights = jax.lax.stop_gradient(weights)
    return jnp.sum(weights * jnp.sum(trajectory_log_probs(logits, pairs), axis=-1))


def score_weights(losses: Array, baseline: str = "leave_one_out") -> Array:
    """`(loss_i - b_i) / N` with the leave-one-out baseline `b_i = mean_{j != i} loss_j` (or
    `b_i = 0` for `"none"`, or when `N = 1`)."""
    if baseline not in BASELINES:
        raise InvalidArgumentError(f"baseline: expected one of {BASELINES}, got {baseline!r}")
    n = losses.shape[0]
    if baseline == "none" or n < 2:
        return losses / n
    loo = (jnp.sum(losses) - losses) / (n - 1)
    return (losses - loo) / n


def stochastic_gradients(problem: RLHFProblem, x, logits: Array, pairs: TrajectoryPairs,
                         labels: Array, *, baseline: str = "leave_one_out"):
    """Unbiased estimates of `grad_x L(x, pi_y)` and `grad_y L(x, pi_y)` from pairs drawn from
    `pi_y = softmax(logits)` and their labels.

    Returns:
      `(loss, grad_x, grad_y)`: the mean loss on `pairs`, its gradient in `x` (a pytree like
      `x`), and the score-function estimate `mean_i (loss_i - b_i) grad_y (log pi(tau_i1) +
      log pi(tau_i2))` (`[S, A]`), see the module docstring for the baseline.
    """
    _check_pairs(pairs)
    _check_labels(labels, pairs.num_pairs)
    if tuple(getattr(logits, "shape", ())) != tuple(problem.env.true_reward.shape):
        raise InvalidArgumentError(
            f"logits: expected shape [S, A] = {tuple(problem.env.true_reward.shape)}, got "
            f"{tuple(getattr(logits, 'shape', ()))}")

    def loss_fn(params):
        losses = pair_losses(problem.reward(params), pairs, labels)
        return jnp.mean(losses), losses

    (loss, losses), grad_x = jax.value_and_grad(loss_fn, has_aux=True)(x)
    weights = score_weights(jax.lax.stop_gradient(losses), baseline)
    grad_y = jax.grad(score_surrogate)(logits, pairs, weights)
    return loss, grad_x, grad_y


# --------------------------------------------------------------------------------------------
# Exact expectations by enumeration (tiny instances: tests)
# --------------------------------------------------------------------------------------------

def enumerate_trajectories(mdp: TabularMDP, policy: Array, horizon: int):
    """Every `horizon`-step trajectory in the canonical form of `sample_pairs`, with its
    probability under `policy` (differentiable in `policy`, `mdp.initial`, `mdp.transitions`).

    Returns:
      `(trajectories, probs)`: `TrajectoryPairs`-like fields of shape `[M, H]` (a
      `TrajectoryPairs` with the pair axis dropped is not valid, so a plain dict
      `{"states", "actions", "alive"}` is returned) and `probs [M]`, summing to 1.
      `M = (S A)^H` (impossible sequences have probability 0).

    Raises:
      InvalidArgumentError: `(S A)^H > MAX_ENUMERATED`, or `horizon < 1`.
    """
    check_shapes(mdp)
    horizon = _check_int("horizon", horizon, 1)
    num_states, num_actions = mdp.rewards.shape
    count = (num_states * num_actions) ** horizon
    if count > MAX_ENUMERATED:
        raise InvalidArgumentError(
            f"horizon: enumerating (S A)^H = {count} trajectories exceeds {MAX_ENUMERATED} "
            f"(enumeration is for tiny instances)")
    codes = np.array(list(itertools.product(range(num_states * num_actions), repeat=horizon)),
                     dtype=np.int32).reshape(count, horizon)
    states = jnp.asarray(codes // num_actions)
    actions = jnp.asarray(codes % num_actions)
    terminal = (jnp.zeros(num_states, bool) if mdp.terminal is None
                else jnp.asarray(mdp.terminal, bool))
    ended = jnp.cumsum(terminal[states].astype(jnp.int32), axis=1) - terminal[states]
    alive = ended == 0
    transitions = mdp.transitions
    if isinstance(transitions, SparseTransitions):
        transitions = transitions.todense()
    dtype = jnp.result_type(policy.dtype, float)
    canonical = (states == 0) & (actions == 0)
    step = jnp.where(alive, policy[states, actions].astype(dtype),
                     canonical.astype(dtype))                                          # [M, H]
    move = transitions[states[:, :-1], actions[:, :-1], states[:, 1:]].astype(dtype)   # [M, H-1]
    move = jnp.where(alive[:, 1:], move, 1.0)
    probs = (mdp.initial[states[:, 0]].astype(dtype) * jnp.prod(step, axis=1)
             * jnp.prod(move, axis=1))
    return {"states": states, "actions": actions, "alive": alive}, probs


def exact_preference_loss(problem: RLHFProblem, x, policy: Array) -> Array:
    """`L(x, pi)` exactly: the double sum over every pair of trajectories, labels averaged with
    the annotator's probabilities (tiny instances; differentiable in `x` and `policy`)."""
    traj, probs = enumerate_trajectories(problem.env.mdp, policy, problem.horizon)
    single = TrajectoryPairs(states=traj["states"][:, None], actions=traj["actions"][:, None],
                             alive=traj["alive"][:, None])
    model = trajectory_returns(problem.reward(x), single)[:, 0]                  # [M]
    true = trajectory_returns(problem.env.true_reward, single)[:, 0]
    d = model[:, None] - model[None, :]
    q = preference_probability(true[:, None] - true[None, :], problem.noise)
    losses = q * jax.nn.softplus(-d) + (1.0 - q) * jax.nn.softplus(d)
    return probs @ losses @ probs


# --------------------------------------------------------------------------------------------
# The FIFO buffer of labelled pairs (fixed-size ring arrays: jittable)
# --------------------------------------------------------------------------------------------

@struct.dataclass
class PairBuffer:
    """The last `B` labelled pairs in ring arrays.

    Attributes:
      pairs: `TrajectoryPairs` with `[B, 2, H]` fields (`preferences_sim`: `SegmentPairs`, any
        pytree of `[B, ...]` leaves); slot `i` holds pair number `i + B * k` for the largest `k`
        with that number `< count`.
      labels: `[B]` labels.
      count: int scalar, pairs pushed so far (all time).
    """

    pairs: Any
    labels: Array
    count: Array

    @property
    def size(self) -> int:
        return self.labels.shape[-1]

    @property
    def valid(self) -> Array:
        """`[B]` bool: the slot holds a pair (all true once `count >= B`)."""
        return jnp.arange(self.size) < self.count


def empty_buffer(size: int, horizon: int, dtype=jnp.float32) -> PairBuffer:
    """A buffer of `size` slots for `horizon`-step pairs, holding nothing."""
    size = _check_int("buffer_size", size, 1)
    horizon = _check_int("horizon", horizon, 1)
    zeros = jnp.zeros((size, 2, horizon), jnp.int32)
    return PairBuffer(pairs=TrajectoryPairs(states=zeros, actions=zeros,
                                            alive=jnp.zeros((size, 2, horizon), bool)),
                      labels=jnp.zeros((size,), dtype), count=jnp.zeros((), jnp.int32))


def push_pairs(buffer: PairBuffer, pairs: TrajectoryPairs, labels: Array) -> PairBuffer:
    """Appends `N <= B` labelled pairs, overwriting the oldest ones once full (FIFO)."""
    _check_pairs(pairs)
    _check_labels(labels, pairs.num_pairs)
    n, size = pairs.num_pairs, buffer.size
    if n > size:
        raise InvalidArgumentError(
            f"pairs: expected at most buffer_size = {size} pairs per push, got {n}")
    if tuple(pairs.states.shape[1:]) != tuple(buffer.pairs.states.shape[1:]):
        raise InvalidArgumentError(
            f"pairs.states: expected shape [N, 2, H] = [N, 2, {buffer.pairs.horizon}] (the "
            f"buffer's horizon), got {tuple(pairs.states.shape)}")
    slots = (buffer.count + jnp.arange(n)) % size
    new_pairs = jax.tree_util.tree_map(lambda old, new: old.at[slots].set(new.astype(old.dtype)),
                                       buffer.pairs, pairs)
    return PairBuffer(pairs=new_pairs,
                      labels=buffer.labels.at[slots].set(labels.astype(buffer.labels.dtype)),
                      count=buffer.count + n)


def buffer_in_order(buffer: PairBuffer):
    """`(pairs, labels, valid)` rolled so that slot 0 is the oldest held pair (host or jit)."""
    start = jnp.where(buffer.count > buffer.size, buffer.count % buffer.size, 0)
    order = (start + jnp.arange(buffer.size)) % buffer.size
    take = lambda a: a[order]  # noqa: E731
    valid = jnp.arange(buffer.size) < jnp.minimum(buffer.count, buffer.size)
    return jax.tree_util.tree_map(take, buffer.pairs), buffer.labels[order], valid


__all__ = [
    "BASELINES",
    "PairBuffer",
    "RLHFProblem",
    "RewardModel",
    "TrajectoryPairs",
    "accuracy_of_returns",
    "annotate",
    "bradley_terry_nll",
    "buffer_in_order",
    "check_noise",
    "check_protocol",
    "check_params",
    "empty_buffer",
    "enumerate_trajectories",
    "exact_preference_loss",
    "labels_from_uniforms",
    "linear_reward_model",
    "mlp_reward_model",
    "pair_losses",
    "pairs_from_uniforms",
    "preference_accuracy",
    "preference_nll",
    "preference_probability",
    "push_pairs",
    "rlhf_problem",
    "sample_labelled_pairs",
    "sample_pairs",
    "score_surrogate",
    "score_weights",
    "stochastic_gradients",
    "trajectory_log_probs",
    "trajectory_returns",
]
