"""HPGD on simulator problems: the model-free hypergradient from vmapped rollouts (SPEC 9).

The estimator behind `bj.hypergradient(simulator_problem, x, "hpgd", ...)` (`hpgd.py`
dispatches here when the problem is a `bj.SimulatorProblem`). Per outer step, for one context
(drawn, or every context with `contexts="all"`):

1. the follower's policy comes from a learner (`bilevel_jax.learners`), its state warm-started
   through the estimator state (`learners.follow` re-initializes it when `reset_each_step`);
2. `num_envs` environments are rolled out by `bj.sim.rollout` (vmapped, auto-reset);
3. every term of SPEC 9 is a weight, independent of `x`, on `follower_reward`, `leader_reward`
   or `transition_log_prob` at a saved step, and the estimate is one reverse pass of

       sum_i  wf_i r_x(step_i) + wl_i rbar_x(step_i) + ws_i log p_x(step_i)

   (`_assemble`): no per-sample Jacobian, any pytree `x`.

Two sample forms of the response term `(1/lam) E[ sum_t gammabar^tau_t Abar(s_t,a_t) dA(s_t,a_t) ]`:

* `unbiased=False` (`_single_batch_weights`, the CB-RL recipe with the tabular paper variant's
  normalization): one batch of `num_envs x num_steps` steps and **learned baselines**: one flax
  MLP critic `obs -> [A + D]` (`A` joint actions, `D = dim(x)`) holds the leader's
  `Qbar_hat(s, .)` and the follower's expected vector return `Dhat(s)` of `d_x r`; it is fitted
  on each batch by `critic_steps` Adam steps of regression on lambda-returns (`critic_lambda`;
  bootstrapped by the critic before the fit) and warm-started in the estimator state. Then

      Abar_hat(s, a) = Qbar_hat(s, a) - sum_a' pi(a'|s) Qbar_hat(s, a')      (exactly centered)
      dA_hat_t       = D_t - Dhat(s_t)                                     (D_t Monte-Carlo)

  with `D_t` continued by `gamma Dhat(s')` where the window's end (or a time limit) cuts it.
  The `(s, a)` critic pools all visits, so the correlation of the two factors along one
  trajectory (the bias of `Gbar_t - Vbar(s_t)`) is diluted as in the tabular per-(s, a)
  averages; what is left is the critic's error (measured against `exact` in the tests: 1.5%).
  Since `E_pi[Abar_hat(s, .)] = 0`, `Dhat` changes only the variance (it removes the large
  `Abar * dV(s)` part; `follower_baseline=False` drops it, for a large `x` whose per-step
  `d_x r`, the critic's targets, would be too costly). Steps weigh `gammabar^tau / n_tau`,
  `n_tau` the episodes at risk at in-episode time `tau` (see `bilevel_jax.estimators.hpgd`).
* `unbiased=True` (`_branching_weights`): `samples_per_trajectory` times `tau` per
  environment drawn from the geometric law of `gammabar`, `(s, a)` the step `tau` of the
  environment's first episode (the normalized leader visitation), `a' ~ pi(.|s)`; from the
  saved environment state, four branch rollouts of `horizon` steps: the leader's `Gbar` from
  `(s, a)` and `(s, a')` with common random numbers, the follower's `D` from `(s, a)` and
  `(s, a')` with common random numbers (independent of the leader's pair). The symmetric
  product `(Gbar(a) - Gbar(a')) (D(a) - D(a')) / 2` has expectation `E_a[Abar dA](s)`
  (`E[(Q(a) - Q(a'))(dQ(a) - dQ(a'))] = 2 Cov_pi(Q, dQ)`), so the estimate is unbiased up to
  the cut `gamma^horizon`, and the paired differences cancel most of the branch noise.

* `unbiased=True, unbiased_form="critic"` (`_critic_weights`; the default, `None`, picks it
  where the observations are discrete, see `_discrete_states`: an observation space
  `Discrete(S)`, the state index itself, or a one-hot `Box(0, 1, (S,))`, its argmax;
  `bj.sim.as_simulator` gives both; elsewhere `None` is "plain" and "critic" is refused): the
  tabular critic form of `bilevel_jax.estimators.hpgd` (its helpers `_loo_leader_critic`,
  `_loo_follower_alpha`, `_truncated_geometric`, `_roulette_lengths`, `_doubly_robust_sum`) on
  the first episodes of `num_envs` environments (seen for `horizon` steps), with the state
  index from the observation and the joint action index:

      g = sum_t w_t [ d_x rbar_t + psi_t (Gbar_t - rbar_t) ] + (1/lam) sum_t c_t (D_t - b_{-i}(s_t)),
      w_t = gammabar^t / N,   c_t = w_t Ahat_{-i}(s_t, a_t) + (branch correction)

  `Ahat_{-i} = Qhat_{-i} - pi . Qhat_{-i}`, `Qhat_{-i}(s, a)` the mean leader return from the
  *other* environments' first visits of `(s, a)` (at `t < horizon / 2`): unbiased for
  `Qbar(s, a)` and independent of environment `i`; `b_{-i}(s)` the other environments' mean
  `D` at `s` (variance only). Where no other environment saw `(s, a)` the pooled mean stands
  in, corrected by `samples_per_trajectory` draws per environment from its episode's
  visitation, `a' ~ pi`, two leader branches (`(s, a)`, `(s, a')`, common random numbers,
  `horizon / 2` steps, from the saved env state) summing the pooled critic's TD errors up to
  a Russian-roulette length. The follower's `D_t` score part is `psi_t` times its soft TD
  error (as below). Unbiased up to `gammabar^(horizon / 2)`; time limits end episodes (the
  follower's returns too: a bias where they cut). `info["samples"]` counts the transitions
  read (first episodes, the branch steps used where a branch is needed), `info["simulated"]`
  the transitions simulated (`N horizon + 2 N samples_per_trajectory horizon / 2`). The
  variance estimate (`estimate_variance`) is the spread of the per-environment terms, which
  are not independent (each environment is also the others' critic): indicative only.

Score terms (`problem.transition_log_prob` given and `score_terms` not False), with
`psi_t = d_x log p_x(s_{t+1} | s_t, a_t)` and baselines of `(s_t, a_t)` (unbiased, since
`E[psi_t | s_t, a_t] = 0`): the follower's `D` gains `gamma psi_t V*(s_{t+1})`, taken as
`psi_t (r_t + gamma V(s_{t+1}) - V(s_t) - lam log pi(a_t|s_t))` (the soft TD error of the
learner's value: `V(s) + lam log pi(a|s) - r` is its `gamma E[V(s')]`); the leader's part
gains `gammabar^{tau+1} psi_t Vbar(s_{t+1})`, taken as `psi_t (rbar_t + gammabar Vbar_hat(s')
- Qbar_hat(s_t, a_t))` with the critic (single batch) or `psi (Gbar(s, a) - rbar(s, a))` on the
leader branches' first transitions (branching). No score term for an `x`-dependent initial
distribution. Terminal states (SPEC 1) stop every sum. Time limits end the leader's episodes;
in the single-batch form the follower's returns bootstrap there from `next_obs` (its learners
treat time limits as cuts), in the branching form they end the branches.

Tuple action spaces: `a' ~ pi` and the behaviour come from `bj.sim.spaces` (a product of
heads), log-probabilities are sums of per-head ones, the critic's actions are the joint actions
(`_joint_probs`, `_joint_index`) and the advantage is that of the joint action.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from bilevel_jax.core.fitting import fit
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.estimators.hpgd import (_doubly_robust_sum, _leader_returns, _loo_follower_alpha,
                                         _loo_leader_critic, _roulette_lengths,
                                         _truncated_geometric)
from bilevel_jax.learners.base import Learner, follow
from bilevel_jax.learners.networks import ValueNet
from bilevel_jax.problem import map_contexts
from gymnax.environments import spaces as gym_spaces

from bilevel_jax.sim import spaces
from bilevel_jax.sim.problem import Step
from bilevel_jax.sim.rollout import (RolloutCarry, discounted_returns, env_step, rollout,
                                     step_rewards, transition_log_probs)

Array = jax.Array


class SampleConfig(NamedTuple):
    """Static options of the model-free HPGD (see `bilevel_jax.estimators.hpgd.hpgd`)."""

    num_envs: int
    num_steps: int
    unbiased: bool
    horizon: int | None
    samples_per_trajectory: int
    critic_hidden: tuple[int, ...]
    critic_learning_rate: float
    critic_steps: int
    contexts: str
    estimate_variance: bool
    score_terms: bool | None
    follower_baseline: bool = True
    critic_lambda: float = 0.8
    unbiased_form: str | None = "plain"     # None: "critic" where observations are discrete


# ---------------------------------------------------------------------------------------------
# Small pure functions.


def _joint_probs(logits) -> Array:
    """`[n_1 * ... * n_D]` joint action probabilities of one observation's (tuple) logits,
    the first head most significant (as `_joint_index`)."""
    if not isinstance(logits, (tuple, list)):
        return jax.nn.softmax(logits)
    probs = jax.nn.softmax(logits[0])
    for head in logits[1:]:
        probs = (probs[:, None] * jax.nn.softmax(head)[None, :]).reshape(-1)
    return probs


def _joint_index(action: Array, heads: tuple[int, ...], factorized: bool) -> Array:
    """Joint action index of actions `[...]` (or `[..., D]` for a tuple space)."""
    if not factorized:
        return action.astype(jnp.int32)
    index = jnp.zeros(action.shape[:-1], jnp.int32)
    for d, n in enumerate(heads):
        index = index * n + action[..., d].astype(jnp.int32)
    return index


def _forced_logits(action: Array, heads: tuple[int, ...], factorized: bool):
    """Logits that put all mass on `action` (one observation): the branch's first step."""
    def head(n, a):
        return jnp.where(jnp.arange(n) == a, 0.0, -jnp.inf)
    if factorized:
        return tuple(head(n, action[d]) for d, n in enumerate(heads))
    return head(heads[0], action)


def _map2(fn, tree):
    """`fn` of one observation over the two leading axes `[T, N]` of `tree`."""
    return jax.vmap(jax.vmap(fn))(tree)


def _first_episode(done: Array) -> Array:
    """`[T, N]` mask of each lane's first episode (steps up to and including its first end)."""
    done = done.astype(jnp.int32)
    return (jnp.cumsum(done, axis=0) - done) == 0


def _at_risk_weights(time: Array, discount, dtype) -> Array:
    """`gammabar^tau_t / n_tau_t` per step `[T, N]`: `n_tau` the episodes at risk at `tau`
    (started at least `tau` steps before the window's end), as in the tabular paper variant."""
    num_steps = time.shape[0]
    starts = jnp.sum(time == 0, axis=1).astype(dtype)           # [T] episodes started at t
    at_risk = jnp.cumsum(starts)[::-1]                          # [T]: n_tau for tau = index
    n_tau = at_risk[jnp.minimum(time, num_steps - 1)]
    return discount ** time.astype(dtype) / jnp.maximum(n_tau, 1.0)


def _forward_returns(coeffs: Array, done: Array, discount) -> Array:
    """`alpha_k = c_k + gamma (1 - done_{k-1}) alpha_{k-1}` along axis 0: how much `d_x r_k`
    weighs in `sum_t c_t D_t` (`D_t` the return-to-go within the episode). One reverse
    `discounted_returns` on the time-reversed sequence (no second recurrence)."""
    prev_done = jnp.concatenate([jnp.ones_like(done[:1]), done[:-1]], axis=0)
    return discounted_returns(coeffs[::-1], prev_done[::-1], discount)[::-1]


def _assemble(problem, x, context, steps: Step, weights: dict, per_env: bool, extra=None):
    """One reverse pass of the surrogate over the saved steps.

    Args:
      steps: the saved transitions (with env states), leading axes `[N, M]` (environment,
        steps of that environment's samples).
      weights: `follower`, `leader` and optionally `score` `[N, M]`, the cotangents of
        `follower_reward`, `leader_reward` and `transition_log_prob` (stop-gradient).
      per_env: also return `N` times the variance of the per-environment contributions (their
        sum is the estimate; one vmapped reverse pass instead of one).
      extra: optional `[N, D]` terms already in flat `x`-space (the learned baselines'), added
        per environment.

    Returns:
      `(grad, variance)` flat `[D]` vectors (`variance` NaN unless `per_env`).
    """
    x_flat, unravel = ravel_pytree(lax.stop_gradient(x))
    weights = lax.stop_gradient(weights)

    def surrogate(xf, steps, w):
        xx = unravel(xf)
        r, rbar = step_rewards(problem, xx, context, steps)
        total = jnp.sum(w["follower"] * r) + jnp.sum(w["leader"] * rbar)
        if "score" in w:
            total = total + jnp.sum(w["score"] * transition_log_probs(problem, xx, context, steps))
        return total

    if per_env:
        per = jax.vmap(jax.grad(surrogate), (None, 0, 0))(x_flat, steps, weights)   # [N, D]
        if extra is not None:
            per = per + lax.stop_gradient(extra).astype(per.dtype)
        return per.sum(0), per.shape[0] * jnp.var(per, axis=0, ddof=1)
    grad = jax.grad(surrogate)(x_flat, steps, weights)
    if extra is not None:
        grad = grad + lax.stop_gradient(extra).astype(grad.dtype).sum(0)
    return grad, jnp.full_like(grad, jnp.nan)


def _step_jacobian(problem, x, context, steps: Step, score_factor=None) -> Array:
    """`d_x r` at every step `[T, N, D]` (plus `score_factor * d_x log p` when given): the
    follower critic's vector reward. Forward mode, `D` passes over the batch."""
    x_flat, unravel = ravel_pytree(lax.stop_gradient(x))

    def per_step(xf):
        xx = unravel(xf)
        out = step_rewards(problem, xx, context, steps)[0]
        if score_factor is not None:
            out = out + score_factor * transition_log_probs(problem, xx, context, steps)
        return out

    return jax.jacfwd(per_step)(x_flat)


def _concat_steps(parts: Sequence[Step], axis: int) -> Step:
    return jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves, axis=axis), *parts)


def _swap(tree):
    """`[T, N, ...] -> [N, T, ...]` on every leaf."""
    return jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), tree)


# ---------------------------------------------------------------------------------------------
# The leader's critic (single-batch variant).


def _critic_net(cfg: SampleConfig, num_actions: int, dim_x: int) -> nn.Module:
    """`obs -> [A + D]`: the leader's `Qbar(s, .)` over the joint actions, then (with
    `follower_baseline`) the follower's expected vector return `Dhat(s)` of `d_x r`."""
    return ValueNet(hidden=cfg.critic_hidden,
                    outputs=num_actions + (dim_x if cfg.follower_baseline else 0))


def _critic_optimizer(cfg: SampleConfig):
    # Clipping keeps the first fits (targets of order 1/(1 - gammabar)) from overshooting.
    return optax.chain(optax.clip_by_global_norm(10.0), optax.adam(cfg.critic_learning_rate))


def _fit_critic(net, opt, critic, batch: dict, num_actions, num_updates):
    """`num_updates` full-batch Adam steps of regression of both heads on Monte-Carlo targets
    (returns-to-go, bootstrapped by the critic before the fit where the window cuts them).

    Fixed targets make each fit one regression, not a chain of Bellman backups, so a few
    warm-started steps per batch track the values; the warm start averages over batches.
    `batch` (flat `[B, ...]`): `obs`, `index` (joint action), `q_target`, and `d_target [B, D]`
    when the follower head is fitted."""
    def loss_fn(params):
        out = jax.vmap(net.apply, (None, 0))(params, batch["obs"])
        q_sa = jnp.take_along_axis(out[:, :num_actions], batch["index"][:, None], axis=1)[:, 0]
        loss = jnp.mean((q_sa - batch["q_target"]) ** 2)
        if "d_target" in batch:
            loss = loss + jnp.mean((out[:, num_actions:] - batch["d_target"]) ** 2)
        return loss

    params, opt_state, losses, _ = fit(loss_fn, opt, critic["params"], critic["opt"],
                                       num_updates)
    return {"params": params, "opt": opt_state}, losses[-1]


# ---------------------------------------------------------------------------------------------
# Cotangent weights of the two sample forms.


class _World(NamedTuple):
    """What one context's estimate reads: the env params, discounts, temperature, action space,
    the learned follower's `policy` / `value` (one observation)."""

    params: Any
    lam: Any
    gamma: Any
    gamma_bar: Any
    heads: tuple[int, ...]
    factorized: bool
    policy: Any
    value: Any
    score: bool


def _follower_td(world: _World, steps: Step, follower_reward: Array) -> Array:
    """Soft TD error `r + gamma V(s') - V(s) - lam log pi(a|s)` per step `[T, N]` (0 after a
    terminal step): the follower's score-term factor with its `(s, a)` baseline."""
    logp = spaces.log_prob(_map2(world.policy, steps.obs), steps.action)
    v, v_next = _map2(world.value, steps.obs), _map2(world.value, steps.next_obs)
    keep = 1.0 - steps.terminated.astype(follower_reward.dtype)
    return keep * (follower_reward + world.gamma * v_next - v - world.lam * logp)


def _single_batch_weights(problem, x, context, world: _World, critic, key, cfg: SampleConfig):
    """The single-batch form: steps and weights `[N, T]`, the baselines' flat `[N, D]` terms,
    the critic after its fit and its loss."""
    policy = world.policy
    traj = rollout(key, problem, x, context, policy, cfg.num_envs, cfg.num_steps,
                   keep_states=True)
    steps = traj.steps()
    r, rbar = traj.follower_reward, traj.leader_reward
    dtype = rbar.dtype
    keep = 1.0 - traj.terminated.astype(dtype)
    done = traj.done.astype(dtype)
    probs = _map2(lambda o: _joint_probs(policy(o)), traj.obs)             # [T, N, A]
    next_probs = _map2(lambda o: _joint_probs(policy(o)), traj.next_obs)
    index = _joint_index(traj.action, world.heads, world.factorized)       # [T, N]
    follower_td = _follower_td(world, steps, r) if world.score else None

    num_actions = probs.shape[-1]
    dim_x = ravel_pytree(x)[0].shape[0]
    net, opt = _critic_net(cfg, num_actions, dim_x), _critic_optimizer(cfg)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])                         # noqa: E731
    f32 = lambda a: flat(a).astype(jnp.float32)                             # noqa: E731

    # lambda-return targets from the critic before the fit (lambda = 1: Monte-Carlo returns,
    # the window's end bootstrapped; smaller: less variance, more of the critic's own bias).
    # The leader's episodes end at terminal states and time limits; the follower's learners
    # treat time limits as cuts, not ends, so its vector return bootstraps there too.
    lam_r = cfg.critic_lambda
    before = _map2(lambda o: net.apply(critic["params"], o).astype(dtype), traj.next_obs)
    v_bar_boot = jnp.sum(next_probs * before[..., :num_actions], -1)       # [T, N]
    gbar = world.gamma_bar
    q_target = discounted_returns(rbar + gbar * (1.0 - lam_r) * (1.0 - done) * v_bar_boot, done,
                                  gbar * lam_r, bootstrap=v_bar_boot[-1])
    batch = {"obs": jax.tree_util.tree_map(flat, traj.obs), "index": flat(index),
             "q_target": f32(lax.stop_gradient(q_target))}
    if cfg.follower_baseline:
        # The follower head's vector reward is D_t's summand as the estimate uses it (score
        # part with its baseline), so Dhat(s) estimates E[D_t | s_t = s].
        jac = _step_jacobian(problem, x, context, steps, follower_td)        # [T, N, D]
        trunc = traj.truncated.astype(dtype)[..., None]
        d_boot = before[..., num_actions:]
        g = world.gamma
        d_reward = jac + g * ((1.0 - lam_r) * keep[..., None] + lam_r * trunc) * d_boot
        d_target = discounted_returns(d_reward, done[..., None], g * lam_r, bootstrap=d_boot[-1])
        batch["d_target"] = f32(lax.stop_gradient(d_target))
    critic, critic_loss = _fit_critic(net, opt, critic, batch, num_actions, cfg.critic_steps)
    apply = lambda o: net.apply(critic["params"], o).astype(dtype)         # noqa: E731
    out, out_next = _map2(apply, traj.obs), _map2(apply, traj.next_obs)    # [T, N, A (+ D)]
    q, q_next = out[..., :num_actions], out_next[..., :num_actions]
    q_sa = jnp.take_along_axis(q, index[..., None], axis=-1)[..., 0]
    advantage = q_sa - jnp.sum(probs * q, -1)

    w = _at_risk_weights(traj.time, world.gamma_bar, dtype)
    coeffs = w * advantage / world.lam                                      # c_t
    alpha = _forward_returns(coeffs, done, world.gamma)
    weights = {"follower": alpha, "leader": w}
    if world.score:
        leader_td = keep * (rbar + world.gamma_bar * jnp.sum(next_probs * q_next, -1) - q_sa)
        weights["score"] = alpha * follower_td + w * leader_td
    extra = None
    if cfg.follower_baseline:
        # sum_t c_t (D_t - Dhat(s_t)), with D_t continued by gamma Dhat(s') where the window
        # or a time limit cuts it (the cut would otherwise be a bias).
        d_hat, d_next = out[..., num_actions:], out_next[..., num_actions:]
        cont = traj.truncated.astype(dtype).at[-1].set(keep[-1])             # [T, N]
        extra = (-jnp.einsum("tn,tnd->nd", coeffs, d_hat)
                 + jnp.einsum("tn,tnd->nd", alpha * world.gamma * cont, d_next))
    samples = cfg.num_envs * cfg.num_steps
    return _swap(steps), _swap(weights), extra, critic, critic_loss, samples


def _branch(problem, x, context, world: _World, key, carry: RolloutCarry, first_action,
            num_steps: int):
    """A rollout of `num_steps` steps from saved env states whose first action is forced.

    Returns the steps `[H, B]` and their `(follower_reward, leader_reward)` at `x`. The same
    `key` for two calls gives both the same random numbers lane by lane (common random
    numbers): `env_step` splits its keys by lane, and the policy's draws are Gumbel noise of
    the same shape.
    """
    k_first, k_rest = jax.random.split(key)
    forced = lambda obs_and_action: _forced_logits(obs_and_action[1], world.heads,  # noqa: E731
                                                   world.factorized)
    carry1, step0 = env_step(k_first, problem, world.params, forced,
                             carry.replace(obs=(carry.obs, first_action)))
    step0 = step0.replace(obs=carry.obs)
    r0, rbar0 = step_rewards(problem, lax.stop_gradient(x), context, step0)
    rest = rollout(k_rest, problem, x, context, world.policy, carry.time.shape[0], num_steps - 1,
                   start=carry1, keep_states=True)
    steps = _concat_steps([jax.tree_util.tree_map(lambda a: a[None], step0), rest.steps()], 0)
    return (steps, jnp.concatenate([r0[None], rest.follower_reward]),
            jnp.concatenate([rbar0[None], rest.leader_reward]))


def _branching_weights(problem, x, context, world: _World, key, cfg: SampleConfig,
                       horizon: int):
    """Weights `[N, H + 4 M H]` of the branching form and the steps they weigh."""
    n, m, h = cfg.num_envs, cfg.samples_per_trajectory, horizon
    k_main, k_tau, k_act, k_lead, k_follow = jax.random.split(key, 5)
    traj = rollout(k_main, problem, x, context, world.policy, n, h, keep_states=True)
    dtype = traj.leader_reward.dtype
    first = _first_episode(traj.done).astype(dtype)                    # [H, N]
    gbar, gamma = jnp.asarray(world.gamma_bar, dtype), jnp.asarray(world.gamma, dtype)

    # Direct term: the discounted leader return of each environment's first episode.
    direct = first * gbar ** traj.time.astype(dtype) / n

    # (s, a) from the normalized leader visitation: geometric times within the first episode.
    u = jax.random.uniform(k_tau, (n, m), dtype, minval=jnp.finfo(dtype).tiny)
    tau = jnp.floor(jnp.log(u) / jnp.log(gbar)).astype(jnp.int32)
    tau_c = jnp.minimum(tau, h - 1)
    cols = jnp.broadcast_to(jnp.arange(n)[:, None], (n, m))
    pick = lambda leaf: leaf[tau_c, cols].reshape((n * m,) + leaf.shape[2:])  # noqa: E731
    valid = ((tau < h) & (first[tau_c, cols] > 0)).astype(dtype).reshape(-1)   # [B]
    scale = valid / ((1.0 - gbar) * n * m)
    start = RolloutCarry(env_state=jax.tree_util.tree_map(pick, traj.state),
                         obs=jax.tree_util.tree_map(pick, traj.obs), time=pick(traj.time))
    a = pick(traj.action)
    a_alt = spaces.sample(k_act, jax.vmap(world.policy)(start.obs))         # a' ~ pi(.|s)
    actions = jnp.stack([a, a_alt.astype(a.dtype)])                        # [2, B(, D)]

    # The four branches in one traced call: over the roles (leader, follower) with independent
    # keys, and within a role over the actions (a, a') with the key *unbatched*, so the pair
    # shares its random draws (common random numbers) whatever the PRNG implementation.
    def pair(k):
        return jax.vmap(lambda act: _branch(problem, x, context, world, k, start, act, h))(actions)

    all_steps, all_r, all_rbar = jax.vmap(pair)(jnp.stack([k_lead, k_follow]))  # [2, 2, H, B]
    lead_steps = jax.tree_util.tree_map(lambda a: a[0], all_steps)
    foll_steps = jax.tree_util.tree_map(lambda a: a[1], all_steps)
    lead_rbar, foll_r = all_rbar[0], all_r[1]
    lead_first = jax.vmap(_first_episode)(lead_steps.done).astype(dtype)
    foll_first = jax.vmap(_first_episode)(foll_steps.done).astype(dtype)
    powers = jnp.arange(h, dtype=dtype)[None, :, None]
    g_bar = jnp.sum(lead_first * gbar ** powers * lead_rbar, axis=1)     # [2, B] Gbar(s, .)
    coeff = 0.5 * scale * (g_bar[0] - g_bar[1]) / world.lam               # [B]
    sign = jnp.asarray([1.0, -1.0], dtype)[:, None, None]
    foll_w = sign * coeff[None, None, :] * foll_first * gamma ** powers    # [2, H, B]

    zeros_lead = jnp.zeros_like(lead_rbar)
    weights = {"follower": [jnp.zeros_like(direct), zeros_lead, foll_w],
               "leader": [direct, zeros_lead, jnp.zeros_like(foll_w)]}
    if world.score:
        # Leader: psi at each leader branch's first transition times what follows it (halved:
        # (s, a) and (s, a') are both draws from the visitation).
        lead_score = zeros_lead.at[:, 0].set(0.5 * scale * (g_bar - lead_rbar[:, 0]))
        foll_score = foll_w * jax.vmap(lambda st, r: _follower_td(world, st, r))(foll_steps, foll_r)
        weights["score"] = [jnp.zeros_like(direct), lead_score, foll_score]

    def by_env(tree):
        """`[2, H, B]` branch leaves -> `[N, 2 M H]` (the environment whose sample it is)."""
        def leaf(a):
            a = a.reshape((2, h, n, m) + a.shape[3:])
            a = jnp.moveaxis(a, 2, 0)                                      # [N, 2, H, M, ...]
            return a.reshape((n, 2 * h * m) + a.shape[4:])
        return jax.tree_util.tree_map(leaf, tree)

    steps = _concat_steps([_swap(traj.steps()), by_env(lead_steps), by_env(foll_steps)], 1)
    weights = {name: jnp.concatenate([_swap(parts[0]), by_env(parts[1]), by_env(parts[2])], 1)
               for name, parts in weights.items()}
    samples = n * h + 4 * n * m * h
    return steps, weights, samples


def _discrete_states(problem, params):
    """`(num_states, obs -> state index)` of a simulator whose observations are discrete, or
    None: an observation space `Discrete(S)` (an integer observation, `as_simulator(...,
    observation="index")`) or a 1-D `Box(0, 1, (S,))` (read as one-hot, its argmax:
    `as_simulator`'s default `observation="one_hot"`). The number of states is the space's."""
    space = problem.env.observation_space(params)
    if isinstance(space, gym_spaces.Discrete):
        return int(space.n), lambda obs: jnp.asarray(obs, jnp.int32)
    if isinstance(space, gym_spaces.Box) and len(tuple(space.shape)) == 1:
        try:
            bounds = bool(np.all(np.asarray(space.low) == 0) and np.all(np.asarray(space.high) == 1))
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            bounds = False
        if bounds:
            return int(space.shape[0]), lambda obs: jnp.argmax(obs, axis=-1).astype(jnp.int32)
    return None


def _unbiased_form(cfg: SampleConfig, problem, params) -> str:
    """The branching form to run: `cfg.unbiased_form`, or (None) `"critic"` where the
    observations are discrete (`_discrete_states`) and `"plain"` elsewhere."""
    discrete = _discrete_states(problem, params) is not None
    if cfg.unbiased_form is None:
        return "critic" if discrete else "plain"
    if cfg.unbiased_form == "critic" and not discrete:
        raise InvalidArgumentError(
            "unbiased_form: 'critic' needs discrete observations (its leave-one-out tables are "
            "per state): an observation space Discrete(S) or a one-hot Box(0, 1, (S,)), got "
            f"observation_space {problem.env.observation_space(params)!r}; use 'plain'")
    return cfg.unbiased_form


def _critic_weights(problem, x, context, world: _World, key, cfg: SampleConfig, horizon: int,
                    states):
    """The critic form on a discrete-observation simulator (`hpgd`'s `unbiased_form="critic"`,
    with the tabular form's leave-one-out critics `_loo_leader_critic`, `_loo_follower_alpha`):
    steps and weights `[N, H]` of the main rollout, the transitions read and simulated."""
    num_states, state_index = states
    n, m, h = cfg.num_envs, cfg.samples_per_trajectory, horizon
    hb = max(2, h // 2)                                    # branch length (as the critic's cut)
    k_main, k_tau, k_alt, k_branch, k_len = jax.random.split(key, 5)
    traj = rollout(k_main, problem, x, context, world.policy, n, h, keep_states=True)
    steps = traj.steps()
    rbar = traj.leader_reward
    dtype = rbar.dtype
    gbar, gamma = jnp.asarray(world.gamma_bar, dtype), jnp.asarray(world.gamma, dtype)
    first = _first_episode(traj.done).astype(dtype)                         # [H, N]
    done = traj.done.astype(dtype)
    keep = 1.0 - traj.terminated.astype(dtype)
    w = first * (gbar ** jnp.arange(h, dtype=dtype))[:, None] / n           # visitation weights
    g_bar = _leader_returns(rbar * first, done, gbar)                       # Gbar_t, [H, N]
    s = state_index(traj.obs)                                               # [H, N]
    a = _joint_index(traj.action, world.heads, world.factorized)
    probs = _map2(lambda o: _joint_probs(world.policy(o)), traj.obs)       # [H, N, A]
    num_actions = probs.shape[-1]

    critic = _loo_leader_critic(s, a, first, g_bar, num_states, num_actions)
    covered, q_pool = critic["covered"], critic["q_pool"]
    env = jnp.broadcast_to(jnp.arange(n)[None, :], (h, n))
    q_rows = critic["q_hat"][env, s]                                        # [H, N, A]
    q_sa = jnp.take_along_axis(q_rows, a[..., None], axis=-1)[..., 0]
    coeff = w * (q_sa - jnp.sum(probs * q_rows, -1))                        # w Ahat_{-i}

    # Correction where no other environment saw (s, a): m steps per environment from its first
    # episode's visitation, leader branches from the saved env state with (s, a) and (s, a'),
    # a' ~ pi, common random numbers, doubly robust sums of the pooled critic's TD errors.
    lengths = first.sum(0)                                                   # [N] >= 1
    tau, z = _truncated_geometric(k_tau, (m, n), gbar, lengths[None, :], dtype)
    cols = jnp.broadcast_to(jnp.arange(n)[None, :], (m, n))
    pick = lambda leaf: leaf[tau, cols].reshape((m * n,) + leaf.shape[2:])  # noqa: E731
    start = RolloutCarry(env_state=jax.tree_util.tree_map(pick, traj.state),
                         obs=jax.tree_util.tree_map(pick, traj.obs), time=pick(traj.time))
    s_j, env_j, a_j = pick(s), cols.reshape(-1), pick(traj.action)
    a_alt = spaces.sample(k_alt, jax.vmap(world.policy)(start.obs)).astype(a_j.dtype)
    actions = jnp.stack([a_j, a_alt])                                       # [2, B(, D)]
    stop = _roulette_lengths(k_len, s_j.shape, gbar, hb)
    b_steps, _, b_rbar = jax.vmap(
        lambda act: _branch(problem, x, context, world, k_branch, start, act, hb))(actions)
    alive = jax.vmap(_first_episode)(b_steps.done).astype(dtype)             # [2, Hb, B]
    b_s, b_next = state_index(b_steps.obs), state_index(b_steps.next_obs)
    b_a = _joint_index(b_steps.action, world.heads, world.factorized)
    b_probs = jax.vmap(_map2, (None, 0))(lambda o: _joint_probs(world.policy(o)),
                                         b_steps.next_obs)                  # [2, Hb, B, A]
    v_next = jnp.sum(b_probs * q_pool[b_next], -1)
    # Episodes end at `done` (time limits included, as the critic's returns do).
    delta = (b_rbar + gbar * (1.0 - b_steps.done.astype(dtype)) * v_next - q_pool[b_s, b_a])
    first_a = jnp.stack([pick(a), _joint_index(a_alt, world.heads, world.factorized)])
    need = (~covered[env_j[None], s_j[None], first_a]).astype(dtype)        # [2, B]
    total, used = jax.vmap(_doubly_robust_sum, (0, 0, None))(delta, alive, stop)
    u = jnp.broadcast_to(z / (n * m), (m, n)).reshape(-1)
    coeff = coeff.at[tau.reshape(-1), env_j].add(u * need[0] * total[0] - u * need[1] * total[1])
    coeff = coeff / world.lam

    alpha, _, _ = _loo_follower_alpha(s, first, done, coeff, gamma, num_states)
    weights = {"follower": alpha, "leader": w}
    if world.score:
        # psi_t times the follower's soft TD error (its (s, a) baseline) and the leader's
        # gammabar Gbar_{t+1} = Gbar_t - rbar_t along the episode.
        follower_td = _follower_td(world, steps, traj.follower_reward)
        weights["score"] = alpha * follower_td + w * keep * (g_bar - rbar)
    read = jnp.sum(first) + jnp.sum(need * used)
    simulated = n * h + 2 * n * m * hb
    return _swap(steps), _swap(weights), read, simulated


# ---------------------------------------------------------------------------------------------
# The estimator.


def _default_horizon(gamma_bar) -> int:
    if isinstance(gamma_bar, jax.core.Tracer):
        raise InvalidArgumentError(
            "horizon: the default branch length depends on problem.leader_discount, which is "
            "traced here (a jit argument or a swept value); pass horizon=... explicitly")
    return max(2, math.ceil(math.log(1e-6) / math.log(float(gamma_bar))))


def sample_hpgd(learner: Learner, cfg: SampleConfig):
    """`(init, update)` of HPGD on a `SimulatorProblem` (built by `hpgd(...)`)."""

    def init(problem, x):
        key = jax.random.key(0)   # the learners' and critic's first parameters (x has no key)
        x = lax.stop_gradient(x)

        def per_context(context, k):
            k_learn, k_critic, k_obs = jax.random.split(k, 3)
            if context is None and problem.context_sampler is not None:
                context = problem.context_sampler(k_obs)
            state = {"learner": learner.init(problem, x, context, k_learn)}
            if not cfg.unbiased:
                params = problem.env_params(x, context)
                obs, _ = problem.env.reset_env(k_obs, params)
                heads = problem.action_heads(params)
                net = _critic_net(cfg, math.prod(heads), ravel_pytree(x)[0].shape[0])
                critic_params = net.init(k_critic, obs)
                state["critic"] = {"params": critic_params,
                                   "opt": _critic_optimizer(cfg).init(critic_params)}
            return state

        return map_contexts(per_context, problem, jax.random.split(key, problem.num_contexts))

    def update(problem, x, state, key):
        x = lax.stop_gradient(x)
        lam, gamma_bar = problem.temperature, problem.leader_discount
        horizon = cfg.horizon
        if cfg.unbiased and horizon is None:
            horizon = _default_horizon(gamma_bar)
        score = (problem.transition_log_prob is not None if cfg.score_terms is None
                 else cfg.score_terms)
        if score and problem.transition_log_prob is None:
            raise InvalidArgumentError(
                "score_terms: True needs problem.transition_log_prob (x in the dynamics), got None")

        def per_context(context, cstate, k):
            k_learn, k_est = jax.random.split(k)
            params = problem.env_params(x, context)
            form = _unbiased_form(cfg, problem, params) if cfg.unbiased else None
            lstate, linfo = follow(learner, problem, x, context, cstate["learner"], k_learn)
            world = _World(params=params, lam=lam, gamma=problem.follower_discount(x, context),
                           gamma_bar=gamma_bar, heads=problem.action_heads(params),
                           factorized=problem.is_factorized(params),
                           policy=lambda obs: learner.policy(lstate, obs),
                           value=lambda obs: learner.value(lstate, obs), score=score)
            new_state = {"learner": lstate}
            extra, critic_loss = None, jnp.asarray(jnp.nan, jnp.float32)
            if form == "critic":
                steps, weights, samples, simulated = _critic_weights(
                    problem, x, context, world, k_est, cfg, horizon,
                    _discrete_states(problem, params))
            elif form == "plain":
                steps, weights, samples = _branching_weights(problem, x, context, world, k_est,
                                                             cfg, horizon)
                simulated = samples
            else:
                steps, weights, extra, critic, critic_loss, samples = _single_batch_weights(
                    problem, x, context, world, cstate["critic"], k_est, cfg)
                new_state["critic"] = critic
                simulated = samples
            grad, variance = _assemble(problem, x, context, steps, weights,
                                       cfg.estimate_variance, extra)
            info = {"learner_loss": jnp.asarray(linfo["loss"], jnp.float32),
                    "learner_finite": jnp.asarray(linfo["finite"], bool),
                    "critic_loss": jnp.asarray(critic_loss, jnp.float32)}
            counts = (jnp.asarray(samples, jnp.int32), jnp.asarray(simulated, jnp.int32))
            return grad, variance, new_state, info, counts

        if cfg.contexts == "sample" or problem.num_contexts == 1:
            k_ctx, k_est = jax.random.split(key)
            index, context = problem.draw_context(k_ctx)
            cstate = jax.tree_util.tree_map(lambda leaf: leaf[index], state)
            grad, variance, new_c, info, (samples, simulated) = per_context(context, cstate,
                                                                            k_est)
            state = jax.tree_util.tree_map(lambda leaf, new: leaf.at[index].set(new), state, new_c)
        else:
            keys = jax.random.split(key, problem.num_contexts)
            grads, variances, state, infos, counts = map_contexts(per_context, problem, state,
                                                                  keys)
            probs = problem.probs().astype(grads.dtype)
            grad, variance = probs @ grads, (probs ** 2) @ variances
            info = {"learner_loss": jnp.mean(infos["learner_loss"]),
                    "learner_finite": jnp.all(infos["learner_finite"]),
                    "critic_loss": jnp.mean(infos["critic_loss"])}
            samples, simulated = jnp.sum(counts[0]), jnp.sum(counts[1])
        _, unravel = ravel_pytree(x)
        info = dict(info, samples=jnp.asarray(samples), simulated=jnp.asarray(simulated),
                    variance=unravel(variance))
        return unravel(grad), state, info

    return init, update


def check_sample_options(cfg: SampleConfig) -> None:
    """Raises `InvalidArgumentError` naming the first out-of-range simulator option."""
    hidden = cfg.critic_hidden
    if (not isinstance(hidden, tuple) or not hidden
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in hidden)):
        raise InvalidArgumentError(
            f"critic_hidden: expected a non-empty tuple of ints >= 1, got {cfg.critic_hidden!r}")
    if not (isinstance(cfg.critic_learning_rate, (int, float)) and cfg.critic_learning_rate > 0):
        raise InvalidArgumentError(
            f"critic_learning_rate: expected a number > 0, got {cfg.critic_learning_rate!r}")
    if cfg.unbiased and cfg.horizon is not None and cfg.horizon < 2:
        raise InvalidArgumentError(
            f"horizon: expected an int >= 2 on a simulator problem, got {cfg.horizon!r}")
    if not (isinstance(cfg.critic_lambda, (int, float)) and 0 < cfg.critic_lambda <= 1):
        raise InvalidArgumentError(
            f"critic_lambda: expected a number in (0, 1], got {cfg.critic_lambda!r}")
    if cfg.unbiased_form not in (None, "critic", "plain"):
        raise InvalidArgumentError(
            "unbiased_form: expected None, 'critic' (discrete observations) or 'plain', got "
            f"{cfg.unbiased_form!r}")
    if cfg.score_terms not in (None, True, False):
        raise InvalidArgumentError(
            f"score_terms: expected None, True or False, got {cfg.score_terms!r}")
