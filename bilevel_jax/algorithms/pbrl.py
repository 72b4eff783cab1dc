"""PBRL (SPEC 6): joint descent on `(x, y)` of `-f(x, pi_y) + rho * penalty(x, y)`.

`y` holds the followers' policy logits (`[K, S, A]`), initialized at the soft-optimal policy of
`x0`. `rho` is ramped from `rho_0` to `rho_max` over `ramp_iters` iterations (geometrically), and
the step is taken on the objective divided by `rho`, i.e. the step size scales as `1/rho`. The
value penalty's `V*` is approximated by `inner_sweeps` soft sweeps warm-started from the previous
iteration's table. Reported: exact `F(x)` (the bilevel objective at the leader's iterate), the
penalized objective, the penalty, `rho`, and `best_response_gap`, the followers' distance to
their best responses `sum_k p_k [V*_{x,k}(mu) - V^{pi_y}_{x,k}(mu)] >= 0` (soft values) at the
iterate `(x, y)` the step was taken at: `V*` from a solve to tolerance warm-started at the inner
sweeps' table when `track_objective`, else the value of the inner sweeps' soft-greedy policy
(then it is the value penalty with approximate `V*` and may be slightly negative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bilevel_jax.algorithms.base import Algorithm, any_nonfinite, global_norm
from bilevel_jax.core.evaluation import policy_evaluation
from bilevel_jax.core.soft_vi import soft_bellman_operator, soft_value_iteration
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.penalties import bellman_penalty, value_penalty
from bilevel_jax.problem import leader_objective, map_contexts

PENALTIES = ("value", "bellman")


def policy_objective(problem, x, y):
    """`f(x, pi_y) = sum_k p_k mu . Vbar^{pi_y}`: the leader's value under the followers' `y`."""
    def one(context, logits):
        mdp = problem.follower(x, context)
        leader = policy_evaluation(problem.leader_mdp(x, context, mdp),
                                   jax.nn.softmax(logits, axis=-1))
        return jnp.dot(mdp.initial, leader.v)

    values = map_contexts(one, problem, y)
    return jnp.dot(problem.probs().astype(values.dtype), values)


def rho_schedule(step, rho_0, rho_max, ramp_iters):
    frac = jnp.clip(step / max(ramp_iters, 1), 0.0, 1.0)
    return rho_0 * (rho_max / rho_0) ** frac


def pbrl(optimizer: optax.GradientTransformation, *, penalty: str = "value", rho_0: float = 1.0,
         rho_max: float = 100.0, ramp_iters: int = 1000, inner_sweeps: int = 10,
         track_objective: bool = True) -> Algorithm:
    if penalty not in PENALTIES:
        raise InvalidArgumentError(f"penalty: expected one of {PENALTIES}, got {penalty!r}")
    if not any(isinstance(v, jax.core.Tracer) for v in (rho_0, rho_max)) and not 0 < rho_0 <= rho_max:
        # (traced values, e.g. swept under vmap, are not checked here)
        raise InvalidArgumentError(
            f"rho_0, rho_max: expected 0 < rho_0 <= rho_max, got {rho_0}, {rho_max}")

    def follower_q(problem, x, q0, num_sweeps):
        def one(context, q):
            mdp = problem.follower(x, context)
            return soft_value_iteration(mdp, problem.temperature, init_q=q, num_sweeps=num_sweeps).q
        return jax.lax.stop_gradient(map_contexts(one, problem, q0))

    def init(problem, x0, key):
        q = map_contexts(lambda c: soft_value_iteration(problem.follower(x0, c),
                                                        problem.temperature).q, problem)
        params = {"x": x0, "y": q / problem.temperature}
        return {"x": x0, "y": params["y"], "q": q, "opt": optimizer.init(params), "key": key,
                "step": jnp.zeros((), jnp.int32)}

    def step(problem, state):
        rho = rho_schedule(state["step"], rho_0, rho_max, ramp_iters)
        q = follower_q(problem, state["x"], state["q"], inner_sweeps)

        def penalized(params):
            x, y = params["x"], params["y"]
            if penalty == "value":
                p = value_penalty(problem, x, y, init_q=q, num_sweeps=0)
            else:
                p = bellman_penalty(problem, x, y)
            f = policy_objective(problem, x, y)
            return (-f + rho * p) / rho, (f, p)

        params = {"x": state["x"], "y": state["y"]}
        (scaled, (f, p)), grads = jax.value_and_grad(penalized, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, state["opt"], params)
        new = optax.apply_updates(params, updates)
        residual = jnp.max(jnp.abs(map_contexts(
            lambda c, qc: soft_bellman_operator(qc, problem.follower(state["x"], c),
                                                problem.temperature) - qc, problem, q)))
        objective = leader_objective(problem, state["x"]) if track_objective else f
        gap = value_penalty(problem, state["x"], state["y"], init_q=q,
                            **({} if track_objective else {"num_sweeps": 0}))
        metrics = {"objective": jnp.asarray(objective, jnp.float32),
                   "grad_norm": global_norm(grads["x"]).astype(jnp.float32),
                   "follower_residual": residual.astype(jnp.float32),
                   "samples": jnp.zeros((), jnp.float32),
                   "nonfinite": any_nonfinite(grads, new),
                   "penalized_objective": (scaled * rho).astype(jnp.float32),
                   "penalty": p.astype(jnp.float32), "policy_objective": f.astype(jnp.float32),
                   "rho": jnp.asarray(rho, jnp.float32),
                   "best_response_gap": gap.astype(jnp.float32)}
        new_state = {"x": new["x"], "y": new["y"], "q": q, "opt": opt_state, "key": state["key"],
                     "step": state["step"] + 1}
        return new_state, metrics

    return Algorithm(init, step)
