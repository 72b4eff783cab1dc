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

On a `bj.SimulatorProblem` the same `pbrl(...)` runs the model-free form
(`bilevel_jax.algorithms.sample_pbrl`): policy networks `y`, a warm best-response learner for
`V*` and `pi*`, sampled gradients from one surrogate's `jax.grad`; value penalty only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bilevel_jax.algorithms.base import Algorithm, any_nonfinite, global_norm
from bilevel_jax.core.evaluation import policy_evaluation
from bilevel_jax.core.soft_vi import soft_bellman_operator, soft_value_iteration
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.estimators.base import check_learner_option, is_simulator
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


def _check_sample_options(options: dict) -> None:
    """The simulator options' ranges, checked without importing gymnax (`InvalidArgumentError`
    naming the option; the same checks as `sample_pbrl.check_sample_options`)."""
    for name in ("num_envs", "num_steps", "baseline_steps"):
        value, low = options[name], 0 if name == "baseline_steps" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
    for name in ("policy_hidden", "baseline_hidden"):
        value = options[name]
        if not isinstance(value, tuple) or not all(
                isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in value):
            raise InvalidArgumentError(
                f"{name}: expected a tuple of ints >= 1 (empty: no hidden layer), got {value!r}")
    if options["policy_activation"] not in ("tanh", "relu"):
        raise InvalidArgumentError(f"policy_activation: expected one of ('tanh', 'relu'), got "
                                   f"{options['policy_activation']!r}")
    lr = options["baseline_learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise InvalidArgumentError(f"baseline_learning_rate: expected a number > 0, got {lr!r}")
    if options["score_terms"] not in (None, True, False):
        raise InvalidArgumentError(
            f"score_terms: expected None, True or False, got {options['score_terms']!r}")


def rho_schedule(step, rho_0, rho_max, ramp_iters):
    """`rho_0 (rho_max / rho_0)^min(step / ramp_iters, 1)`: the geometric ramp of both forms."""
    frac = jnp.clip(step / max(ramp_iters, 1), 0.0, 1.0)
    return rho_0 * (rho_max / rho_0) ** frac


def pbrl(optimizer: optax.GradientTransformation, *, penalty: str = "value", rho_0: float = 1.0,
         rho_max: float = 100.0, ramp_iters: int = 1000, inner_sweeps: int = 10,
         track_objective: bool = True, learner="soft_dqn", learner_options: dict | None = None,
         num_envs: int = 16, num_steps: int = 128, policy_hidden=(64, 64),
         policy_activation: str = "tanh", baseline_hidden=(64, 64),
         baseline_learning_rate: float = 1e-3, baseline_steps: int = 10,
         score_terms: bool | None = None) -> Algorithm:
    """PBRL: joint descent on `(x, y)` of `(-f(x, pi_y) + rho * penalty(x, y)) / rho`.

    On a tabular `BilevelProblem` (module doc): `y` are logits `[K, S, A]`, `V*` from
    `inner_sweeps` warm-started soft sweeps, exact gradients. On a `bj.SimulatorProblem` the
    model-free form of `bilevel_jax.algorithms.sample_pbrl` runs: `y` are the parameters of a
    flax policy network per context, `V*` and `pi*` come from the best-response `learner`
    (kept warm), and the gradients in `x` (Danskin) and `y` (score-function policy gradient with
    a learned baseline) are one `jax.grad` of a surrogate over vmapped rollouts. The same `rho`
    ramp (`rho_schedule`) and `1/rho` step scaling in both forms.

    Args:
      optimizer: optax optimizer over `{"x": x, "y": y}` (fed the gradient of the objective).
      penalty: `"value"` (`V*_x(mu) - V^{pi_y}_x(mu)`) or `"bellman"` (tabular problems only:
        a simulator problem is refused with `InvalidArgumentError` naming `penalty`).
      rho_0, rho_max, ramp_iters: `rho` ramped geometrically from `rho_0` to `rho_max` over
        `ramp_iters` iterations.
      inner_sweeps (tabular): soft sweeps per iteration for `V*`.
      track_objective: report the exact `F(x)`; on a simulator problem that is `F` of its
        tabular `reference` (`bj.sim.reference_model`) where it has one, else (and without
        `track_objective`) the sampled `F` (the leader's discounted return under `pi*`).
      learner, learner_options (simulator): the best-response follower, a `bj.learners` name
        built with `learner_options` or a ready `Learner` (`"soft_vi_tabular"`: the exact one of
        an `as_simulator` problem); its state is warm-started across iterations.
      num_envs, num_steps (simulator): rollouts of `pi_y` and of `pi*` per context and step
        (`num_envs` environments each, `num_steps` steps, auto-reset).
      policy_hidden, policy_activation (simulator): the policy network's torso (`()`: a linear
        policy, on one-hot observations a table of logits) and its activation.
      baseline_hidden, baseline_learning_rate, baseline_steps (simulator): the learned baseline
        (soft value of `pi_y` and the leader's value), fitted by `baseline_steps` Adam steps per
        iteration (0: never fitted).
      score_terms (simulator): the `d_x log p_x` terms (None: when the problem has
        `transition_log_prob`).

    Raises:
      InvalidArgumentError: naming the option out of range (at construction), or `penalty`,
        `learner`, `learner_options`, `contexts` (a context sampler) when `init` meets a
        simulator problem that cannot run.
    """
    if penalty not in PENALTIES:
        raise InvalidArgumentError(f"penalty: expected one of {PENALTIES}, got {penalty!r}")
    check_learner_option(learner, learner_options)
    sample_cfg = dict(num_envs=num_envs, num_steps=num_steps,
                      policy_hidden=tuple(policy_hidden) if isinstance(policy_hidden, list)
                      else policy_hidden, policy_activation=policy_activation,
                      baseline_hidden=tuple(baseline_hidden) if isinstance(baseline_hidden, list)
                      else baseline_hidden, baseline_learning_rate=baseline_learning_rate,
                      baseline_steps=baseline_steps, score_terms=score_terms)
    _check_sample_options(sample_cfg)
    if not any(isinstance(v, jax.core.Tracer) for v in (rho_0, rho_max)) and not 0 < rho_0 <= rho_max:
        # (traced values, e.g. swept under vmap, are not checked here)
        raise InvalidArgumentError(
            f"rho_0, rho_max: expected 0 < rho_0 <= rho_max, got {rho_0}, {rho_max}")

    def follower_q(problem, x, q0, num_sweeps):
        def one(context, q):
            mdp = problem.follower(x, context)
            return soft_value_iteration(mdp, problem.temperature, init_q=q, num_sweeps=num_sweeps).q
        return jax.lax.stop_gradient(map_contexts(one, problem, q0))

    def rho_at(step):
        return rho_schedule(step, rho_0, rho_max, ramp_iters)

    sample_fns = []

    def simulator_algorithm() -> Algorithm:
        """The model-free form, built on first use (imports the learners, i.e. gymnax)."""
        if not sample_fns:
            from bilevel_jax.algorithms import sample_pbrl  # noqa: PLC0415 - gymnax
            from bilevel_jax.learners import make_learner  # noqa: PLC0415
            follower = make_learner(learner, **(learner_options or {}))
            sample_fns.append(sample_pbrl.sample_pbrl(
                optimizer, follower, sample_pbrl.SamplePBRLConfig(**sample_cfg), rho=rho_at))
        return sample_fns[0]

    def check_simulator_penalty():
        if penalty != "value":
            raise InvalidArgumentError(
                f"penalty: a SimulatorProblem supports only 'value' (the Bellman penalty needs "
                f"a model, or a learned critic of pi_y that is not implemented), got {penalty!r}")

    def init(problem, x0, key):
        if is_simulator(problem):
            check_simulator_penalty()
            return simulator_algorithm().init(problem, x0, key)
        q = map_contexts(lambda c: soft_value_iteration(problem.follower(x0, c),
                                                        problem.temperature).q, problem)
        params = {"x": x0, "y": q / problem.temperature}
        return {"x": x0, "y": params["y"], "q": q, "opt": optimizer.init(params), "key": key,
                "step": jnp.zeros((), jnp.int32)}

    def step(problem, state):
        if is_simulator(problem):
            check_simulator_penalty()
            new_state, metrics = simulator_algorithm().step(problem, state)
            from bilevel_jax.sim.problem import reference_model  # noqa: PLC0415 - gymnax
            reference = reference_model(problem)
            if track_objective and reference is not None:
                metrics["objective"] = jnp.asarray(leader_objective(reference, state["x"]),
                                                   jnp.float32)
            return new_state, metrics
        rho = rho_at(state["step"])
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
