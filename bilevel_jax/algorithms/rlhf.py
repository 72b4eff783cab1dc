"""RLHF algorithms (SPEC 7.4): PBRL on the bilevel formulation, and the decoupled pipeline.

Both take an `RLHFProblem` (bilevel_jax.preferences) and follow its data protocol (the PBRL
paper's, Atari: 576 initial pairs, 500 warm-up epochs, 16 pairs per reward epoch, a buffer of
the last 3,000 pairs; the problem's sizes scale it to the environment):

* `init`: draw `heldout_pairs` pairs from the initial policy `pi*_{x0}` (kept fixed, for
  `preference_accuracy`), draw `initial_pairs` labelled pairs from it into the FIFO buffer,
  and take `warmup_epochs` optimizer steps of the reward model on the buffer's NLL (a fresh
  optimizer state, discarded after the warm-up). The lower level then starts at `pi*_x` of the
  warmed-up reward. With the same seed, both algorithms see the same held-out set, the same
  initial pairs and the same warmed-up reward.
* every iteration (one "reward epoch"): draw `pairs_per_epoch` new pairs from the current
  policy, label them, push them into the buffer (`buffer_size` slots, oldest overwritten),
  update.

Metrics every iteration (all of the iterate the iteration starts from, i.e. of the policy that
drew the iteration's pairs):

* `objective`: `(J(pi) - J_worst) / (J_best - J_worst)`, `J(pi) = mu . V^pi` the true
  (discounted, entropy-free) return of the learned policy (`pi_y` for PBRL, `pi*_x` for the
  decoupled pipeline), `J_best`/`J_worst` the optimal and pessimal returns of the true reward:
  in `[0, 1]` by construction (the uniform policy's value is `problem.returns[1]`, normalized
  the same way);
* `true_return`: `J(pi)` itself; `preference_accuracy` of `r_x` on the held-out pairs
  (`preferences.preference_accuracy`); `labels`: labels used so far, the initial ones included
  (held-out pairs are evaluation data, not counted); `preference_loss`: the buffer's NLL at `x`;
* `grad_norm` (of the reward model's update direction), `follower_residual`, `samples`
  (environment steps taken this iteration: the alive steps of the new pairs) and `nonfinite`;
  PBRL adds `penalty`, `rho`, `score_norm` (the norm of the score-function term) and
  `reward_policy_objective` (the `objective` of the reward model's own soft-optimal policy,
  approximated by the warm-started sweeps: how far `pi_y` lags behind `pi*_x`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bilevel_jax.algorithms.base import Algorithm, any_nonfinite, global_norm
from bilevel_jax.algorithms.pbrl import PENALTIES, rho_schedule
from bilevel_jax.core.soft_vi import soft_bellman_operator, soft_value_iteration
from bilevel_jax.core.fitting import fit
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.penalties import bellman_penalty, value_penalty
from bilevel_jax.preferences import (
    RLHFProblem,
    bradley_terry_nll,
    check_params,
    empty_buffer,
    pair_losses,
    preference_accuracy,
    push_pairs,
    sample_labelled_pairs,
    score_surrogate,
    score_weights,
    trajectory_returns,
)


def _check_problem(problem) -> None:
    if not isinstance(problem, RLHFProblem):
        raise InvalidArgumentError(
            f"problem: expected an RLHFProblem (bilevel_jax.preferences.rlhf_problem), got "
            f"{type(problem).__name__}")


def _is_traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


def _draw(problem: RLHFProblem, key, policy, num_pairs: int):
    """`num_pairs` pairs from `policy` and their annotator labels (one PRNG call)."""
    return sample_labelled_pairs(key, problem.mdp, policy, problem.env.true_reward,
                                 problem.noise, problem.horizon, num_pairs)


def _buffer_loss(problem: RLHFProblem, x, buffer):
    return bradley_terry_nll(problem.reward(x), buffer.pairs, buffer.labels, buffer.valid)


def _fit(problem: RLHFProblem, optimizer, x, opt_state, buffer, steps: int):
    """`steps` optimizer steps on the buffer's NLL; returns `(x, opt_state, first grad)`."""
    x, opt_state, _, grad_norm = fit_loss(lambda p: _buffer_loss(problem, p, buffer), optimizer,
                                          x, opt_state, steps)
    return x, opt_state, grad_norm


def fit_loss(loss, optimizer, x, opt_state, steps: int, key=None):
    """`steps` optimizer steps on `loss(x)` (with `key`: `loss(x, key_i)`, a fresh key per
    step) in one scan: `(x, opt_state, first loss, first grad norm)`, the first step's taken at
    the given `x` (zeros when `steps == 0`)."""
    if steps == 0:
        zero = jnp.zeros((), jnp.float32)
        return x, opt_state, zero, zero
    x, opt_state, losses, norms = fit(loss, optimizer, x, opt_state, steps, key)
    return x, opt_state, losses[0], norms[0]


def _setup(problem: RLHFProblem, x0, key, optimizer):
    """Shared start of both algorithms: held-out set, initial pairs, reward warm-up.

    Returns the state entries both algorithms share: `x` (warmed up), `q` (the soft-optimal Q of
    its reward), `key`, `step`, `buffer`, `heldout = {"pairs", "gaps"}` (the true return gaps of
    the held-out pairs) and `labels` (labels used so far).
    """
    _check_problem(problem)
    check_params(problem, x0)
    key, sub = jax.random.split(key)
    lam = problem.temperature
    policy0 = jax.lax.stop_gradient(
        soft_value_iteration(problem.follower_mdp(x0), lam).policy)
    # Held-out and initial pairs in one draw (one compiled PRNG site); the held-out labels are
    # not used (accuracy is measured against the true return gaps).
    num_held, num_initial = problem.heldout_pairs, problem.initial_pairs
    pairs, labels = _draw(problem, sub, policy0, num_held + num_initial)
    held_pairs = jax.tree_util.tree_map(lambda a: a[:num_held], pairs)
    true = trajectory_returns(problem.env.true_reward, held_pairs)
    heldout = {"pairs": held_pairs, "gaps": true[:, 0] - true[:, 1]}
    dtype = problem.env.true_reward.dtype
    buffer = empty_buffer(problem.buffer_size, problem.horizon, dtype)
    labels_used = jnp.zeros((), jnp.int32)
    x = x0
    if num_initial:
        buffer = push_pairs(buffer, jax.tree_util.tree_map(lambda a: a[num_held:], pairs),
                            labels[num_held:])
        labels_used = labels_used + num_initial
        if problem.warmup_epochs:
            x, _, _ = _fit(problem, optimizer, x0, optimizer.init(x0), buffer,
                           problem.warmup_epochs)
    q = jax.lax.stop_gradient(soft_value_iteration(problem.follower_mdp(x), lam).q)
    return {"x": x, "q": q, "key": key, "step": jnp.zeros((), jnp.int32), "buffer": buffer,
            "heldout": heldout, "labels": labels_used}


def _evaluation(problem: RLHFProblem, x, policy, buffer, heldout, track_objective: bool):
    reward = problem.reward(x)
    if track_objective:
        true_return = problem.true_return(policy)
        objective = problem.normalize_return(true_return)
    else:
        objective = true_return = jnp.asarray(jnp.nan, reward.dtype)
    return {"objective": jnp.asarray(objective, jnp.float32),
            "true_return": jnp.asarray(true_return, jnp.float32),
            "preference_accuracy": preference_accuracy(
                reward, heldout["pairs"], heldout["gaps"]).astype(jnp.float32),
            "preference_loss": _buffer_loss(problem, x, buffer).astype(jnp.float32)}


def _residual(problem: RLHFProblem, x, q):
    mdp = problem.follower_mdp(x)
    return jnp.max(jnp.abs(soft_bellman_operator(q, mdp, problem.temperature) - q))


def rlhf_pbrl(optimizer: optax.GradientTransformation, *, penalty: str = "value",
              rho_0: float = 1.0, rho_max: float = 100.0, ramp_iters: int = 1000,
              inner_sweeps: int = 10, baseline: str = "leave_one_out",
              track_objective: bool = True) -> Algorithm:
    """PBRL for RLHF: joint descent on `(x, y)` of `L(x, pi_y) + rho * penalty(r_x, y)`.

    The policy is tabular, `pi_y = softmax(y / lam)`: `y [S, A]` holds the logits times the
    temperature, a soft Q-table in the units of the reward, initialized at `Q*` of the
    warmed-up reward model (so `pi_y = pi*_x` at the start). This only reparameterizes the
    logits (`grad_y = grad_logits / lam`); it puts `y` on the scale of `r_x` so that one
    optimizer (one learning rate) moves the reward model and the policy at comparable rates
    (with raw logits and Adam, a near-greedy policy at small `lam` needs logit changes of order
    `1/lam` and lags far behind the reward model). Each iteration:

    * `rho = rho_0 (rho_max / rho_0)^min(step / ramp_iters, 1)` (geometric ramp);
    * `V*` for the value penalty: `inner_sweeps` soft sweeps at `x`, warm-started from the
      previous iteration's table (as in `bilevel_jax.algorithms.pbrl`);
    * new pairs from `pi_y`, labelled, pushed into the buffer;
    * gradient of `(L + rho * penalty) / rho` (the step scales as `1/rho`, like `pbrl`):
      `x` gets the NLL gradient on the whole buffer plus `rho` times the penalty's;
      `y` gets the score-function term of the new pairs (`preferences.score_weights`, leave-one-
      out baseline) plus `rho` times the penalty's; one optimizer step on `{"x", "y"}`.

    The penalties are those of `bilevel_jax.penalties`, applied to `problem.bilevel()` (the lower
    level with reward `r_x`): `"value"` (`V*_x(mu) - V^{pi_y}_x(mu)`) or `"bellman"` with
    visitation weights (`w = d^{pi_y}`: with a point-mass start the initial-state weighting
    would only constrain the policy at the start state).
    """
    if penalty not in PENALTIES:
        raise InvalidArgumentError(f"penalty: expected one of {PENALTIES}, got {penalty!r}")
    if not _is_traced(rho_0, rho_max) and not 0 < rho_0 <= rho_max:
        raise InvalidArgumentError(
            f"rho_0, rho_max: expected 0 < rho_0 <= rho_max, got {rho_0}, {rho_max}")
    if not isinstance(inner_sweeps, int) or inner_sweeps < 1:
        raise InvalidArgumentError(f"inner_sweeps: expected an int >= 1, got {inner_sweeps!r}")
    if not isinstance(ramp_iters, int) or ramp_iters < 1:
        raise InvalidArgumentError(f"ramp_iters: expected an int >= 1, got {ramp_iters!r}")
    score_weights(jnp.zeros(2), baseline)   # refuses an unknown baseline now

    def init(problem, x0, key):
        state = _setup(problem, x0, key, optimizer)
        params = {"x": state["x"], "y": state["q"]}
        return dict(state, y=params["y"], opt=optimizer.init(params))

    def step(problem, state):
        _check_problem(problem)
        lam = problem.temperature
        x, y = state["x"], state["y"]
        rho = rho_schedule(state["step"], rho_0, rho_max, ramp_iters)
        q = jax.lax.stop_gradient(soft_value_iteration(
            problem.follower_mdp(x), lam, init_q=state["q"], num_sweeps=inner_sweeps).q)
        key, sub = jax.random.split(state["key"])
        policy = jax.nn.softmax(y / lam, axis=-1)
        fresh, labels = _draw(problem, sub, policy, problem.pairs_per_epoch)
        buffer = push_pairs(state["buffer"], fresh, labels)
        weights = score_weights(pair_losses(problem.reward(x), fresh, labels), baseline)
        bilevel = problem.bilevel()

        def penalized(params):
            px, py = params["x"], params["y"] / lam
            nll = _buffer_loss(problem, px, buffer)
            if penalty == "value":
                p = value_penalty(bilevel, px, py, init_q=q, num_sweeps=0)
            else:
                p = bellman_penalty(bilevel, px, py, weighting="visitation")
            return (nll + rho * p) / rho, p

        params = {"x": x, "y": y}
        (_, p), grads = jax.value_and_grad(penalized, has_aux=True)(params)
        # The score-function term of L's y-gradient (in logits; chained to y = lam * logits).
        score_grad = jax.grad(score_surrogate)(y / lam, fresh, weights)
        grads = {"x": grads["x"], "y": grads["y"] + score_grad / (lam * rho)}
        updates, opt_state = optimizer.update(grads, state["opt"], params)
        new = optax.apply_updates(params, updates)
        metrics = _evaluation(problem, x, policy, buffer, state["heldout"], track_objective)
        labels_used = state["labels"] + problem.pairs_per_epoch
        metrics.update({
            "grad_norm": global_norm(grads["x"]).astype(jnp.float32),
            "follower_residual": _residual(problem, x, q).astype(jnp.float32),
            "samples": jnp.sum(fresh.alive).astype(jnp.float32),
            "nonfinite": any_nonfinite(grads, new),
            "labels": labels_used.astype(jnp.float32),
            "penalty": p.astype(jnp.float32),
            "rho": jnp.asarray(rho, jnp.float32),
            "score_norm": global_norm(score_grad).astype(jnp.float32),
            "reward_policy_objective": jnp.asarray(
                problem.return_fraction(jax.nn.softmax(q / lam, axis=-1))
                if track_objective else jnp.nan, jnp.float32),
        })
        new_state = {"x": new["x"], "y": new["y"], "q": q, "opt": opt_state, "key": key,
                     "step": state["step"] + 1, "buffer": buffer, "heldout": state["heldout"],
                     "labels": labels_used}
        return new_state, metrics

    return Algorithm(init, step)


def rlhf_decoupled(optimizer: optax.GradientTransformation, *, fit_steps: int = 1,
                   track_objective: bool = True) -> Algorithm:
    """The decoupled RLHF pipeline (the paper's baseline): fit the reward, then solve the RL.

    Each iteration: new pairs from `pi*_x` (the soft-optimal policy of the current reward
    model), labelled, pushed into the buffer; `fit_steps` optimizer steps of the reward model on
    the buffer's NLL (one optimizer state kept across iterations); `pi*_x` of the new reward by
    soft value iteration to tolerance, warm-started from the previous solution. The policy
    never sees the preference loss: only the reward model does.
    """
    if not isinstance(fit_steps, int) or fit_steps < 1:
        raise InvalidArgumentError(f"fit_steps: expected an int >= 1, got {fit_steps!r}")

    def init(problem, x0, key):
        state = _setup(problem, x0, key, optimizer)
        return dict(state, opt=optimizer.init(state["x"]))

    def step(problem, state):
        _check_problem(problem)
        lam = problem.temperature
        x, q = state["x"], state["q"]
        policy = jax.nn.softmax(q / lam, axis=-1)
        key, sub = jax.random.split(state["key"])
        fresh, labels = _draw(problem, sub, policy, problem.pairs_per_epoch)
        buffer = push_pairs(state["buffer"], fresh, labels)
        new_x, opt_state, grad_norm = _fit(problem, optimizer, x, state["opt"], buffer,
                                           fit_steps)
        sol = soft_value_iteration(problem.follower_mdp(jax.lax.stop_gradient(new_x)), lam,
                                   init_q=q)
        metrics = _evaluation(problem, x, policy, buffer, state["heldout"], track_objective)
        labels_used = state["labels"] + problem.pairs_per_epoch
        metrics.update({
            "grad_norm": grad_norm.astype(jnp.float32),
            "follower_residual": sol.residual.astype(jnp.float32),
            "samples": jnp.sum(fresh.alive).astype(jnp.float32),
            "nonfinite": any_nonfinite(new_x, sol.q, grad_norm),
            "labels": labels_used.astype(jnp.float32),
        })
        new_state = {"x": new_x, "q": jax.lax.stop_gradient(sol.q), "opt": opt_state,
                     "key": key, "step": state["step"] + 1, "buffer": buffer,
                     "heldout": state["heldout"], "labels": labels_used}
        return new_state, metrics

    return Algorithm(init, step)


__all__ = ["rlhf_decoupled", "rlhf_pbrl"]
