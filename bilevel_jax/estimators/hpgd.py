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

      g = (1/E) sum_t gammabar^tau_t [ d_x rbar(s_t, a_t) + (1/lam) Abar_hat(s_t, a_t) dA_hat(s_t, a_t) ]

  with `E` the number of finished episodes and `tau_t` the in-episode time. Biased: returns are
  cut at the window's end, the averages are shared between the two factors of the product, and
  dividing by `E` counts unfinished episodes' steps. `benchmarks/estimators.py` measures the bias.
* `unbiased=True`: `(s, a)` drawn from the leader's discounted visitation with a geometric
  horizon, then independent rollouts from `(s, a)` for `Qbar`, from `(s, a)` and `(s, a')`,
  `a' ~ pi`, for `dQ(s, a) - dQ(s, a')`, and (with the advantage baseline) from `(s, a'')` for
  `Vbar`. Unbiased up to the horizon cut `gamma^horizon` (default: below 1e-6).

When `P` or `mu` depend on `x`, score terms are added: `gamma d_x log P(s'|s, a) V*(s')` in the
follower's vector return, `gammabar d_x log P(s'|s, a) Gbar(s')` and `d_x log mu(s_0) Gbar_0` in
the leader's part.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from bilevel_jax.core.mdp import SparseTransitions
from bilevel_jax.core.rollout import sample_trajectories
from bilevel_jax.core.soft_vi import soft_bellman_operator, soft_greedy_policy, soft_value
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.estimators import model
from bilevel_jax.estimators.base import Estimator, check_positive_ints, register
from bilevel_jax.estimators.exact import zero_q
from bilevel_jax.problem import map_contexts
from bilevel_jax.estimators.oracles import dynamic_sweeps, make_oracle

BASELINES = ("advantage", "none")


def _scatter(shape, index, weights):
    return jnp.zeros(shape, weights.dtype).at[index].add(weights)


def _per_env(fn, *arrays):
    """Applies `fn` to each environment's column of `[T, N]` arrays: results stacked on axis 0."""
    return jax.vmap(fn, in_axes=1)(*arrays)


class _Context:
    """What one context's estimate needs: the model, the follower's q, leader reward."""

    def __init__(self, mdp, q, rbar, lam, gamma_bar):
        self.mdp, self.q, self.rbar, self.lam, self.gamma_bar = mdp, q, rbar, lam, gamma_bar
        self.policy = soft_greedy_policy(q, lam)
        self.v_star = soft_value(q, lam)
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
    the log-depth associative scan at these sizes."""
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


def _paper_cotangents(ctx: _Context, traj, baseline):
    """Per-environment cotangents of the paper's estimator: dict of `[N, ...]` tables.

    All per-(s, a) statistics are segment sums keyed by `(env, s, a)`, state statistics their
    sums over actions; lookups gather several columns of one `[S * A, k]` table at once (on CPU
    a gather costs per index, not per column).
    """
    S, A = ctx.shape
    dtype = ctx.rbar.dtype
    s, sn, times = traj.states, traj.next_states, traj.times
    num_steps, num_envs = s.shape
    sa = s * A + traj.actions
    done = traj.dones.astype(dtype)
    transitions = ctx.mdp.transitions
    sparse = isinstance(transitions, SparseTransitions)
    mu = ctx.mdp.initial

    def per_sa(*columns):
        return jnp.stack([jnp.broadcast_to(c, (S, A)).reshape(S * A) for c in columns], -1)

    def sums(index, columns, segments):
        return jax.ops.segment_sum(jnp.stack(columns, -1).reshape(-1, len(columns)), index,
                                   num_segments=segments)

    static = per_sa(ctx.rbar, ctx.keep[:, None],
                    1.0 / jnp.where(mu > 0, mu, 1.0)[:, None])[sa]            # [T, N, 3]
    rbar, keep, inv_mu = static[..., 0], static[..., 1], static[..., 2]
    returns = _leader_returns(rbar, done, ctx.gamma_bar)
    counts_returns = sums(sa.ravel(), [jnp.ones_like(returns), returns], S * A)
    n_sa = counts_returns[:, 0].reshape(S, A)
    n_s = n_sa.sum(-1)
    qbar_hat = counts_returns[:, 1].reshape(S, A) / jnp.maximum(n_sa, 1.0)
    vbar_hat = counts_returns[:, 1].reshape(S, A).sum(-1) / jnp.maximum(n_s, 1.0)
    leader_adv = qbar_hat - vbar_hat[:, None] if baseline == "advantage" else qbar_hat
    episodes = jnp.maximum(jnp.sum(done), 1.0)
    disc_bar = ctx.gamma_bar ** times.astype(dtype)
    # Response term: sum over steps of W(s, a) [dQ_hat(s, a) - dV_hat(s)], each average expanded
    # over the visits it averages, then over the steps of each visit's return (a recurrence).
    w_step = disc_bar * leader_adv.reshape(S * A)[sa]
    w_table = sums(sa.ravel(), [w_step], S * A)[:, 0].reshape(S, A) / (ctx.lam * episodes)
    w_state = w_table.sum(-1)
    beta = per_sa(w_table / jnp.maximum(n_sa, 1.0)
                  - (w_state / jnp.maximum(n_s, 1.0))[:, None])[sa][..., 0]
    carry = jnp.concatenate([jnp.zeros_like(done[:1]), 1.0 - done[:-1]], axis=0)
    alpha = _linear_recurrence(ctx.gamma * carry, beta)

    # Leader's continuation value after each step (for the d_x P score term).
    next_returns = jnp.concatenate([returns[1:], jnp.zeros_like(returns[:1])], axis=0)
    continues = (1.0 - done) * (jnp.arange(num_steps) < num_steps - 1)[:, None]
    by_next = jnp.stack([ctx.v_star, vbar_hat], -1)[sn]                        # [T, N, 2]
    next_value = continues * next_returns + (1.0 - continues) * by_next[..., 1]
    transition_w = keep * (alpha * ctx.gamma * by_next[..., 0]
                           + disc_bar * ctx.gamma_bar * next_value / episodes)
    start_w = (times == 0) * returns * inv_mu / episodes

    columns = [alpha, disc_bar / episodes, start_w]
    if sparse:
        # d_x log P(s'|s, a) spread over every stored successor equal to s'.
        branching = transitions.branching
        rows = jnp.concatenate([transitions.indices.astype(dtype), transitions.probs],
                               -1).reshape(S * A, 2 * branching)[sa]           # [T, N, 2B]
        match = (rows[..., :branching] == sn[..., None].astype(dtype)).astype(dtype)
        prob = jnp.sum(rows[..., branching:] * match, axis=-1)
        scale = jnp.where(prob > 0, transition_w / jnp.where(prob > 0, prob, 1.0), 0.0)
        columns += list(jnp.moveaxis(match * scale[..., None], -1, 0))
    env_sa = (jnp.arange(num_envs)[None, :] * (S * A) + sa).ravel()
    tables = sums(env_sa, columns, num_envs * S * A).reshape(num_envs, S, A, -1)
    out = {"rewards": tables[..., 0], "leader_reward": tables[..., 1],
           "initial": tables[..., 2].sum(-1)}
    if sparse:
        out["transitions"] = tables[..., 3:]
    else:
        out["transitions"] = _per_env(ctx.transition_cot, s, traj.actions, sn, transition_w)
    return out


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


def hpgd(*, num_envs: int = 16, num_steps: int = 400, max_episode_steps: int | None = None,
         oracle: str = "exact", oracle_sweeps: int = 10, oracle_envs: int = 16,
         oracle_steps: int = 200, learning_rate: float = 0.5, max_level: int = 6,
         baseline: str = "advantage", unbiased: bool = False, horizon: int | None = None,
         contexts: str = "sample", estimate_variance: bool = True) -> Estimator:
    """The HPGD estimator.

    Args:
      num_envs, num_steps: rollout budget per estimate (`N x T` transitions; with
        `unbiased=True`, `num_envs` samples of `(s, a)`, each with rollouts of `horizon` steps).
      max_episode_steps: time limit of the rollouts (None: only terminal states end episodes).
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
    """
    if baseline not in BASELINES:
        raise InvalidArgumentError(f"baseline: expected one of {BASELINES}, got {baseline!r}")
    if contexts not in ("sample", "all"):
        raise InvalidArgumentError(f"contexts: expected 'sample' or 'all', got {contexts!r}")
    check_positive_ints(allow_none=("max_episode_steps", "horizon"), num_envs=num_envs,
                        num_steps=num_steps, max_level=max_level, oracle_sweeps=oracle_sweeps,
                        oracle_envs=oracle_envs, oracle_steps=oracle_steps,
                        max_episode_steps=max_episode_steps, horizon=horizon)
    if not learning_rate > 0:
        raise InvalidArgumentError(f"learning_rate: expected a number > 0, got {learning_rate!r}")
    follower_oracle = make_oracle(oracle, oracle_sweeps=oracle_sweeps, oracle_envs=oracle_envs,
                                  oracle_steps=oracle_steps, learning_rate=learning_rate)

    def init(problem, x):
        return {"q": zero_q(problem, x)}

    def update(problem, x, state, key):
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

        def cotangents(mdp, q, rbar, k):
            ctx = _Context(mdp, q, rbar, lam, gamma_bar)
            if unbiased:
                return _unbiased_cotangents(ctx, k, num_envs, rollout_horizon, baseline)
            traj = sample_trajectories(k, mdp, ctx.policy, num_envs=num_envs,
                                       num_steps=num_steps, max_episode_steps=max_episode_steps)
            return _paper_cotangents(ctx, traj, baseline)

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
                cots = jax.tree_util.tree_map(
                    lambda b, lo, hi: b + (hi - lo) / p_level,
                    cotangents(mdp, q_base, rbar, k_roll), cotangents(mdp, q_lo, rbar, k_roll),
                    cotangents(mdp, q_hi, rbar, k_roll))
                q, sweeps, oracle_samples = q_hi, 2 ** level, 0
            else:
                q, oinfo = follower_oracle.solve(mdp, lam, q_prev, k_oracle)
                cots = cotangents(mdp, q, rbar, k_roll)
                sweeps, oracle_samples = oinfo["sweeps"], oinfo["samples"]

            def vjp(c):
                return model.model_vjp(follower_flat, leader_flat, x_flat, context,
                                       rewards=c["rewards"], transitions=c["transitions"],
                                       initial=c["initial"], leader_reward=c["leader_reward"])

            if estimate_variance:
                per_env = jax.vmap(vjp)(cots)
                grad = per_env.sum(0)
                variance = num_envs * jnp.var(per_env, axis=0, ddof=1)
            else:
                grad = vjp(jax.tree_util.tree_map(lambda c: c.sum(0), cots))
                variance = jnp.full_like(grad, jnp.nan)
            residual = jnp.max(jnp.abs(soft_bellman_operator(q, mdp, lam) - q))
            return grad, variance, jax.lax.stop_gradient(q), residual, sweeps, oracle_samples

        rollouts = (5 if baseline == "advantage" else 4) * rollout_horizon if unbiased else num_steps
        per_estimate = num_envs * rollouts * (3 if oracle == "multilevel" else 1)
        if contexts == "sample" or problem.contexts is None:
            k_ctx, k_est = jax.random.split(key)
            if problem.contexts is None:
                index = 0
                context = (problem.sample_context(k_ctx) if problem.context_sampler is not None
                           else None)
            else:
                index = jax.random.choice(k_ctx, problem.num_contexts, p=problem.probs())
                context = problem.context(index)
            grad, variance, q, residual, sweeps, oracle_samples = per_context(
                context, state["q"][index], k_est)
            new_q = state["q"].at[index].set(q)
            samples = per_estimate + oracle_samples
        else:
            keys = jax.random.split(key, problem.num_contexts)
            grads, variances, new_q, residuals, sweeps, oracle_samples = map_contexts(
                per_context, problem, state["q"], keys)
            probs = problem.probs().astype(grads.dtype)
            grad, variance = probs @ grads, (probs ** 2) @ variances
            residual, sweeps = jnp.max(residuals), jnp.sum(sweeps)
            samples = problem.num_contexts * per_estimate + jnp.sum(oracle_samples)
        info = {"samples": jnp.asarray(samples), "follower_residual": residual,
                "sweeps": jnp.asarray(sweeps), "variance": unravel(variance)}
        return unravel(grad), {"q": new_q}, info

    return Estimator(init, update)


register("hpgd", hpgd)
