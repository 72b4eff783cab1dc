"""Tax design (SPEC 7.2): the economy's rewards, budget and truncated-normal noise against a NumPy
float64 reference written here; the simulator problem validates and rolls out with its 200-step
time limit; the tabular twin's kernel, rewards and exact hypergradient (against central finite
differences), and its leader value against simulations of the continuous economy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr as np_ndtr

import bilevel_jax as bj
from bilevel_jax.envs import tax_design as td

SE = 4.0  # tolerance in standard errors of every statistical check

# A world away from the defaults (every rate different), so a swapped field shows.
TAU, VAT, XI = 0.37, np.array([0.1, 0.5, 1.2]), np.array([0.6, 0.3, 0.1])


def _params(**overrides):
    fields = dict(income_tax=TAU, vat=jnp.asarray(VAT), preferences=jnp.asarray(XI))
    fields.update(overrides)
    return td.TaxDesignParams().replace(**fields)


# ---------------------------------------------------------------- NumPy float64 reference

def np_asset_utility(a, scale):
    return scale * np.log(a / 20.0 + 1.0) if a > 0 else a


def np_utility(a, action, vat=VAT, xi=XI):
    h, c = 0.89 * action[0], 1.25 * np.asarray(action[1:], float)
    return (np_asset_utility(a, 1.0) - 0.1 * h ** 2
            + np.prod(np.power(c / (1.0 * (1.0 + vat)), xi)))


def np_welfare(a, action, tau=TAU, vat=VAT):
    h, c = 0.89 * action[0], 1.25 * np.asarray(action[1:], float)
    return (min(a, 0.0) + 15.0 * np.mean(c / (1.0 + vat)) / 5.0
            + 5.0 * np.log(1.0 + np.sum(vat * c / (1.0 + vat)) + tau * 1.0 * h))


def np_unclipped_budget(a, action, tau=TAU):
    return a + (1.0 - tau) * 1.0 * 0.89 * action[0] - 1.25 * np.sum(action[1:])


def np_budget(a, action, tau=TAU):
    return float(np.clip(np_unclipped_budget(a, action, tau), -100.0, 100.0))


def np_truncnorm_cdf(x, m, std=5.0, lo=-100.0, hi=100.0):
    x = np.clip(x, lo, hi)
    return (np_ndtr((x - m) / std) - np_ndtr((lo - m) / std)) / (
        np_ndtr((hi - m) / std) - np_ndtr((lo - m) / std))


def np_truncnorm_logpdf(x, m, std=5.0, lo=-100.0, hi=100.0):
    z = (x - m) / std
    log_z = np.log(np_ndtr((hi - m) / std) - np_ndtr((lo - m) / std))
    return -0.5 * z ** 2 - 0.5 * np.log(2 * np.pi) - np.log(std) - log_z


# (assets, action): zero consumption, full consumption, a single good missing, deep debt
# (a < -20, where log(a / 20 + 1) is undefined), and budgets beyond both clip bounds.
CASES = [(0.0, (0, 0, 0, 0)), (3.7, (9, 4, 4, 4)), (-37.5, (3, 0, 2, 1)), (55.0, (5, 2, 2, 2)),
         (-20.0, (7, 1, 3, 0)), (100.0, (9, 0, 0, 0)), (98.0, (9, 1, 0, 0)),
         (-100.0, (0, 4, 4, 4)), (-97.0, (1, 3, 4, 2)), (-5.0, (2, 1, 1, 1))]


def test_rewards_and_budget_match_the_numpy_reference():
    params = _params()
    for a, action in CASES:
        act = jnp.asarray(action)
        np.testing.assert_allclose(td.follower_utility(params, a, act), np_utility(a, action),
                                   rtol=1e-12, atol=1e-12, err_msg=str((a, action)))
        np.testing.assert_allclose(td.social_welfare(params, a, act), np_welfare(a, action),
                                   rtol=1e-12, atol=1e-12, err_msg=str((a, action)))
        np.testing.assert_allclose(td.budget(params, a, act), np_budget(a, action),
                                   rtol=1e-12, atol=1e-12, err_msg=str((a, action)))
    # the cases do reach both clip bounds and zero consumption
    unclipped = [np_unclipped_budget(a, act) for a, act in CASES]
    assert max(unclipped) > 100 and min(unclipped) < -100
    assert td.follower_utility(params, 0.0, jnp.zeros(4, int)) == 0.0


def test_reward_gradients_in_the_taxes_are_finite_at_zero_consumption():
    """d r / d y: `-xi_i CD / (1 + y_i)` where every good is consumed, exactly 0 where one with
    `xi_i > 0` is not (the product is 0 for every `y`), never NaN."""
    params = _params()
    grad = jax.grad(lambda vat, a, act: td.follower_utility(params.replace(vat=vat), a, act))
    for a, action in CASES:
        g = np.asarray(grad(jnp.asarray(VAT), a, jnp.asarray(action)))
        cd = np.prod(np.power(1.25 * np.asarray(action[1:], float) / (1.0 + VAT), XI))
        np.testing.assert_allclose(g, -XI * cd / (1.0 + VAT), rtol=1e-10, atol=1e-14)
    welfare_grad = jax.grad(lambda w, a, act: td.social_welfare(
        td._taxed(params, w, jnp.asarray(XI)), a, act))
    for a, action in CASES:
        assert np.all(np.isfinite(welfare_grad(jnp.zeros(4), a, jnp.asarray(action))))


def test_step_is_the_budget_without_noise_and_earns_the_utility():
    env = td.TaxDesignEnv()
    params = _params(noise_std=0.0)
    for a, action in CASES:
        state = td.TaxDesignState(time=jnp.asarray(5, jnp.int32),
                                  assets=jnp.asarray(a, jnp.float32))
        obs, nxt, reward, terminated, info = env.step_env(jax.random.key(0), state,
                                                          jnp.asarray(action), params)
        assert obs.shape == (1,) and obs.dtype == jnp.float32
        np.testing.assert_allclose(obs[0], np_budget(a, action), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(reward, np_utility(a, action), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(info["social_welfare"], np_welfare(a, action), rtol=1e-5,
                                   atol=1e-5)
        assert int(nxt.time) == 6 and not bool(terminated)
    # the reset: sqrt(2) N(0, 1), float32 [1]
    obs, state = jax.vmap(env.reset_env, (0, None))(jax.random.split(jax.random.key(1), 20_000),
                                                    params)
    assert obs.shape == (20_000, 1) and obs.dtype == jnp.float32
    a0 = np.asarray(state.assets, float)
    assert abs(a0.mean()) < SE * np.sqrt(2.0 / a0.size)
    assert abs(a0.var() - 2.0) < SE * 2.0 * np.sqrt(2.0 / a0.size)


@pytest.mark.parametrize("assets, action", [(-97.0, (1, 3, 4, 2)), (2.0, (4, 1, 1, 1)),
                                            (96.0, (9, 0, 1, 0))])
def test_noise_is_the_truly_truncated_normal(assets, action):
    """Binned frequencies of `a'` within 4 SE of the truncated-normal CDF, near each bound and
    in the middle; an untruncated normal (the reference's density) puts mass beyond the bounds."""
    env, params = td.TaxDesignEnv(), _params()
    n = 40_000
    state = td.TaxDesignState(time=jnp.zeros((n,), jnp.int32),
                              assets=jnp.full((n,), assets, jnp.float32))
    _, nxt, _, _, _ = jax.jit(jax.vmap(env.step_env, (0, 0, None, None)))(
        jax.random.split(jax.random.key(2), n), state, jnp.asarray(action), params)
    samples = np.asarray(nxt.assets, float)
    assert samples.min() >= -100.0 and samples.max() <= 100.0
    m = np_budget(assets, action)
    edges = np.concatenate([[-100.0], m + 5.0 * np.linspace(-3, 3, 13), [100.0]])
    edges = np.unique(np.clip(edges, -100.0, 100.0))
    expected = np.diff(np_truncnorm_cdf(edges, m))
    freq = np.histogram(samples, edges)[0] / n
    se = np.sqrt(expected * (1 - expected) / n) + 1e-12
    assert np.all(np.abs(freq - expected) <= SE * se), np.max(np.abs(freq - expected) / se)
    # the check has power: the untruncated normal's bin masses are many SEs off near a bound
    if abs(m) > 90:
        untruncated = np.diff(np_ndtr((edges - m) / 5.0))
        assert np.any(np.abs(freq - untruncated) > SE * se)
    # Kolmogorov-Smirnov at the 0.1% level
    ecdf = np.arange(1, n + 1) / n
    ks = np.max(np.abs(ecdf - np_truncnorm_cdf(np.sort(samples), m)))
    assert ks < 1.95 / np.sqrt(n)


def test_transition_log_prob_is_the_truncated_density_and_its_tau_score():
    problem, _ = td.tax_design_problem(dtype=jnp.float64)
    w = jnp.asarray([0.4, -1.0, 0.2, -0.3])
    tau = 2.0 / (1.0 + np.exp(-0.4))
    xi = problem.context(0)
    grid = np.linspace(-100.0, 100.0, 20_001)
    for assets, action in [(-97.0, (1, 3, 4, 2)), (10.0, (6, 1, 2, 0)), (99.0, (9, 0, 0, 0))]:
        state = td.TaxDesignState(time=jnp.zeros((), jnp.int32), assets=jnp.asarray(assets))
        act = jnp.asarray(action)

        def logp(w, a_next):
            nxt = td.TaxDesignState(time=jnp.ones((), jnp.int32), assets=a_next)
            return problem.transition_log_prob(w, xi, state, act, nxt)

        dens = np.asarray(jax.vmap(logp, (None, 0))(w, jnp.asarray(grid)))
        m = np_budget(assets, action, tau)
        np.testing.assert_allclose(dens, np_truncnorm_logpdf(grid, m), rtol=1e-10, atol=1e-10)
        mass = np.sum(np.diff(grid) * 0.5 * (np.exp(dens[1:]) + np.exp(dens[:-1])))
        assert abs(mass - 1.0) < 1e-6, mass
        # the score in w[0] (tau) against central differences of the NumPy density
        for a_next in (m - 3.0, m + 1.5, np.clip(m + 7.0, -100, 100)):
            score = np.asarray(jax.grad(logp)(w, jnp.asarray(a_next)))
            eps = 1e-6

            def np_logp(w0):
                t = 2.0 / (1.0 + np.exp(-w0))
                return np_truncnorm_logpdf(a_next, np_budget(assets, action, t))

            fd = (np_logp(0.4 + eps) - np_logp(0.4 - eps)) / (2 * eps)
            np.testing.assert_allclose(score[0], fd, rtol=1e-6, atol=1e-8)
            np.testing.assert_array_equal(score[1:], 0.0)  # VAT is not in the dynamics
            if abs(np_unclipped_budget(assets, action, tau)) > 100:
                assert score[0] == 0.0    # a clipped budget does not move with tau


def test_simulator_problem_validates_and_rolls_out_with_the_time_limit():
    problem, w0 = td.tax_design_problem()
    np.testing.assert_allclose(2.0 / (1.0 + np.exp(-np.asarray(w0))), 0.3, rtol=1e-6)
    bj.validate_simulator(problem, w0)
    assert problem.action_heads(problem.env_params(w0, problem.context(0))) == (10, 5, 5, 5)
    # a float64 `w` (x64 is on) in the float32 env: the env's state keeps its dtype in the scan
    w = jnp.asarray([0.4, -1.0, 0.2, -0.3], jnp.float64)
    tau, vat = td.tax_rates(w)
    xi = problem.context(1)
    uniform = lambda obs: tuple(jnp.zeros(n) for n in (10, 5, 5, 5))  # noqa: E731
    traj = jax.jit(lambda k: bj.sim.rollout(k, problem, w, xi, uniform, 8, 450,
                                            keep_states=True))(jax.random.key(3))
    time = np.asarray(traj.time)
    assert time.max() == 199
    np.testing.assert_array_equal(np.asarray(traj.truncated), time == 199)
    assert not np.asarray(traj.terminated).any()
    assert traj.obs.shape == (450, 8, 1) and traj.obs.dtype == jnp.float32
    np.testing.assert_array_equal(time[200], 0)   # a fresh episode after the cut
    a = np.asarray(traj.state.assets, float).ravel()
    acts = np.asarray(traj.action).reshape(-1, 4)
    vat64, xi64 = np.asarray(vat, float), np.asarray(xi, float)
    idx = np.random.default_rng(0).choice(a.size, 300, replace=False)
    ref_r = [np_utility(a[i], acts[i], vat64, xi64) for i in idx]
    ref_w = [np_welfare(a[i], acts[i], float(tau), vat64) for i in idx]
    np.testing.assert_allclose(np.asarray(traj.follower_reward).ravel()[idx], ref_r, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(traj.leader_reward).ravel()[idx], ref_w, rtol=1e-4,
                               atol=1e-4)
    # the env's own reward is the follower's utility at the params' taxes
    np.testing.assert_allclose(np.asarray(traj.reward), np.asarray(traj.follower_reward),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the tabular twin

N_BINS = 21


@pytest.fixture(scope="module")
def twin():
    problem, w0 = td.tax_design_tabular(N_BINS, dtype=jnp.float64)
    return problem, w0, jax.jit(problem.follower)


def test_twin_tables_match_the_numpy_reference_and_rows_are_distributions(twin):
    problem, w0, follower = twin
    w = jnp.asarray([0.4, -1.0, 0.2, -0.3])
    tau, vat = (np.asarray(r, float) for r in td.tax_rates(w))
    edges = np.linspace(-100.0, 100.0, N_BINS + 1)
    centers = 0.5 * (edges[1:] + edges[:-1])
    actions = np.stack(np.unravel_index(np.arange(1250), (10, 5, 5, 5)), -1)
    np.testing.assert_array_equal(td.joint_actions(), actions)
    for k in range(problem.num_contexts):
        xi = np.asarray(problem.context(k), float)
        mdp = follower(w, problem.context(k))
        bj.validate_mdp(mdp)
        P = np.asarray(mdp.transitions)
        assert P.shape == (N_BINS, 1250, N_BINS)
        np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-12)
        budgets = np.clip(centers[:, None] + (1 - tau) * 0.89 * actions[None, :, 0]
                          - 1.25 * actions[None, :, 1:].sum(-1), -100.0, 100.0)
        ref_P = np.diff(np_truncnorm_cdf(edges[None, None, :], budgets[..., None]), axis=-1)
        np.testing.assert_allclose(P, ref_P, atol=1e-12)
        pick = [(s, a) for s in (0, 3, 10, 20) for a in (0, 17, 624, 1249)]
        for s, a in pick:
            np.testing.assert_allclose(mdp.rewards[s, a],
                                       np_utility(centers[s], actions[a], vat, xi),
                                       rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(problem.leader_reward(w, problem.context(k))[s, a],
                                       np_welfare(centers[s], actions[a], tau, vat),
                                       rtol=1e-12, atol=1e-12)
    ref_mu = np.diff(np_ndtr(np.concatenate([[-np.inf], edges[1:-1], [np.inf]]) / np.sqrt(2.0)))
    np.testing.assert_allclose(mdp.initial, ref_mu, atol=1e-14)
    assert mdp.initial[N_BINS // 2] > 0.5    # odd N: a bin centred on 0 holds the reset mass


def test_twin_exact_hypergradient_matches_central_finite_differences(twin):
    problem, w0, _ = twin
    objective = jax.jit(lambda w: bj.leader_objective(problem, w))
    grad, _ = jax.jit(lambda w: bj.hypergradient(problem, w, "exact", validate=False))(w0)
    grad = np.asarray(grad)
    eps = 1e-5
    fd = np.array([(objective(w0 + eps * e) - objective(w0 - eps * e)) / (2 * eps)
                   for e in np.eye(4)])
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6)
    # tau acts through the kernel and VAT through the rewards: both components are large
    assert np.all(np.abs(grad) > 0.1), grad


def test_twin_leader_value_matches_the_continuous_economy(twin):
    """The twin's soft-optimal policy, read off the bin of the continuous assets, in the
    continuous economy: its discounted welfare (1,000 episodes x 80 steps; 0.9^80 = 2e-4 of the
    return is cut) is within 10% + 4 SE of the twin's `f(x, xi)`. The gap is the binning
    (6% measured at 21 bins, 2.5% at 41)."""
    from bilevel_jax.problem import context_objective, solve_follower

    problem, w0, _ = twin
    simulator, _ = td.tax_design_problem(dtype=jnp.float64)
    actions = td.joint_actions()
    context = problem.context(0)
    num_envs, num_steps = 1_000, 80

    @jax.jit
    def values(key):
        _, sol = solve_follower(problem, w0, context)
        value = context_objective(problem, w0, context)
        params = simulator.env_params(w0, context)
        env = simulator.env
        log_pi = jnp.log(sol.policy)
        k_reset, k_run = jax.random.split(key)
        _, state = jax.vmap(env.reset_env, (0, None))(jax.random.split(k_reset, num_envs), params)

        def step(carry, key):
            state, ret, disc = carry
            k_act, k_env = jax.random.split(key)
            index = jax.random.categorical(k_act, log_pi[td.asset_bin(state.assets, N_BINS)])
            action = actions[index]
            welfare = jax.vmap(td.social_welfare, (None, 0, 0))(params, state.assets, action)
            _, state, _, _, _ = jax.vmap(env.step_env, (0, 0, 0, None))(
                jax.random.split(k_env, num_envs), state, action, params)
            return (state, ret + disc * welfare, disc * simulator.leader_discount), None

        init = (state, jnp.zeros(num_envs), jnp.ones(()))
        (_, ret, _), _ = jax.lax.scan(step, init, jax.random.split(k_run, num_steps))
        return value, ret.mean(), ret.std() / jnp.sqrt(num_envs)

    value, mc, se = (float(v) for v in values(jax.random.key(4)))
    assert abs(mc - value) <= 0.1 * abs(value) + SE * se, (value, mc, se)


# ---------------------------------------------------------------- the rates as run metrics

def test_rate_metrics_are_the_rates_of_the_iterate_each_step_starts_from(twin):
    """`with_leader_metrics` records `2 sigmoid(w)` (NumPy here) of the `w` the step's gradient is
    taken at: iteration 0 holds the initial 0.3 rates, iteration 1 those of the updated `w`."""
    import optax

    from bilevel_jax.algorithms.base import with_leader_metrics
    from bilevel_jax.runner.problems.tax_design import tax_rate_metrics

    problem, w0, _ = twin
    from bilevel_jax.algorithms.ascent import hypergradient_ascent

    algorithm = with_leader_metrics(hypergradient_ascent("exact", optax.sgd(0.05)),
                                    tax_rate_metrics)
    step = jax.jit(algorithm.step)
    state = algorithm.init(problem, w0, jax.random.key(0))
    names = ("income_tax", "vat_1", "vat_2", "vat_3")
    for iteration in range(2):
        w = np.asarray(state["x"], float)
        state, metrics = step(problem, state)
        for name, rate in zip(names, 2.0 / (1.0 + np.exp(-w))):
            np.testing.assert_allclose(metrics[name], rate, rtol=1e-6)
        assert np.isfinite(metrics["objective"])
        if iteration == 0:
            np.testing.assert_allclose([metrics[n] for n in names], 0.3, rtol=1e-6)
    assert not np.allclose(np.asarray(state["x"]), np.asarray(w0), atol=1e-3)


def test_runner_writes_the_tax_rates_of_every_iteration(tmp_path):
    import csv

    from bilevel_jax import cli

    path = tmp_path / "twin.yaml"
    path.write_text("problem: {name: tax_design_tabular, num_asset_bins: 5}\n"
                    "estimator: {name: exact}\n"
                    "algorithm: {name: ascent}\n"
                    "optimizer: {name: sgd, learning_rate: 0.05}\n"
                    "iterations: 3\nchunk_size: 3\noutput: {plots: false}\n")
    out = tmp_path / "run"
    assert cli.main(["run", str(path), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2]
    rates = np.array([[float(r[n]) for n in ("income_tax", "vat_1", "vat_2", "vat_3")]
                      for r in rows])
    np.testing.assert_allclose(rates[0], 0.3, rtol=1e-6)
    assert np.all(np.abs(rates[2] - rates[0]) > 1e-4), rates     # every rate moved
    import json
    summary = json.load(open(out / "summary.json"))
    assert {"income_tax", "vat_1", "vat_2", "vat_3"} <= set(summary["metrics"])


def test_model_free_hpgd_on_the_twin_as_a_simulator_points_along_the_exact_gradient():
    """Model-free HPGD (the single-batch form with learned critics, the exact soft-optimal
    household `soft_vi_tabular`) on `as_simulator` of the 21-bin twin: no model reaches the
    estimator; the income tax acts through the score term of the binned kernel, the VAT through
    the rewards. After 20 warm-started outer steps at w0, the mean of the next 30 estimates has
    cosine >= 0.9 with the exact hypergradient (measured 0.997) and every component within
    SE standard errors of it (the estimates are noisy: the income tax's score term has a std of
    about 15 against a gradient of 9.6), and it is closer to exact than to the policy-fixed
    gradient (`naive`, no response term) in the VAT rates."""
    problem, w0 = td.tax_design_tabular(N_BINS)
    exact = np.asarray(jax.jit(lambda w: bj.hypergradient(problem, w, "exact",
                                                          validate=False)[0])(w0))
    naive = np.asarray(jax.jit(lambda w: bj.hypergradient(problem, w, "naive",
                                                          validate=False)[0])(w0))
    simulator = bj.as_simulator(problem)
    estimator = bj.make_estimator("hpgd", learner="soft_vi_tabular", critic_steps=10,
                                  num_envs=64, num_steps=64, critic_hidden=(32,),
                                  estimate_variance=False)
    step = jax.jit(lambda state, key: estimator.update(simulator, w0, state, key)[:2])
    state = jax.jit(estimator.init)(simulator, w0)
    estimates = []
    for key in jax.random.split(jax.random.key(1), 50):
        grad, state = step(state, key)
        estimates.append(np.asarray(grad))
    estimates = np.array(estimates[20:])
    mean = estimates.mean(axis=0)
    se = estimates.std(axis=0, ddof=1) / np.sqrt(len(estimates))
    cos = mean @ exact / (np.linalg.norm(mean) * np.linalg.norm(exact))
    print(f"twin as a simulator: cos {cos:.4f}; exact {exact} naive {naive} mean {mean} se {se}")
    assert cos >= 0.9, (cos, mean, exact)
    assert np.all(np.abs(mean - exact) <= SE * se), (mean, exact, se)
    # The check has power: without the household's response (naive) the VAT gradients have the
    # other sign (measured: +0.19, +0.24, +0.13 against -0.75, -1.08, -0.27).
    vat = slice(1, None)
    assert (np.linalg.norm(mean[vat] - exact[vat])
            < np.linalg.norm(mean[vat] - naive[vat])), (mean, exact, naive)


def test_branching_hpgd_on_the_twin_as_a_simulator_matches_exact_past_the_optimum():
    """The branching form of model-free HPGD (`unbiased=True, unbiased_form="plain"`: paired
    branch rollouts of 50 steps with common random numbers; the exact soft-optimal household
    `soft_vi_tabular`) on `as_simulator` of the 21-bin twin at lam = 0.3, at the initial taxes
    and at an income tax of 0.76 (past the twin's optimum of about 0.6, where the exact
    income-tax gradient is large and negative): the mean of 40 estimates has cosine >= 0.9 with
    the exact hypergradient and every component within SE standard errors, at both points. (The
    single-batch form's learned critic over the 1,250 joint actions is biased here: at 41 bins
    it gives +16.5 +- 1.0 against exact +7.0 at the initial taxes and VAT gradients of the wrong
    sign; benchmarks/tax_design_bias.py.)"""
    problem, w0 = td.tax_design_tabular(N_BINS, temperature=0.3)
    rates = np.array([[0.3, 0.3, 0.3, 0.3], [0.76, 0.3, 0.3, 0.3]])
    points = jnp.asarray(np.log(rates / 2) - np.log1p(-rates / 2), w0.dtype)
    exact = np.asarray(jax.jit(jax.vmap(
        lambda w: bj.hypergradient(problem, w, "exact", validate=False)[0]))(points))
    simulator = bj.as_simulator(problem)
    estimator = bj.make_estimator("hpgd", learner="soft_vi_tabular", unbiased=True,
                                  unbiased_form="plain", horizon=50, samples_per_trajectory=4,
                                  num_envs=32, num_steps=64, estimate_variance=False)
    count = 40

    def estimates(w, key):
        def body(state, k):
            grad, state = estimator.update(simulator, w, state, k)[:2]
            return state, grad
        return jax.lax.scan(body, estimator.init(simulator, w), jax.random.split(key, count))[1]

    grads = np.asarray(jax.jit(jax.vmap(estimates))(points, jax.random.split(
        jax.random.key(5), 2)))                                            # [2, count, 4]
    for g, ex, r in zip(grads, exact, rates):
        mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(count)
        cos = mean @ ex / (np.linalg.norm(mean) * np.linalg.norm(ex))
        print(f"income tax {r[0]}: cos {cos:.4f}; exact {ex} mean {mean} se {se}")
        assert cos >= 0.9, (r, cos, mean, ex)
        assert np.all(np.abs(mean - ex) <= SE * se), (r, mean, ex, se)
    # The two points' income-tax gradients have opposite signs: the check sees the optimum.
    assert exact[0, 0] > 0 > exact[1, 0]
