"""HPGD: the stochastic hypergradient built from follower trajectories (SPEC 5, CB-RL).

The estimator never differentiates the follower's learning: it needs trajectories of the
follower's current policy (from any oracle), and the model derivatives `d_x r`, `d_x P`,
`d_x mu`, `d_x rbar`. Every term is a weighted sum over sampled steps of those derivatives, so
the estimator first builds *cotangent tables* (how much each sampled `(s, a)`, `(s, a, s')` and
start state weighs) and then takes one reverse pass through the user's model functions: `x`
can be any pytree and no Jacobian is ever materialized.

Two variants:

* `unbiased=False` (the paper's estimator): `num_envs` environments for `num_steps` steps with
  auto-reset; per-(s, a) and per-s Monte-Carlo averages of the leader's returns-to-go give
  `Qbar_hat, Vbar_hat`, and of the follower's vector returns give `dQ_hat, dV_hat`;

      g = sum_t (gammabar^tau_t / n_tau_t) [ d_x rbar(s_t, a_t)
                                             + (1/lam) Abar_hat(s_t, a_t) dA_hat(s_t, a_t) ]

  with `tau_t` the in-episode time and `n_tau` the number of episodes *at risk* at time `tau`:
  those started (each environment's initial episode included) at least `tau` steps before the
  window's end, i.e. the episodes whose step `tau` (or whose end before it) the window shows.
  This is the censoring-corrected mean over episodes (see `hpgd`): an episode cut by the
  window's end counts for the times it was seen, and its unseen steps are estimated by the
  episodes seen that long. (The paper's code divides by the number of finished episodes,
  which is `num_envs` times too large a gradient when no episode ends in the window.) Biased:
  returns are cut at the window's end and the averages are shared between the two factors of
  the product. `benchmarks/estimators.py` measures the bias.
* `unbiased=True`, `unbiased_form="critic"` (the default, `_critic_cotangents`): every step of
  `num_envs` episodes, weighted by `gammabar^t / num_envs`, with the leader's advantage from a
  leave-one-environment-out first-visit critic (unbiased and independent of the episode it
  multiplies) and the follower's vector return along the same episode; a branch correction
  only where the critic has no data. See `hpgd` for the formula and why it is unbiased.
* `unbiased=True`, `unbiased_form="plain"`: `(s, a)` drawn from the leader's discounted
  visitation with a geometric horizon, then independent rollouts from `(s, a)` for `Qbar`,
  from `(s, a)` and `(s, a')`, `a' ~ pi`, for `dQ(s, a) - dQ(s, a')`, and (with the advantage
  baseline) from `(s, a'')` for `Vbar`. Unbiased up to the horizon cut `gamma^horizon`
  (default: below 1e-6); about 5 orders of magnitude more variance than the critic form at
  equal transitions.

When `P` or `mu` depend on `x`, score terms are added: `gamma d_x log P(s'|s, a) V*(s')` in the
follower's vector return, `gammabar d_x log P(s'|s, a) Gbar(s')` and `d_x log mu(s_0) Gbar_0` in
the leader's part.

Speed (the paper variant): the rollout is one time loop, and every other per-step quantity is a
vectorized pass over the `[T, N]` steps (two linear recurrences, segment sums keyed by `(s, a)`,
gathers from small materialized tables). Under `vmap` (a grid of runs) the estimate is computed
for all runs at once with their environments side by side (`_paper_estimate`), which gives each
run exactly its own estimate.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bilevel_jax.core.mdp import SparseTransitions
from bilevel_jax.core.rollout import (concrete_value, materialize, run_rows, sample_runs,
                                      sample_trajectories)
from bilevel_jax.core.soft_vi import soft_bellman_operator, soft_greedy_policy, soft_value
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.estimators import model
from bilevel_jax.estimators.base import (Estimator, check_learner_option, check_positive_ints,
                                         is_simulator, register)
from bilevel_jax.estimators.exact import zero_q
from bilevel_jax.problem import map_contexts
from bilevel_jax.estimators.oracles import dynamic_sweeps, make_oracle

BASELINES = ("advantage", "none")
UNBIASED_FORMS = ("critic", "plain")


def _scatter(shape, index, weights):
    return jnp.zeros(shape, weights.dtype).at[index].add(weights)


class _Context:
    """What one context's estimate needs: the model, the follower's q, leader reward.

    The per-state tables that get gathered at every sampled step are materialized once: XLA
    would otherwise fuse their producers (a logsumexp, the softmax inside a reward) into the
    gathers and recompute them per step.
    """

    def __init__(self, mdp, q, rbar, lam, gamma_bar):
        self.mdp, self.q, self.lam, self.gamma_bar = mdp, q, lam, gamma_bar
        self.rbar = materialize(rbar)
        self.policy = materialize(soft_greedy_policy(q, lam))
        self.v_star = materialize(soft_value(q, lam))
        self.keep = mdp.continuation()
        self.gamma = mdp.discount
        self.shape = mdp.rewards.shape

    def transition_cot(self, states, actions, next_states, weights):
        return model.transition_cotangent(self.mdp.transitions, states, actions, next_states,
                                          weights)

    def initial_cot(self, states, weights):
        mu = self.mdp.initial
        return _scatter(mu.shape, states, weights / jnp.where(mu[states] > 0, mu[states], 1.0))


def _linear_recurrence(coeffs, inputs, reverse=False):
    """`y_t = coeffs_t * y_{t-1} + inputs_t` along axis 0 (`y_{-1} = 0`); `reverse=True` runs
    from the end (`y_t = coeffs_t * y_{t+1} + inputs_t`). A sequential scan: on CPU it beats
    the log-depth associative scan at these sizes (and a blocked two-level scan: its body is
    one fused loop, ~30 ns a step)."""
    def body(y, inp):
        c, x = inp
        y = c * y + x
        return y, y
    _, out = lax.scan(body, jnp.zeros_like(inputs[0]), (coeffs, inputs), reverse=reverse)
    return out


def _leader_returns(rewards, dones, discount):
    """Returns-to-go `[T, N]`, cut at episode ends and at the window's end."""
    return _linear_recurrence(discount * (1.0 - dones.astype(rewards.dtype)), rewards,
                              reverse=True)


def _paper_tables(keys, q, rbar, mdp, lam, gamma_bar, *, num_envs, num_steps, max_episode_steps,
                  baseline, per_env, fixed_start):
    """Cotangent tables of the paper's estimator for `R` runs at once (dict of `[R, G, ...]`).

    Every per-run input has a leading run axis of size `R`, or 1 when shared by all runs
    (`keys` has `R`): `q, rbar [., S, A]`, `mdp` (its arrays, `discount` a `[.]` vector),
    `lam, gamma_bar [.]`. Tables are per environment (`G = N`) when `per_env`, else summed
    (`G = 1`): `rewards, leader_reward [R, G, S, A]`, `initial [R, G, S]`, `transitions
    [R, G, S, A, B]` (sparse `probs`) or `[R, G, S, A, S]` (dense).

    All runs' environments are lanes of one `[T, R * N]` layout: the rollout and both
    recurrences are single time loops over all lanes, per-(s, a) statistics are sums keyed by
    `(run, env, s, a)` and lookups gather from flattened per-run tables at per-lane offsets, so
    under `vmap` (see `_paper_estimate`) nothing is transposed or re-indexed per step. The
    cotangents of `initial` and of the transitions are computed apart from those of the rewards:
    when the model's `mu` and `P` do not depend on `x`, the reverse pass never reads them and
    XLA drops their computation.
    """
    S, A = q.shape[-2:]
    SA = S * A
    dtype = q.dtype
    num_runs = keys.shape[0]
    lanes = num_runs * num_envs
    groups = num_envs if per_env else 1
    run = jnp.arange(lanes, dtype=jnp.int32) // num_envs                 # [L]
    group = run * groups + (jnp.arange(lanes, dtype=jnp.int32) % num_envs if per_env else 0)

    def per_lane(value):
        """A per-run scalar `[.]` as a `[L]` vector (or a scalar when shared)."""
        value = jnp.asarray(value, dtype)
        return value[0] if value.shape[0] == 1 else value[run]

    def lookup(table, index):
        """`table[run, index]` for a per-run table `[., K, ...]` and `index [T, L]`."""
        flat, offset = run_rows(materialize(table), run, num_runs)
        return flat[offset + index]

    def sums(index, columns, size):
        """`[R, G, size, k]` sums of `columns [T, L]` keyed by (run, group, index)."""
        data = jnp.stack(columns, -1).reshape(-1, len(columns))
        keys_ = (group * size + index).reshape(-1)
        out = jax.ops.segment_sum(data, keys_, num_segments=num_runs * groups * size)
        return out.reshape(num_runs, groups, size, len(columns))

    lam_r = jnp.asarray(lam, dtype)[:, None, None]
    policy = soft_greedy_policy(q, lam_r)
    v_star = lam_r[..., 0] * soft_value(q / lam_r, 1.0)                   # [., S]
    traj = sample_runs(keys, mdp, policy, num_envs=num_envs, num_steps=num_steps,
                       max_episode_steps=max_episode_steps, fixed_start=fixed_start)
    traj = jax.tree_util.tree_map(lambda f: f.reshape(num_steps, lanes), traj)
    s, sn, times = traj.states, traj.next_states, traj.times
    sa = s * A + traj.actions
    done = traj.dones.astype(dtype)
    gamma_l, gamma_bar_l = per_lane(mdp.discount), per_lane(gamma_bar)

    leader_r = lookup(rbar.reshape(-1, SA), sa)
    returns = _leader_returns(leader_r, done, gamma_bar_l)
    # Step weights gammabar^tau / n_tau, with n_tau the episodes *at risk* at in-episode time
    # tau: those started at least tau steps before the window's end (the episodes whose step
    # tau, or their ending before it, is seen). A step at time tau belongs to one of them, so
    # n_tau >= 1 wherever it is read. Without terminal states n_tau = N (one episode per
    # environment); with many episodes per environment n_tau is about the number started.
    starts = (times == 0).astype(dtype).reshape(num_steps, num_runs, num_envs).sum(-1)  # [T, R]
    at_risk = jnp.cumsum(starts, axis=0)[::-1].T                          # [R, T]: n_tau
    powers = jnp.asarray(gamma_bar, dtype)[:, None] ** jnp.arange(num_steps).astype(dtype)
    disc_w = lookup(powers / jnp.maximum(at_risk, 1.0), times)
    stats = sums(sa, [jnp.ones_like(returns), returns, disc_w], SA)     # [R, G, SA, 3]
    totals = stats.sum(1).reshape(num_runs, S, A, 3)
    n_sa, return_sums, disc_sums = totals[..., 0], totals[..., 1], totals[..., 2]
    n_s = n_sa.sum(-1)
    qbar_hat = return_sums / jnp.maximum(n_sa, 1.0)
    vbar_hat = return_sums.sum(-1) / jnp.maximum(n_s, 1.0)                # [R, S]
    leader_adv = qbar_hat - vbar_hat[..., None] if baseline == "advantage" else qbar_hat
    # Response term: sum over steps of W(s, a) [dQ_hat(s, a) - dV_hat(s)], each average expanded
    # over the visits it averages, then over the steps of each visit's return (a recurrence).
    # W(s, a) = Abar_hat(s, a) sum of gammabar^tau / n_tau over the visits of (s, a) / lam.
    w_table = leader_adv * disc_sums / lam_r
    w_state = w_table.sum(-1)
    beta_table = (w_table / jnp.maximum(n_sa, 1.0)
                  - (w_state / jnp.maximum(n_s, 1.0))[..., None])
    carry = jnp.concatenate([jnp.zeros_like(done[:1]), 1.0 - done[:-1]], axis=0)
    alpha = _linear_recurrence(gamma_l * carry, lookup(beta_table.reshape(num_runs, SA), sa))
    out = {"rewards": sums(sa, [alpha], SA).reshape(num_runs, groups, S, A),
           "leader_reward": stats[..., 2].reshape(num_runs, groups, S, A)}

    # The leader's weighted returns-to-go: sum of gammabar^tau' rbar / n_tau' over the rest of
    # the episode's steps in the window (the score terms' leader factor, weighted like the
    # direct term, so a censored episode's missing steps are left to the episodes at risk).
    weighted_returns = _leader_returns(leader_r * disc_w, done, 1.0)
    start_w = (times == 0) * weighted_returns
    inv_mu = 1.0 / jnp.where(mdp.initial > 0, mdp.initial, 1.0)
    out["initial"] = sums(s, [start_w * lookup(inv_mu, s)], S)[..., 0]

    # Leader's continuation after each step (for the d_x P score term): the weighted return of
    # the next step inside the window; after a time-limit cut (`max_episode_steps`, not a
    # terminal state) the value estimate `Vbar_hat(s')`, as if the episode went on.
    next_returns = jnp.concatenate([weighted_returns[1:], jnp.zeros_like(returns[:1])], axis=0)
    continues = (1.0 - done) * (jnp.arange(num_steps) < num_steps - 1)[:, None]
    truncated = done * (1.0 - traj.terminated.astype(dtype))
    next_value = (continues * next_returns
                  + truncated * disc_w * gamma_bar_l * lookup(vbar_hat, sn))
    keep = 1.0 - jnp.asarray(mdp.terminal, dtype)
    transition_w = lookup(keep, s) * (alpha * gamma_l * lookup(v_star, sn) + next_value)
    transitions = mdp.transitions
    if isinstance(transitions, SparseTransitions):
        # d_x log P(s'|s, a) spread over every stored successor equal to s'.
        branching = transitions.branching
        rows = jnp.concatenate([transitions.indices.astype(dtype), transitions.probs], -1)
        rows = lookup(rows.reshape(rows.shape[0], SA, 2 * branching), sa)  # [T, L, 2B]
        match = (rows[..., :branching] == sn[..., None].astype(dtype)).astype(dtype)
        prob = jnp.sum(rows[..., branching:] * match, axis=-1)
        scale = jnp.where(prob > 0, transition_w / jnp.where(prob > 0, prob, 1.0), 0.0)
        cot = sums(sa, list(jnp.moveaxis(match * scale[..., None], -1, 0)), SA)
        out["transitions"] = cot.reshape(num_runs, groups, S, A, branching)
    else:
        prob = lookup(transitions.reshape(transitions.shape[0], SA * S), sa * S + sn)
        scale = jnp.where(prob > 0, transition_w / jnp.where(prob > 0, prob, 1.0), 0.0)
        out["transitions"] = sums(sa * S + sn, [scale], SA * S).reshape(
            num_runs, groups, S, A, S)
    return out


def _paper_estimate(key, mdp, q, rbar, lam, gamma_bar, **options):
    """One context's cotangent tables of the paper's estimator (dict of `[G, ...]`).

    A `custom_vmap` function: unbatched it is `_paper_tables` for one run; under `vmap` (a
    batch of runs, of contexts) its rule calls `_paper_tables` once for the whole batch, which
    lays the runs' environments side by side as lanes of one rollout instead of letting `vmap`
    add a run axis to every array (with transposes and per-element index arithmetic around
    every gather, scatter and time loop). The estimate is never differentiated.
    """
    initial = concrete_value(mdp.initial)
    fixed_start = (int(np.argmax(initial)) if initial is not None and initial.ndim == 1
                   and np.max(initial) >= 1.0 else None)
    terminal = (jnp.zeros(mdp.rewards.shape[:-1], bool) if mdp.terminal is None
                else jnp.asarray(mdp.terminal, bool))
    mdp = mdp.replace(discount=jnp.asarray(mdp.discount, q.dtype), terminal=terminal)
    args = (key, mdp, q, rbar, jnp.asarray(lam, q.dtype), jnp.asarray(gamma_bar, q.dtype))
    options = dict(options, fixed_start=fixed_start)

    def tables(key, mdp, q, rbar, lam, gamma_bar):
        return _paper_tables(key, q, rbar, mdp, lam, gamma_bar, **options)

    @jax.custom_batching.custom_vmap
    def estimate(*args):
        one_run = [jax.tree_util.tree_map(lambda leaf: leaf[None], arg) for arg in args]
        return jax.tree_util.tree_map(lambda t: t[0], tables(*one_run))

    @estimate.def_vmap
    def estimate_batched(axis_size, in_batched, *args):
        runs = [jax.tree_util.tree_map(lambda leaf, batched: leaf if batched else leaf[None],
                                       arg, flags) for arg, flags in zip(args, in_batched)]
        if not in_batched[0]:
            runs[0] = jnp.broadcast_to(args[0], (axis_size,) + args[0].shape)
        out = tables(*runs)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return estimate(*args)


def _first_episode(traj):
    """Mask `[T, N]` of the steps of each environment's first episode."""
    done = traj.dones.astype(jnp.int32)
    return (jnp.cumsum(done, axis=0) - done) == 0


def _unbiased_cotangents(ctx: _Context, key, num_envs, horizon, baseline):
    S, A = ctx.shape
    dtype = ctx.rbar.dtype
    keys = jax.random.split(key, 7)
    n = num_envs

    def rollout(k, start_states=None, start_actions=None):
        traj = sample_trajectories(k, ctx.mdp, ctx.policy, num_envs=n, num_steps=horizon,
                                   start_states=start_states, start_actions=start_actions)
        return traj, _first_episode(traj).astype(dtype)

    def draw_action(k, states):
        return jax.random.categorical(k, jnp.log(ctx.policy[states]), axis=-1)

    def leader_return(traj, first):
        return jnp.sum(first * ctx.gamma_bar ** traj.times.astype(dtype)
                       * ctx.rbar[traj.states, traj.actions], axis=0)

    # (s, a) from the normalized leader visitation: geometric time within the first episode.
    traj_a, first_a = rollout(keys[0])
    u = jax.random.uniform(keys[1], (n,), dtype, minval=jnp.finfo(dtype).tiny)
    tau = jnp.floor(jnp.log(u) / jnp.log(ctx.gamma_bar)).astype(jnp.int32)
    in_window = tau < horizon
    tau_c = jnp.minimum(tau, horizon - 1)
    cols = jnp.arange(n)
    valid = (in_window & (first_a[tau_c, cols] > 0)).astype(dtype)
    s_i, a_i = traj_a.states[tau_c, cols], traj_a.actions[tau_c, cols]
    scale = valid / ((1.0 - ctx.gamma_bar) * n)

    traj_b, first_b = rollout(keys[2], s_i, a_i)           # Qbar(s, a)
    q_bar = leader_return(traj_b, first_b)
    if baseline == "advantage":                             # Vbar(s) from an independent action
        traj_e, first_e = rollout(keys[3], s_i, draw_action(keys[4], s_i))
        q_bar = q_bar - leader_return(traj_e, first_e)
    traj_c, first_c = rollout(keys[5], s_i, a_i)           # dQ(s, a)
    traj_d, first_d = rollout(keys[6], s_i, draw_action(jax.random.fold_in(keys[6], 1), s_i))
    w = scale * q_bar / ctx.lam

    def vector_return_cot(traj, first, weight):
        step_w = weight[None, :] * first * ctx.gamma ** traj.times.astype(dtype)
        score_w = step_w * ctx.gamma * ctx.keep[traj.states] * ctx.v_star[traj.next_states]
        return step_w, score_w

    step_c, score_c = vector_return_cot(traj_c, first_c, w)
    step_d, score_d = vector_return_cot(traj_d, first_d, -w)
    g_b = leader_return(traj_b, first_b)
    leader_score = scale * ctx.keep[s_i] * (g_b - ctx.rbar[s_i, a_i])
    start_w = leader_return(traj_a, first_a) / n

    def env_tables(sc, ac, snc, stc, scc, sd, ad, snd, std, scd, s0, a0, sb1, ls, sw, st0, sc_):
        trans = (ctx.transition_cot(sc, ac, snc, scc) + ctx.transition_cot(sd, ad, snd, scd)
                 + ctx.transition_cot(s0[None], a0[None], sb1[None], ls[None]))
        return {"rewards": _scatter((S, A), (sc, ac), stc) + _scatter((S, A), (sd, ad), std),
                "leader_reward": _scatter((S, A), (s0, a0), sc_),
                "transitions": trans,
                "initial": ctx.initial_cot(st0[None], sw[None])}

    return jax.vmap(env_tables, in_axes=(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0))(
        traj_c.states, traj_c.actions, traj_c.next_states, step_c, score_c,
        traj_d.states, traj_d.actions, traj_d.next_states, step_d, score_d,
        s_i, a_i, traj_b.next_states[0], leader_score, start_w, traj_a.states[0], scale)


def _truncated_geometric(key, shape, discount, length, dtype):
    """Draws `t in [0, length)` with `P(t) ~ discount^t` (`length >= 1`, broadcast to `shape`),
    and the normalizer `Z = sum_{t < length} discount^t`: a step of an episode seen for
    `length` steps, drawn from its discounted visitation."""
    length = jnp.asarray(length, dtype)
    mass = 1.0 - discount ** length
    u = jax.random.uniform(key, shape, dtype)
    t = jnp.floor(jnp.log1p(-u * mass) / jnp.log(discount))
    t = jnp.clip(t, 0, length - 1).astype(jnp.int32)
    return t, mass / (1.0 - discount)


def _roulette_lengths(key, shape, discount, horizon):
    """Branch lengths `K >= 1` with `P(K > k) = discount^k` (capped at `horizon`)."""
    u = jax.random.uniform(key, shape, minval=jnp.finfo(jnp.float32).tiny)
    return jnp.minimum(1 + jnp.floor(jnp.log(u) / jnp.log(discount)), horizon).astype(jnp.int32)


def _doubly_robust_sum(delta, alive, lengths):
    """`sum_{k < K} delta_k` over a branch's steps `[H, B]` while `alive` (its first episode):
    the Russian-roulette estimate of `sum_k gammabar^k delta_k` with continuation probability
    `gammabar` (so every kept step weighs 1)."""
    k = jnp.arange(delta.shape[0])[:, None]
    used = alive * (k < lengths[None, :]).astype(delta.dtype)
    return jnp.sum(used * delta, axis=0), jnp.sum(used, axis=0)


def _loo_leader_critic(s, a, first, g_bar, num_states, num_actions):
    """The leader's leave-one-environment-out first-visit critic of the critic form.

    Args: `s, a [H, N]` state and (joint) action indices of `N` environments' steps, `first
    [H, N]` the mask of their first episodes (float), `g_bar [H, N]` the leader's returns from
    each step within its episode.

    Per environment `i`, `Qhat_{-i}(s, a)` is the mean over the *other* environments of the
    return `Gbar` from their first visit of `(s, a)` (at `t < H / 2`, so the window cuts it by
    at most `gammabar^(H / 2)`). The environments visiting `(s, a)` are decided before their
    first visit, so it is an unbiased estimate of `Qbar(s, a)`, independent of environment
    `i`. Where no other environment saw `(s, a)` the pooled per-(s, a) mean of every visit of
    every environment (or its state's mean) stands in (`covered` False there).

    Returns a dict: `covered [N, S, A]` bool, `q_hat [N, S, A]` (the critic), `q_pool [S, A]`
    (the pooled means, also the branches' doubly robust critic), `v_i, g_i [N, S * A]` (first
    visits and their returns per environment, for the variance groups).
    """
    h, n = s.shape
    S, A = num_states, num_actions
    SA = S * A
    sa = s * A + a
    env = jnp.broadcast_to(jnp.arange(n)[None, :], (h, n))
    times = jnp.broadcast_to(jnp.arange(h)[:, None], (h, n))
    eligible = (first > 0) & (times < max(1, h // 2))
    first_time = jax.ops.segment_min(jnp.where(eligible, times, h).reshape(-1),
                                     (env * SA + sa).reshape(-1), num_segments=n * SA)
    first_visit = (eligible & (times == first_time.reshape(n, SA)[env, sa])).astype(first.dtype)
    v_i = _scatter((n, SA), (env, sa), first_visit)                        # [N, SA] 0 / 1
    g_i = _scatter((n, SA), (env, sa), first_visit * g_bar)
    others = v_i.sum(0)[None, :] - v_i
    covered = (others > 0).reshape(n, S, A)
    q_others = ((g_i.sum(0)[None, :] - g_i) / jnp.maximum(others, 1.0)).reshape(n, S, A)
    # Pooled per-(s, a) means (every visit of every environment): the fallback where no other
    # environment saw (s, a), and the critic of the branches' doubly robust sums.
    n_sa = _scatter((S, A), (s, a), first)
    q_sum = _scatter((S, A), (s, a), first * g_bar)
    state_mean = q_sum.sum(-1) / jnp.maximum(n_sa.sum(-1), 1.0)
    q_pool = jnp.where(n_sa > 0, q_sum / jnp.maximum(n_sa, 1.0), state_mean[:, None])
    q_hat = jnp.where(covered, q_others, q_pool[None])                       # [N, S, A]
    return {"covered": covered, "q_hat": q_hat, "q_pool": q_pool, "v_i": v_i, "g_i": g_i}


def _loo_follower_alpha(s, first, done, coeff, gamma, num_states):
    """Cotangents `alpha [H, N]` of the follower's per-step vector reward in
    `sum_t c_t (D_t - b_{-i}(s_t))`, `D_t` the vector return within the episode and `b_{-i}(s)`
    the mean of `D` over the *other* environments' visits of `s` (independent of the
    environment whose steps it multiplies; it changes only the variance where
    `E[c_t | s_t] = 0`). Also returns `ratio [N, S]` (environment i's `sum c / visits by the
    others`, for the variance groups) and the recurrence's `carry [H, N]`."""
    h, n = s.shape
    env = jnp.broadcast_to(jnp.arange(n)[None, :], (h, n))
    n_is = _scatter((n, num_states), (env, s), first)
    c_is = _scatter((n, num_states), (env, s), coeff * first)
    others = n_is.sum(0)[None, :] - n_is
    ratio = jnp.where(others > 0, c_is / jnp.maximum(others, 1.0), 0.0)
    beta = -first * (ratio.sum(0)[s] - ratio[env, s])
    carry = jnp.concatenate([jnp.zeros_like(done[:1]), 1.0 - done[:-1]], axis=0)
    alpha = _linear_recurrence(gamma * carry, coeff + beta)                 # D_t's cotangent
    return alpha, ratio, carry


def _critic_cotangents(ctx: _Context, key, num_envs, horizon, samples_per_trajectory,
                       groups=True):
    """Per-environment cotangent tables of the critic-corrected unbiased form, and the
    transitions it reads (see `hpgd`, `unbiased_form="critic"`)."""
    S, A = ctx.shape
    dtype = ctx.rbar.dtype
    n, m, h = num_envs, samples_per_trajectory, horizon
    gbar = jnp.asarray(ctx.gamma_bar, dtype)
    gamma = jnp.asarray(ctx.gamma, dtype)
    k_main, k_tau, k_alt, k_branch, k_len = jax.random.split(key, 5)

    # Main batch: the first episode of each of n environments (seen for up to h steps).
    traj = sample_trajectories(k_main, ctx.mdp, ctx.policy, num_envs=n, num_steps=h)
    first = _first_episode(traj).astype(dtype)                              # [H, N]
    s, a, sn = traj.states, traj.actions, traj.next_states
    done = traj.dones.astype(dtype)
    w = first * (gbar ** jnp.arange(h, dtype=dtype))[:, None] / n          # visitation weights
    rbar_t = ctx.rbar[s, a]
    g_bar = _leader_returns(rbar_t * first, done, gbar)                     # Gbar_t, [H, N]

    # The leader's critic, per environment i (`_loo_leader_critic`): the mean over the *other*
    # environments of the return Gbar from their first visit of (s, a) (at t < h / 2), with
    # the pooled per-(s, a) means where no other environment saw (s, a).
    env = jnp.broadcast_to(jnp.arange(n)[None, :], (h, n))
    critic = _loo_leader_critic(s, a, first, g_bar, S, A)
    covered, v_i, g_i, q_hat = critic["covered"], critic["v_i"], critic["g_i"], critic["q_hat"]
    q_pool = critic["q_pool"]
    v_pool = jnp.sum(ctx.policy * q_pool, -1)
    adv_hat = q_hat - jnp.sum(ctx.policy[None] * q_hat, -1, keepdims=True)
    coeff = w * adv_hat[env, s, a]                                          # Term 1

    # Correction where no other environment saw (s, a) (the fallback is not unbiased there):
    # m steps per environment drawn from its first episode's visitation; from each, leader
    # branches from (s, a) and (s, a'), a' ~ pi, with common random numbers, doubly robust
    # (TD errors of the pooled critic) with Russian-roulette lengths, each kept only for an
    # uncovered action (both are zero, and no branch is needed, almost always).
    lengths = first.sum(0)                                                   # [N] >= 1
    tau, z = _truncated_geometric(k_tau, (m, n), gbar, lengths[None, :], dtype)
    cols = jnp.broadcast_to(jnp.arange(n)[None, :], (m, n))
    s_j, a_j = s[tau, cols].reshape(-1), a[tau, cols].reshape(-1)          # [B = M N]
    env_j = cols.reshape(-1)
    a_alt = jax.random.categorical(k_alt, jnp.log(ctx.policy[s_j]), axis=-1)
    stop = _roulette_lengths(k_len, s_j.shape, gbar, h)

    def branch(start_actions):
        bt = sample_trajectories(k_branch, ctx.mdp, ctx.policy, num_envs=s_j.shape[0],
                                 num_steps=h, start_states=s_j, start_actions=start_actions)
        alive = _first_episode(bt).astype(dtype)
        delta = (ctx.rbar[bt.states, bt.actions]
                 + gbar * ctx.keep[bt.states] * v_pool[bt.next_states]
                 - q_pool[bt.states, bt.actions])
        need = (~covered[env_j, s_j, start_actions]).astype(dtype)
        total, used = _doubly_robust_sum(delta, alive, stop)
        return need * total, need * used

    e_a, used_a = branch(a_j)
    e_alt, used_alt = branch(a_alt)
    u = jnp.broadcast_to(z / (n * m), (m, n)).reshape(-1)
    coeff = coeff.at[tau.reshape(-1), env_j].add(u * (e_a - e_alt))
    coeff = coeff / ctx.lam

    # Follower baseline: leave-one-environment-out means of D over the visits of each state
    # (independent of the environment whose steps it multiplies).
    alpha, ratio, carry = _loo_follower_alpha(s, first, done, coeff, gamma, S)

    # Per-group tables (G groups of environments; they sum to the estimate) for the variance
    # estimate. Each environment's steps go to its group, and so does its influence as a
    # critic (its first-visit returns, centered, through the other environments' D): the
    # environments' terms are not independent, their linearization is.
    num_groups = min(n, 16) if groups else 1
    group = jnp.broadcast_to((jnp.arange(n) % num_groups)[None, :], (h, n))
    denom = v_i.sum(0)
    q_first = g_i.sum(0) / jnp.maximum(denom, 1.0)
    kappa = _scatter((num_groups, S * A), (jnp.arange(n) % num_groups,),
                     v_i * (g_i - v_i * q_first) / jnp.maximum(denom, 1.0)).reshape(
                         num_groups, S, A)
    if num_groups > 1:
        # The baseline term -c_i b_i goes to environment i's group (its cotangent is on the
        # other environments' steps), and the critic's influence to the critic's group.
        centered = kappa - jnp.sum(ctx.policy[None] * kappa, -1, keepdims=True)
        ratio_g = _scatter((num_groups, S), (jnp.arange(n) % num_groups,), ratio)
        own = (group[None] == jnp.arange(num_groups)[:, None, None])
        beta_g = -first[None] * (ratio_g[:, s] - own * ratio[env, s][None])
        zeta = w[None] * centered[:, s, a] / ctx.lam + beta_g                # [G, H, N]
        influence = jax.vmap(lambda c: _linear_recurrence(gamma * carry, c))(zeta)
        alpha_own = _linear_recurrence(gamma * carry, coeff)
    else:
        influence = jnp.zeros((1, h, n), dtype)
        alpha_own = alpha
    flat = lambda v: v.reshape(-1)                                           # noqa: E731

    def group_tables(g, infl):
        mine = (group == g).astype(dtype)
        rew = alpha_own * mine + infl
        trans = (ctx.keep[s] * (alpha_own * gamma * ctx.v_star[sn] + w * (g_bar - rbar_t)) * mine
                 + ctx.keep[s] * infl * gamma * ctx.v_star[sn])
        return {"rewards": _scatter((S, A), (flat(s), flat(a)), flat(rew)),
                "leader_reward": _scatter((S, A), (flat(s), flat(a)), flat(w * mine)),
                "transitions": ctx.transition_cot(flat(s), flat(a), flat(sn), flat(trans)),
                "initial": ctx.initial_cot(s[0], g_bar[0] * mine[0] / n)}

    tables = jax.vmap(group_tables)(jnp.arange(num_groups), influence)
    samples = jnp.sum(first) + jnp.sum(used_a) + jnp.sum(used_alt)
    return tables, samples.astype(jnp.int32)


def hpgd(*, num_envs: int = 16, num_steps: int = 400, max_episode_steps: int | None = None,
         oracle: str = "exact", oracle_sweeps: int = 10, oracle_envs: int = 16,
         oracle_steps: int = 200, learning_rate: float = 0.5, max_level: int = 6,
         baseline: str = "advantage", unbiased: bool = False, horizon: int | None = None,
         contexts: str = "sample", estimate_variance: bool = True,
         learner="soft_dqn", learner_options: dict | None = None,
         samples_per_trajectory: int = 4, critic_hidden=(64, 64),
         critic_learning_rate: float = 3e-3, critic_steps: int = 50,
         critic_lambda: float = 0.8, follower_baseline: bool = True,
         score_terms: bool | None = None, unbiased_form: str | None = None) -> Estimator:
    """The HPGD estimator, on a tabular `BilevelProblem` or a `bj.SimulatorProblem`.

    On a simulator problem the model-free form of `bilevel_jax.estimators.sample_hpgd` runs
    instead (chosen at trace time by the problem's type): the oracle options are replaced by
    `learner`, `num_envs x num_steps` are the rollouts of the single-batch form, and
    `num_envs x samples_per_trajectory` the `(s, a)` of the branching form (`unbiased=True`,
    branches of `horizon` steps); `max_episode_steps` is the problem's own there.

    Args:
      num_envs, num_steps: rollout budget per estimate (`N x T` transitions; with
        `unbiased=True`, `num_envs` samples of `(s, a)`, each with rollouts of `horizon` steps).
      max_episode_steps: time limit of the rollouts (None: only terminal states end episodes;
        the default is right whether or not episodes end within the window, see below).
      oracle: `"exact"`, `"warm"` (`oracle_sweeps` warm-started sweeps), `"soft_q_learning"`
        (`oracle_envs x oracle_steps` sampled transitions, step `learning_rate`) or
        `"multilevel"` (`2^k` sweeps with `P(k) ~ 2^-k`, `k <= max_level`, combining levels
        `k` and `k-1` with common random numbers).
      baseline: `"advantage"` (use `Abar = Qbar - Vbar`) or `"none"` (use `Qbar`).
      unbiased: the geometric-horizon variant with independent rollouts.
      horizon: rollout length of the unbiased variant (default: `gammabar^horizon <= 1e-6`).
      contexts: `"sample"` (one context drawn per estimate, as in the paper) or `"all"`
        (every context, weighted by its probability).
      estimate_variance: also return a per-coordinate variance estimate (costs one reverse pass
        per environment instead of one in all).
      learner, learner_options (simulator problems): the follower, a `bj.learners` name built
        with `learner_options`, or a ready-made `Learner` (e.g. `"soft_vi_tabular"`, the exact
        soft-optimal follower of an `as_simulator` problem); its state is warm-started in the
        estimator state (re-initialized per step if the learner says `reset_each_step`).
      samples_per_trajectory (simulator, `unbiased=True`): geometric `(s, a)` draws per rollout.
      critic_hidden, critic_learning_rate, critic_steps (simulator, `unbiased=False`): the
        critic MLP (the leader's Q and the follower's vector value of `d_x r`), its Adam step
        size and regression steps per estimate (warm-started in the estimator state).
      critic_lambda (simulator, `unbiased=False`): the critic's targets are lambda-returns
        (1: Monte-Carlo returns-to-go; smaller: lower variance, more bootstrapping).
      follower_baseline (simulator, `unbiased=False`): fit and subtract the follower's learned
        vector value `Dhat(s)` (needs `d_x r` per step: `dim(x)` forward passes; False for a
        large `x`, at a higher variance and the window's cut of `D_t` left uncorrected).
      score_terms (simulator): add the `d_x log p_x` terms (None: when the problem has
        `transition_log_prob`).
      unbiased_form (`unbiased=True`): `"critic"` (see below) or `"plain"` (one geometric
        `(s, a)` per environment and independent rollouts; on a simulator its branching form
        with common random numbers). None: `"critic"` on tabular problems and on simulators
        with discrete observations (`Discrete(S)` or one-hot `Box(0, 1, (S,))` observation
        spaces, as `bj.sim.as_simulator` gives; `sample_hpgd._critic_weights`), `"plain"` on
        other simulators, where `"critic"` is refused.

    Normalization of the paper variant (`unbiased=False`): the mean over episodes of
    `sum_tau gammabar^tau h(s_tau, a_tau)` is taken time by time, each `tau` over the `n_tau`
    episodes at risk at `tau` (started at least `tau` steps before the window's end), so every
    step weighs `gammabar^tau / n_tau`; the score terms' leader factor (the start state's, and
    the continuation after `d_x log P`) is the return weighted the same way. The set of episodes
    at risk at `tau` depends only on earlier episodes' lengths, not on their own steps, so each
    time's average is the ratio of two sums whose expectations are in the right proportion, on
    every problem: without terminal states `n_tau = num_envs` (one episode per environment,
    seen for `num_steps` steps: what the window misses weighs `gammabar^num_steps`); with many episodes
    per environment `n_tau` is about the number started. (The paper's code divides by the number
    of finished episodes, at least one: without episode ends in the window that is `num_envs`
    times the gradient.) After a time-limit cut (`max_episode_steps`, not a terminal state) the
    `d_x P` score term continues with `gammabar Vbar_hat(s')`; the episode's remaining rewards
    are not counted (the time limit defines the episodes).

    The critic form of the unbiased variant (`unbiased=True`, tabular): `num_envs` episodes
    (the first of each environment, seen for up to `horizon` steps), step weights
    `w_t = gammabar^t / num_envs`, and

        g = sum_t w_t [ d_x rbar_t + gammabar psi_t Gbar_{t+1} ] + d_x log mu(s_0) Gbar_0 / N
            + (1/lam) sum_t c_t (D_t - b_i(s_t)),
        c_t = w_t Ahat_{-i}(s_t, a_t) + (sampled correction, below)

    with `Gbar_t`, `D_t` the leader's return and the follower's vector return (score part
    `gamma psi V*` included) from step `t` of the episode, `psi_t = d_x log P(s_{t+1}|s_t, a_t)`,
    `i` the step's environment. `Ahat_{-i} = Qhat_{-i} - pi . Qhat_{-i}` is the leader's
    critic *without environment i*: the mean of the returns from the other environments'
    first visits of `(s, a)` (at `t < horizon / 2`). Which environments visit `(s, a)` is
    decided before their first visit, so `Qhat_{-i}(s, a)` is an unbiased estimate of
    `Qbar(s, a)`, independent of environment i, and `E[Ahat_{-i}(s_t, a_t) D_t] =
    E[Abar dQ*(s_t, a_t)]` (`E[D_t | s_t, a_t] = dQ*`): unbiased, with every step of every
    episode used (the per-(s, a) pooling of the paper variant, without its bias). The
    follower baseline `b_i(s)`, the mean of `D` over the other environments' visits of `s`,
    changes only the variance (`sum_a pi Ahat = 0`). Where no other environment saw `(s, a)`,
    the critic falls back to the pooled mean, and the difference is corrected: per environment
    `samples_per_trajectory` steps `t_j` drawn from `gammabar^t` on its episode, `a' ~ pi`, and
    leader branches from `(s, a)` and `(s, a')` (common random numbers) give doubly robust
    estimates of `Qbar - Qhat` (`sum_{k < K} rbar_k + gammabar Vhat(s_{k+1}) - Qhat(s_k, a_k)`,
    Russian-roulette length `P(K > k) = gammabar^k`), each counted only for an action no other
    environment saw; `c_{t_j}` gains `Z / (N M)` times their difference (`Z` the episode's
    normalizer). Unbiased up to the cuts `gammabar^(horizon / 2)` (critic) and
    `max(gamma, gammabar)^horizon` (returns); time limits are not applied. `info["samples"]`
    counts the transitions the estimate reads (the episodes' steps, the branch steps before
    their stop where a branch is needed), `info["simulated"]` those the vectorized rollouts
    simulate: `num_envs x horizon` steps and `2 x num_envs x samples_per_trajectory x horizon`
    for the branches (every other form reads all it simulates; both counts include a sampling
    oracle's transitions). The
    variance estimate sums over 16 groups of environments, each with its environments' steps
    and its influence as a critic and through the baselines (the environments' terms are not
    independent; their linearization is).

    The estimate is not differentiable (the paper variant is a `custom_vmap` function, so that
    a `vmap` over runs rolls all runs out as one batch, see `_paper_estimate`).
    """
    if baseline not in BASELINES:
        raise InvalidArgumentError(f"baseline: expected one of {BASELINES}, got {baseline!r}")
    if contexts not in ("sample", "all"):
        raise InvalidArgumentError(f"contexts: expected 'sample' or 'all', got {contexts!r}")
    if unbiased_form is not None and unbiased_form not in UNBIASED_FORMS:
        raise InvalidArgumentError(
            f"unbiased_form: expected None or one of {UNBIASED_FORMS}, got {unbiased_form!r}")
    check_positive_ints(allow_none=("max_episode_steps", "horizon"), num_envs=num_envs,
                        num_steps=num_steps, max_level=max_level, oracle_sweeps=oracle_sweeps,
                        oracle_envs=oracle_envs, oracle_steps=oracle_steps,
                        max_episode_steps=max_episode_steps, horizon=horizon)
    if not learning_rate > 0:
        raise InvalidArgumentError(f"learning_rate: expected a number > 0, got {learning_rate!r}")
    check_learner_option(learner, learner_options)
    check_positive_ints(samples_per_trajectory=samples_per_trajectory, critic_steps=critic_steps)
    sample_cfg = dict(num_envs=num_envs, num_steps=num_steps, unbiased=unbiased, horizon=horizon,
                      samples_per_trajectory=samples_per_trajectory,
                      critic_hidden=(tuple(critic_hidden)
                                     if isinstance(critic_hidden, (list, tuple)) else critic_hidden),
                      critic_learning_rate=critic_learning_rate, critic_steps=critic_steps,
                      contexts=contexts, estimate_variance=estimate_variance,
                      score_terms=score_terms, follower_baseline=follower_baseline,
                      critic_lambda=critic_lambda,
                      unbiased_form=unbiased_form)

    @functools.cache
    def simulator_fns():
        """`(init, update)` of the model-free form, built on first use: it imports gymnax
        (through `bilevel_jax.sim`), which must not load before `jax.distributed`."""
        from bilevel_jax.estimators import sample_hpgd  # noqa: PLC0415
        from bilevel_jax.learners import make_learner  # noqa: PLC0415
        cfg = sample_hpgd.SampleConfig(**sample_cfg)
        sample_hpgd.check_sample_options(cfg)
        if baseline != "advantage":
            raise InvalidArgumentError(
                "baseline: the model-free HPGD's sample forms use the leader's advantage "
                f"(centered under the policy), so only 'advantage' is valid, got {baseline!r}")
        follower = make_learner(learner, **(learner_options or {}))
        return sample_hpgd.sample_hpgd(follower, cfg)

    follower_oracle = make_oracle(oracle, oracle_sweeps=oracle_sweeps, oracle_envs=oracle_envs,
                                  oracle_steps=oracle_steps, learning_rate=learning_rate)

    def init(problem, x):
        if is_simulator(problem):
            return simulator_fns()[0](problem, x)
        return {"q": zero_q(problem, x)}

    def update(problem, x, state, key):
        if is_simulator(problem):
            return simulator_fns()[1](problem, x, state, key)
        x_flat, unravel, follower_flat, leader_flat = model.flat_problem_fns(problem, x)
        lam, gamma_bar = problem.temperature, problem.leader_discount
        rollout_horizon = horizon
        if unbiased and rollout_horizon is None:
            if isinstance(gamma_bar, jax.core.Tracer):
                raise InvalidArgumentError(
                    "horizon: the default rollout length depends on problem.leader_discount, "
                    "which is traced here (a jit argument or a swept value); pass horizon=... "
                    "explicitly")
            rollout_horizon = max(1, math.ceil(math.log(1e-6) / math.log(float(gamma_bar))))

        critic_form = unbiased and unbiased_form in (None, "critic")
        rollouts = (5 if baseline == "advantage" else 4) * rollout_horizon if unbiased else num_steps
        static_samples = num_envs * rollouts

        def cotangents(mdp, q, rbar, k):
            """`(tables, transitions read, transitions simulated)` of one context's estimate."""
            if critic_form:
                tables, read = _critic_cotangents(_Context(mdp, q, rbar, lam, gamma_bar), k,
                                                  num_envs, rollout_horizon,
                                                  samples_per_trajectory,
                                                  groups=estimate_variance)
                # The main batch and both leader branches run their full `horizon` steps as
                # fixed-length vectorized rollouts, whatever the estimate then reads of them.
                simulated = num_envs * rollout_horizon * (1 + 2 * samples_per_trajectory)
                return tables, read, jnp.asarray(simulated, jnp.int32)
            if unbiased:
                tables = _unbiased_cotangents(_Context(mdp, q, rbar, lam, gamma_bar), k,
                                              num_envs, rollout_horizon, baseline)
            else:
                tables = _paper_estimate(k, mdp, q, rbar, lam, gamma_bar, num_envs=num_envs,
                                         num_steps=num_steps, max_episode_steps=max_episode_steps,
                                         baseline=baseline, per_env=estimate_variance)
            return (tables, jnp.asarray(static_samples, jnp.int32),
                    jnp.asarray(static_samples, jnp.int32))

        def per_context(context, q_prev, k):
            k_oracle, k_roll, k_level = jax.random.split(k, 3)
            mdp = follower_flat(x_flat, context)
            rbar = leader_flat(x_flat, context)
            if oracle == "multilevel":
                levels = jnp.arange(1, max_level + 1)
                probs = 2.0 ** -levels.astype(rbar.dtype)
                probs = probs / probs.sum()
                level = jax.random.choice(k_level, levels, p=probs)
                p_level = probs[level - 1]
                q_base = dynamic_sweeps(mdp, lam, q_prev, 1)
                q_lo = dynamic_sweeps(mdp, lam, q_prev, 2 ** (level - 1))
                q_hi = dynamic_sweeps(mdp, lam, q_lo, 2 ** (level - 1))
                (c_b, n_b, m_b), (c_lo, n_lo, m_lo), (c_hi, n_hi, m_hi) = (
                    cotangents(mdp, q_base, rbar, k_roll), cotangents(mdp, q_lo, rbar, k_roll),
                    cotangents(mdp, q_hi, rbar, k_roll))
                cots = jax.tree_util.tree_map(lambda b, lo, hi: b + (hi - lo) / p_level,
                                              c_b, c_lo, c_hi)
                q, sweeps, oracle_samples = q_hi, 2 ** level, n_b + n_lo + n_hi
                simulated = m_b + m_lo + m_hi
            else:
                q, oinfo = follower_oracle.solve(mdp, lam, q_prev, k_oracle)
                cots, read, rolled = cotangents(mdp, q, rbar, k_roll)
                sweeps, oracle_samples = oinfo["sweeps"], oinfo["samples"] + read
                simulated = oinfo["samples"] + rolled

            def vjp(c):
                return model.model_vjp(follower_flat, leader_flat, x_flat, context,
                                       rewards=c["rewards"], transitions=c["transitions"],
                                       initial=c["initial"], leader_reward=c["leader_reward"])

            if estimate_variance:
                per_env = jax.vmap(vjp)(cots)
                grad = per_env.sum(0)
                variance = per_env.shape[0] * jnp.var(per_env, axis=0, ddof=1)
            else:
                grad = vjp(jax.tree_util.tree_map(lambda c: c.sum(0), cots))
                variance = jnp.full_like(grad, jnp.nan)
            residual = jnp.max(jnp.abs(soft_bellman_operator(q, mdp, lam) - q))
            return (grad, variance, jax.lax.stop_gradient(q), residual, sweeps, oracle_samples,
                    simulated)

        if contexts == "sample" or problem.contexts is None:
            k_ctx, k_est = jax.random.split(key)
            index, context = problem.draw_context(k_ctx)
            grad, variance, q, residual, sweeps, oracle_samples, simulated = per_context(
                context, state["q"][index], k_est)
            new_q = state["q"].at[index].set(q)
            samples = oracle_samples
        else:
            keys = jax.random.split(key, problem.num_contexts)
            grads, variances, new_q, residuals, sweeps, oracle_samples, simulated = map_contexts(
                per_context, problem, state["q"], keys)
            simulated = jnp.sum(simulated)
            probs = problem.probs().astype(grads.dtype)
            grad, variance = probs @ grads, (probs ** 2) @ variances
            residual, sweeps = jnp.max(residuals), jnp.sum(sweeps)
            samples = jnp.sum(oracle_samples)
        info = {"samples": jnp.asarray(samples), "simulated": jnp.asarray(simulated),
                "follower_residual": residual,
                "sweeps": jnp.asarray(sweeps), "variance": unravel(variance)}
        return unravel(grad), {"q": new_q}, info

    return Estimator(init, update, simulator=True)


register("hpgd", hpgd, simulator=True)
