"""Zero-order hypergradients on simulator problems: forward differences of rollout values (SPEC 9).

The estimator behind `bj.hypergradient(simulator_problem, x, "zero_order", ...)` (`zero_order.py`
dispatches here when the problem is a `bj.SimulatorProblem`). Per outer step `t`:

1. `u_t = smoothing / t` (or constant), `z_j ~ N(0, I)` (`j < num_directions`, drawn from the
   key exactly as the tabular `zero_order` draws them, so both see the same directions);
2. the follower at `x` is fitted by the learner (`bilevel_jax.learners.follow`, warm-started in
   the estimator state); the follower at `x + u z_j` is fitted warm (its own learner state,
   kept in the estimator state next to the first: `shifted="warm"`) or from a fresh `init`
   every step (`shifted="fresh"`, the CB-RL tax baseline's two fresh followers);
3. `F` at both points is the mean over `num_envs` environments of the discounted leader return
   of each environment's first episode (`bj.sim.rollout`, `bj.sim.discounted_returns` at time 0;
   cut by the window's end, a bias of order `gammabar^num_steps`). Both points roll out with the
   same key (common random numbers), so the paired per-environment differences, not two
   independent means, carry the noise:

       g = mean_j (Fhat(x + u z_j) - Fhat(x)) / u * z_j
         = mean_n  mean_j (G_n(x + u z_j) - G_n(x)) / u * z_j         (G_n: env n's return)

`info["objective"]` is `Fhat(x)` with its standard error `objective_se`; `difference_se` is the
standard error of the mean forward difference `mean_j (Fhat(x + u z_j) - Fhat(x))`;
`rollout_variance` is the per-coordinate variance of `g` given the directions (from the spread
over environments: what more rollouts would remove), and `variance`, as in the tabular form,
the spread over directions (NaN with one direction). With contexts, every context is estimated
(its own learner states) and weighted by its probability; a context-free problem with a
`context_sampler` draws one context per estimate, shared by both points.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from bilevel_jax.learners.base import Learner, follow
from bilevel_jax.problem import map_contexts
from bilevel_jax.sim.rollout import discounted_returns, rollout

Array = jax.Array


class SampleZeroOrderConfig(NamedTuple):
    """Static options of the model-free zero-order estimator (see `zero_order.zero_order`)."""

    smoothing: float
    num_directions: int
    decay: bool
    num_envs: int
    num_steps: int
    shifted: str = "warm"      # "warm" or "fresh" (checked by `zero_order`)


def episode_returns(problem, x, context, policy, key: Array, num_envs: int,
                    num_steps: int) -> Array:
    """`[N]` discounted leader returns of each environment's first episode under `policy`.

    `G_0` of `discounted_returns` is exactly the first episode's return (the recursion stops at
    the first `done`), cut at the window's end when the episode is longer than `num_steps`.
    """
    traj = rollout(key, problem, x, context, policy, num_envs, num_steps)
    return discounted_returns(traj.leader_reward, traj.done, problem.leader_discount)[0]


def _mean_se(values: Array, axis: int = -1) -> tuple[Array, Array]:
    """Mean and its standard error (`std(ddof=1) / sqrt(n)`) along `axis`."""
    n = values.shape[axis]
    return jnp.mean(values, axis), jnp.std(values, axis, ddof=1) / jnp.sqrt(n)


def sample_zero_order(learner: Learner, cfg: SampleZeroOrderConfig):
    """`(init, update)` of zero-order on a `SimulatorProblem` (built by `zero_order(...)`)."""
    num_dirs = cfg.num_directions

    def init_learners(problem, x, context, key):
        state = {"learner": learner.init(problem, x, context, key)}
        if cfg.shifted == "warm":
            # Copies of the follower at x (the shifted points are within u |z| of it).
            state["shifted"] = jax.tree_util.tree_map(
                lambda leaf: jnp.broadcast_to(leaf, (num_dirs,) + jnp.shape(leaf)),
                state["learner"])
        return state

    def init(problem, x):
        key = jax.random.key(0)   # the learners' first parameters (x has no key)
        x = lax.stop_gradient(x)

        def per_context(context, k):
            k_learn, k_ctx = jax.random.split(k)
            if context is None and problem.context_sampler is not None:
                context = problem.context_sampler(k_ctx)
            return init_learners(problem, x, context, k_learn)

        learners = map_contexts(per_context, problem, jax.random.split(key, problem.num_contexts))
        return {"step": jnp.zeros((), jnp.int32), "learners": learners}

    def update(problem, x, state, key):
        x = lax.stop_gradient(x)
        x_flat, unravel = ravel_pytree(x)
        step = state["step"] + 1
        u = (cfg.smoothing / step if cfg.decay else jnp.asarray(cfg.smoothing)).astype(x_flat.dtype)
        key_z, key_f = jax.random.split(key)     # as the tabular zero_order: the same z
        z = jax.random.normal(key_z, (num_dirs,) + x_flat.shape, x_flat.dtype)      # [J, D]

        def per_context(context, cstate, k):
            k_learn, k_roll = jax.random.split(k)
            base_state, base_info = follow(learner, problem, x, context, cstate["learner"],
                                           k_learn)

            # Common random numbers in the learning too: every follower fits with `k_learn`
            # (a fresh one split as `follow` splits it for a reset), so with a learner that
            # resets each step the two followers differ only through x.
            def fit_shifted(zj, lstate):
                xj = unravel(x_flat + u * zj)
                if lstate is None:      # shifted="fresh": a new follower at every step
                    k_update, k_init = jax.random.split(k_learn)
                    return learner.update(problem, xj, context,
                                          learner.init(problem, xj, context, k_init), k_update)
                return follow(learner, problem, xj, context, lstate, k_learn)

            if cfg.shifted == "warm":
                shift_states, shift_info = jax.vmap(fit_shifted)(z, cstate["shifted"])
            else:
                shift_states, shift_info = jax.vmap(lambda zj: fit_shifted(zj, None))(z)

            # Common random numbers: one rollout key for x and every x + u z_j.
            base = episode_returns(problem, x, context,
                                   lambda obs: learner.policy(base_state, obs), k_roll,
                                   cfg.num_envs, cfg.num_steps)                         # [N]
            shifted = jax.vmap(lambda zj, ls: episode_returns(
                problem, unravel(x_flat + u * zj), context,
                lambda obs: learner.policy(ls, obs), k_roll, cfg.num_envs, cfg.num_steps))(
                    z, shift_states)                                                    # [J, N]
            new = {"learner": base_state}
            if cfg.shifted == "warm":
                new["shifted"] = shift_states
            diffs = shifted - base[None]                                                # [J, N]
            finite = (jnp.asarray(base_info["finite"], bool)
                      & jnp.all(jnp.asarray(shift_info["finite"], bool)))
            loss = jnp.mean(jnp.asarray(shift_info["loss"], jnp.float32))
            return base, diffs, new, {"learner_loss": jnp.asarray(base_info["loss"], jnp.float32),
                                      "shifted_learner_loss": loss, "learner_finite": finite}

        if problem.contexts is None:
            k_ctx, k_est = jax.random.split(key_f)
            _, context = problem.draw_context(k_ctx)
            cstate = jax.tree_util.tree_map(lambda leaf: leaf[0], state["learners"])
            base, diffs, new, infos = per_context(context, cstate, k_est)
            learners = jax.tree_util.tree_map(lambda leaf: leaf[None], new)
            base, diffs = base[None], diffs[None]
            infos = jax.tree_util.tree_map(lambda leaf: leaf[None], infos)
            probs = jnp.ones((1,), base.dtype)
        else:
            keys = jax.random.split(key_f, problem.num_contexts)
            base, diffs, learners, infos = map_contexts(per_context, problem, state["learners"],
                                                        keys)                   # [K, (J,) N]
            probs = problem.probs().astype(base.dtype)

        # Per environment n: the contexts' weighted values and forward differences (the
        # environments are independent draws, so their spread gives the standard errors).
        base_n = probs @ base                                                        # [N]
        diff_n = jnp.einsum("k,kjn->jn", probs, diffs)                               # [J, N]
        objective, objective_se = _mean_se(base_n)
        difference, difference_se = _mean_se(jnp.mean(diff_n, 0))
        per_env = jnp.einsum("jn,jd->nd", diff_n, z) / (num_dirs * u)                # [N, D]
        grad, grad_se = _mean_se(per_env, axis=0)
        per_direction = jnp.mean(diff_n, 1)[:, None] * z / u                          # [J, D]
        variance = (jnp.var(per_direction, axis=0, ddof=1) / num_dirs if num_dirs > 1
                    else jnp.full_like(grad, jnp.nan))
        samples = problem.num_contexts * (num_dirs + 1) * cfg.num_envs * cfg.num_steps
        info = {"objective": objective, "objective_se": objective_se,
                "difference": difference, "difference_se": difference_se,
                "smoothing": u, "samples": jnp.asarray(samples),
                "variance": unravel(variance), "rollout_variance": unravel(grad_se ** 2),
                "learner_loss": jnp.mean(infos["learner_loss"]),
                "shifted_learner_loss": jnp.mean(infos["shifted_learner_loss"]),
                "learner_finite": jnp.all(infos["learner_finite"])}
        return unravel(grad), {"step": step, "learners": learners}, info

    return init, update
