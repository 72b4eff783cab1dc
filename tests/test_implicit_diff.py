"""Derivatives of the soft value iteration solution (SPEC 4) and of evaluation/visitation.

Every derivative is checked against central finite differences of the independent NumPy
reference (x64, eps = 1e-5, relative 1e-6), and the implicit derivative is also checked against
autodiff through many unrolled sweeps. The objective `mu . v + sum(pi * W)` (fixed random `W`)
exercises the derivative of the policy, not only the envelope-theorem part.
"""

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
import reference as ref
from helpers import assert_rel_close, soft_vi

S, A, B = 5, 3, 3
GAMMA = 0.9
LAM = 0.5
EPS = 1e-5
TERMINAL = np.array([False, False, False, True, False])
SOLVERS = ["direct", "richardson", "gmres"]

_rng = np.random.default_rng(1234)
REWARDS = _rng.uniform(-1, 1, size=(S, A))
LOGITS = _rng.normal(size=(S, A, S))
INITIAL = _rng.dirichlet(np.ones(S))
W = _rng.normal(size=(S, A))           # weights of the policy term of the objective
SPARSE_INDICES = np.stack([[_rng.choice(S, size=B, replace=False) for _ in range(A)]
                           for _ in range(S)])
SPARSE_LOGITS = _rng.normal(size=(S, A, B))
EVAL_C = _rng.normal(size=S)
EVAL_POLICY_LOGITS = _rng.normal(size=(S, A))

N_R, N_L, N_MU = S * A, S * A * S, S
ZEROS_Q = jnp.zeros((S, A))


# ----------------------------------------------------------------------------------------------
# The library side
# ----------------------------------------------------------------------------------------------

def build_mdp(rewards, logits, initial, discount=GAMMA):
    return bj.TabularMDP(transitions=jax.nn.softmax(logits, axis=-1), rewards=rewards,
                         discount=discount, initial=initial, terminal=jnp.asarray(TERMINAL))


def objective_from(sol, initial):
    return jnp.dot(initial, sol.v) + jnp.sum(sol.policy * W)


def dense_objective(rewards, logits, initial, init_q, *, linear_solver="direct",
                    differentiation="implicit", num_sweeps=None):
    sol = bj.soft_value_iteration(build_mdp(rewards, logits, initial), LAM, init_q=init_q,
                                  differentiation=differentiation, num_sweeps=num_sweeps,
                                  linear_solver=linear_solver)
    return objective_from(sol, initial)


def sparse_objective(rewards, sparse_logits, initial, *, linear_solver):
    transitions = bj.SparseTransitions(indices=jnp.asarray(SPARSE_INDICES, jnp.int32),
                                       probs=jax.nn.softmax(sparse_logits, axis=-1))
    mdp = bj.TabularMDP(transitions=transitions, rewards=rewards, discount=GAMMA,
                        initial=initial, terminal=jnp.asarray(TERMINAL))
    return objective_from(bj.soft_value_iteration(mdp, LAM, linear_solver=linear_solver), initial)


def evaluation_objective(pol_logits, rewards, logits, *, linear_solver):
    """`mu . V^pi_lam + sum_s d(s) c(s)` of a softmax policy."""
    mdp = build_mdp(rewards, logits, jnp.asarray(INITIAL))
    pi = jax.nn.softmax(pol_logits, axis=-1)
    v = bj.policy_evaluation(mdp, pi, LAM, linear_solver=linear_solver).v
    d = bj.visitation(mdp, pi, linear_solver=linear_solver)
    return jnp.dot(mdp.initial, v) + jnp.dot(d, EVAL_C)


@lru_cache(maxsize=None)
def solver_grad_fn(linear_solver):
    """One jitted function (one compilation) per linear solver computing the gradients of the
    dense objective (w.r.t. rewards, logits, initial, init_q), of the sparse objective (w.r.t.
    rewards, sparse logits, initial) and of the evaluation objective."""
    @jax.jit
    def grads(init_q):
        dense = jax.grad(dense_objective, argnums=(0, 1, 2, 3))(
            jnp.asarray(REWARDS), jnp.asarray(LOGITS), jnp.asarray(INITIAL), init_q,
            linear_solver=linear_solver)
        sparse = jax.grad(sparse_objective, argnums=(0, 1, 2))(
            jnp.asarray(REWARDS), jnp.asarray(SPARSE_LOGITS), jnp.asarray(INITIAL),
            linear_solver=linear_solver)
        evaluation = jax.grad(evaluation_objective, argnums=(0, 1, 2))(
            jnp.asarray(EVAL_POLICY_LOGITS), jnp.asarray(REWARDS), jnp.asarray(LOGITS),
            linear_solver=linear_solver)
        return dense, sparse, evaluation
    return grads


@lru_cache(maxsize=None)
def solver_grads(linear_solver):
    dense, sparse, evaluation = solver_grad_fn(linear_solver)(ZEROS_Q)
    return flat_grad(dense[:3]), flat_grad(sparse), flat_grad(evaluation)


@lru_cache(maxsize=None)
def unrolled_grad(num_sweeps):
    grad = jax.jit(jax.grad(dense_objective, argnums=(0, 1, 2)),
                   static_argnames=("differentiation", "num_sweeps"))
    return flat_grad(grad(*args(), ZEROS_Q, differentiation="unroll", num_sweeps=num_sweeps))


def flat_grad(grads):
    return np.concatenate([np.asarray(g).reshape(-1) for g in grads])


def args():
    return jnp.asarray(REWARDS), jnp.asarray(LOGITS), jnp.asarray(INITIAL)


# ----------------------------------------------------------------------------------------------
# The reference side: finite differences of the NumPy implementation
# ----------------------------------------------------------------------------------------------

X0 = np.concatenate([REWARDS.reshape(-1), LOGITS.reshape(-1), INITIAL])


def ref_outputs(x, num_sweeps=None):
    """(q, v, pi, objective) as one vector, from x = (rewards, logits, initial) flattened."""
    rewards = x[:N_R].reshape(S, A)
    P = ref.softmax(x[N_R:N_R + N_L].reshape(S, A, S), axis=-1)
    initial = x[N_R + N_L:]
    if num_sweeps is None:
        q, v, pi = ref.soft_value_iteration(P, rewards, GAMMA, LAM, TERMINAL)
    else:
        q = ref.soft_sweeps(P, rewards, GAMMA, LAM, TERMINAL, num_sweeps=num_sweeps)
        v, pi = ref.soft_v(q, LAM), ref.softmax(q / LAM)
    f = initial @ v + np.sum(pi * W)
    return np.concatenate([q.reshape(-1), v, pi.reshape(-1), [f]])


@pytest.fixture(scope="module")
def fd_jacobian():
    """`[S*A + S + S*A + 1, N_R + N_L + N_MU]`: rows (q, v, pi, f), columns (r, logits, mu)."""
    return ref.central_jacobian(ref_outputs, X0, eps=EPS)


@lru_cache(maxsize=None)
def sparse_fd_grad():
    def f_ref(x):
        rewards = x[:N_R].reshape(S, A)
        sparse_logits = x[N_R:N_R + S * A * B].reshape(S, A, B)
        initial = x[N_R + S * A * B:]
        P = ref.dense_from_sparse(SPARSE_INDICES, ref.softmax(sparse_logits), S)
        _, v, pi = ref.soft_value_iteration(P, rewards, GAMMA, LAM, TERMINAL)
        return np.array([initial @ v + np.sum(pi * W)])

    x0 = np.concatenate([REWARDS.reshape(-1), SPARSE_LOGITS.reshape(-1), INITIAL])
    return ref.central_jacobian(f_ref, x0, eps=EPS)[0]


@lru_cache(maxsize=None)
def evaluation_fd_grad():
    def g_ref(x):
        pi = ref.softmax(x[:S * A].reshape(S, A))
        rewards = x[S * A:2 * S * A].reshape(S, A)
        P = ref.softmax(x[2 * S * A:].reshape(S, A, S))
        _, v = ref.policy_evaluation(P, rewards, GAMMA, pi, LAM, TERMINAL)
        d = ref.visitation(P, GAMMA, pi, INITIAL, TERMINAL)
        return np.array([INITIAL @ v + d @ EVAL_C])

    x0 = np.concatenate([EVAL_POLICY_LOGITS.reshape(-1), REWARDS.reshape(-1), LOGITS.reshape(-1)])
    return ref.central_jacobian(g_ref, x0, eps=EPS)[0]


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

def test_reference_fd_is_sane(fd_jacobian):
    # Independent closed form for one block: d(mu . v*)/dr = d(s) pi*(a|s) (envelope theorem).
    P = ref.softmax(LOGITS, axis=-1)
    _, _, pi = ref.soft_value_iteration(P, REWARDS, GAMMA, LAM, TERMINAL)
    d = ref.visitation(P, GAMMA, pi, INITIAL, TERMINAL)
    v_rows = slice(S * A, S * A + S)
    dv_dr = INITIAL @ fd_jacobian[v_rows, :N_R]
    np.testing.assert_allclose(dv_dr, (d[:, None] * pi).reshape(-1), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("linear_solver", SOLVERS)
def test_implicit_grad_matches_finite_differences(fd_jacobian, linear_solver):
    grad = solver_grads(linear_solver)[0]
    expected = fd_jacobian[-1]
    assert_rel_close(grad, expected, rtol=1e-6, atol_scale=1e-8)
    # The policy term matters: the reward gradient is not just the envelope term d(s) pi(a|s).
    envelope = INITIAL @ fd_jacobian[S * A:S * A + S, :N_R]
    assert np.max(np.abs(grad[:N_R] - envelope)) > 1e-2


@pytest.mark.parametrize("linear_solver", SOLVERS)
def test_sparse_grad_wrt_probs_matches_finite_differences(linear_solver):
    assert_rel_close(solver_grads(linear_solver)[1], sparse_fd_grad(), rtol=1e-6,
                     atol_scale=1e-8)


@pytest.mark.parametrize("linear_solver", SOLVERS)
def test_evaluation_and_visitation_grads_match_finite_differences(linear_solver):
    assert_rel_close(solver_grads(linear_solver)[2], evaluation_fd_grad(), rtol=1e-6,
                     atol_scale=1e-8)


def test_jacfwd_matches_finite_differences(fd_jacobian):
    def outputs(rewards, logits, initial):
        sol = bj.soft_value_iteration(build_mdp(rewards, logits, initial), LAM)
        return jnp.concatenate([sol.q.reshape(-1), sol.v, sol.policy.reshape(-1),
                                objective_from(sol, initial)[None]])

    jac = jax.jit(jax.jacfwd(outputs, argnums=(0, 1, 2)))(*args())
    jac = np.concatenate([np.asarray(j).reshape(j.shape[0], -1) for j in jac], axis=1)
    assert jac.shape == fd_jacobian.shape
    assert_rel_close(jac, fd_jacobian, rtol=1e-6, atol_scale=1e-8)


def test_unrolled_sweeps_agree_with_implicit_and_fd(fd_jacobian):
    # 0.9^2000 ~ 1e-92: the unrolled iterate has converged, so its derivative is the implicit one.
    unrolled = unrolled_grad(2000)
    assert_rel_close(unrolled, fd_jacobian[-1], rtol=1e-6, atol_scale=1e-8)
    assert_rel_close(solver_grads("direct")[0], unrolled, rtol=1e-8, atol_scale=1e-10)


def test_truncated_unroll_is_the_derivative_of_the_truncated_iterate():
    expected = ref.central_jacobian(lambda x: ref_outputs(x, num_sweeps=4)[-1:], X0, eps=EPS)[0]
    unrolled = unrolled_grad(4)
    assert_rel_close(unrolled, expected, rtol=1e-6, atol_scale=1e-8)
    implicit = solver_grads("direct")[0]
    assert np.max(np.abs(unrolled - implicit)) > 1e-3 * np.max(np.abs(implicit))


def test_backward_pass_does_not_depend_on_the_forward_sweeps(fd_jacobian):
    # Cold start far from the solution (many sweeps) and a warm start at the solution (a couple
    # of sweeps) give the same gradient: the derivative is that of the fixed point, computed by
    # one linear solve, not by differentiating the sweeps. No gradient flows into init_q.
    mdp = build_mdp(*args())
    solution = soft_vi(mdp, LAM)
    far_q = jnp.full((S, A), 1e3, dtype=jnp.float64)   # not weakly typed: same compilation
    far = soft_vi(mdp, LAM, init_q=far_q)
    warm = soft_vi(mdp, LAM, init_q=solution.q)
    assert int(far.num_iters) > 100 * max(int(warm.num_iters), 1)
    g_far = solver_grad_fn("direct")(far_q)[0]
    g_warm = solver_grad_fn("direct")(solution.q)[0]
    assert_rel_close(flat_grad(g_far[:3]), flat_grad(g_warm[:3]), rtol=1e-9, atol_scale=1e-11)
    assert_rel_close(flat_grad(g_far[:3]), fd_jacobian[-1], rtol=1e-6, atol_scale=1e-8)
    for g in (g_far, g_warm):
        np.testing.assert_array_equal(np.asarray(g[3]), 0.0)


def test_grad_wrt_discount_and_temperature():
    def f(discount, lam):
        mdp = build_mdp(*args(), discount=discount)
        return objective_from(bj.soft_value_iteration(mdp, lam), jnp.asarray(INITIAL))

    def f_ref(x):
        P = ref.softmax(LOGITS, axis=-1)
        _, v, pi = ref.soft_value_iteration(P, REWARDS, x[0], x[1], TERMINAL)
        return np.array([INITIAL @ v + np.sum(pi * W)])

    expected = ref.central_jacobian(f_ref, np.array([GAMMA, LAM]), eps=EPS)[0]
    got = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(GAMMA), jnp.asarray(LAM))
    assert_rel_close(np.array([float(got[0]), float(got[1])]), expected, rtol=1e-6)


def test_hard_value_iteration_grad_matches_finite_differences():
    # Away from ties the greedy policy is locally constant and q is locally linear in (r, P).
    def f(rewards, logits):
        mdp = build_mdp(rewards, logits, jnp.asarray(INITIAL))
        sol = bj.value_iteration(mdp)
        return jnp.dot(mdp.initial, sol.v) + jnp.sum(sol.q * W)

    def f_ref(x):
        rewards = x[:N_R].reshape(S, A)
        P = ref.softmax(x[N_R:].reshape(S, A, S), axis=-1)
        q, v, _ = ref.value_iteration(P, rewards, GAMMA, TERMINAL)
        return np.array([INITIAL @ v + np.sum(q * W)])

    q, _, _ = ref.value_iteration(ref.softmax(LOGITS), REWARDS, GAMMA, TERMINAL)
    top2 = np.sort(q, axis=-1)[:, -2:]
    assert np.min(top2[:, 1] - top2[:, 0]) > 1e-3, "greedy action must be unique for this test"
    x0 = np.concatenate([REWARDS.reshape(-1), LOGITS.reshape(-1)])
    expected = ref.central_jacobian(f_ref, x0, eps=EPS)[0]
    grads = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(REWARDS), jnp.asarray(LOGITS))
    assert_rel_close(flat_grad(grads), expected, rtol=1e-6, atol_scale=1e-8)
