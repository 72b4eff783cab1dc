"""Soft/hard value iteration, policy evaluation and visitation against the NumPy reference (x64),
plus float32 stability at low temperature."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
import reference as ref
from helpers import assert_rel_close, soft_vi, to_mdp, value_iteration, visitation

S, A, B = 7, 3, 3


def make_ref(seed, *, terminal, sparse, discount=0.9, **kwargs):
    rng = np.random.default_rng(seed)
    return ref.random_mdp(rng, S, A, discount=discount, num_terminal=2 if terminal else 0,
                          branching=B if sparse else None, **kwargs)


# ----------------------------------------------------------------------------------------------
# Soft value iteration
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("terminal", [False, True], ids=["noterm", "term"])
@pytest.mark.parametrize("temperature", [1.0, 0.1, 0.003])
def test_soft_vi_matches_reference(temperature, terminal, sparse):
    r = make_ref(10, terminal=terminal, sparse=sparse, discount=0.95)
    mdp = to_mdp(r, sparse=sparse)
    sol = soft_vi(mdp, temperature)
    q, v, pi = ref.soft_value_iteration(r.P, r.rewards, r.discount, temperature, r.terminal)
    assert sol.q.dtype == jnp.float64
    assert_rel_close(sol.q, q)
    assert_rel_close(sol.v, v)
    assert_rel_close(sol.policy, pi)
    np.testing.assert_allclose(np.sum(sol.policy, -1), 1.0, atol=1e-12)
    assert float(sol.residual) <= 1e-10 * max(1.0, float(np.max(np.abs(q))))
    assert 0 < int(sol.num_iters) < 100_000


def test_soft_vi_gamma_099_with_terminal_zero_rows():
    # Terminal rows may be all zero (the episode ends; P is never used there).
    r = make_ref(11, terminal=True, sparse=False, discount=0.99, zero_terminal_rows=True)
    bj.validate_mdp(to_mdp(r))
    sol = soft_vi(to_mdp(r), 0.2)
    q, v, pi = ref.soft_value_iteration(r.P, r.rewards, r.discount, 0.2, r.terminal)
    assert_rel_close(sol.q, q)
    assert_rel_close(sol.v, v)
    assert_rel_close(sol.policy, pi)


def test_terminal_states_earn_reward_and_stop():
    # In a terminal state Q(s, a) = r(s, a) exactly, whatever the successors.
    r = make_ref(12, terminal=True, sparse=False)
    sol = soft_vi(to_mdp(r), 0.5)
    np.testing.assert_allclose(np.asarray(sol.q)[r.terminal], r.rewards[r.terminal], rtol=1e-12)
    assert not np.allclose(np.asarray(sol.q)[~r.terminal], r.rewards[~r.terminal])


def test_sparse_repeated_indices_add_up():
    r = make_ref(13, terminal=True, sparse=True, duplicate_indices=True)
    assert any(len(set(row)) < B for row in r.indices.reshape(-1, B)), "need a repeated index"
    sol = soft_vi(to_mdp(r, sparse=True), 0.3)
    q, v, pi = ref.soft_value_iteration(r.P, r.rewards, r.discount, 0.3, r.terminal)
    assert_rel_close(sol.q, q)
    assert_rel_close(sol.policy, pi)


def test_sparse_from_dense_roundtrip():
    r = make_ref(14, terminal=False, sparse=True)
    sparse = bj.SparseTransitions.from_dense(r.P)
    assert sparse.indices.shape == (S, A, B)
    np.testing.assert_allclose(np.asarray(sparse.todense()), r.P, rtol=0, atol=1e-15)
    wider = bj.SparseTransitions.from_dense(r.P, branching=B + 2)
    np.testing.assert_allclose(np.asarray(wider.todense()), r.P, rtol=0, atol=1e-15)
    with pytest.raises(bj.InvalidMDPError, match="transitions"):
        bj.SparseTransitions.from_dense(r.P, branching=B - 1)
    # Solutions from the converted kernel match the reference too.
    mdp = to_mdp(r).replace(transitions=sparse)
    q, _, _ = ref.soft_value_iteration(r.P, r.rewards, r.discount, 0.5, None)
    assert_rel_close(soft_vi(mdp, 0.5).q, q)


@pytest.mark.parametrize("init", ["zeros", "far"])
def test_fixed_num_sweeps_are_plain_bellman_sweeps(init):
    r = make_ref(15, terminal=True, sparse=False)
    init_q = np.zeros((S, A)) if init == "zeros" else np.full((S, A), 50.0)
    sol = soft_vi(to_mdp(r), 0.4, init_q=jnp.asarray(init_q), num_sweeps=7)
    expected = ref.soft_sweeps(r.P, r.rewards, r.discount, 0.4, r.terminal, num_sweeps=7,
                               init_q=init_q)
    assert int(sol.num_iters) == 7
    assert_rel_close(sol.q, expected, rtol=1e-12)
    assert_rel_close(sol.v, ref.soft_v(expected, 0.4), rtol=1e-12)


def test_warm_start_converges_to_same_fixed_point_in_fewer_sweeps():
    r = make_ref(16, terminal=False, sparse=False)
    mdp = to_mdp(r)
    cold = soft_vi(mdp, 0.5)
    warm = soft_vi(mdp, 0.5, init_q=cold.q + 1e-6)
    far = soft_vi(mdp, 0.5, init_q=jnp.full((S, A), -1e3, dtype=jnp.float64))
    q, _, _ = ref.soft_value_iteration(r.P, r.rewards, r.discount, 0.5, None)
    for sol in (cold, warm, far):
        assert_rel_close(sol.q, q)
    assert int(warm.num_iters) < int(cold.num_iters) < int(far.num_iters)


@pytest.mark.parametrize("terminal", [False, True], ids=["noterm", "term"])
def test_hard_value_iteration_matches_reference(terminal):
    r = make_ref(17, terminal=terminal, sparse=False)
    sol = value_iteration(to_mdp(r))
    q, v, pi = ref.value_iteration(r.P, r.rewards, r.discount, r.terminal)
    assert_rel_close(sol.q, q)
    assert_rel_close(sol.v, v)
    np.testing.assert_array_equal(np.asarray(sol.policy), pi)


def test_hard_value_iteration_sparse():
    r = make_ref(18, terminal=True, sparse=True)
    sol = value_iteration(to_mdp(r, sparse=True))
    q, v, pi = ref.value_iteration(r.P, r.rewards, r.discount, r.terminal)
    assert_rel_close(sol.q, q)
    np.testing.assert_array_equal(np.asarray(sol.policy), pi)


def test_soft_values_approach_hard_values_as_temperature_vanishes():
    # 0 <= V*_lam - V*_0 <= lam log(A) / (1 - gamma) (entropy is at most log A per step).
    r = make_ref(19, terminal=True, sparse=False)
    _, v_hard, _ = ref.value_iteration(r.P, r.rewards, r.discount, r.terminal)
    for lam in (0.1, 0.01, 0.001):
        v = np.asarray(soft_vi(to_mdp(r), lam).v)
        gap = v - v_hard
        assert np.all(gap >= -1e-9)
        assert np.all(gap <= lam * np.log(A) / (1 - r.discount) + 1e-9)


# ----------------------------------------------------------------------------------------------
# Policy evaluation and visitation, every linear solver
# ----------------------------------------------------------------------------------------------

def random_policy(seed, zero_some=True):
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(A), size=S)
    if zero_some:   # exercise 0 log 0 = 0 in the entropy bonus
        pi[0] = np.eye(A)[1]
        pi[2, 0] = 0.0
        pi[2] /= pi[2].sum()
    return pi


@partial(jax.jit, static_argnames="method")
def evaluate_and_visit(mdp, pi, method, lam):
    """Policy evaluation (temperature `lam`, traced) and visitation: one compilation per method
    (always call it with positional arguments so that the compilations are shared)."""
    return bj.policy_evaluation(mdp, pi, lam, linear_solver=method), bj.visitation(
        mdp, pi, linear_solver=method)


@pytest.mark.parametrize("method, sparse", [
    ("auto", False), ("direct", False), ("richardson", False), ("gmres", False),
    ("direct", True), ("richardson", True), ("gmres", True)])
def test_policy_evaluation_and_visitation_match_reference(method, sparse):
    r = make_ref(20, terminal=True, sparse=sparse, discount=0.95)
    mdp = to_mdp(r, sparse=sparse)
    pi = random_policy(21)
    for lam in (0.0, 0.7):
        out, d = evaluate_and_visit(mdp, jnp.asarray(pi), method, lam)
        q, v = ref.policy_evaluation(r.P, r.rewards, r.discount, pi, lam, r.terminal)
        assert_rel_close(out.v, v, err_msg=f"lam={lam}")
        assert_rel_close(out.q, q, err_msg=f"lam={lam}")
    assert_rel_close(d, ref.visitation(r.P, r.discount, pi, r.initial, r.terminal))


def test_visitation_without_terminal_sums_to_effective_horizon():
    r = make_ref(24, terminal=False, sparse=False, discount=0.8)
    pi = random_policy(25, zero_some=False)
    d = np.asarray(visitation(to_mdp(r), jnp.asarray(pi)))
    assert_rel_close(d, ref.visitation(r.P, r.discount, pi, r.initial))
    np.testing.assert_allclose(d.sum(), 1.0 / (1.0 - r.discount), rtol=1e-10)


def test_evaluating_the_soft_optimal_policy_gives_the_soft_optimal_values():
    # SPEC 2: V*_lam is the entropy-regularized value of pi*_lam.
    r = make_ref(26, terminal=True, sparse=False)
    lam = 0.3
    _, v_star, pi_star = ref.soft_value_iteration(r.P, r.rewards, r.discount, lam, r.terminal)
    out, _ = evaluate_and_visit(to_mdp(r), jnp.asarray(pi_star), "auto", lam)
    assert_rel_close(out.v, v_star)


def test_visitation_expectation_identity():
    # E[sum_t gamma^t g(s_t, a_t)] = sum_s d(s) sum_a pi(a|s) g(s, a) = mu . V_g.
    r = make_ref(27, terminal=True, sparse=False)
    pi = random_policy(28, zero_some=False)
    g = np.random.default_rng(29).normal(size=(S, A))
    d = np.asarray(evaluate_and_visit(to_mdp(r), jnp.asarray(pi), "auto", 0.0)[1])
    _, v_g = ref.policy_evaluation(r.P, g, r.discount, pi, 0.0, r.terminal)
    np.testing.assert_allclose(np.sum(d * np.sum(pi * g, -1)), r.initial @ v_g, rtol=1e-9)


def test_linear_solver_options_and_bad_method():
    r = make_ref(30, terminal=True, sparse=False)
    pi = random_policy(31)
    expected = ref.visitation(r.P, r.discount, pi, r.initial, r.terminal)
    opts = bj.LinearSolverOptions(method="richardson", tol=1e-13)
    assert_rel_close(visitation(to_mdp(r), jnp.asarray(pi), linear_solver=opts), expected)
    # A Richardson solve capped at 3 sweeps is visibly inexact: the options are honoured.
    capped = bj.LinearSolverOptions(method="richardson", max_iters=3)
    assert np.max(np.abs(np.asarray(visitation(to_mdp(r), jnp.asarray(pi), linear_solver=capped))
                         - expected)) > 1e-3
    with pytest.raises(ValueError, match="method"):
        bj.visitation(to_mdp(r), jnp.asarray(pi), linear_solver="cholesky")


# ----------------------------------------------------------------------------------------------
# float32 stability at low temperature
# ----------------------------------------------------------------------------------------------

@jax.jit
def _float32_pipeline(mdp):
    """Soft VI at lam = 1e-3, evaluation and visitation of its policy, and the implicit
    gradient of mu . V* w.r.t. the rewards: one compilation for the float32 tests."""
    lam = 1e-3
    sol = bj.soft_value_iteration(mdp, lam)
    v_eval = bj.policy_evaluation(mdp, sol.policy, lam).v
    d = bj.visitation(mdp, sol.policy)
    grad = jax.grad(lambda rw: jnp.dot(
        mdp.initial, bj.soft_value_iteration(mdp.replace(rewards=rw), lam).v))(mdp.rewards)
    return sol, v_eval, d, grad


def _float32_mdp(seed, reward_shift=0.0):
    r = ref.random_mdp(np.random.default_rng(seed), 10, 4, discount=0.99, num_terminal=1)
    return bj.TabularMDP(transitions=jnp.asarray(r.P, jnp.float32),
                         rewards=jnp.asarray(r.rewards + reward_shift, jnp.float32),
                         discount=0.99, initial=jnp.asarray(r.initial, jnp.float32),
                         terminal=jnp.asarray(r.terminal))


@pytest.mark.parametrize("reward_shift", [0.0, 1.0], ids=["centered", "positive"])
def test_float32_low_temperature_is_finite_and_accurate(reward_shift):
    # Rewards of order 1, gamma = 0.99, lam = 1e-3: q / lam ~ 1e5, so exp(q / lam) would overflow
    # float32; a logsumexp-stable solver stays finite and close to the float64 reference.
    lam = 1e-3
    mdp = _float32_mdp(32, reward_shift)
    terminal = np.asarray(mdp.terminal)
    # The reference uses exactly the float32 numbers, in float64.
    P64 = np.asarray(mdp.transitions, np.float64)
    r64 = np.asarray(mdp.rewards, np.float64)
    mu64 = np.asarray(mdp.initial, np.float64)
    sol, v_eval, d, grad = _float32_pipeline(mdp)
    for x in (sol.q, sol.v, sol.policy, v_eval, d, grad):
        assert x.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(x)))
    q, v, pi = ref.soft_value_iteration(P64, r64, 0.99, lam, terminal)
    assert_rel_close(sol.q, q, rtol=1e-3, atol_scale=1e-4)
    assert_rel_close(sol.v, v, rtol=1e-3, atol_scale=1e-4)
    # pi = softmax(q / lam): a float32 error of 1e-5 in q moves pi by ~1e-2 at lam = 1e-3.
    np.testing.assert_allclose(np.asarray(sol.policy), pi, atol=2e-2)
    np.testing.assert_allclose(np.sum(np.asarray(sol.policy), -1), 1.0, atol=1e-5)

    # Evaluation and visitation of the computed policy, against the reference in float64.
    pi32 = np.asarray(sol.policy, np.float64)
    _, v_e = ref.policy_evaluation(P64, r64, 0.99, pi32, lam, terminal)
    assert_rel_close(v_eval, v_e, rtol=1e-3, atol_scale=1e-4)
    assert_rel_close(d, ref.visitation(P64, 0.99, pi32, mu64, terminal), rtol=1e-3,
                     atol_scale=1e-4)
    # d(mu . V*)/dr(s, a) = d*(s) pi*(a|s) (envelope theorem), in float64.
    g_ref = ref.visitation(P64, 0.99, pi, mu64, terminal)[:, None] * pi
    np.testing.assert_allclose(np.asarray(grad), g_ref, atol=2e-2 * np.max(g_ref))
