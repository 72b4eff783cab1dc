"""Designer algorithms for incentive design with a zero-sum lower level (SPEC 6, 7.5).

Both are `Algorithm(init, step)` over an `envs.incentive_design.IncentiveDesignProblem`:

* `equilibrium_ascent`: ascent on `F(x)` with the exact hypergradient through the regularized
  Nash equilibrium (implicit differentiation of the solver's fixed point), the solver
  warm-started from the previous iterate's equilibrium.
* `ni_pbrl`: PBRL with the Nikaido-Isoda penalty: joint descent on `(x, mu_logits, nu_logits)`
  of `(-f(x, mu, nu) + rho * NI_gap(x, mu, nu)) / rho`, the players' best responses
  approximated by `inner_sweeps` soft sweeps warm-started from the previous iteration's
  tables, `rho` ramped geometrically (`algorithms.pbrl.rho_schedule`). The NI gap is the sum
  of the two players' value penalties of SPEC 6 (`max_nu' J(mu, nu') - J(mu, nu)` for nu,
  `J(mu, nu) - min_mu' J(mu', nu)` for mu).

Metrics of every iteration (all at the iterate the step starts from): `objective` (the exact
`F(x)`: the designer's value at the equilibrium of `x`, solved to the problem's tolerance),
`equilibrium_gap` (the exact NI gap of the algorithm's player policies: the solver's for ascent,
PBRL's own `(mu, nu)` for PBRL), `grad_norm` (of the `x` part of the step's gradient),
`follower_residual`, `samples` (0: model-based), `nonfinite`; ascent adds `solver_sweeps`
(the warm-started equilibrium solve's sweeps), PBRL adds `penalty` (the
approximate NI gap in its objective), `rho`, `penalized_objective` and `policy_objective`
(`f(x, mu, nu)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bilevel_jax.algorithms.base import Algorithm, any_nonfinite, global_norm
from bilevel_jax.algorithms.pbrl import rho_schedule
from bilevel_jax.core.soft_vi import soft_bellman_operator, soft_value_iteration
from bilevel_jax.envs.incentive_design import (
    check_incentive_problem,
    designer_objective,
    equilibrium_gap,
    policy_objective,
    solve_equilibrium,
)
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.games import max_player_mdp, min_player_mdp

_f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731


def _stop(tree):
    return jax.tree_util.tree_map(lax.stop_gradient, tree)


def _check_positive_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")


def _equilibrium_tables(eq, temperature):
    """The best-response Q tables that an equilibrium implies: nu's `[S, B]`
    (`sum_a mu Q + lam sum_a mu log mu`) and mu's `[S, A]` (`-sum_b nu Q + lam sum_b nu log nu`),
    the soft-optimal tables of `max_player_mdp` / `min_player_mdp` at the fixed point; warm
    starts that make the exact NI gap at (or near) an equilibrium a few sweeps."""
    lam = jnp.asarray(temperature, eq.q.dtype)
    mu, nu = eq.mu_policy, eq.nu_policy
    q_max = (jnp.einsum("sab,sa->sb", eq.q, mu)
             + lam * jnp.sum(mu * eq.mu_logits, axis=-1)[:, None])
    q_min = (-jnp.einsum("sab,sb->sa", eq.q, nu)
             + lam * jnp.sum(nu * eq.nu_logits, axis=-1)[:, None])
    return _stop(q_max), _stop(q_min)


def equilibrium_ascent(optimizer: optax.GradientTransformation, *,
                       warm_start: bool = True) -> Algorithm:
    """Hypergradient ascent on `F(x)` through the equilibrium (optax minimizes: fed `-grad F`).

    State: `x`, `opt`, `eq` (the last `GameEquilibrium`, the next solve's warm start when
    `warm_start`), `key`, `step`. Each step solves the equilibrium at `x` once: its `F` is the
    `objective` metric and its implicit derivative the step's gradient. `follower_residual` is
    the solver's `max(residual, stage_residual)`; `equilibrium_gap` the NI gap of its policies
    (zero up to the solver's accuracy: a check, not a target; its best responses start from the
    tables the equilibrium implies, so it costs a few sweeps); `solver_sweeps` the sweeps the
    warm-started solve took.
    """
    def init(problem, x0, key):
        check_incentive_problem(problem, x0)
        _, eq = designer_objective(problem, x0)
        return {"x": x0, "opt": optimizer.init(x0), "eq": _stop(eq), "key": key,
                "step": jnp.zeros((), jnp.int32)}

    def step(problem, state):
        x = state["x"]
        warm = state["eq"] if warm_start else None
        (value, eq), grad = jax.value_and_grad(
            lambda z: designer_objective(problem, z, init=warm), has_aux=True)(x)
        updates, opt_state = optimizer.update(jax.tree_util.tree_map(jnp.negative, grad),
                                              state["opt"], x)
        new_x = optax.apply_updates(x, updates)
        eq = _stop(eq)
        q_max, q_min = _equilibrium_tables(eq, problem.temperature)
        gap = equilibrium_gap(problem, x, eq.mu_logits, eq.nu_logits, init_q_max=q_max,
                              init_q_min=q_min)
        metrics = {"objective": _f32(value),
                   "grad_norm": _f32(global_norm(grad)),
                   "follower_residual": _f32(jnp.maximum(eq.residual, eq.stage_residual)),
                   "samples": jnp.zeros((), jnp.float32),
                   "nonfinite": any_nonfinite(grad, new_x),
                   "equilibrium_gap": _f32(gap),
                   "solver_sweeps": _f32(eq.num_sweeps)}
        new_state = {"x": new_x, "opt": opt_state, "eq": eq, "key": state["key"],
                     "step": state["step"] + 1}
        return new_state, metrics

    return Algorithm(init, step)


def _best_response_tables(problem, x, mu_logits, nu_logits, q_max, q_min, num_sweeps):
    """`num_sweeps` soft sweeps of each player's best-response MDP from the given tables:
    nu's `[S, B]` (in `max_player_mdp` given mu) and mu's `[S, A]` (in `min_player_mdp` given
    nu). Constants of the step (stop-gradient), like PBRL's approximate `V*`."""
    game = _stop(problem.incentivized_game(x))
    lam = lax.stop_gradient(problem.temperature)
    mu = jax.nn.softmax(lax.stop_gradient(mu_logits), axis=-1)
    nu = jax.nn.softmax(lax.stop_gradient(nu_logits), axis=-1)
    mdp_max, mdp_min = max_player_mdp(game, mu, lam), min_player_mdp(game, nu, lam)
    options = {} if num_sweeps is None else {"num_sweeps": num_sweeps}
    q_max = soft_value_iteration(mdp_max, lam, init_q=q_max, **options).q
    q_min = soft_value_iteration(mdp_min, lam, init_q=q_min, **options).q
    residual = jnp.maximum(
        jnp.max(jnp.abs(soft_bellman_operator(q_max, mdp_max, lam) - q_max)),
        jnp.max(jnp.abs(soft_bellman_operator(q_min, mdp_min, lam) - q_min)))
    return _stop(q_max), _stop(q_min), residual


def ni_pbrl(optimizer: optax.GradientTransformation, *, rho_0: float = 1.0,
            rho_max: float = 100.0, ramp_iters: int = 1000, inner_sweeps: int = 10,
            track_objective: bool = True) -> Algorithm:
    """PBRL with the Nikaido-Isoda penalty (SPEC 6, zero-sum lower level).

    Minimizes `(-f(x, mu, nu) + rho * NI_gap(x, mu, nu)) / rho` jointly in
    `params = {"x", "mu_logits" [S, A], "nu_logits" [S, B]}` with `optimizer` (the division by
    `rho` scales the step as `1/rho`); `f = policy_objective` (the designer's value under the
    players' current policies minus the cost). `rho` goes from `rho_0` to `rho_max`
    geometrically over `ramp_iters` iterations, then stays. Each step first runs `inner_sweeps`
    soft sweeps of both best-response MDPs, warm-started from the previous step's tables (state
    `q_max [S, B]`, `q_min [S, A]`); the penalty evaluates their soft-greedy policies exactly and
    differentiates by Danskin (`games.nikaido_isoda_gap`, no derivative through the sweeps).
    The logits start at the equilibrium of `x0` and the tables at the exact best responses.

    `objective` is the exact `F(x)` when `track_objective` (one equilibrium solve per step,
    warm-started; state `eq`), else `f(x, mu, nu)`; `equilibrium_gap` is the exact NI gap of
    `(mu, nu)` at `x` (best responses solved to tolerance from the step's tables);
    `follower_residual` the larger soft Bellman residual of the two tables after the sweeps.

    `rho_0`, `rho_max` may be traced (swept under `vmap`); concrete values need
    `0 < rho_0 <= rho_max`.
    """
    traced = any(isinstance(v, jax.core.Tracer) for v in (rho_0, rho_max))
    if not traced:
        try:
            ok = 0 < float(rho_0) <= float(rho_max) < float("inf")
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InvalidArgumentError(
                f"rho_0, rho_max: expected numbers with 0 < rho_0 <= rho_max, got {rho_0!r}, "
                f"{rho_max!r}")
    _check_positive_int("ramp_iters", ramp_iters)
    _check_positive_int("inner_sweeps", inner_sweeps)

    def init(problem, x0, key):
        check_incentive_problem(problem, x0)
        eq = _stop(solve_equilibrium(problem, x0))
        q_max, q_min = _equilibrium_tables(eq, problem.temperature)
        q_max, q_min, _ = _best_response_tables(problem, x0, eq.mu_logits, eq.nu_logits,
                                                q_max, q_min, None)
        params = {"x": x0, "mu_logits": eq.mu_logits, "nu_logits": eq.nu_logits}
        return {"x": x0, "mu_logits": eq.mu_logits, "nu_logits": eq.nu_logits,
                "q_max": q_max, "q_min": q_min, "opt": optimizer.init(params), "eq": eq,
                "key": key, "step": jnp.zeros((), jnp.int32)}

    def step(problem, state):
        rho = rho_schedule(state["step"], rho_0, rho_max, ramp_iters)
        x, mu_logits, nu_logits = state["x"], state["mu_logits"], state["nu_logits"]
        q_max, q_min, residual = _best_response_tables(
            problem, x, mu_logits, nu_logits, state["q_max"], state["q_min"], inner_sweeps)

        def penalized(params):
            f = policy_objective(problem, params["x"], params["mu_logits"], params["nu_logits"])
            p = equilibrium_gap(problem, params["x"], params["mu_logits"], params["nu_logits"],
                                init_q_max=q_max, init_q_min=q_min, num_sweeps=0)
            return (-f + rho * p) / rho, (f, p)

        params = {"x": x, "mu_logits": mu_logits, "nu_logits": nu_logits}
        (scaled, (f, p)), grads = jax.value_and_grad(penalized, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, state["opt"], params)
        new = optax.apply_updates(params, updates)

        # Exact diagnostics at the step's starting point (no gradients flow through them).
        gap = equilibrium_gap(problem, x, mu_logits, nu_logits, init_q_max=q_max,
                              init_q_min=q_min)
        eq = state["eq"]
        if track_objective:
            objective, eq = designer_objective(problem, x, init=state["eq"])
            eq = _stop(eq)
        else:
            objective = f
        metrics = {"objective": _f32(objective),
                   "grad_norm": _f32(global_norm(grads["x"])),
                   "follower_residual": _f32(residual),
                   "samples": jnp.zeros((), jnp.float32),
                   "nonfinite": any_nonfinite(grads, new),
                   "equilibrium_gap": _f32(gap),
                   "penalty": _f32(p),
                   "rho": _f32(rho),
                   "penalized_objective": _f32(scaled * rho),
                   "policy_objective": _f32(f)}
        new_state = {"x": new["x"], "mu_logits": new["mu_logits"], "nu_logits": new["nu_logits"],
                     "q_max": q_max, "q_min": q_min, "opt": opt_state, "eq": eq,
                     "key": state["key"], "step": state["step"] + 1}
        return new_state, metrics

    return Algorithm(init, step)


__all__ = ["equilibrium_ascent", "ni_pbrl"]
