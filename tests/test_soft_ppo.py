"""soft_ppo: the learned policy's exact soft value (NumPy reference) against V*, batching,
factorized actions, option checks, non-finite detection."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from gymnax.environments import environment, spaces

import bilevel_jax as bj
import reference as ref
from helpers import numpy_mdp
from bilevel_jax.envs.random_mdp import random_bilevel_problem
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.learners import make_learner
from bilevel_jax.learners.soft_ppo import soft_ppo


def _exact_values(state, learner, bilevel, x, context):
    """(mu . V^pi_soft of the learned pi, mu . V*, mu . V^uniform), all exact in float64."""
    P, r, gamma, mu, terminal = numpy_mdp(bilevel.follower(x, context))
    S, A = r.shape
    lam = float(bilevel.temperature)
    logits = jax.vmap(lambda o: learner.policy(state, o))(jnp.eye(S, dtype=jnp.float32))
    pi = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float64), axis=-1))
    _, v_pi = ref.policy_evaluation(P, r, gamma, pi, lam, terminal)
    _, v_star, _ = ref.soft_value_iteration(P, r, gamma, lam, terminal)
    _, v_unif = ref.policy_evaluation(P, r, gamma, np.full((S, A), 1.0 / A), lam, terminal)
    return mu @ v_pi, mu @ v_star, mu @ v_unif


def _fit(learner, problem, x):
    """`(key_data, context) -> (state, info)`: init and one update (what is jitted/vmapped)."""
    def run(key_data, context):
        key = jax.random.wrap_key_data(key_data)
        state = learner.init(problem, x, context, key)
        return learner.update(problem, x, context, state, jax.random.fold_in(key, 1))
    return run


def _key_data(seed):
    return jax.random.key_data(jax.random.key(seed))


# One random MDP and one compiled fit, shared by the optimality and the batching tests.
_MDP, _X0 = random_bilevel_problem(0, num_states=5, num_actions=3, temperature=0.5)
_MDP_SIM = bj.sim.as_simulator(_MDP, max_episode_steps=50)  # truncations bootstrap
_MDP_LEARNER = soft_ppo(num_envs=8, num_steps=32, learning_rate=2.5e-3, num_updates=40)
_mdp_fit = _fit(_MDP_LEARNER, _MDP_SIM, _X0)
_mdp_fit_jit = jax.jit(_mdp_fit)


def test_random_mdp_reaches_soft_optimum():
    context = _MDP_SIM.context(0)
    state, info = _mdp_fit_jit(_key_data(0), context)
    assert bool(info["finite"])
    v_pi, v_star, v_unif = _exact_values(state, _MDP_LEARNER, _MDP, _X0, context)
    assert v_star > 0 and v_unif < 0.95 * v_star  # the test can fail: random is far off
    assert v_pi >= 0.95 * v_star, (v_pi, v_star)
    assert v_pi <= v_star + 1e-6  # V* is the maximum (a sanity check of the evaluation)
    # the critic learned the soft value (to 10%: it tracks V^pi, close to V*)
    value = float(_MDP_LEARNER.value(state, jnp.eye(5, dtype=jnp.float32)[0]))
    assert np.isfinite(value) and abs(value - v_star) < 0.1 * abs(v_star)


def test_jit_and_vmap_over_seeds_and_contexts_agree():
    keys = jnp.stack([_key_data(0), _key_data(1)])
    contexts = _MDP_SIM.contexts  # K = 2 contexts, batched along with the seeds
    batched_state, batched_info = jax.jit(jax.vmap(_mdp_fit))(keys, contexts)
    for i in range(2):
        state, info = _mdp_fit_jit(keys[i], _MDP_SIM.context(i))
        chex.assert_trees_all_close(
            (state.actor, state.critic, info["loss"]),
            jax.tree_util.tree_map(lambda a: a[i], (batched_state.actor, batched_state.critic,
                                                    batched_info["loss"])),
            rtol=1e-4, atol=1e-5)
        assert bool(info["finite"]) and int(state.steps) == 40 * 8 * 32


def test_four_rooms_reaches_soft_optimum():
    bilevel, num_params = bj.envs.four_rooms_problem(temperature=0.002)
    problem = bj.sim.as_simulator(bilevel, max_episode_steps=200)
    x = jnp.zeros(num_params, jnp.float32)
    context = problem.context(0)
    learner = soft_ppo(num_envs=16, num_steps=64, learning_rate=2.5e-3, num_updates=80)
    state, info = jax.jit(_fit(learner, problem, x))(_key_data(0), context)
    assert bool(info["finite"])
    v_pi, v_star, v_unif = _exact_values(state, learner, bilevel, x, context)
    assert v_unif < 0.5 * v_star
    assert v_pi >= 0.95 * v_star, (v_pi, v_star)


@struct.dataclass
class _PickParams(environment.EnvParams):
    max_steps_in_episode: int = 1


class _PickEnv(environment.Environment):
    """One decision, Tuple(Discrete(3), Discrete(2)) actions; reward 1 for (2, 0), else 0."""

    @property
    def default_params(self):
        return _PickParams()

    def reset_env(self, key, params):
        return jnp.ones((2,), jnp.float32), environment.EnvState(time=jnp.zeros((), jnp.int32))

    def step_env(self, key, state, action, params):
        reward = jnp.where((action[0] == 2) & (action[1] == 0), 1.0, 0.0)
        new = environment.EnvState(time=state.time + 1)
        return jnp.ones((2,), jnp.float32), new, reward, jnp.asarray(True), {}

    def action_space(self, params=None):
        return spaces.Tuple([spaces.Discrete(3), spaces.Discrete(2)])

    def observation_space(self, params):
        return spaces.Box(0.0, 1.0, (2,), jnp.float32)


def _pick_problem():
    env = _PickEnv()
    return bj.sim.SimulatorProblem(
        env=env, env_params=lambda x, c: env.default_params,
        follower_reward=lambda x, c, s: s.reward + x,  # x = nan poisons the rewards
        leader_reward=lambda x, c, s: s.reward, discount=0.9, temperature=0.02)


_PICK_LEARNER = soft_ppo(num_envs=8, num_steps=16, hidden=(32,), learning_rate=1e-2,
                         num_updates=25)


def _pick_run(x):
    problem = _pick_problem()
    state = _PICK_LEARNER.init(problem, x, None, jax.random.key(0))
    return _PICK_LEARNER.update(problem, x, None, state, jax.random.key(1))


_pick_run_jit = jax.jit(_pick_run)


def test_factorized_actions_learn_the_rewarded_joint_action():
    state, info = _pick_run_jit(jnp.float32(0.0))
    assert bool(info["finite"])
    logits = _PICK_LEARNER.policy(state, jnp.ones((2,), jnp.float32))
    assert isinstance(logits, tuple) and [l.shape for l in logits] == [(3,), (2,)]
    joint = float(jnp.exp(bj.sim.spaces.log_prob(logits, jnp.array([2, 0]))))
    assert int(jnp.argmax(logits[0])) == 2 and int(jnp.argmax(logits[1])) == 0
    assert joint > 0.8, joint  # uniform: 1/6


def test_sequential_and_batched_members_agree():
    """Under vmap the CPU default runs members' epochs one by one; the batched path must give
    the same learner (to float32 rounding), and the members must differ (the check can fail)."""
    problem, keys = _pick_problem(), jax.random.split(jax.random.key(5), 2)
    actors = []
    for sequential in (True, False):
        learner = soft_ppo(num_envs=4, num_steps=8, hidden=(16,), num_updates=3,
                           sequential_members=sequential)
        fit = jax.jit(jax.vmap(lambda k: learner.update(
            problem, 0.0, None, learner.init(problem, 0.0, None, k), k)[0].actor))
        actors.append(fit(keys))
    chex.assert_trees_all_close(actors[0], actors[1], rtol=1e-4, atol=1e-6)
    first = jax.tree_util.tree_leaves(actors[0])[0]
    assert not np.allclose(np.asarray(first[0]), np.asarray(first[1]))


def test_nan_reward_is_reported():
    _, info = _pick_run_jit(jnp.float32(jnp.nan))
    assert not bool(info["finite"])


@pytest.mark.parametrize("options, name", [
    ({"num_envs": 0}, "num_envs"),
    ({"num_steps": 2.5}, "num_steps"),
    ({"num_envs": 3, "num_steps": 5, "num_minibatches": 4}, "num_minibatches"),
    ({"update_epochs": 0}, "update_epochs"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"gae_lambda": 1.5}, "gae_lambda"),
    ({"clip_eps": 0.0}, "clip_eps"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"vf_coef": -0.5}, "vf_coef"),
    ({"activation": "gelu"}, "activation"),
    ({"hidden": (64, 0)}, "hidden"),
    ({"hidden": ()}, "hidden"),
    ({"anneal_lr": 1}, "anneal_lr"),
    ({"num_updates": True}, "num_updates"),
    ({"sequential_members": 1}, "sequential_members"),
])
def test_bad_options_refused(options, name):
    with pytest.raises(InvalidArgumentError, match=name):
        soft_ppo(**options)
    with pytest.raises(InvalidArgumentError, match=name):
        make_learner("soft_ppo", **options)


def test_registered():
    assert "soft_ppo" in bj.learners.available()
    assert bj.learners.options_of("soft_ppo")["num_steps"] == 128
