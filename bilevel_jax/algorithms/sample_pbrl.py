"""PBRL on simulator problems: the model-free value-penalty method (SPEC 6 and 9).

`bj.pbrl(optimizer, ...)` runs this when its problem is a `bj.SimulatorProblem` (`pbrl.py`
dispatches in `init` / `step`, as `hpgd.py` does to `sample_hpgd.py`). The follower of context
`k` has its own policy network `pi_{y_k}` (flax `HeadsNet`, `obs -> logits`, one head per action
dimension), whose parameters `y` are a variable of the leader's algorithm, and the leader
descends jointly in `(x, y)` on

    L(x, y) = sum_k p_k [ -f_k(x, pi_{y_k}) + rho p_k(x, y_k) ] / rho,
    p_k(x, y_k) = V*_{x,k}(mu) - V^{pi_{y_k}}_{x,k}(mu)                    (value penalty)

(soft values at `lam = problem.temperature`, `f_k` the leader's discounted return under
`pi_{y_k}`), with the tabular `pbrl`'s `rho` ramp (`rho_schedule`) and its `1/rho` scaling.
`V*` and `pi*` come from a best-response learner (`bilevel_jax.learners`; `soft_vi_tabular` is
the exact one of an `as_simulator` problem) whose state is kept warm across iterations.

**State** (leaves with a leading context axis `K`): `y` the policy parameters (with
`policy_hidden=()` and one-hot observations the policy is a table: logits
`y["params"]["Dense_0"]["kernel"][s] + y["params"]["Dense_0"]["bias"]`, `[S, A] + [A]`, so its
gradients are those of the tabular logits `y[k, s, :]`); `follower`: the learner's state and a
learned baseline (flax `ValueNet`, `obs -> [2]`: the soft value `V_hat(s)` of `pi_y` and the
leader's value `Vbar_hat(s)` under `pi_y`) with its Adam state.

**Estimator** (`estimate`), per context and outer step: `num_envs` environments roll out
`pi_y` and `num_envs` roll out the learner's `pi*`, `num_steps` steps each (`bj.sim.rollout`,
auto-reset). With `tau_t` the in-episode time, `u_t = gamma^tau_t / n_tau_t` and
`ubar_t = gammabar^tau_t / n_tau_t` the at-risk weights of `sample_hpgd` (`n_tau` the episodes
at risk at time `tau`), returns-to-go within episodes

    G_t    = sum_{j >= t} gamma^{j-t} (r_j - lam log pi_y(a_j|s_j))   (soft; time limits
             bootstrap `gamma V_hat(s')`, the window's end too)
    Gbar_t = sum_{j >= t} gammabar^{j-t} rbar_j                       (the window's end
             bootstraps `Vbar_hat`; terminal states and time limits end it)

and baselines from the critic *before* this batch's fit (so independent of the batch: every
baseline term has expectation exactly zero), the gradient estimates are

    grad_x p = sum_{t in pi*} u_t ( d_x r_t + psi_t delta*_t )
             - sum_{t in pi_y} u_t ( d_x r_t + psi_t (gamma G_{t+1} - gamma V_hat(s_t)) )
    grad_y p = - sum_{t in pi_y} u_t grad_y log pi_y(a_t|s_t) (G_t - V_hat(s_t))
    grad_x f =   sum_{t in pi_y} ubar_t ( d_x rbar_t + psi_t (gammabar Gbar_{t+1} - gammabar Vbar_hat(s_t)) )
    grad_y f =   sum_{t in pi_y} ubar_t grad_y log pi_y(a_t|s_t) (Gbar_t - Vbar_hat(s_t))

Danskin for `grad_x V*` (the policy-fixed derivative at `pi*`: a difference of discounted
expectations of `d_x r` under `pi*` and `pi_y`, no second derivative), the entropy-regularized
score-function policy gradient for `grad_y` (the `-lam grad_y log pi` of the soft reward has
expectation zero and is left out). Score terms (`x` in the dynamics, `psi_t = d_x log
p_x(s_{t+1}|s_t, a_t)`, when `problem.transition_log_prob` is given and `score_terms` is not
False): `gamma V(s_{t+1})` is taken as the Monte-Carlo `gamma G_{t+1}` under `pi_y` (0 after a
terminal step) and as the learner's soft TD error `delta*_t = r_t + gamma V*(s') - V*(s) -
lam log pi*(a_t|s_t)` under `pi*` (`sample_hpgd._follower_td`); every baseline is a function
of `(s_t, a_t)`, and `E[psi_t | s_t, a_t] = 0`. No score term for an `x`-dependent initial
distribution. All terms are weights (stop-gradient) on `r_x`, `rbar_x`, `log p_x` at saved steps
and on `log pi_y` at the `pi_y` steps, so the estimate of `grad_{(x, y)} L` is one `jax.grad` of

    sum_k p_k sum_i [ wf_i r_x(step_i) + wl_i rbar_x(step_i) + ws_i log p_x(step_i)
                      + wp_i log pi_{y_k}(a_i|s_i) ]

The estimates are unbiased up to the window's cut (`gamma^num_steps` times the critic's error)
when no episode restarts inside the window (otherwise the at-risk normalization is a ratio
estimate, as in `sample_hpgd`'s single-batch form). Reported with it: the penalty
`p_hat = sum_{pi*} u_t (r_t - lam log pi*_t) - sum_{pi_y} u_t (r_t - lam log pi_y,t)` (the value
of the learner's policy stands for `V*`, as the tabular `pbrl` uses its sweeps' policy),
`f_hat = sum_{pi_y} ubar_t rbar_t`, and the sampled bilevel objective
`F_hat = sum_{pi*} ubar_t rbar_t` (the leader's return under the best response). After the
estimate the baseline is fitted (`baseline_steps` full-batch Adam steps of regression on
`(G_t, Gbar_t)`) and kept for the next step.

The Bellman penalty (SPEC 6) would need a learned critic `Q^{pi_y}` and its `x`- and
`y`-derivatives; it is not implemented on simulators (`pbrl(penalty="bellman")` refuses a
simulator problem with `InvalidArgumentError` naming `penalty`).

Tuple action spaces: heads per action dimension, joint log-probabilities as sums
(`bj.sim.spaces`). Problems with a `context_sampler` instead of finite contexts are refused
(`contexts`): `y` holds one policy per context.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bilevel_jax.algorithms.base import Algorithm, any_nonfinite, global_norm
from bilevel_jax.core.fitting import fit
from bilevel_jax.algorithms.pbrl import _check_sample_options
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.estimators.sample_hpgd import (_World, _at_risk_weights, _concat_steps,
                                                _follower_td, _map2)
from bilevel_jax.learners.base import Learner, follow
from bilevel_jax.learners.networks import HeadsNet, ValueNet
from bilevel_jax.problem import map_contexts
from bilevel_jax.sim import spaces
from bilevel_jax.sim.rollout import (discounted_returns, rollout, step_rewards,
                                     transition_log_probs)

Array = jax.Array

class SamplePBRLConfig(NamedTuple):
    """Static options of the model-free PBRL (see `bilevel_jax.algorithms.pbrl.pbrl`)."""

    num_envs: int = 16
    num_steps: int = 128
    policy_hidden: tuple[int, ...] = (64, 64)
    policy_activation: str = "tanh"
    baseline_hidden: tuple[int, ...] = (64, 64)
    baseline_learning_rate: float = 1e-3
    baseline_steps: int = 10
    score_terms: bool | None = None


def check_sample_options(cfg: SamplePBRLConfig) -> None:
    """Raises `InvalidArgumentError` naming the first out-of-range option."""
    _check_sample_options(cfg._asdict())


def policy_net(cfg: SamplePBRLConfig, heads: tuple[int, ...], factorized: bool) -> HeadsNet:
    """The follower's policy network `obs -> logits` (`[n]`, or a tuple of heads)."""
    return HeadsNet(heads=heads, factorized=factorized, hidden=cfg.policy_hidden,
                    activation=cfg.policy_activation)


def _baseline_net(cfg: SamplePBRLConfig) -> ValueNet:
    """`obs -> [V_hat(s), Vbar_hat(s)]`: the soft value of `pi_y` and the leader's value."""
    return ValueNet(hidden=cfg.baseline_hidden, outputs=2)


def _baseline_optimizer(cfg: SamplePBRLConfig):
    return optax.chain(optax.clip_by_global_norm(10.0), optax.adam(cfg.baseline_learning_rate))


def _space(problem, x, context):
    params = problem.env_params(x, context)
    return params, problem.action_heads(params), problem.is_factorized(params)


def check_contexts(problem) -> None:
    if problem.contexts is None and problem.context_sampler is not None:
        raise InvalidArgumentError(
            "contexts: PBRL keeps one follower policy y per context and needs finite contexts; "
            "the problem has a context_sampler (contexts=None)")


def score_enabled(problem, cfg: SamplePBRLConfig) -> bool:
    score = (problem.transition_log_prob is not None if cfg.score_terms is None
             else cfg.score_terms)
    if score and problem.transition_log_prob is None:
        raise InvalidArgumentError(
            "score_terms: True needs problem.transition_log_prob (x in the dynamics), got None")
    return bool(score)


def init_follower(problem, x, key: Array, learner: Learner, cfg: SamplePBRLConfig):
    """`(y, follower)`: per-context policy parameters and `{"learner", "baseline"}` states
    (leaves with a leading axis `K`). The policy starts near uniform (small output layer)."""
    check_contexts(problem)
    score_enabled(problem, cfg)
    x = lax.stop_gradient(x)

    def per_context(context, k):
        k_learn, k_policy, k_base, k_obs = jax.random.split(k, 4)
        params, heads, factorized = _space(problem, x, context)
        obs, _ = problem.env.reset_env(k_obs, params)
        y = policy_net(cfg, heads, factorized).init(k_policy, obs)
        base = _baseline_net(cfg).init(k_base, obs)
        follower = {"learner": learner.init(problem, x, context, k_learn),
                    "baseline": {"params": base, "opt": _baseline_optimizer(cfg).init(base)}}
        return y, follower

    return map_contexts(per_context, problem, jax.random.split(key, problem.num_contexts))


def _fit_baseline(net, opt, baseline, obs, targets, num_updates: int):
    """`num_updates` full-batch Adam steps of regression of `net(obs)` `[B, 2]` on `targets`."""
    if num_updates == 0:
        return baseline, jnp.asarray(jnp.nan, jnp.float32)

    def loss_fn(params):
        out = jax.vmap(net.apply, (None, 0))(params, obs)
        return jnp.mean((out - targets) ** 2)

    params, opt_state, losses, _ = fit(loss_fn, opt, baseline["params"], baseline["opt"],
                                       num_updates)
    return {"params": params, "opt": opt_state}, losses[-1]


def _context_batch(problem, x, context, y_k, follower_k, key, learner: Learner,
                   cfg: SamplePBRLConfig, score: bool, leader_weight, penalty_weight):
    """One context: fit the best response, roll out `pi_y` and `pi*`, the surrogate's weights
    (`[T, 2N]` on the steps of both rollouts, `[T, N]` on `log pi_y`), the new follower state
    and the sampled values."""
    k_learn, k_y, k_star = jax.random.split(key, 3)
    lstate, linfo = follow(learner, problem, x, context, follower_k["learner"], k_learn)
    params, heads, factorized = _space(problem, x, context)
    lam, gbar = problem.temperature, problem.leader_discount
    gamma = problem.follower_discount(x, context)
    net = policy_net(cfg, heads, factorized)
    pi_y = lambda obs: net.apply(y_k, obs)                                  # noqa: E731
    world = _World(params=params, lam=lam, gamma=gamma, gamma_bar=gbar, heads=heads,
                   factorized=factorized, policy=lambda obs: learner.policy(lstate, obs),
                   value=lambda obs: learner.value(lstate, obs), score=score)
    n, t = cfg.num_envs, cfg.num_steps

    # The follower policy pi_y.
    ty = rollout(k_y, problem, x, context, pi_y, n, t, keep_states=True)
    r, rbar = ty.follower_reward, ty.leader_reward
    dtype = rbar.dtype
    lw, pw = (jnp.asarray(w, dtype) for w in (leader_weight, penalty_weight))
    logp = spaces.log_prob(_map2(pi_y, ty.obs), ty.action).astype(dtype)
    done = ty.done.astype(dtype)
    keep = 1.0 - ty.terminated.astype(dtype)
    trunc = ty.truncated.astype(dtype)
    bnet, bopt = _baseline_net(cfg), _baseline_optimizer(cfg)
    apply_b = lambda obs: bnet.apply(follower_k["baseline"]["params"], obs).astype(dtype)  # noqa: E731
    out, out_next = _map2(apply_b, ty.obs), _map2(apply_b, ty.next_obs)    # [T, N, 2]
    v, vbar, v_next, vbar_next = out[..., 0], out[..., 1], out_next[..., 0], out_next[..., 1]
    soft = r - lam * logp
    g = discounted_returns(soft + gamma * trunc * v_next, done, gamma, bootstrap=v_next[-1])
    g_bar = discounted_returns(rbar, done, gbar, bootstrap=vbar_next[-1])
    u = _at_risk_weights(ty.time, gamma, dtype)
    u_bar = _at_risk_weights(ty.time, gbar, dtype)
    w_y = {"follower": -pw * u, "leader": -lw * u_bar}
    w_policy = -(lw * u_bar * (g_bar - vbar) + pw * u * (g - v))
    if score:
        cont = keep * (g - soft - gamma * v)                 # gamma G_{t+1} - gamma V_hat(s_t)
        cont_bar = (1.0 - done) * (g_bar - rbar - gbar * vbar)
        w_y["score"] = -(lw * u_bar * cont_bar + pw * u * cont)

    # The best response pi* (Danskin: its discounted d_x r expectation is grad_x V*).
    ts = rollout(k_star, problem, x, context, world.policy, n, t, keep_states=True)
    u_star = _at_risk_weights(ts.time, gamma, dtype)
    w_star = {"follower": pw * u_star, "leader": jnp.zeros_like(u_star)}
    if score:
        w_star["score"] = pw * u_star * _follower_td(world, ts.steps(), ts.follower_reward)
    logp_star = spaces.log_prob(_map2(world.policy, ts.obs), ts.action).astype(dtype)

    values = {"penalty": (jnp.sum(u_star * (ts.follower_reward - lam * logp_star))
                          - jnp.sum(u * soft)),
              "policy_objective": jnp.sum(u_bar * rbar),
              "objective": jnp.sum(_at_risk_weights(ts.time, gbar, dtype) * ts.leader_reward)}

    batch = {"steps": _concat_steps([ty.steps(), ts.steps()], 1),
             "policy_obs": ty.obs, "policy_action": ty.action, "policy": w_policy,
             **{name: jnp.concatenate([w_y[name], w_star[name]], 1) for name in w_y}}

    flat = lambda a: a.reshape((-1,) + a.shape[2:])                        # noqa: E731
    targets = flat(jnp.stack([g, g_bar], -1)).astype(jnp.float32)
    baseline, baseline_loss = _fit_baseline(bnet, bopt, follower_k["baseline"],
                                            jax.tree_util.tree_map(flat, ty.obs),
                                            lax.stop_gradient(targets), cfg.baseline_steps)
    info = dict(values, learner_loss=jnp.asarray(linfo["loss"], jnp.float32),
                learner_finite=jnp.asarray(linfo["finite"], bool),
                baseline_loss=jnp.asarray(baseline_loss, jnp.float32))
    return lax.stop_gradient(batch), {"learner": lstate, "baseline": baseline}, info


def _surrogate(problem, x, context, y_k, batch, cfg: SamplePBRLConfig, score: bool):
    """`sum_i wf_i r_x + wl_i rbar_x + ws_i log p_x + wp_i log pi_y` over one context's steps."""
    r, rbar = step_rewards(problem, x, context, batch["steps"])
    total = jnp.sum(batch["follower"] * r) + jnp.sum(batch["leader"] * rbar)
    if score:
        total = total + jnp.sum(batch["score"]
                                * transition_log_probs(problem, x, context, batch["steps"]))
    _, heads, factorized = _space(problem, x, context)
    net = policy_net(cfg, heads, factorized)
    logp = spaces.log_prob(_map2(lambda obs: net.apply(y_k, obs), batch["policy_obs"]),
                           batch["policy_action"])
    return total + jnp.sum(batch["policy"] * logp.astype(total.dtype))


def estimate(problem, x, y, follower, key: Array, learner: Learner, cfg: SamplePBRLConfig, *,
             leader_weight=1.0, penalty_weight=1.0):
    """Stochastic gradient of `sum_k p_k [ -leader_weight f_k(x, y_k) + penalty_weight
    p_k(x, y_k) ]` in `(x, y)` (see the module doc), every context at once.

    Args:
      problem: a `bj.SimulatorProblem` with finite contexts (or none).
      x: the leader's variable (any pytree).
      y: the policies' parameters, leaves `[K, ...]` (as `init_follower` makes them).
      follower: `{"learner", "baseline"}` states, leaves `[K, ...]`.
      key: PRNG key.
      leader_weight, penalty_weight: the weights of `-f` and `p` (scalars, may be traced);
        PBRL's step uses `1/rho` and `1`.

    Returns:
      `(grads, follower, info)`: `grads = {"x": ..., "y": ...}` with the structures of `x` and
      `y`; the follower states after this step's fits; `info` the context-weighted sampled
      `penalty`, `policy_objective` (`f`), `objective` (`F` under the learner's `pi*`), and the
      learner's and baseline's losses, `samples`.
    """
    check_contexts(problem)
    score = score_enabled(problem, cfg)
    x = lax.stop_gradient(x)
    keys = jax.random.split(key, problem.num_contexts)

    def per_context(context, y_k, follower_k, k):
        return _context_batch(problem, x, context, y_k, follower_k, k, learner, cfg, score,
                              leader_weight, penalty_weight)

    batch, follower, infos = map_contexts(per_context, problem, y, follower, keys)

    def surrogate(params):
        def one(context, y_k, b):
            return _surrogate(problem, params["x"], context, y_k, b, cfg, score)
        values = map_contexts(one, problem, params["y"], batch)
        return jnp.dot(problem.probs().astype(values.dtype), values)

    grads = jax.grad(surrogate)({"x": x, "y": y})
    probs = problem.probs()
    info = {name: jnp.dot(probs.astype(infos[name].dtype), infos[name])
            for name in ("penalty", "policy_objective", "objective")}
    info.update(learner_loss=jnp.mean(infos["learner_loss"]),
                learner_finite=jnp.all(infos["learner_finite"]),
                baseline_loss=jnp.mean(infos["baseline_loss"]),
                samples=jnp.asarray(2 * cfg.num_envs * cfg.num_steps * problem.num_contexts))
    return grads, follower, info


def sample_pbrl(optimizer: optax.GradientTransformation, learner: Learner,
                cfg: SamplePBRLConfig, *, rho) -> Algorithm:
    """`Algorithm(init, step)` of PBRL on a simulator problem (built by `pbrl(...)`).

    `rho(step)` is the penalty constant of the step (the tabular `pbrl`'s `rho_schedule`).
    State: `x`, `y`, `follower`, `opt` (over `{"x", "y"}`), `key`, `step`.
    """
    check_sample_options(cfg)

    def init(problem, x0, key):
        key, k_init = jax.random.split(key)
        y, follower = init_follower(problem, x0, k_init, learner, cfg)
        return {"x": x0, "y": y, "follower": follower, "opt": optimizer.init({"x": x0, "y": y}),
                "key": key, "step": jnp.zeros((), jnp.int32)}

    def step(problem, state):
        rho_t = rho(state["step"])
        key, sub = jax.random.split(state["key"])
        params = {"x": state["x"], "y": state["y"]}
        grads, follower, info = estimate(problem, state["x"], state["y"], state["follower"], sub,
                                         learner, cfg, leader_weight=1.0 / rho_t,
                                         penalty_weight=1.0)
        updates, opt_state = optimizer.update(grads, state["opt"], params)
        new = optax.apply_updates(params, updates)
        f, p = info["policy_objective"], info["penalty"]
        metrics = {"objective": jnp.asarray(info["objective"], jnp.float32),
                   "grad_norm": global_norm(grads["x"]).astype(jnp.float32),
                   "follower_residual": jnp.asarray(info["learner_loss"], jnp.float32),
                   "samples": jnp.asarray(info["samples"], jnp.float32),
                   "nonfinite": any_nonfinite(grads, new),
                   "penalized_objective": jnp.asarray(-f + rho_t * p, jnp.float32),
                   "penalty": jnp.asarray(p, jnp.float32),
                   "policy_objective": jnp.asarray(f, jnp.float32),
                   "rho": jnp.asarray(rho_t, jnp.float32),
                   "best_response_gap": jnp.asarray(p, jnp.float32),
                   "baseline_loss": jnp.asarray(info["baseline_loss"], jnp.float32)}
        new_state = {"x": new["x"], "y": new["y"], "follower": follower, "opt": opt_state,
                     "key": key, "step": state["step"] + 1}
        return new_state, metrics

    return Algorithm(init, step)


__all__ = ["SamplePBRLConfig", "check_sample_options", "estimate", "init_follower",
           "policy_net", "sample_pbrl"]
