"""Sample-based soft Q-learning for integer (or one-hot) observations: the tabular oracle's
model-free twin.

Per step, `num_envs` environments act with the behaviour policy `softmax(Q / lam)` mixed with
`epsilon`-uniform, and every transition updates its entry,

    Q(s, a) += alpha_n (r + gamma (1 - terminated) lam logsumexp(Q(s') / lam) - Q(s, a)),

with the visit-count step size `alpha_n = (1 + step_scale n(s, a))^-step_exponent`
(Robbins-Monro for exponents in (0.5, 1]), so the table converges to the soft-optimal `Q*` on
every pair that keeps being visited. Polynomial steps (`step_scale = 1`) shrink too fast for
long horizons, where the error contracts only by `gamma` per effective step: at `gamma = 0.99`
the rescaled linear schedule `step_exponent = 1, step_scale ~ (1 - gamma) / 3` learns far
faster (on Four-Rooms after 15M transitions, mean |Q - Q*| 0.10 against 2.9 with
`step_exponent = 0.6`). Time-limit cuts bootstrap (they are not terminal). Same-step duplicates
of a pair are averaged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from bilevel_jax.core.soft_vi import soft_value
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.learners.base import Learner, all_finite, check_options, register
from bilevel_jax.sim import spaces
from bilevel_jax.sim.rollout import RolloutCarry, env_step, reset, step_rewards

Array = jax.Array


@struct.dataclass
class SoftQTabularState:
    q: Array          # [S, A]
    counts: Array     # [S, A] visits
    carry: RolloutCarry
    steps: Array      # env steps taken
    temperature: Array  # the problem's lam (policy and value see only the state)


def table_policy(state, obs) -> Array:
    """Logits `Q[s] / lam` of a Q-table learner's state (fields `q [S, A]`, `temperature`)."""
    return state.q[_state_index(obs)] / state.temperature


def table_value(state, obs) -> Array:
    """Soft value `lam logsumexp(Q[s] / lam)` of a Q-table learner's state."""
    return soft_value(state.q[_state_index(obs)], state.temperature)


def _state_index(obs: Array) -> Array:
    """Integer state of an index or one-hot observation."""
    obs = jnp.asarray(obs)
    return obs.astype(jnp.int32) if obs.ndim == 0 else jnp.argmax(obs).astype(jnp.int32)


def _num_states(problem, params) -> int:
    space = problem.env.observation_space(params)
    if hasattr(space, "n"):
        return int(space.n)
    shape = tuple(space.shape)
    if len(shape) != 1:
        raise InvalidArgumentError(
            f"env: soft_q_tabular expects integer or one-hot [S] observations, got shape {shape}")
    return shape[0]


def soft_q_tabular(*, num_envs: int = 16, num_updates: int = 1_000, epsilon: float = 0.1,
                   step_exponent: float = 0.51, step_scale: float = 1.0,
                   reset_each_step: bool = False) -> Learner:
    """Soft Q-learning on a table `[S, A]`; one `update` = `num_updates` steps of `num_envs`.

    Args:
      num_envs: environments stepped side by side.
      num_updates: environment steps (each followed by a table update) per `update` call.
      epsilon: weight of the uniform policy in the behaviour policy (exploration).
      step_exponent: `alpha_n = (1 + step_scale n)^-step_exponent`, in (0.5, 1] for convergence.
      step_scale: `> 0`; about `(1 - gamma) / 3` with `step_exponent = 1` for long horizons.
      reset_each_step: re-initialize before every fit (see `learners.follow`).
    """
    check_options(num_envs=(num_envs, "pos_int"), num_updates=(num_updates, "pos_int"),
                  epsilon=(epsilon, "unit"), step_scale=(step_scale, "pos_float"))
    if isinstance(step_exponent, bool) or not isinstance(step_exponent, (int, float)) \
            or not 0.5 < step_exponent <= 1:
        raise InvalidArgumentError(f"step_exponent: expected a number in (0.5, 1], got {step_exponent!r}")

    def init(problem, x, context, key):
        params = problem.env_params(x, context)
        heads = problem.action_heads(params)
        if problem.is_factorized(params):
            raise InvalidArgumentError("env: soft_q_tabular needs a Discrete action space, got a Tuple")
        q = jnp.zeros((_num_states(problem, params), heads[0]), jnp.float32)
        return SoftQTabularState(q=q, counts=jnp.zeros_like(q), carry=reset(key, problem, params, num_envs),
                                 steps=jnp.zeros((), jnp.int32),
                                 temperature=jnp.asarray(problem.temperature, jnp.float32))

    def update(problem, x, context, state, key):
        x = lax.stop_gradient(x)
        params = problem.env_params(x, context)
        lam = problem.temperature
        gamma = problem.follower_discount(x, context)

        def body(state, k):
            behaviour = lambda obs: spaces.mix_uniform(state.q[_state_index(obs)] / lam, epsilon)  # noqa: E731
            carry, step = env_step(k, problem, params, behaviour, state.carry)
            reward, _ = step_rewards(problem, x, context, step)
            s = jax.vmap(_state_index)(step.obs)
            s_next = jax.vmap(_state_index)(step.next_obs)
            v_next = soft_value(state.q[s_next], lam)
            target = reward + gamma * (1.0 - step.terminated) * v_next
            td = target.astype(state.q.dtype) - state.q[s, step.action]
            hits = jnp.zeros_like(state.counts).at[s, step.action].add(1.0)
            td_sum = jnp.zeros_like(state.q).at[s, step.action].add(td)
            alpha = (1.0 + step_scale * state.counts) ** -step_exponent
            q = state.q + alpha * td_sum / jnp.maximum(hits, 1.0)
            new = state.replace(q=q, counts=state.counts + hits, carry=carry, steps=state.steps + 1)
            return new, jnp.mean(td ** 2)

        state, losses = lax.scan(body, state, jax.random.split(key, num_updates))
        loss = jnp.mean(losses)
        return state, {"loss": loss, "finite": all_finite(loss, state.q)}

    return Learner(init=init, update=update, policy=table_policy, value=table_value,
                   reset_each_step=reset_each_step)


register("soft_q_tabular", soft_q_tabular)
