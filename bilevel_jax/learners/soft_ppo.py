"""PPO for the entropy-regularized objective (PureJaxRL style): the follower's soft policy.

The follower maximizes `E[sum_t gamma^t (r_t - lam log pi(a_t|s_t))]` (SPEC 2). PPO runs as
usual on the *soft reward* `r_t - lam log pi_old(a_t|s_t)` (the log-probability of the
behaviour policy, a constant in the loss), so the critic learns the soft value `V^pi` and the
advantages are soft advantages. Why this is the soft policy gradient: with
`J(theta) = E_pi[sum_t gamma^t (r_t - lam log pi_theta(a_t|s_t))]`,

    grad J = E[sum_t gamma^t grad log pi(a_t|s_t) (Q^pi_soft(s_t, a_t) - b(s_t))]
             + E[sum_t gamma^t E_{a ~ pi}[-lam grad log pi(a|s_t)]],

and the last term vanishes (`E_{a ~ pi}[grad log pi(a|s)] = grad sum_a pi(a|s) = 0`). So
treating the `-lam log pi` bonus as reward, with no separate entropy term in the loss, gives
exactly the soft policy gradient; its fixed point is the soft-optimal policy
`pi*(a|s) ∝ exp(Q*(s, a) / lam)` (soft policy iteration: `pi` is stationary iff it is the
softmax of its own `Q^pi_soft / lam`, which holds only at `Q*`).

Bootstrapping: `delta_t = r_t + gamma (1 - terminated_t) V(next_obs_t) - V(obs_t)`, with
`next_obs` the observation *before* auto-reset, so a time-limit cut (truncation) bootstraps
from the state it cut at and a termination does not; GAE stops at every episode end
(`done = terminated | truncated`).

One `update` call is `num_updates` PPO iterations in one `lax.scan`: each rolls out the current
policy for `num_steps` steps of `num_envs` environments (`bilevel_jax.sim.rollout`, continuing
from the state's carry), computes GAE, and runs `update_epochs` epochs of `num_minibatches`
shuffled minibatches of the clipped-ratio loss plus `vf_coef` times the clipped value loss.
Actor (`HeadsNet`) and critic (`ValueNet`) are separate networks, orthogonally initialized,
trained by one Adam (gradients clipped to `max_grad_norm`). `anneal_lr` decays the learning
rate linearly to 0 over each `update` call (PureJaxRL's schedule over one call's updates).
Discrete and factorized `Tuple` action spaces (the joint log-probability is the sum over heads).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax

from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.learners.base import Learner, all_finite, check_options, register, sequential_members as _sequential
from bilevel_jax.learners.networks import HeadsNet, ValueNet
from bilevel_jax.sim import spaces
from bilevel_jax.sim.rollout import RolloutCarry, reset, rollout

Array = jax.Array


@struct.dataclass
class SoftPPOState:
    actor: Any            # actor (HeadsNet) params
    critic: Any           # critic (ValueNet) params
    opt_state: Any        # Adam state over {"actor", "critic"}
    carry: RolloutCarry   # the running environments
    updates: Array        # PPO iterations done
    steps: Array          # transitions collected (num_steps * num_envs per iteration)
    heads: tuple = struct.field(pytree_node=False, default=())
    factorized: bool = struct.field(pytree_node=False, default=False)


def soft_ppo(*, num_envs: int = 4, num_steps: int = 128, num_minibatches: int = 4,
             update_epochs: int = 4, learning_rate: float = 2.5e-4, anneal_lr: bool = False,
             max_grad_norm: float = 0.5, gae_lambda: float = 0.95, clip_eps: float = 0.2,
             vf_coef: float = 0.5, hidden=(64, 64), activation: str = "tanh",
             num_updates: int = 100, reset_each_step: bool = False,
             sequential_members: bool | None = None) -> Learner:
    """Soft PPO; one `update` = `num_updates` iterations of `num_steps x num_envs` samples.

    Args:
      num_envs, num_steps: environments stepped side by side, steps per rollout.
      num_minibatches: minibatches per epoch (must divide `num_envs * num_steps`).
      update_epochs: passes over each rollout.
      learning_rate, anneal_lr, max_grad_norm: Adam step size, its linear decay to 0 over one
        `update` call, gradient clipping by global norm.
      gae_lambda, clip_eps, vf_coef: GAE lambda, ratio (and value) clip, value-loss weight.
      hidden, activation: torso widths and "tanh" or "relu" of both networks.
      num_updates: PPO iterations per `update` call.
      reset_each_step: re-initialize before every fit (see `learners.follow`).
      sequential_members: under `vmap`, run the members' minibatch epochs one after another
        (None: on the CPU backend, where XLA's batched dots are 2-3x slower per member; the
        rollouts stay batched).
    """
    check_options(num_envs=(num_envs, "pos_int"), num_steps=(num_steps, "pos_int"),
                  num_minibatches=(num_minibatches, "pos_int"),
                  update_epochs=(update_epochs, "pos_int"),
                  learning_rate=(learning_rate, "pos_float"),
                  max_grad_norm=(max_grad_norm, "pos_float"), gae_lambda=(gae_lambda, "unit"),
                  clip_eps=(clip_eps, "pos_float"), vf_coef=(vf_coef, "pos_float"),
                  num_updates=(num_updates, "pos_int"))
    batch = num_envs * num_steps
    if batch % num_minibatches:
        raise InvalidArgumentError(
            f"num_minibatches: expected a divisor of num_envs * num_steps = {batch}, "
            f"got {num_minibatches!r}")
    if activation not in ("tanh", "relu"):
        raise InvalidArgumentError(f"activation: expected 'tanh' or 'relu', got {activation!r}")
    try:
        hidden = tuple(hidden)
    except TypeError:
        hidden = None
    if not hidden or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in hidden):
        raise InvalidArgumentError(f"hidden: expected a non-empty sequence of ints >= 1, got {hidden!r}")
    check_options(anneal_lr=(anneal_lr, "bool"), reset_each_step=(reset_each_step, "bool"),
                  sequential_members=(sequential_members, "bool_or_none"))
    minibatch = batch // num_minibatches
    critic_net = ValueNet(hidden=hidden, activation=activation)
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.scale_by_adam(eps=1e-5))

    def actor_net(heads, factorized):
        return HeadsNet(heads=heads, factorized=factorized, hidden=hidden,
                        activation=activation, head_scale=0.01)

    def init(problem, x, context, key):
        params = problem.env_params(x, context)
        heads = problem.action_heads(params)
        factorized = problem.is_factorized(params)
        k_env, k_actor, k_critic = jax.random.split(key, 3)
        carry = reset(k_env, problem, params, num_envs)
        obs = jax.tree_util.tree_map(lambda a: a[0], carry.obs)
        actor = actor_net(heads, factorized).init(k_actor, obs)
        critic = critic_net.init(k_critic, obs)
        return SoftPPOState(actor=actor, critic=critic,
                            opt_state=tx.init({"actor": actor, "critic": critic}), carry=carry,
                            updates=jnp.zeros((), jnp.int32), steps=jnp.zeros((), jnp.int32),
                            heads=heads, factorized=factorized)

    def update(problem, x, context, state, key):
        x = lax.stop_gradient(x)
        lam = jnp.asarray(problem.temperature, jnp.float32)
        gamma = jnp.asarray(problem.follower_discount(x, context), jnp.float32)
        net = actor_net(state.heads, state.factorized)
        batched = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731 - over [T, N]

        def loss_fn(params, mb):
            logits = jax.vmap(net.apply, (None, 0))(params["actor"], mb["obs"])
            logp = spaces.log_prob(logits, mb["action"])
            value = jax.vmap(critic_net.apply, (None, 0))(params["critic"], mb["obs"])
            adv = mb["adv"]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            ratio = jnp.exp(logp - mb["logp"])
            pg_loss = -jnp.mean(jnp.minimum(
                ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv))
            value_clipped = mb["value"] + jnp.clip(value - mb["value"], -clip_eps, clip_eps)
            v_loss = 0.5 * jnp.mean(jnp.maximum((value - mb["target"]) ** 2,
                                                (value_clipped - mb["target"]) ** 2))
            entropy = jnp.mean(spaces.entropy(logits))
            approx_kl = jnp.mean((ratio - 1.0) - (logp - mb["logp"]))
            return pg_loss + vf_coef * v_loss, (pg_loss, v_loss, entropy, approx_kl)

        def _epochs(params, opt_state, data, key, lr):
            """`update_epochs` passes of shuffled minibatch Adam steps over one rollout's data."""
            def epoch(carry, k):
                perm = jax.random.permutation(k, batch)
                mbs = jax.tree_util.tree_map(
                    lambda a: a[perm].reshape((num_minibatches, minibatch) + a.shape[1:]), data)

                def step(carry, mb):
                    params, opt_state = carry
                    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
                    upd, opt_state = tx.update(grads, opt_state, params)
                    upd = jax.tree_util.tree_map(lambda u: -lr * u, upd)
                    return (optax.apply_updates(params, upd), opt_state), (loss,) + aux

                return lax.scan(step, carry, mbs)

            return lax.scan(epoch, (params, opt_state), jax.random.split(key, update_epochs))

        def iteration(carry, inp):
            state, lr = carry, inp[1]
            k_roll, k_perm = jax.random.split(inp[0])
            policy = lambda obs: net.apply(state.actor, obs)  # noqa: E731
            traj = rollout(k_roll, problem, x, context, policy, num_envs, num_steps,
                           start=state.carry)
            logits = batched(policy)(traj.obs)
            logp = spaces.log_prob(logits, traj.action)
            value = batched(lambda o: critic_net.apply(state.critic, o))(traj.obs)
            next_value = batched(lambda o: critic_net.apply(state.critic, o))(traj.next_obs)
            soft_reward = jnp.asarray(traj.follower_reward, jnp.float32) - lam * logp
            delta = soft_reward + gamma * (1.0 - traj.terminated) * next_value - value
            keep = gamma * gae_lambda * (1.0 - traj.done)

            def gae(a, inp):
                d, k = inp
                a = d + k * a
                return a, a

            _, adv = lax.scan(gae, jnp.zeros_like(delta[0]), (delta, keep), reverse=True)
            data = {"obs": traj.obs, "action": traj.action, "logp": logp, "value": value,
                    "adv": adv, "target": adv + value}
            data = jax.tree_util.tree_map(lambda a: a.reshape((batch,) + a.shape[2:]), data)

            learn = _epochs
            if _sequential(sequential_members):
                learn = jax.custom_batching.sequential_vmap(learn)
            params = {"actor": state.actor, "critic": state.critic}
            (params, opt_state), stats = learn(params, state.opt_state, data, k_perm, lr)
            ended = jnp.sum(traj.done)
            lengths = jnp.sum(jnp.where(traj.done, traj.time + 1, 0))
            new = state.replace(actor=params["actor"], critic=params["critic"],
                                opt_state=opt_state, carry=traj.final,
                                updates=state.updates + 1, steps=state.steps + batch)
            return new, (tuple(jnp.mean(s) for s in stats), ended, lengths,
                         jnp.mean(traj.follower_reward))

        frac = 1.0 - jnp.arange(num_updates, dtype=jnp.float32) / num_updates
        lrs = learning_rate * (frac if anneal_lr else jnp.ones_like(frac))
        state, (stats, ended, lengths, reward) = lax.scan(
            iteration, state, (jax.random.split(key, num_updates), lrs))
        loss, pg_loss, v_loss, entropy, approx_kl = (jnp.mean(s) for s in stats)
        ended_total = jnp.sum(ended)
        info = {"loss": loss, "policy_loss": pg_loss, "value_loss": v_loss, "entropy": entropy,
                "approx_kl": approx_kl, "mean_reward": jnp.mean(reward),
                # mean length of the episodes that ended during the call (0 when none did)
                "episode_length": jnp.sum(lengths) / jnp.maximum(ended_total, 1),
                "episodes": ended_total,
                "finite": all_finite(loss, state.actor, state.critic)}
        return state, info

    def policy(state, obs):
        return actor_net(state.heads, state.factorized).apply(state.actor, obs)

    def value(state, obs):
        return critic_net.apply(state.critic, obs)

    return Learner(init=init, update=update, policy=policy, value=value,
                   reset_each_step=reset_each_step)


register("soft_ppo", soft_ppo)
