"""Zero-order hypergradients by Gaussian smoothing (SPEC 5).

    g = mean_j (F(x + u z_j) - F(x)) / u * z_j,   z_j ~ N(0, I),   u_t = c / t

`F` is exact (`values="model"`: followers solved to tolerance, warm-started, and the leader's
value by one linear solve) or a Monte-Carlo estimate from rollouts of the follower's policy
(`values="rollout"`). On a `bj.SimulatorProblem` the model-free form of
`bilevel_jax.estimators.sample_zero_order` runs instead (chosen at trace time by the problem's
type): `F` from rollouts of followers fitted by `learner` at `x` and at `x + u z`.

With exact values, each evaluation solves every context in turn (`lax.map`, not `vmap`), so each
follower's sweeps stop at its own tolerance rather than at the slowest context's. `F(x)` warm-starts from the previous step's solutions; the shifted points
`x + u z_j` from the fresh solutions at `x`, which are closer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from bilevel_jax.core.evaluation import policy_evaluation
from bilevel_jax.core.rollout import sample_trajectories
from bilevel_jax.core.soft_vi import soft_value_iteration
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.estimators.base import (Estimator, check_learner_option, check_positive_ints,
                                         is_simulator, register)
from bilevel_jax.estimators.exact import zero_q


def _model_objective(problem, x, init_q):
    """Exact `F(x)` and the followers' solutions `q [K, S, A]` (warm-started at `init_q`)."""

    def per_context(args):
        context, q0 = args
        mdp = problem.follower(x, context)
        sol = soft_value_iteration(mdp, problem.temperature, init_q=q0)
        leader = policy_evaluation(problem.leader_mdp(x, context, mdp), sol.policy)
        return jnp.dot(mdp.initial, leader.v), sol.q

    if problem.contexts is None:
        value, q = per_context((None, init_q[0]))
        values, q = value[None], q[None]
    else:
        values, q = lax.map(per_context, (problem.contexts, init_q))
    return jnp.dot(problem.probs().astype(values.dtype), values), q


def _rollout_objective(problem, x, key, num_envs, num_steps):
    """Monte-Carlo `F(x)`: discounted leader return of the first episode of each environment."""

    def per_context(context, k):
        mdp = problem.follower(x, context)
        policy = soft_value_iteration(mdp, problem.temperature).policy
        rbar = problem.leader_reward(x, context)
        traj = sample_trajectories(k, mdp, policy, num_envs=num_envs, num_steps=num_steps)
        first_episode = jnp.cumsum(traj.dones, axis=0) - traj.dones == 0
        discounts = problem.leader_discount ** traj.times
        returns = jnp.sum(first_episode * discounts * rbar[traj.states, traj.actions], axis=0)
        return jnp.mean(returns)

    keys = jax.random.split(key, problem.num_contexts)
    if problem.contexts is None:
        values = per_context(None, keys[0])[None]
    else:
        values = jax.vmap(per_context)(problem.contexts, keys)
    return jnp.dot(problem.probs().astype(values.dtype), values)


def zero_order(*, smoothing: float = 0.1, num_directions: int = 1, decay: bool = True,
               values: str = "model", num_envs: int = 64, num_steps: int = 500,
               learner="soft_dqn", learner_options: dict | None = None,
               shifted: str = "warm") -> Estimator:
    """Gaussian-smoothing estimator with `u_t = smoothing / t` (`decay=False`: constant `u`).

    Args:
      smoothing, decay: `u_t = smoothing / t` at the estimator's `t`-th step (constant when
        `decay=False`).
      num_directions: Gaussian directions `z_j` per estimate (the average of their forward
        differences).
      values: tabular problems: `"model"` (exact `F`) or `"rollout"` (Monte-Carlo `F`).
        Simulator problems always estimate `F` from rollouts.
      num_envs, num_steps: the rollouts of each Monte-Carlo `F` (`N` first episodes, each cut
        at `T` steps).
      learner, learner_options (simulator problems): the follower, a `bj.learners` name built
        with `learner_options` or a ready-made `Learner` (as `hpgd`'s); the follower at `x` is
        warm-started in the estimator state.
      shifted (simulator problems): the follower at `x + u z`: `"warm"` (its own learner state
        kept in the estimator state) or `"fresh"` (a new `init` every step, the CB-RL baseline).
    """
    if values not in ("model", "rollout"):
        raise InvalidArgumentError(f"values: expected 'model' or 'rollout', got {values!r}")
    if smoothing <= 0 or num_directions < 1:
        raise InvalidArgumentError(
            f"smoothing / num_directions: expected > 0 and >= 1, got {smoothing}, {num_directions}")
    check_positive_ints(num_envs=num_envs, num_steps=num_steps)
    check_learner_option(learner, learner_options)
    if shifted not in ("warm", "fresh"):
        raise InvalidArgumentError(f"shifted: expected 'warm' or 'fresh', got {shifted!r}")

    @functools.cache
    def simulator_fns():
        """`(init, update)` of the model-free form, built on first use: it imports gymnax
        (through `bilevel_jax.sim`), which must not load before `jax.distributed`."""
        from bilevel_jax.estimators import sample_zero_order  # noqa: PLC0415
        from bilevel_jax.learners import make_learner  # noqa: PLC0415
        cfg = sample_zero_order.SampleZeroOrderConfig(
            smoothing=smoothing, num_directions=num_directions, decay=decay,
            num_envs=num_envs, num_steps=num_steps, shifted=shifted)
        follower = make_learner(learner, **(learner_options or {}))
        return sample_zero_order.sample_zero_order(follower, cfg)

    def init(problem, x):
        if is_simulator(problem):
            return simulator_fns()[0](problem, x)
        return {"step": jnp.zeros((), jnp.int32), "q": zero_q(problem, x)}

    def update(problem, x, state, key):
        if is_simulator(problem):
            return simulator_fns()[1](problem, x, state, key)
        x_flat, unravel = ravel_pytree(x)
        step = state["step"] + 1
        u = smoothing / step if decay else jnp.asarray(smoothing)
        key_z, key_f = jax.random.split(key)
        z = jax.random.normal(key_z, (num_directions,) + x_flat.shape, x_flat.dtype)

        if values == "model":
            base, q = _model_objective(problem, x, state["q"])
            shifted = lax.map(lambda zj: _model_objective(problem, unravel(x_flat + u * zj), q)[0],
                              z)
        else:
            def objective(xf):
                # Common random numbers: the same rollout key for x and x + u z.
                return _rollout_objective(problem, unravel(xf), key_f, num_envs, num_steps)

            base, q = objective(x_flat), state["q"]
            shifted = jax.vmap(lambda zj: objective(x_flat + u * zj))(z)
        diffs = (shifted - base) / u
        per_direction = diffs[:, None] * z
        grad = jnp.mean(per_direction, axis=0)
        variance = (jnp.var(per_direction, axis=0, ddof=1) / num_directions
                    if num_directions > 1 else jnp.full_like(grad, jnp.nan))
        samples = 0 if values == "model" else (num_directions + 1) * num_envs * num_steps
        info = {"objective": base, "smoothing": u, "samples": jnp.asarray(samples),
                "variance": unravel(variance),
                "follower_residual": jnp.zeros((), x_flat.dtype)}
        return unravel(grad), {"step": step, "q": jax.lax.stop_gradient(q)}, info

    # Only the tabular model form's objective is exact; the simulator form's is an estimate.
    return Estimator(init, update, exact_objective=values == "model", simulator=True)


register("zero_order", zero_order, simulator=True)
