"""Model-free zero-order on simulator problems (`bj.sim.as_simulator` of a random tabular problem,
the exact soft-optimal follower `soft_vi_tabular`) against the same estimator with exact `F`.

Both forms draw the directions `z` from the key the same way, so for the same keys they take
the forward difference along the same `z` at the same `u`: the sample-`F` estimate minus the
exact-`F` one (`bj.hypergradient(tabular, x, "zero_order")`, `values="model"`) is pure rollout
noise, with mean zero (up to the window's cut `gammabar^num_steps`, 3e-5 here). Its spread
checks the standard errors reported in `info`.

Speed: 5 states, 3 actions, two contexts; each batch of estimates is one jitted `vmap`; the
statistical batches use `unsafe_rbg` keys (faster compiles), the jit/vmap equality threefry's.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax.envs.random_mdp import random_bilevel_problem

SE = 4.0
NUM_ESTIMATES = 200
SMOOTHING = 0.5

_PROBLEM, _X = random_bilevel_problem(1, num_states=5, num_actions=3, dim_x=3, num_contexts=2,
                                      temperature=0.5)
_SIMULATOR = bj.sim.as_simulator(_PROBLEM)
_OPTIONS = dict(smoothing=SMOOTHING, num_envs=64, num_steps=100)
SAMPLE = bj.make_estimator("zero_order", learner="soft_vi_tabular", **_OPTIONS)
EXACT = bj.make_estimator("zero_order", values="model", smoothing=SMOOTHING)


def _keys(seed, n=NUM_ESTIMATES, impl="unsafe_rbg"):
    return jax.random.split(jax.random.key(seed, impl=impl), n)


@functools.lru_cache(maxsize=None)
def _batch(estimator):
    """`(problem, keys) -> (grads [n, D], infos)`: one jitted vmap of `bj.hypergradient`."""
    def one(problem, k):
        grad, info = bj.hypergradient(problem, _X, estimator, key=k, validate=False)
        info.pop("state")
        return grad, info
    return jax.jit(jax.vmap(one, (None, 0)))


@functools.lru_cache(maxsize=1)
def _paired(seed=0):
    """Sample-F and exact-F estimates for the same keys (same directions)."""
    keys = _keys(seed)
    g_s, info_s = _batch(SAMPLE)(_SIMULATOR, keys)
    g_e, info_e = _batch(EXACT)(_PROBLEM, keys)
    return (np.asarray(g_s), jax.tree_util.tree_map(np.asarray, info_s), np.asarray(g_e),
            jax.tree_util.tree_map(np.asarray, info_e))


def test_sample_zero_order_is_the_smoothed_finite_difference_along_the_same_directions():
    g_s, _, g_e, _ = _paired()
    error = g_s - g_e
    se = error.std(0, ddof=1) / np.sqrt(len(error))
    mean_e = g_e.mean(0)
    print(f"mean sample {g_s.mean(0)} mean exact-F {mean_e} mean error {error.mean(0)} se {se}")
    # The comparison has power: the noise floor is well below the estimate it checks.
    assert np.linalg.norm(se) < 0.1 * np.linalg.norm(mean_e), (se, mean_e)
    assert np.all(np.abs(error.mean(0)) <= SE * se), (error.mean(0), se)
    # Not trivially equal either: the rollouts do add noise.
    assert np.all(se > 0)


def test_reported_standard_errors_match_the_spread():
    g_s, info_s, g_e, info_e = _paired()
    # F(x): the exact value is the same for every key.
    f_exact = info_e["objective"][0]
    f_hat, f_se = info_s["objective"], info_s["objective_se"]
    spread = f_hat.std(ddof=1)
    rms_se = np.sqrt(np.mean(f_se ** 2))
    print(f"F {f_exact:.5f}: mean estimate {f_hat.mean():.5f}, spread {spread:.5f}, "
          f"reported SE {rms_se:.5f}")
    assert abs(f_hat.mean() - f_exact) <= SE * spread / np.sqrt(len(f_hat))
    assert 0.8 <= spread / rms_se <= 1.25, (spread, rms_se)
    # The gradient's rollout noise given z: standardized errors have unit spread.
    standardized = (g_s - g_e) / np.sqrt(info_s["rollout_variance"])
    ratio = standardized.std(ddof=1)
    print(f"standardized gradient error: spread {ratio:.3f}")
    assert 0.8 <= ratio <= 1.25, ratio
    # With one direction the difference's SE is the rollout SE of g along z, |g| = |d| |z| / u.
    np.testing.assert_allclose(np.sqrt(info_s["rollout_variance"]).sum(1),
                               info_s["difference_se"] * np.abs(g_s).sum(1)
                               / np.abs(info_s["difference"]), rtol=1e-6)


def test_jit_vmap_warm_and_fresh_followers_and_the_decay():
    keys = _keys(3, 2, impl="threefry2x32")
    batched, _ = _batch(SAMPLE)(_SIMULATOR, keys)      # vmapped bj.hypergradient (fresh state)

    # Warm: two learner states per context (at x and at x + u z); fresh: only the first. With
    # the exact follower both give the same estimate, and u_t = c / t decays with the steps.
    fresh = bj.make_estimator("zero_order", learner="soft_vi_tabular", shifted="fresh",
                              **_OPTIONS)
    step = jax.jit(lambda est_state, k, est: est.update(_SIMULATOR, _X, est_state, k),
                   static_argnums=2)
    state_w, state_f = SAMPLE.init(_SIMULATOR, _X), fresh.init(_SIMULATOR, _X)
    assert set(state_w["learners"]) == {"learner", "shifted"}
    assert set(state_f["learners"]) == {"learner"}
    assert state_w["learners"]["shifted"].q.shape == (2, 1, 5, 3)      # [K, J, S, A]
    for t, k in enumerate(keys, start=1):
        g_w, state_w, info_w = step(state_w, k, SAMPLE)
        g_f, state_f, info_f = step(state_f, k, fresh)
        if t == 1:      # jit of one update from the initial state = that member of the vmap
            np.testing.assert_allclose(g_w, batched[0], rtol=1e-9, atol=1e-12)
            assert not np.allclose(batched[0], batched[1])
        assert float(info_w["smoothing"]) == pytest.approx(SMOOTHING / t)
        np.testing.assert_allclose(g_w, g_f, rtol=1e-5, atol=1e-8)
        assert bool(info_w["learner_finite"]) and bool(info_f["learner_finite"])
    assert int(state_w["step"]) == len(keys)
    assert int(info_w["samples"]) == 2 * 2 * 64 * 100


def test_simulator_zero_order_options_are_checked():
    with pytest.raises(bj.InvalidArgumentError, match="shifted"):
        bj.make_estimator("zero_order", shifted="cold")
    with pytest.raises(bj.InvalidArgumentError, match="learner"):
        bj.hypergradient(_SIMULATOR, _X, "zero_order", learner="no_such_learner")
    with pytest.raises(bj.InvalidArgumentError, match="learner_options"):
        bj.make_estimator("zero_order", learner_options=[1])
    with pytest.raises(bj.InvalidArgumentError, match="num_envs"):
        bj.make_estimator("zero_order", num_envs=0)
