"""Entropy-regularized DQN (the CB-RL tax experiment's follower learner, SPEC 7.2).

One soft-Q head per action dimension on a shared MLP torso (`networks.HeadsNet`: 64x64 ReLU,
orthogonal init sqrt 2, heads with init scale 0.1). Per env step, `num_envs` environments act
with the behaviour policy `softmax(Q_d / lam)` per head mixed with `epsilon`-uniform (epsilon
annealed linearly from `epsilon_start` to `epsilon_end` over `epsilon_steps` env steps), the
`num_envs` transitions go into a flashbax replay buffer of capacity `buffer_size`, and, once
`learning_starts` transitions were collected, one Adam step (global-norm clip `max_grad_norm`)
is taken on a uniformly sampled batch of `batch_size` transitions with the loss

    sum_d mean_batch ( Q_d(s, a_d) - y_d )^2,
    y_d = r + gamma (1 - terminated) lam logsumexp( Q_target,d(s') / lam ),

where `r` is the follower's reward at `x` (`problem.follower_reward`, not the environment's
own), `gamma = problem.follower_discount(x, context)`, `lam = problem.temperature`. A time-limit
cut (`Step.truncated`) bootstraps; only `Step.terminated` stops it. The target network is a
hard copy of the online one every `target_update_every` transitions.

**Cached targets.** The target network changes only at its copies, so its soft values
`lam logsumexp(Q_target,d(s') / lam)` are stored with each transition (`next_value`, computed
when it enters the buffer) and recomputed for the whole buffer at each copy (and when the
temperature changed between calls), instead of a target forward pass on every sampled batch:
the same targets, a quarter fewer FLOPs per update (at the defaults the refresh costs
`buffer_size` forward rows per `target_update_every / num_envs` updates, 20 rows per update).
The copy and the `learning_starts` switch are `learners.shared_cond` branches, so under `vmap`
they stay branches (a plain `lax.cond` would become a select that refreshes every step).

**Factorized (tuple) action spaces.** As in the reference, every head `d` gets its own soft
target built from the *full* reward and its *own* next-state soft value, i.e. each head is
learned as if it alone chose the action while the other heads act from their current policies.
The learned policy is the product of the heads' softmaxes `prod_d softmax(Q_d / lam)`; this is
the joint soft-optimal policy (and `sum_d` of the heads' soft values the joint soft value) only
when the heads' rewards separate, `r(s, a) = sum_d r_d(s, a_d)` with per-head dynamics; in
general it is the reference's approximation, not the joint soft-optimal `Q`.

Shapes (one seed): observations `[*obs_shape]` (flattened, cast to float32), `policy(state,
obs)` returns logits `Q / lam`: `[n]` for `Discrete(n)`, a tuple `([n_1], ..., [n_D])` for a
`Tuple` of `Discrete`; `value(state, obs)` a scalar (`lam logsumexp(Q / lam)`, summed over
heads). The buffer stores `obs`, `next_obs` `[buffer_size, *obs_shape]`, `action` `[buffer_size]`
or `[buffer_size, D]` int32, `reward`, `terminated` `[buffer_size]` float32, `next_value`
`[buffer_size, D]` float32.

One `update` call runs `num_updates` env steps (and their gradient steps) in one `lax.scan`;
all of it (networks, target, optimizer, buffer, running environments, step counter) lives in
the state, so it jits with the problem closed over and vmaps over keys, `x` and contexts.
"""

from __future__ import annotations

import functools
from typing import Any

import flashbax
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax

from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.learners.base import (Learner, all_finite, check_options, register,
                                       sequential_members as _sequential, shared_cond)
from bilevel_jax.learners.networks import HeadsNet, soft_value
from bilevel_jax.sim import spaces
from bilevel_jax.sim.rollout import RolloutCarry, env_step, reset, step_rewards

Array = jax.Array


@struct.dataclass
class SoftDQNState:
    params: Any           # online network
    target_params: Any    # target network (hard copies)
    opt_state: Any
    buffer: Any           # flashbax TrajectoryBufferState
    carry: RolloutCarry   # the learner's running environments
    steps: Array          # env steps taken (transitions = steps * num_envs)
    temperature: Array    # the problem's lam (policy and value see only the state)
    heads: tuple = struct.field(pytree_node=False, default=(1,))
    factorized: bool = struct.field(pytree_node=False, default=False)


def _store(obs):
    """Observations as stored: inexact leaves in float32, integers as they are."""
    def cast(a):
        a = jnp.asarray(a)
        return a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.inexact) else a
    return jax.tree_util.tree_map(cast, obs)


def _components(learning_rate, max_grad_norm, buffer_size, batch_size):
    optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate))
    buffer = flashbax.make_item_buffer(max_length=buffer_size, min_length=1,
                                       sample_batch_size=batch_size, add_sequences=False,
                                       add_batches=True)
    return optimizer, buffer


def _q_values(hidden, heads, factorized, params, obs):
    """Q of one observation: a tuple of heads (always, also for `Discrete`)."""
    out = HeadsNet(heads=heads, factorized=factorized, hidden=hidden).apply(params, obs)
    return out if factorized else (out,)


def _sample(buffer_state, key, batch_size: int):
    """Uniform draw (with replacement) of `batch_size` stored transitions: one `randint` and a
    gather from the flashbax item buffer's storage (`[1, buffer_size, ...]`), cheaper per step
    than the trajectory buffer's generic sampler; same distribution."""
    capacity = jax.tree_util.tree_leaves(buffer_state.experience)[0].shape[1]
    size = jnp.where(buffer_state.is_full, capacity, buffer_state.current_index)
    index = jax.random.randint(key, (batch_size,), 0, jnp.maximum(size, 1))
    return jax.tree_util.tree_map(lambda a: a[0, index], buffer_state.experience)


def _micro_batches(batch_size: int) -> int:
    """The largest divisor of `batch_size` up to 8 (8 was fastest at batch 1,000 on CPU)."""
    return max(m for m in range(1, 9) if batch_size % m == 0)


def _head_values(hidden, heads, factorized, params, obs, lam) -> Array:
    """Soft values `lam logsumexp(Q_d(s) / lam)` per head of a batch of observations: `[B, D]`."""
    q = jax.vmap(lambda o: _q_values(hidden, heads, factorized, params, o))(obs)
    return jnp.stack([lam * jax.nn.logsumexp(q_d / lam, axis=-1) for q_d in q], axis=-1)


def _gradient_step(hidden, optimizer, batch_size, state, params, opt_state, buffer_state, gamma,
                   key, sequential_members):
    """One Adam step on a uniformly sampled batch: `(params, opt_state, loss)`.

    `sequential_members`: under `vmap` (seeds, contexts, grid points), run the members' steps
    one after another (`lax.map`) instead of as batched dots. On XLA's CPU backend a batched
    dot costs 2-3x per member what a plain one does at these sizes, so the sequential loop is
    what keeps many vmapped seeds as fast in aggregate as one; on accelerators the batched dot
    is the fast path.
    """
    batch = _sample(buffer_state, key, batch_size)
    step = functools.partial(_adam_step, hidden, optimizer, state.heads, state.factorized)
    if sequential_members:
        step = jax.custom_batching.sequential_vmap(step)
    return step(params, opt_state, batch, gamma)


def _adam_step(hidden, optimizer, heads, factorized, params, opt_state, batch, gamma):
    batched_q = jax.vmap(lambda p, o: _q_values(hidden, heads, factorized, p, o), (None, 0))

    def loss_fn(params, batch):
        q = batched_q(params, batch["obs"])
        actions = batch["action"].reshape(batch["action"].shape[0], -1)
        keep = gamma * (1.0 - batch["terminated"])
        total = 0.0
        for d, q_d in enumerate(q):
            q_sa = jnp.take_along_axis(q_d, actions[:, d:d + 1], axis=-1)[:, 0]
            y = batch["reward"] + keep * batch["next_value"][:, d]
            total = total + jnp.mean(jnp.square(q_sa - y))
        return total

    # The batch's mean loss as the mean over equal micro-batches of their mean losses: the
    # same gradient, but XLA's CPU dot for the weight gradients (a contraction over the batch
    # axis) runs faster as a batched dot over micro-batches than as one long contraction
    # (measured at 1,000 x 64 x 64; see benchmarks/followers.py).
    micro = _micro_batches(batch["reward"].shape[0])
    split = jax.tree_util.tree_map(lambda a: a.reshape((micro, -1) + a.shape[1:]), batch)
    losses, grads = jax.vmap(jax.value_and_grad(loss_fn), (None, 0))(params, split)
    loss, grads = jnp.mean(losses), jax.tree_util.tree_map(lambda g: jnp.mean(g, 0), grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _buffer_values(hidden, heads, factorized, target_params, buffer_state, lam) -> Array:
    """The soft values of every stored next observation under `target_params`: `[1, N, D]`."""
    next_obs = jax.tree_util.tree_map(lambda a: a[0], buffer_state.experience["next_obs"])
    return _head_values(hidden, heads, factorized, target_params, next_obs, lam)[None]


def _with_values(buffer_state, values):
    return buffer_state.replace(experience={**buffer_state.experience, "next_value": values})


def soft_dqn(*, num_envs: int = 10, hidden=(64, 64), learning_rate: float = 5e-5,
             max_grad_norm: float = 1.0, buffer_size: int = 10_000, batch_size: int = 1_000,
             learning_starts: int = 10_000, target_update_every: int = 5_000,
             epsilon_start: float = 1.0, epsilon_end: float = 0.1, epsilon_steps: int = 100_000,
             num_updates: int = 1_000, reset_each_step: bool = False,
             sequential_members: bool | None = None) -> Learner:
    """Entropy-regularized DQN with one soft-Q head per action dimension (see module doc).

    Args:
      num_envs: environments stepped side by side (one env step = `num_envs` transitions).
      hidden: widths of the MLP torso.
      learning_rate, max_grad_norm: Adam step size and global-norm clip.
      buffer_size, batch_size: replay capacity and update batch (transitions).
      learning_starts: transitions collected before the first gradient step.
      target_update_every: transitions between hard target copies.
      epsilon_start, epsilon_end, epsilon_steps: linear epsilon schedule over env steps.
      num_updates: env steps (each with its gradient step once learning) per `update` call.
      reset_each_step: re-initialize before every fit (the reference's protocol).
      sequential_members: under `vmap`, take the members' gradient steps one after another
        (None: on the CPU backend, where XLA's batched dots are 2-3x slower per member).
    """
    check_options(num_envs=(num_envs, "pos_int"), learning_rate=(learning_rate, "pos_float"),
                  max_grad_norm=(max_grad_norm, "pos_float"), buffer_size=(buffer_size, "pos_int"),
                  batch_size=(batch_size, "pos_int"), learning_starts=(learning_starts, "nonneg_int"),
                  target_update_every=(target_update_every, "pos_int"),
                  epsilon_start=(epsilon_start, "unit"), epsilon_end=(epsilon_end, "unit"),
                  epsilon_steps=(epsilon_steps, "pos_int"), num_updates=(num_updates, "pos_int"))
    hidden = tuple(hidden) if isinstance(hidden, (tuple, list)) else hidden
    if (not isinstance(hidden, tuple) or not hidden
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in hidden)):
        raise InvalidArgumentError(f"hidden: expected a non-empty tuple of ints >= 1, got {hidden!r}")
    if batch_size > buffer_size:
        raise InvalidArgumentError(
            f"batch_size: expected at most buffer_size = {buffer_size}, got {batch_size}")
    if num_envs > buffer_size:
        raise InvalidArgumentError(
            f"num_envs: expected at most buffer_size = {buffer_size}, got {num_envs}")
    check_options(reset_each_step=(reset_each_step, "bool"),
                  sequential_members=(sequential_members, "bool_or_none"))

    optimizer, buffer = _components(learning_rate, max_grad_norm, buffer_size, batch_size)

    def network(heads, factorized):
        return HeadsNet(heads=heads, factorized=factorized, hidden=hidden)

    def q_values(state: SoftDQNState, params, obs):
        return _q_values(hidden, state.heads, state.factorized, params, obs)

    def init(problem, x, context, key) -> SoftDQNState:
        env_params = problem.env_params(x, context)
        heads, factorized = problem.action_heads(env_params), problem.is_factorized(env_params)
        k_reset, k_net = jax.random.split(key)
        carry = reset(k_reset, problem, env_params, num_envs)
        obs0 = jax.tree_util.tree_map(lambda a: a[0], carry.obs)
        params = network(heads, factorized).init(k_net, _store(obs0))
        action = jnp.zeros((len(heads),) if factorized else (), jnp.int32)
        item = {"obs": _store(obs0), "action": action, "reward": jnp.zeros((), jnp.float32),
                "next_obs": _store(obs0), "terminated": jnp.zeros((), jnp.float32),
                "next_value": jnp.zeros((len(heads),), jnp.float32)}
        return SoftDQNState(params=params, target_params=params, opt_state=optimizer.init(params),
                            buffer=buffer.init(item), carry=carry,
                            steps=jnp.zeros((), jnp.int32),
                            temperature=jnp.asarray(problem.temperature, jnp.float32),
                            heads=heads, factorized=factorized)

    def update(problem, x, context, state: SoftDQNState, key):
        env_params = problem.env_params(x, context)
        x_const = lax.stop_gradient(x)
        gamma = jnp.asarray(lax.stop_gradient(problem.follower_discount(x, context)), jnp.float32)
        lam = jnp.asarray(lax.stop_gradient(problem.temperature), jnp.float32)

        def learn(operand):
            params, opt_state, buffer_state, k = operand
            return _gradient_step(hidden, optimizer, batch_size, state, params, opt_state,
                                  buffer_state, gamma, k, _sequential(sequential_members))

        def skip(operand):
            params, opt_state, _, _ = operand
            return params, opt_state, jnp.zeros((), jnp.float32)

        def refresh(operand):   # the hard target copy: target := online, cached values redone
            params, _, buffer_state = operand
            return params, _buffer_values(hidden, state.heads, state.factorized, params,
                                          buffer_state, lam)

        def keep(operand):
            _, target_params, buffer_state = operand
            return target_params, buffer_state.experience["next_value"]

        # Cached values computed at another temperature are redone with the current target.
        values = shared_cond(
            state.temperature != lam,
            lambda b: _buffer_values(hidden, state.heads, state.factorized, state.target_params,
                                     b, lam),
            lambda b: b.experience["next_value"], state.buffer)
        state = state.replace(temperature=lam, buffer=_with_values(state.buffer, values))

        def body(s: SoftDQNState, k):
            k_step, k_sample = jax.random.split(k)
            frac = jnp.minimum(s.steps.astype(jnp.float32) / epsilon_steps, 1.0)
            epsilon = epsilon_start + (epsilon_end - epsilon_start) * frac

            def behaviour(obs):
                logits = tuple(q / lam for q in q_values(s, s.params, _store(obs)))
                logits = spaces.mix_uniform(logits, epsilon)
                return logits if s.factorized else logits[0]

            carry, step = env_step(k_step, problem, env_params, behaviour, s.carry)
            reward, _ = step_rewards(problem, x_const, context, step)
            next_obs = _store(step.next_obs)
            items = {"obs": _store(step.obs), "action": step.action.astype(jnp.int32),
                     "reward": reward.astype(jnp.float32), "next_obs": next_obs,
                     "terminated": step.terminated.astype(jnp.float32),
                     "next_value": _head_values(hidden, s.heads, s.factorized, s.target_params,
                                                next_obs, lam)}
            buffer_state = buffer.add(s.buffer, items)
            steps = s.steps + 1
            before, after = s.steps * num_envs, steps * num_envs
            learning = after >= learning_starts
            params, opt_state, loss = shared_cond(
                learning, learn, skip, (s.params, s.opt_state, buffer_state, k_sample))
            copy = learning & (after // target_update_every > before // target_update_every)
            target, values = shared_cond(copy, refresh, keep,
                                         (params, s.target_params, buffer_state))
            buffer_state = _with_values(buffer_state, values)
            s = s.replace(params=params, target_params=target, opt_state=opt_state,
                          buffer=buffer_state, carry=carry, steps=steps)
            return s, (loss, learning, epsilon, reward.astype(jnp.float32))

        state, (losses, learning, epsilons, rewards) = lax.scan(
            body, state, jax.random.split(key, num_updates))
        count = jnp.sum(learning)
        loss = jnp.sum(jnp.where(learning, losses, 0.0)) / jnp.maximum(count, 1)
        info = {"loss": loss,
                "finite": all_finite(state.params, losses, rewards),
                "epsilon": epsilons[-1],
                "mean_reward": jnp.mean(rewards),
                "learning_updates": count,
                "transitions": state.steps * num_envs}
        return state, info

    def policy(state: SoftDQNState, obs):
        logits = tuple(q / state.temperature for q in q_values(state, state.params, _store(obs)))
        return logits if state.factorized else logits[0]

    def value(state: SoftDQNState, obs):
        return soft_value(q_values(state, state.params, _store(obs)), state.temperature)

    return Learner(init=init, update=update, policy=policy, value=value,
                   reset_each_step=reset_each_step)


register("soft_dqn", soft_dqn)
