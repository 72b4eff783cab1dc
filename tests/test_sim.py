"""Simulator problems: `as_simulator` reproduces the tabular model (transitions, rewards, SPEC 1
terminals, time limits, discounted visitation) statistically; rollouts under jit and vmap;
validation names the offending field; soft_q_tabular reaches the soft-optimal policy."""

from __future__ import annotations

import chex
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from gymnax.environments import environment, spaces as gym_spaces

import bilevel_jax as bj
from bilevel_jax import sim
from bilevel_jax.envs.random_mdp import random_bilevel_problem
import reference as ref
from helpers import numpy_mdp, soft_optimal_kl

SE = 4.0  # tolerance in standard errors of every statistical check


def _problem(terminal: bool, transition_dependent: bool = True, sparse: bool = False):
    return random_bilevel_problem(3, num_states=6, num_actions=3, dim_x=4, num_terminal=int(terminal),
                                  branching=3 if sparse else None, sparse=sparse,
                                  transition_dependent=transition_dependent, temperature=0.5)


_rollout = jax.jit(sim.rollout, static_argnames=("policy", "num_envs", "num_steps",
                                                 "keep_states"))


@pytest.mark.parametrize("sparse", [False, True])
def test_transition_frequencies_and_rewards_match_the_model(sparse):
    problem, x = _problem(terminal=False, sparse=sparse)
    simp = sim.as_simulator(problem, observation="index")
    context = problem.context(1)
    P, r, _, _, _ = numpy_mdp(problem.follower(x, context))
    uniform = lambda obs: jnp.zeros(3)  # noqa: E731
    traj = _rollout(jax.random.key(0), simp, x, context, uniform, num_envs=64, num_steps=400,
                    keep_states=True)
    s = np.asarray(traj.state.state).ravel()
    a = np.asarray(traj.action).ravel()
    s2 = np.asarray(traj.next_state.state).ravel()
    counts = np.zeros_like(P)
    np.add.at(counts, (s, a, s2), 1.0)
    n_sa = counts.sum(-1, keepdims=True)
    assert n_sa.min() > 300
    freq = counts / n_sa
    se = np.sqrt(P * (1 - P) / n_sa) + 1e-12
    assert np.all(np.abs(freq - P) <= SE * se + 1e-9), np.max(np.abs(freq - P) / se)
    # the model itself (a wrong kernel must fail): a 3% shift is many SEs at this sample size
    assert np.any(np.abs(freq - np.roll(P, 1, axis=-1)) > SE * se)
    np.testing.assert_allclose(np.asarray(traj.follower_reward).ravel(), r[s, a], rtol=1e-12)
    leader = np.asarray(problem.leader_reward(x, context))
    np.testing.assert_allclose(np.asarray(traj.leader_reward).ravel(), leader[s, a], rtol=1e-12)
    logp = sim.transition_log_probs(simp, x, context, traj.steps())
    np.testing.assert_allclose(np.asarray(logp).ravel(), np.log(P[s, a, s2]), rtol=1e-10)


@pytest.mark.parametrize("terminal", [False, True])
def test_discounted_visitation_of_rollouts_matches_the_model(terminal):
    problem, x = _problem(terminal=terminal)
    simp = sim.as_simulator(problem, observation="index")
    context = problem.context(0)
    P, _, gamma, mu, term = numpy_mdp(problem.follower(x, context))
    logits = np.random.default_rng(0).normal(size=(6, 3))
    pi = ref.softmax(logits)
    table = jnp.asarray(logits)
    policy = lambda obs: table[obs]  # noqa: E731
    num_envs, num_steps = 4000, 120   # gamma^120 = 3e-6: the cut is far below the noise
    traj = _rollout(jax.random.key(1), simp, x, context, policy, num_envs=num_envs,
                    num_steps=num_steps, keep_states=False)
    first = np.cumsum(np.asarray(traj.done), axis=0) - np.asarray(traj.done) == 0  # [T, N]
    weights = np.where(first, gamma ** np.asarray(traj.time), 0.0)
    per_env = np.zeros((num_envs, 6))
    for t in range(num_steps):
        np.add.at(per_env, (np.arange(num_envs), np.asarray(traj.obs[t])), weights[t])
    mean, se = per_env.mean(0), per_env.std(0) / np.sqrt(num_envs)
    expected = ref.visitation(P, gamma, pi, mu, term)
    assert np.all(np.abs(mean - expected) <= SE * se), (mean, expected, se)
    if terminal:
        assert expected.sum() < 1 / (1 - gamma) - 1  # episodes do end


def test_terminal_states_and_time_limits_follow_spec_1():
    problem, x = _problem(terminal=True)
    simp = sim.as_simulator(problem, observation="index", max_episode_steps=7)
    context = problem.context(0)
    mdp = problem.follower(x, context)
    terminal = np.asarray(mdp.terminal)
    traj = _rollout(jax.random.key(2), simp, x, context, lambda o: jnp.zeros(3), num_envs=32,
                    num_steps=300, keep_states=True)
    s = np.asarray(traj.state.state)
    time = np.asarray(traj.time)
    # acting in a terminal state ends the episode, with its reward earned
    np.testing.assert_array_equal(np.asarray(traj.terminated), terminal[s])
    assert np.asarray(traj.terminated).sum() > 50
    # the time limit cuts (truncates, not terminates) after 7 steps
    assert time.max() == 6
    np.testing.assert_array_equal(np.asarray(traj.truncated), (time == 6) & ~terminal[s])
    # after an episode ends, the next step starts a new one at time 0 from the initial states
    done = np.asarray(traj.done)
    assert np.all(time[1:][done[:-1]] == 0)
    assert np.all(time[1:][~done[:-1]] == time[:-1][~done[:-1]] + 1)
    starts = s[1:][done[:-1]]
    assert np.all(np.asarray(mdp.initial)[starts] > 0)
    # the carry continues a trajectory where it stopped
    more = _rollout(jax.random.key(3), simp, x, context, lambda o: jnp.zeros(3), num_envs=32,
                    num_steps=5, keep_states=False)
    cont = jax.jit(lambda k, start: sim.rollout(k, simp, x, context, lambda o: jnp.zeros(3), 32, 3,
                                                start=start))(jax.random.key(4), more.final)
    np.testing.assert_array_equal(np.asarray(cont.obs[0]), np.asarray(more.final.obs))
    np.testing.assert_array_equal(np.asarray(cont.time[0]), np.asarray(more.final.time))


def test_rewards_and_log_density_are_differentiable_in_x():
    problem, x = _problem(terminal=False, transition_dependent=True, sparse=True)
    simp = sim.as_simulator(problem, observation="one_hot")
    context = problem.context(0)
    traj = _rollout(jax.random.key(5), simp, x, context, lambda o: jnp.zeros(3), num_envs=4,
                    num_steps=10, keep_states=True)
    steps = traj.steps()

    @jax.jit
    def surrogate(x):
        r, rbar = sim.step_rewards(simp, x, context, steps)
        return jnp.sum(r) + 2 * jnp.sum(rbar) + jnp.sum(sim.transition_log_probs(simp, x, context, steps))

    grad = jax.grad(surrogate)(x)
    numeric = ref.central_jacobian(lambda v: np.asarray(surrogate(jnp.asarray(v))), np.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-6, atol=1e-8)
    assert np.abs(numeric).max() > 1e-3


class RolloutVariantsTest(chex.TestCase):
    """jit and vmap (over keys, x and contexts) give each member's own trajectory."""

    @chex.variants(with_jit=True)
    def test_vmapped_rollout_equals_each_member(self):
        problem, x = _problem(terminal=True)
        simp = sim.as_simulator(problem, max_episode_steps=20)
        policy = lambda obs: jnp.zeros(3)  # noqa: E731

        def one(key, x, context):
            traj = sim.rollout(key, simp, x, context, policy, 3, 25)
            return traj.obs, traj.action, traj.follower_reward, traj.done

        keys = jax.random.split(jax.random.key(6), 2)
        xs = jnp.stack([x, 2 * x])
        batched = self.variant(jax.vmap(one))(keys, xs, problem.contexts)
        one_jit = jax.jit(one)
        for i in range(2):
            single = one_jit(keys[i], xs[i], problem.context(i))
            for b, s in zip(batched, single):
                np.testing.assert_allclose(np.asarray(b[i]), np.asarray(s), rtol=1e-12)


def test_gymnax_environment_with_x_in_its_params():
    env, params = gymnax.make("CartPole-v1")

    problem = bj.SimulatorProblem(
        env=env, env_params=lambda x, c: params.replace(gravity=params.gravity * x),
        follower_reward=lambda x, c, s: s.reward - 0.1 * x * jnp.abs(s.next_obs[0]),
        leader_reward=lambda x, c, s: -jnp.abs(s.next_obs[2]), discount=0.99, temperature=0.1,
        max_episode_steps=50)
    bj.validate_simulator(problem, 1.0)
    run = jax.jit(lambda x: sim.rollout(jax.random.key(0), problem, x, None, lambda o: jnp.zeros(2), 8, 120))
    traj = run(1.0)
    assert traj.obs.shape == (120, 8, 4)
    assert np.asarray(traj.done).sum() >= 8          # a random policy drops the pole
    assert np.asarray(traj.time).max() <= 49
    heavy = run(3.0)
    assert np.asarray(heavy.done).sum() > np.asarray(traj.done).sum()  # x is in the dynamics


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

class _TupleEnv(environment.Environment):
    def action_space(self, params):
        return gym_spaces.Tuple([gym_spaces.Discrete(3), gym_spaces.Discrete(2)])

    def observation_space(self, params):
        return gym_spaces.Box(0.0, 1.0, (1,))

    def reset_env(self, key, params):
        return jnp.zeros(1), environment.EnvState(time=jnp.zeros((), jnp.int32))

    def step_env(self, key, state, action, params):
        return jnp.zeros(1), state.replace(time=state.time + 1), jnp.sum(action) * 1.0, False, {}


def _valid_tabular():
    problem, x = _problem(terminal=False)
    return sim.as_simulator(problem), x


@pytest.mark.parametrize("change, field", [
    (dict(env=object()), "env"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(discount=1.0), "discount"),
    (dict(leader_discount=-0.1), "leader_discount"),
    (dict(max_episode_steps=0), "max_episode_steps"),
    (dict(follower_reward=lambda x, c, s: jnp.nan), "follower_reward"),
    (dict(follower_reward=lambda x, c, s: jnp.ones(2)), "follower_reward"),
    (dict(leader_reward=lambda x, c, s: jnp.inf), "leader_reward"),
    (dict(transition_log_prob=lambda x, c, s, a, s2: jnp.nan), "transition_log_prob"),
    (dict(contexts={"shift": jnp.zeros((2, 6, 3)), "leader": jnp.zeros((3, 6, 3))}), "contexts"),
    (dict(context_probs=jnp.array([0.5, 0.6])), "context_probs"),
])
def test_validate_names_the_offending_field(change, field):
    problem, x = _valid_tabular()
    bad = problem.replace(**change)
    with pytest.raises(bj.InvalidSimulatorError, match=rf"^{field}:"):
        bj.validate_simulator(bad, x)


def test_validate_refuses_a_tabular_discount_outside_the_unit_interval():
    problem, x = random_bilevel_problem(0, num_states=4, num_actions=2, discount=1.0)
    with pytest.raises(bj.InvalidSimulatorError, match="^discount:"):
        bj.validate_simulator(sim.as_simulator(problem), x)


def test_validate_accepts_tuple_actions_and_refuses_continuous_ones():
    env = _TupleEnv()
    problem = bj.SimulatorProblem(env=env, env_params=lambda x, c: environment.EnvParams(10),
                                  follower_reward=lambda x, c, s: s.reward,
                                  leader_reward=lambda x, c, s: s.reward, discount=0.9)
    bj.validate_simulator(problem, 0.0)
    traj = sim.rollout(jax.random.key(0), problem, 0.0, None,
                       lambda o: (jnp.zeros(3), jnp.zeros(2)), 4, 30)
    assert traj.action.shape == (30, 4, 2)
    assert np.asarray(traj.truncated).sum() > 0
    env_c, params_c = gymnax.make("Pendulum-v1")
    cont = bj.SimulatorProblem(env=env_c, env_params=lambda x, c: params_c,
                               follower_reward=lambda x, c, s: s.reward,
                               leader_reward=lambda x, c, s: s.reward, discount=0.9)
    with pytest.raises(bj.InvalidSimulatorError, match="^env:"):
        bj.validate_simulator(cont, 0.0)


def test_rollout_refuses_bad_sizes():
    problem, x = _valid_tabular()
    for name, kwargs in (("num_envs", dict(num_envs=0, num_steps=3)),
                         ("num_steps", dict(num_envs=2, num_steps=2.5))):
        with pytest.raises(bj.InvalidArgumentError, match=f"^{name}:"):
            sim.rollout(jax.random.key(0), problem, x, problem.context(0), lambda o: jnp.zeros(3), **kwargs)
    with pytest.raises(bj.InvalidArgumentError, match="^observation:"):
        sim.as_simulator(random_bilevel_problem(0)[0], observation="pixels")


# ---------------------------------------------------------------------------------------------
# soft_q_tabular: the model-free twin of the tabular oracle
# ---------------------------------------------------------------------------------------------

KL_THRESHOLD = 0.01  # d*-normalized mean KL(pi* || pi); a uniform policy is at > 0.1 here


@pytest.mark.parametrize("observation", ["index", "one_hot"])
def test_soft_q_tabular_reaches_the_soft_optimal_policy(observation):
    problem, x = random_bilevel_problem(0, num_states=5, num_actions=3, temperature=0.5,
                                        num_terminal=1)
    simp = sim.as_simulator(problem, observation=observation)
    context = problem.context(0)
    mdp = problem.follower(x, context)
    learner = bj.make_learner("soft_q_tabular", num_envs=16, num_updates=3000)
    state = learner.init(simp, x, context, jax.random.key(0))
    obs = np.eye(5) if observation == "one_hot" else np.arange(5)
    logits = lambda st: np.stack([np.asarray(learner.policy(st, o)) for o in obs])  # noqa: E731
    assert soft_optimal_kl(mdp, 0.5, logits(state)) > 10 * KL_THRESHOLD
    state, info = jax.jit(lambda s, k: learner.update(simp, x, context, s, k))(state, jax.random.key(1))
    assert bool(info["finite"])
    kl = soft_optimal_kl(mdp, 0.5, logits(state))
    assert kl < KL_THRESHOLD, kl


def test_soft_q_tabular_on_four_rooms():
    """At a paper temperature (lam = 0.003) pi* is nearly greedy: the uniform policy is at a
    weighted KL of 0.93; 1.3M sampled transitions bring soft Q-learning below 0.1."""
    lam = 0.003
    problem, n = bj.envs.four_rooms_problem(temperature=lam, dtype=jnp.float32)
    simp = sim.as_simulator(problem, observation="one_hot", max_episode_steps=200)
    x = jnp.zeros(n, jnp.float32)
    context = problem.context(0)
    mdp = problem.follower(x, context)
    learner = bj.make_learner("soft_q_tabular", num_envs=32, num_updates=40_000, epsilon=0.2)
    state = jax.jit(lambda k: learner.update(simp, x, context, learner.init(simp, x, context, k), k)[0])(
        jax.random.key(0))
    logits = np.asarray(jax.vmap(lambda o: learner.policy(state, o))(jnp.eye(mdp.num_states)))
    assert soft_optimal_kl(mdp, lam, 0 * logits) > 0.5
    kl = soft_optimal_kl(mdp, lam, logits)
    assert kl < 0.1, kl


def test_soft_q_tabular_vmaps_over_seeds_and_refuses_bad_options():
    problem, x = random_bilevel_problem(0, num_states=5, num_actions=3, temperature=0.5)
    simp = sim.as_simulator(problem)
    context = problem.context(0)
    learner = bj.make_learner("soft_q_tabular", num_envs=4, num_updates=50)

    def fit(key):
        return learner.update(simp, x, context, learner.init(simp, x, context, key), key)[0].q

    keys = jax.random.split(jax.random.key(0), 2)
    batched = jax.jit(jax.vmap(fit))(keys)
    single = jax.jit(fit)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single(keys[i])), rtol=1e-6)
    for name, value in (("num_envs", 0), ("num_updates", -1), ("epsilon", 1.5), ("step_exponent", 0.4),
                        ("step_scale", 0.0)):
        with pytest.raises(bj.InvalidArgumentError, match=f"^{name}:"):
            bj.make_learner("soft_q_tabular", **{name: value})
    with pytest.raises(bj.InvalidArgumentError, match="^learner:"):
        bj.make_learner("soft_sarsa")
    bad = simp.replace(follower_reward=lambda x, c, s: jnp.nan * s.reward)
    info = jax.jit(lambda k: learner.update(bad, x, context, learner.init(bad, x, context, k), k)[1])(keys[0])
    assert not bool(info["finite"])


def test_reference_model_reports_the_exact_objective():
    """`as_simulator` keeps its source as `reference`: ascent with `track_objective` reports the
    tabular `F(x)` of each iterate (solved on the reference at the simulator's temperature, also
    after a replace), model-free PBRL too; a reference that is not tabular is refused."""
    problem, x0 = random_bilevel_problem(1, num_states=4, num_actions=3, dim_x=2,
                                         num_contexts=1, temperature=0.4)
    simp = sim.as_simulator(problem)
    assert simp.reference is problem
    hotter = simp.replace(temperature=0.8)
    np.testing.assert_allclose(float(sim.reference_model(hotter).temperature), 0.8)
    options = dict(learner="soft_vi_tabular", num_envs=4, num_steps=20, critic_hidden=(8,),
                   critic_steps=2, estimate_variance=False)
    result = bj.train(hotter, "hpgd", optax.sgd(0.1), 3, jax.random.key(0), x0=x0, chunk_size=3,
                      **options)
    exact_f = float(bj.leader_objective(problem.replace(temperature=0.8), x0))
    np.testing.assert_allclose(float(result.metrics["objective"][0]), exact_f, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(result.metrics["objective"])))
    # zero-order's own objective is exact only with a model: on a simulator it is sampled, so
    # the tracked F must still come from the reference
    result = bj.train(hotter, "zero_order", optax.sgd(0.1), 2, jax.random.key(0), x0=x0,
                      chunk_size=2, learner="soft_vi_tabular", num_envs=4, num_steps=20)
    np.testing.assert_allclose(float(result.metrics["objective"][0]), exact_f, rtol=1e-5)
    pbrl = bj.pbrl(optax.sgd(0.05), learner="soft_vi_tabular", num_envs=4, num_steps=20,
                   policy_hidden=(), baseline_hidden=(8,), baseline_steps=2)
    result = bj.train(hotter, pbrl, None, 2, jax.random.key(0), x0=x0, chunk_size=2)
    np.testing.assert_allclose(float(result.metrics["objective"][0]), exact_f, rtol=1e-5)
    with pytest.raises(bj.sim.InvalidSimulatorError, match="reference"):
        sim.check_simulator(simp.replace(reference="not a problem"))
