"""RLHF on simulators (gymnax environments, SPEC 7.4 with the sample forms of SPEC 9).

`rlhf_sim_problem` makes the problem: the leader's `x` are the parameters of a reward model
`r_x(obs, action)` (`bilevel_jax.preferences_sim`), the follower's reward in the environment is
`r_x` (a `SimulatorProblem` whose `follower_reward` is `r_x(step.obs, step.action)` and whose
`leader_reward` is 0), and the environment's own reward is hidden from the follower: only the
synthetic annotator reads it (`Trajectory.reward`). Three algorithms share one data protocol
and one metrics table:

* `rlhf_sim_pbrl`: PBRL (value penalty) with the follower's policy network `pi_y` as `y`:
  joint descent on `(x, y)` of `L(x, pi_y) / rho + p(x, y)`, `p = V*_x(mu) - V^{pi_y}_x(mu)`,
  whose `(x, y)` gradient is the model-free estimate of `sample_pbrl.estimate` (Danskin in `x`
  from a warm best-response learner's rollouts; the soft score-function gradient in `y`), plus
  the NLL's gradient in `x` on the whole buffer and its score-function term in `y` on the new
  pairs (`preferences_sim.preference_gradients`), both divided by `rho`.
* `rlhf_sim_decoupled`: the paper's baseline: each iteration fits the reward model on the
  buffer (`fit_steps` optimizer steps), then trains the learner (PPO) on `r_x` (one
  `learners.follow`, warm-started); the policy never sees the preference loss.
* `rlhf_sim_true_reward`: the ceiling: the same learner trained on the environment's reward.

**Data protocol** (the PBRL paper's, Atari: 576 initial pairs, 500 warm-up epochs, 16 pairs per
reward epoch, a buffer of 3,000): `init` rolls out the initial policy (`num_envs x num_steps`)
and takes `heldout_pairs` pairs (kept fixed: accuracy is measured against their true return
gaps) and `initial_pairs` labelled pairs into the FIFO buffer, then `warmup_epochs` full-batch
optimizer steps of the reward model on the buffer's NLL (a fresh optimizer state, discarded).
Every iteration rolls out the current policy, takes `pairs_per_epoch` new pairs, labels them and
pushes them into the buffer (`buffer_size` slots). `fit_batch_size=None` (the paper's) takes
every reward step on the NLL of the whole buffer; an int `B` takes each step on `B` pairs drawn
uniformly (with replacement) from the buffer's filled slots instead, and every other use of the
buffer's NLL (PBRL's gradient in `x`, the `preference_loss` metric) on such a draw too: the same
expected gradient at `B / buffer_size` of the cost (a CNN over `2 x L` frames per pair is most
of an iteration's time on a CPU).

**Learners.** Any sample-based learner of `bilevel_jax.learners` (`soft_ppo`, `soft_dqn`,
`soft_q_tabular`). Not `soft_vi_tabular`: it solves the model read from a `TabularEnv`'s params,
whose rewards are the hidden environment reward here, not `r_x` (it would leak the annotator's
reward to the follower).

**Metrics** (of the policy that drew the iteration's pairs): `objective` and `true_return`: the
mean undiscounted environment return of the episodes that start and end inside that rollout
(NaN when none does); `env_reward`: its mean environment reward per step; `episodes`;
`preference_accuracy` on the held-out pairs; `preference_loss`: the buffer's NLL at `x` (the
first reward step's, or PBRL's NLL gradient's: the same draw when `fit_batch_size` is set);
`labels`: labels used so far (initial ones included); `grad_norm`, `follower_residual` (the
learner's loss), `samples` (environment steps of the iteration), `nonfinite`; PBRL adds
`penalty`, `rho`, `score_norm`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from gymnax.environments.environment import Environment

from bilevel_jax.algorithms.base import Algorithm, any_nonfinite, global_norm
from bilevel_jax.algorithms.pbrl import rho_schedule
from bilevel_jax.algorithms.rlhf import fit_loss
from bilevel_jax.algorithms.sample_pbrl import (SamplePBRLConfig, check_sample_options, estimate,
                                                init_follower, policy_net)
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.learners.base import Learner, follow, sequential_members
from bilevel_jax.preferences import BASELINES, RewardModel, check_noise, check_protocol
from bilevel_jax.preferences_sim import (SegmentPairs, annotate, bradley_terry_nll,
                                         check_reward_model, check_segment_length, empty_buffer,
                                         episodic_returns, preference_accuracy,
                                         preference_gradients, push_pairs, segments_from_rollout,
                                         take_pairs, true_returns)
from bilevel_jax.sim.problem import SimulatorProblem, check_simulator
from bilevel_jax.sim.rollout import rollout

Array = jax.Array


@struct.dataclass
class RLHFSimProblem:
    """RLHF on a simulator (a pytree).

    Attributes:
      sim: the follower's `SimulatorProblem` (reward `r_x`, leader reward 0, no contexts).
      reward_fn: `apply(x, obs, action) -> scalar` (static).
      noise: annotator noise `>= 0` (may be traced).
      segment_length: `L`; num_envs, num_steps: the pair rollouts `[T, N]` (static).
      initial_pairs, warmup_epochs, pairs_per_epoch, buffer_size, heldout_pairs: the protocol.
      fit_batch_size: pairs per reward step (None: the whole buffer).
    """

    sim: SimulatorProblem
    reward_fn: Callable[..., Array] = struct.field(pytree_node=False)
    noise: Any = 0.0
    segment_length: int = struct.field(pytree_node=False, default=25)
    num_envs: int = struct.field(pytree_node=False, default=16)
    num_steps: int = struct.field(pytree_node=False, default=128)
    initial_pairs: int = struct.field(pytree_node=False, default=576)
    warmup_epochs: int = struct.field(pytree_node=False, default=500)
    pairs_per_epoch: int = struct.field(pytree_node=False, default=16)
    buffer_size: int = struct.field(pytree_node=False, default=3000)
    heldout_pairs: int = struct.field(pytree_node=False, default=256)
    fit_batch_size: int | None = struct.field(pytree_node=False, default=None)

    def true_reward_sim(self) -> SimulatorProblem:
        """The same world with the environment's own reward as the follower's (the ceiling)."""
        return self.sim.replace(follower_reward=lambda x, c, step: jnp.asarray(
            step.reward, jnp.float32))


def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def rlhf_sim_problem(base, reward_model, *, env_params=None, base_x=None, temperature=None,
                     discount=None, noise=0.0, segment_length: int = 25, num_envs: int = 16,
                     num_steps: int = 128, initial_pairs: int = 576, warmup_epochs: int = 500,
                     pairs_per_epoch: int = 16, buffer_size: int = 3000,
                     heldout_pairs: int = 256, max_episode_steps: int | None = None,
                     fit_batch_size: int | None = None, probe_params=None) -> RLHFSimProblem:
    """Builds and checks an `RLHFSimProblem` (host-side, eager).

    Args:
      base: a gymnax `Environment` (with `env_params`, default `env.default_params`), or a
        `SimulatorProblem` (e.g. `bj.as_simulator(tabular)`) whose `env` and
        `env_params(base_x, None)` give the world; its follower reward is replaced by `r_x` and
        its environment reward becomes the hidden one.
      reward_model: a `preferences.RewardModel` (`init(key)`, `apply(params, obs, action)`) or
        an `apply` function (then give `probe_params` to have it checked).
      temperature: `lam > 0` (None: the base problem's, or 0.01); discount: the follower's
        (None: the base problem's, or 0.99).
      noise: annotator noise; segment_length: `L <= num_steps`; num_envs, num_steps: the
        rollouts the pairs come from; the protocol sizes (see the module doc);
      fit_batch_size: None (every reward step on the whole buffer) or pairs per step `>= 1`.

    Raises:
      InvalidArgumentError: naming the field (`segment_length` longer than the rollout,
        `reward_model` not a scalar per step, protocol sizes, `noise`, `base`).
    """
    if isinstance(base, SimulatorProblem):
        if base.contexts is not None or base.context_sampler is not None:
            raise InvalidArgumentError("base: expected a context-free simulator problem")
        env = base.env
        params_fn = lambda x, c: base.env_params(base_x, None)  # noqa: E731
        temperature = base.temperature if temperature is None else temperature
        if discount is None:
            discount = base.follower_discount(base_x, None)
        max_episode_steps = base.max_episode_steps if max_episode_steps is None else max_episode_steps
    elif isinstance(base, Environment):
        env = base
        fixed = base.default_params if env_params is None else env_params
        params_fn = lambda x, c: fixed  # noqa: E731
        temperature = 0.01 if temperature is None else temperature
        discount = 0.99 if discount is None else discount
    else:
        raise InvalidArgumentError(
            f"base: expected a gymnax Environment or a SimulatorProblem, got {type(base).__name__}")
    check_noise(noise)
    num_envs = _int("num_envs", num_envs, 1)
    num_steps = _int("num_steps", num_steps, 1)
    segment_length = check_segment_length(segment_length, num_steps)
    initial_pairs, warmup_epochs, pairs_per_epoch, heldout_pairs, buffer_size = check_protocol(
        initial_pairs, warmup_epochs, pairs_per_epoch, heldout_pairs, buffer_size)
    if fit_batch_size is not None:
        fit_batch_size = _int("fit_batch_size", fit_batch_size, 1)
    apply = reward_model.apply if isinstance(reward_model, RewardModel) else reward_model
    if not callable(apply):
        raise InvalidArgumentError(
            f"reward_model: expected a RewardModel or an apply(params, obs, action) function, "
            f"got {type(reward_model).__name__}")

    def follower_reward(x, context, step):
        return apply(x, step.obs, step.action)

    def leader_reward(x, context, step):
        # zero, in the follower reward's dtype (the leader's objective is the NLL, not a return)
        return jnp.zeros_like(apply(x, step.obs, step.action))

    sim = SimulatorProblem(env=env, env_params=params_fn, follower_reward=follower_reward,
                           leader_reward=leader_reward, temperature=temperature,
                           discount=discount, leader_discount=discount,
                           max_episode_steps=max_episode_steps)
    try:
        check_simulator(sim)
    except ValueError as err:
        raise InvalidArgumentError(str(err)) from None
    heads = sim.action_heads(params_fn(None, None))
    if sim.is_factorized(params_fn(None, None)):
        raise InvalidArgumentError(
            f"base: expected a Discrete action space (the reward model takes one int action), "
            f"got a tuple of {heads}")
    problem = RLHFSimProblem(sim=sim, reward_fn=apply, noise=noise,
                             segment_length=segment_length, num_envs=num_envs,
                             num_steps=num_steps, initial_pairs=initial_pairs,
                             warmup_epochs=warmup_epochs, pairs_per_epoch=pairs_per_epoch,
                             buffer_size=buffer_size, heldout_pairs=heldout_pairs,
                             fit_batch_size=fit_batch_size)
    if probe_params is None and isinstance(reward_model, RewardModel):
        probe_params = jax.eval_shape(reward_model.init, jax.random.key(0))
    if probe_params is not None:
        check_params(problem, probe_params)
    return problem


def check_params(problem: RLHFSimProblem, x) -> None:
    """`InvalidArgumentError` naming `reward_model` unless `r_x(obs, action)` is a scalar."""
    params = problem.sim.env_params(None, None)
    obs, _ = jax.eval_shape(problem.sim.env.reset_env, jax.random.key(0), params)
    check_reward_model(problem.reward_fn, x, obs, jax.ShapeDtypeStruct((), jnp.int32))


def _check_problem(problem) -> None:
    if not isinstance(problem, RLHFSimProblem):
        raise InvalidArgumentError(
            f"problem: expected an RLHFSimProblem (bilevel_jax.algorithms.rlhf_sim."
            f"rlhf_sim_problem), got {type(problem).__name__}")


def draw_pairs(problem: RLHFSimProblem, key, x, policy, num_pairs: int):
    """One rollout of `policy` (`obs -> logits`), `num_pairs` segment pairs from it and their
    labels. Returns `(pairs, labels, stats)`, `stats` the rollout's true-return metrics."""
    k_roll, k_seg, k_label = jax.random.split(key, 3)
    traj = rollout(k_roll, problem.sim, jax.lax.stop_gradient(x), None, policy,
                   problem.num_envs, problem.num_steps)
    pairs = segments_from_rollout(k_seg, traj, problem.segment_length, num_pairs)
    labels = annotate(k_label, pairs, problem.noise)
    mean, count = episodic_returns(traj.reward, traj.time, traj.done)
    stats = {"true_return": jnp.asarray(mean, jnp.float32),
             "episodes": count.astype(jnp.float32),
             "env_reward": jnp.mean(jnp.asarray(traj.reward, jnp.float32)),
             "samples": jnp.asarray(problem.num_envs * problem.num_steps, jnp.float32)}
    return pairs, labels, stats


def _buffer_loss(problem, x, buffer, key):
    """The NLL at `x` of the buffer's filled slots, or of `fit_batch_size` of them drawn
    uniformly with `key` (the same mean)."""
    if problem.fit_batch_size is None:
        return bradley_terry_nll(problem.reward_fn, x, buffer.pairs, buffer.labels, buffer.valid)
    filled = jnp.minimum(buffer.count, buffer.size)
    index = jax.random.randint(key, (problem.fit_batch_size,), 0, jnp.maximum(filled, 1))
    pairs = jax.tree_util.tree_map(lambda a: a[index], buffer.pairs)
    return bradley_terry_nll(problem.reward_fn, x, pairs, buffer.labels[index],
                             buffer.valid[index])


def _per_member(fn: Callable) -> Callable:
    """`fn` whose vmapped members (seeds, grid points) run one after another on CPU.

    The reward model's dots with per-member params become batched dots under `vmap`, which
    XLA's CPU backend runs at 2-3x the per-member cost of plain ones (measured on the
    MinAtar CNN: 12,800 frames of 3 members, 660-860 ms batched against 300 ms one after
    another); `learners.base.sequential_members` decides by backend. `fn` must take every
    traced value it uses as an argument (`custom_vmap` refuses batched closures)."""
    return jax.custom_batching.sequential_vmap(fn) if sequential_members(None) else fn


def _fit(problem, optimizer, x, opt_state, buffer, steps: int, key):
    """`steps` optimizer steps on the buffer's NLL (whole-buffer or minibatch, `_buffer_loss`):
    `(x, opt_state, the NLL at the given x, first grad norm)`."""
    def fit(x, opt_state, buffer, key):
        return fit_loss(lambda p, k: _buffer_loss(problem, p, buffer, k), optimizer, x,
                        opt_state, steps, key)
    return _per_member(fit)(x, opt_state, buffer, key)


def _setup(problem: RLHFSimProblem, x0, key, optimizer, policy):
    """Held-out set, initial pairs and the reward warm-up (shared by every algorithm)."""
    _check_problem(problem)
    check_params(problem, x0)
    key, sub = jax.random.split(key)
    num_held, num_initial = problem.heldout_pairs, problem.initial_pairs
    pairs, labels, _ = draw_pairs(problem, sub, x0, policy, num_held + num_initial)
    held = take_pairs(pairs, 0, num_held)
    g = true_returns(held)
    heldout = {"pairs": held, "gaps": g[:, 0] - g[:, 1]}
    buffer = empty_buffer(problem.buffer_size, held, labels.dtype)
    x = x0
    if num_initial:
        buffer = push_pairs(buffer, take_pairs(pairs, num_held, num_held + num_initial),
                            labels[num_held:])
        x, _, _, _ = _fit(problem, optimizer, x0, optimizer.init(x0), buffer,
                          problem.warmup_epochs, jax.random.fold_in(sub, 1))
    return {"x": x, "key": key, "step": jnp.zeros((), jnp.int32), "buffer": buffer,
            "heldout": heldout, "labels": jnp.asarray(num_initial, jnp.int32)}


def _evaluation(problem, x, heldout, stats, buffer_loss, track_accuracy: bool):
    """The iteration's metrics; `buffer_loss` is the buffer's NLL at `x`, as the step's fit or
    gradient computed it (not evaluated again here; None: NaN). The held-out accuracy (a CNN
    over `2 x L` frames per held-out pair, more frames than a PPO update's rollout) only with
    `track_accuracy`; NaN otherwise."""
    accuracy = (_per_member(lambda x, heldout: preference_accuracy(
        problem.reward_fn, x, heldout["pairs"], heldout["gaps"]))(x, heldout)
        if track_accuracy else jnp.nan)
    loss = jnp.nan if buffer_loss is None else buffer_loss
    return {"objective": stats["true_return"], "true_return": stats["true_return"],
            "env_reward": stats["env_reward"], "episodes": stats["episodes"],
            "preference_accuracy": jnp.asarray(accuracy, jnp.float32),
            "preference_loss": jnp.asarray(loss, jnp.float32)}


def _policy_fn(cfg: SamplePBRLConfig, problem: RLHFSimProblem):
    params = problem.sim.env_params(None, None)
    return policy_net(cfg, problem.sim.action_heads(params), False).apply


def rlhf_sim_pbrl(optimizer: optax.GradientTransformation, learner: Learner,
                  cfg: SamplePBRLConfig = SamplePBRLConfig(), *, rho_0: float = 1.0,
                  rho_max: float = 100.0, ramp_iters: int = 1000,
                  baseline: str = "leave_one_out", track_accuracy: bool = True) -> Algorithm:
    """PBRL for RLHF on a simulator (see the module doc). `learner` gives `V*`/`pi*` of `r_x`
    (warm across iterations); `cfg` the penalty estimator's options (`sample_pbrl`);
    `track_accuracy=False` skips the held-out accuracy (NaN; see `_evaluation`).

    State: `x`, `y` (policy params, leading axis 1), `follower`, `opt` (over `{"x", "y"}`),
    `key`, `step`, `buffer`, `heldout`, `labels`.
    """
    check_sample_options(cfg)
    traced = any(isinstance(v, jax.core.Tracer) for v in (rho_0, rho_max))
    if not traced and not 0 < rho_0 <= rho_max:
        raise InvalidArgumentError(
            f"rho_0, rho_max: expected 0 < rho_0 <= rho_max, got {rho_0}, {rho_max}")
    _int("ramp_iters", ramp_iters, 1)
    if baseline not in BASELINES:
        raise InvalidArgumentError(f"baseline: expected one of {BASELINES}, got {baseline!r}")

    def init(problem, x0, key):
        _check_problem(problem)
        key, k_f = jax.random.split(key)
        y, follower = init_follower(problem.sim, x0, k_f, learner, cfg)
        apply_pi = _policy_fn(cfg, problem)
        y0 = jax.tree_util.tree_map(lambda a: a[0], y)
        state = _setup(problem, x0, key, optimizer, lambda obs: apply_pi(y0, obs))
        return dict(state, y=y, follower=follower,
                    opt=optimizer.init({"x": state["x"], "y": y}))

    def step(problem, state):
        _check_problem(problem)
        x, y = state["x"], state["y"]
        rho = rho_schedule(state["step"], rho_0, rho_max, ramp_iters)
        key, k_pairs, k_est = jax.random.split(state["key"], 3)
        apply_pi = _policy_fn(cfg, problem)
        y0 = jax.tree_util.tree_map(lambda a: a[0], y)
        fresh, labels, stats = draw_pairs(problem, k_pairs, x, lambda obs: apply_pi(y0, obs),
                                          problem.pairs_per_epoch)
        buffer = push_pairs(state["buffer"], fresh, labels)
        pen_grads, follower, info = estimate(problem.sim, x, y, state["follower"], k_est,
                                             learner, cfg, leader_weight=0.0,
                                             penalty_weight=1.0)
        k_nll = jax.random.fold_in(k_pairs, 1)
        nll, nll_grad_x = _per_member(lambda x, buffer, k: jax.value_and_grad(
            lambda p: _buffer_loss(problem, p, buffer, k))(x))(x, buffer, k_nll)
        _, _, score = preference_gradients(problem.reward_fn, x, apply_pi, y0, fresh, labels,
                                           baseline=baseline)
        score = jax.tree_util.tree_map(lambda a: a[None], score)
        grads = {"x": jax.tree_util.tree_map(lambda a, b: a / rho + b, nll_grad_x,
                                             pen_grads["x"]),
                 "y": jax.tree_util.tree_map(lambda a, b: a / rho + b, score, pen_grads["y"])}
        params = {"x": x, "y": y}
        updates, opt_state = optimizer.update(grads, state["opt"], params)
        new = optax.apply_updates(params, updates)
        labels_used = state["labels"] + problem.pairs_per_epoch
        metrics = _evaluation(problem, x, state["heldout"], stats, nll, track_accuracy)
        metrics.update({
            "grad_norm": global_norm(grads["x"]).astype(jnp.float32),
            "follower_residual": jnp.asarray(info["learner_loss"], jnp.float32),
            "samples": stats["samples"] + jnp.asarray(info["samples"], jnp.float32),
            "nonfinite": any_nonfinite(grads, new),
            "labels": labels_used.astype(jnp.float32),
            "penalty": jnp.asarray(info["penalty"], jnp.float32),
            "rho": jnp.asarray(rho, jnp.float32),
            "score_norm": global_norm(score).astype(jnp.float32)})
        new_state = {"x": new["x"], "y": new["y"], "follower": follower, "opt": opt_state,
                     "key": key, "step": state["step"] + 1, "buffer": buffer,
                     "heldout": state["heldout"], "labels": labels_used}
        return new_state, metrics

    return Algorithm(init, step)


def rlhf_sim_decoupled(optimizer: optax.GradientTransformation, learner: Learner, *,
                       fit_steps: int = 1, track_accuracy: bool = True) -> Algorithm:
    """The decoupled pipeline: pairs from the learner's policy, `fit_steps` reward epochs on
    the buffer (one optimizer state kept), then one `learners.follow` of the learner on `r_x`;
    `track_accuracy=False` skips the held-out accuracy (NaN).

    State: `x`, `learner`, `opt`, `key`, `step`, `buffer`, `heldout`, `labels`."""
    _int("fit_steps", fit_steps, 1)

    def init(problem, x0, key):
        _check_problem(problem)
        key, k_l = jax.random.split(key)
        lstate = learner.init(problem.sim, x0, None, k_l)
        state = _setup(problem, x0, key, optimizer, lambda obs: learner.policy(lstate, obs))
        return dict(state, learner=lstate, opt=optimizer.init(state["x"]))

    def step(problem, state):
        _check_problem(problem)
        x, lstate = state["x"], state["learner"]
        key, k_pairs, k_learn = jax.random.split(state["key"], 3)
        fresh, labels, stats = draw_pairs(problem, k_pairs, x,
                                          lambda obs: learner.policy(lstate, obs),
                                          problem.pairs_per_epoch)
        buffer = push_pairs(state["buffer"], fresh, labels)
        k_fit = jax.random.fold_in(k_pairs, 1)
        new_x, opt_state, nll, grad_norm = _fit(problem, optimizer, x, state["opt"], buffer,
                                                fit_steps, k_fit)
        lstate, info = follow(learner, problem.sim, jax.lax.stop_gradient(new_x), None, lstate,
                              k_learn)
        labels_used = state["labels"] + problem.pairs_per_epoch
        metrics = _evaluation(problem, x, state["heldout"], stats, nll, track_accuracy)
        metrics.update({"grad_norm": grad_norm.astype(jnp.float32),
                        "follower_residual": jnp.asarray(info["loss"], jnp.float32),
                        "samples": stats["samples"],
                        "nonfinite": any_nonfinite(new_x) | ~jnp.asarray(info["finite"], bool),
                        "labels": labels_used.astype(jnp.float32)})
        new_state = {"x": new_x, "learner": lstate, "opt": opt_state, "key": key,
                     "step": state["step"] + 1, "buffer": buffer,
                     "heldout": state["heldout"], "labels": labels_used}
        return new_state, metrics

    return Algorithm(init, step)


def rlhf_sim_true_reward(learner: Learner, *, track_accuracy: bool = True) -> Algorithm:
    """The ceiling: the learner trained on the environment's own reward (no labels). `x` is
    carried unchanged (the reward model is untouched); the preference metrics are of it
    (`track_accuracy=False`: the held-out accuracy is NaN).

    State: `x`, `learner`, `key`, `step`, `heldout`."""

    def init(problem, x0, key):
        _check_problem(problem)
        check_params(problem, x0)
        key, k_l, k_h = jax.random.split(key, 3)
        lstate = learner.init(problem.true_reward_sim(), x0, None, k_l)
        held, _, _ = draw_pairs(problem, k_h, x0, lambda obs: learner.policy(lstate, obs),
                                problem.heldout_pairs)
        g = true_returns(held)
        return {"x": x0, "learner": lstate, "key": key, "step": jnp.zeros((), jnp.int32),
                "heldout": {"pairs": held, "gaps": g[:, 0] - g[:, 1]}}

    def step(problem, state):
        _check_problem(problem)
        key, k_pairs, k_learn = jax.random.split(state["key"], 3)
        lstate = state["learner"]
        _, _, stats = draw_pairs(problem, k_pairs, state["x"],
                                 lambda obs: learner.policy(lstate, obs), 1)
        lstate, info = follow(learner, problem.true_reward_sim(), state["x"], None, lstate,
                              k_learn)
        metrics = _evaluation(problem, state["x"], state["heldout"], stats, None,
                              track_accuracy)
        metrics.update({
            "grad_norm": jnp.zeros((), jnp.float32),
            "follower_residual": jnp.asarray(info["loss"], jnp.float32),
            "samples": stats["samples"],
            "nonfinite": ~jnp.asarray(info["finite"], bool),
            "labels": jnp.zeros((), jnp.float32)})
        return dict(state, learner=lstate, key=key, step=state["step"] + 1), metrics

    return Algorithm(init, step)


__all__ = ["RLHFSimProblem", "SegmentPairs", "check_params", "draw_pairs", "rlhf_sim_decoupled",
           "rlhf_sim_pbrl", "rlhf_sim_problem", "rlhf_sim_true_reward"]
