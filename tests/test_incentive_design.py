"""Incentive design with a zero-sum lower level (SPEC 6 "zero-sum lower level", SPEC 7.5).

The references are NumPy float64 implementations written here, independent of the library:

* the regularized Nash equilibrium by soft Shapley iteration whose stage games are solved by
  Newton-type root finding (scipy `hybr`) on the log-policy conditions (the library uses
  warm-started extragradient steps instead);
* the designer's value by a dense policy evaluation of the joint policy;
* the Nikaido-Isoda gap from soft value iteration on the induced single-agent MDPs, checked
  against an evaluation of the joint policy.

One tiny instance (`S = 3`, `A = B = 2`, `lam = 0.3`, cost `0.3`) is shared by every test, and
the jitted entry points are defined once at module level so that compilations are shared.
"""

from __future__ import annotations

import os
from functools import lru_cache

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import root

from bilevel_jax.algorithms.incentive import equilibrium_ascent, ni_pbrl
from bilevel_jax.envs.incentive_design import (
    IncentiveDesignProblem,
    check_incentive_problem,
    designer_objective,
    equilibrium_gap,
    incentive_design_problem,
    policy_objective,
    validate_incentive_problem,
)
from bilevel_jax.errors import InvalidArgumentError, InvalidMDPError
from bilevel_jax.games import GameEquilibrium, nikaido_isoda_gap, solve_game_equilibrium
from bilevel_jax.problem import InvalidProblemError
from bilevel_jax.runner.config import ConfigError, load_config, resolve_config
from bilevel_jax.runner.problems.incentive_design import make_incentive_algorithm

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                       "incentive_design")
S, A, B = 3, 2, 2
LAM, COST, GAMMA, GAMMA_BAR = 0.3, 0.3, 0.9, 0.9
EPS = 1e-4        # central differences of the gradient (Hessian check)
FD_STEP = 1e-3    # five-point differences of F: truncation ~FD_STEP^4, solver ~1e-13 / FD_STEP


def _scalars(problem: IncentiveDesignProblem) -> IncentiveDesignProblem:
    """Scalar leaves as float64 arrays (so that replacing them never retraces)."""
    as64 = lambda v: jnp.asarray(v, jnp.float64)  # noqa: E731
    return problem.replace(temperature=as64(problem.temperature), cost=as64(problem.cost),
                           designer_discount=as64(problem.designer_discount),
                           game=problem.game.replace(discount=as64(problem.game.discount)))


# The accurate instance (derivative and reference checks) and the one the algorithms run on.
_problem, X0 = incentive_design_problem(0, S, A, B, discount=GAMMA, designer_discount=GAMMA_BAR,
                                        temperature=LAM, cost=COST, inner_iters=10,
                                        solver_iters=3000, solver_tol=1e-13)
PROBLEM = _scalars(_problem)
RUN_PROBLEM = PROBLEM.replace(solver_tol=1e-10, solver_iters=1000)
X_RAND = jnp.asarray(np.random.default_rng(3).normal(size=(S, A, B)))
X_START_B = jnp.asarray(np.random.default_rng(1).normal(size=(S, A, B)))

# The same instance's arrays, as plain NumPy (the references' inputs).
NP_P = np.asarray(PROBLEM.game.transitions)
NP_R = np.asarray(PROBLEM.game.rewards)
NP_INIT = np.asarray(PROBLEM.game.initial)
NP_RBAR = np.asarray(PROBLEM.designer_reward)


def cold_start() -> GameEquilibrium:
    """A warm start equal to the solver's own cold start (zeros, uniform policies): passing one
    always keeps the jitted signature fixed."""
    z = lambda *s: jnp.zeros(s)  # noqa: E731
    return GameEquilibrium(mu_logits=z(S, A), nu_logits=z(S, B), mu_policy=z(S, A),
                           nu_policy=z(S, B), q=z(S, A, B), v=z(S), residual=z(),
                           stage_residual=z(), num_sweeps=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# Module-level jitted entry points (one compilation each)
# ----------------------------------------------------------------------------------------------

def _objective(problem, x, init):
    return designer_objective(problem, x, init=init)


# (F, eq), (dF/dproblem, dF/dx)
_VALUE_AND_GRAD = jax.jit(jax.value_and_grad(_objective, argnums=(0, 1), has_aux=True))
_GAP = jax.jit(equilibrium_gap)


def objective_and_grads(x, problem=PROBLEM, init=None):
    (value, eq), (g_problem, g_x) = _VALUE_AND_GRAD(problem, jnp.asarray(x),
                                                    cold_start() if init is None else init)
    return float(value), eq, g_problem, np.asarray(g_x)


# ----------------------------------------------------------------------------------------------
# NumPy float64 references
# ----------------------------------------------------------------------------------------------

def np_log_softmax(z):
    z = z - np.max(z, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def np_stage_game(q, lam, log_mu, log_nu):
    """The regularized stage game `min_mu max_nu mu^T q nu - lam H(mu) + lam H(nu)` (`q [A, B]`)
    by root finding (scipy `hybr`, analytic Jacobian) on the best-response conditions
    `log mu = log_softmax(-q nu / lam)`, `log nu = log_softmax(q^T mu / lam)`."""
    num_a, num_b = q.shape

    def conditions(z):
        lmu, lnu = z[:num_a], z[num_a:]
        mu, nu = np.exp(np_log_softmax(lmu)), np.exp(np_log_softmax(lnu))
        br_mu, br_nu = np_log_softmax(-q @ nu / lam), np_log_softmax(q.T @ mu / lam)
        value = np.concatenate([lmu - br_mu, lnu - br_nu])
        # d softmax = diag(p) - p p^T; d log_softmax(u) = I - 1 softmax(u)^T.
        d_mu, d_nu = np.diag(mu) - np.outer(mu, mu), np.diag(nu) - np.outer(nu, nu)
        e_mu, e_nu = np.exp(br_mu), np.exp(br_nu)
        jac = np.eye(num_a + num_b)
        jac[:num_a, num_a:] = (np.eye(num_a) - np.outer(np.ones(num_a), e_mu)) @ q @ d_nu / lam
        jac[num_a:, :num_a] = -(np.eye(num_b) - np.outer(np.ones(num_b), e_nu)) @ q.T @ d_mu / lam
        return value, jac

    sol = root(conditions, np.concatenate([log_mu, log_nu]), jac=True, method="hybr", tol=1e-15)
    assert np.max(np.abs(conditions(sol.x)[0])) < 1e-12, sol.message
    lmu, lnu = np_log_softmax(sol.x[:num_a]), np_log_softmax(sol.x[num_a:])
    mu, nu = np.exp(lmu), np.exp(lnu)
    value = mu @ q @ nu + lam * mu @ lmu - lam * nu @ lnu
    return value, lmu, lnu


def np_equilibrium(P, R, gamma, lam, max_sweeps=3000):
    """Soft Shapley iteration `V <- stage value of Q = R + gamma P V`, stage games solved exactly.

    Returns `(v [S], log mu [S, A], log nu [S, B])`."""
    num_s, num_a, num_b = R.shape
    v = np.zeros(num_s)
    lmu = np.full((num_s, num_a), -np.log(num_a))
    lnu = np.full((num_s, num_b), -np.log(num_b))
    for _ in range(max_sweeps):
        q = R + gamma * np.einsum("sabt,t->sab", P, v)
        v_new = np.empty(num_s)
        for s in range(num_s):
            v_new[s], lmu[s], lnu[s] = np_stage_game(q[s], lam, lmu[s], lnu[s])
        done = np.max(np.abs(v_new - v)) < 1e-14
        v = v_new
        if done:
            break
    else:
        raise AssertionError("reference Shapley iteration did not converge")
    return v, lmu, lnu


def np_joint_evaluation(P, reward, gamma, mu, nu):
    """`[S]` values of the joint policy `mu x nu` for a stage reward `[S, A, B]`."""
    joint = mu[:, :, None] * nu[:, None, :]
    r_pi = np.sum(joint * reward, axis=(1, 2))
    P_pi = np.einsum("sab,sabt->st", joint, P)
    return np.linalg.solve(np.eye(len(r_pi)) - gamma * P_pi, r_pi)


def np_objective(x, lam=LAM, cost=COST, gamma=GAMMA, gamma_bar=GAMMA_BAR):
    """`(F(x), v, log mu, log nu)` for the additive incentive."""
    x = np.asarray(x)
    v, lmu, lnu = np_equilibrium(NP_P, NP_R + x, gamma, lam)
    value = NP_INIT @ np_joint_evaluation(NP_P, NP_RBAR, gamma_bar, np.exp(lmu), np.exp(lnu))
    return value - cost * np.sum(x ** 2), v, lmu, lnu


def np_soft_vi(P, r, gamma, lam, sweeps=3000):
    """Soft-optimal `(V [S], pi [S, K])` of a single-agent MDP `P [S, K, S]`, `r [S, K]`."""
    q = np.zeros_like(r)
    for _ in range(sweeps):
        m = np.max(q / lam, axis=-1)
        v = lam * (m + np.log(np.sum(np.exp(q / lam - m[:, None]), axis=-1)))
        q_new = r + gamma * P @ v
        if np.max(np.abs(q_new - q)) < 1e-15:
            break
        q = q_new
    return v, np.exp(np_log_softmax(q / lam))


def np_ni_gap(x, mu_logits, nu_logits):
    """`max_nu' J(mu, nu') - min_mu' J(mu', nu)`, both best responses by soft VI on the induced
    MDPs, their values re-evaluated on the joint policy with the stage payoff
    `r + lam log mu - lam log nu` (SPEC 6)."""
    R = NP_R + np.asarray(x)
    lmu, lnu = np_log_softmax(np.asarray(mu_logits)), np_log_softmax(np.asarray(nu_logits))
    mu, nu = np.exp(lmu), np.exp(lnu)
    r_max = np.einsum("sab,sa->sb", R, mu) + LAM * np.sum(mu * lmu, -1)[:, None]
    _, br_nu = np_soft_vi(np.einsum("sabt,sa->sbt", NP_P, mu), r_max, GAMMA, LAM)
    r_min = -np.einsum("sab,sb->sa", R, nu) + LAM * np.sum(nu * lnu, -1)[:, None]
    _, br_mu = np_soft_vi(np.einsum("sabt,sb->sat", NP_P, nu), r_min, GAMMA, LAM)

    def joint_value(m, n):
        stage = R + LAM * np.log(m)[:, :, None] - LAM * np.log(n)[:, None, :]
        return NP_INIT @ np_joint_evaluation(NP_P, stage, GAMMA, m, n)

    return joint_value(mu, br_nu) - joint_value(br_mu, nu)


def assert_rel_close(actual, expected, rtol=1e-6, err_msg=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), err_msg
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-9 * scale, err_msg=err_msg)


# ----------------------------------------------------------------------------------------------
# The equilibrium and F against the references; the hypergradient against finite differences
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["zero", "random"])
def test_equilibrium_and_objective_match_numpy_reference(which):
    x = X0 if which == "zero" else X_RAND
    value, eq, _, _ = objective_and_grads(x)
    ref_value, v, lmu, lnu = np_objective(x)
    assert_rel_close(eq.v, v)
    assert_rel_close(eq.mu_policy, np.exp(lmu))
    assert_rel_close(eq.nu_policy, np.exp(lnu))
    assert_rel_close(value, ref_value)
    assert float(eq.stage_residual) < 1e-10
    # A warm start from another incentive's equilibrium reaches the same point in fewer sweeps.
    _, other, _, _ = objective_and_grads(X_RAND + 0.05 if which == "random" else X0 + 0.05)
    warm_value, warm, _, _ = objective_and_grads(x, init=other)
    assert_rel_close(warm.v, v)
    assert_rel_close(warm_value, ref_value)
    assert int(warm.num_sweeps) < int(eq.num_sweeps)


def five_point(f, h=FD_STEP):
    """Central difference with Richardson extrapolation: error `O(h^4)` (F's discount
    derivatives are large: `d^k/dgamma^k` grows like `k! / (1 - gamma)^(k+1)`)."""
    return (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)


def test_hypergradient_matches_finite_differences():
    """dF/dx (directional, 3 random directions) and dF/d(temperature, discount, designer
    discount, cost), the exact implicit derivative, vs finite differences of F."""
    x = X_RAND
    _, _, g_problem, g_x = objective_and_grads(x)
    rng = np.random.default_rng(11)
    for k in range(3):
        d = rng.normal(size=x.shape)
        fd = five_point(lambda t: objective_and_grads(x + t * d)[0])
        assert_rel_close(np.sum(g_x * d), fd, err_msg=f"direction {k}")
    fields = {
        "temperature": (g_problem.temperature, lambda p, v: p.replace(temperature=v)),
        "discount": (g_problem.game.discount,
                     lambda p, v: p.replace(game=p.game.replace(discount=v))),
        "designer_discount": (g_problem.designer_discount,
                              lambda p, v: p.replace(designer_discount=v)),
        "cost": (g_problem.cost, lambda p, v: p.replace(cost=v)),
    }
    base = {"temperature": LAM, "discount": GAMMA, "designer_discount": GAMMA_BAR, "cost": COST}
    for name, (grad, setter) in fields.items():
        # float64 arrays (not weakly typed Python floats): the jitted function is not retraced.
        fd = five_point(lambda t: objective_and_grads(
            x, setter(PROBLEM, jnp.asarray(base[name] + t, jnp.float64)))[0])
        assert_rel_close(float(grad), fd, err_msg=name)
    # The cost derivative is -||x||^2 exactly (a sanity check of the test itself).
    assert_rel_close(float(g_problem.cost), -np.sum(np.asarray(x) ** 2), rtol=1e-12)


def test_ni_gap_is_nonnegative_and_zero_at_the_equilibrium():
    x = X_RAND
    rng = np.random.default_rng(5)
    for seed in range(3):
        mu_logits, nu_logits = rng.normal(size=(S, A)), rng.normal(size=(S, B))
        gap = float(_GAP(PROBLEM, x, jnp.asarray(mu_logits), jnp.asarray(nu_logits)))
        assert gap > 1e-4, seed
        assert_rel_close(gap, np_ni_gap(x, mu_logits, nu_logits), err_msg=str(seed))
    _, eq, _, _ = objective_and_grads(x)
    at_eq = float(_GAP(PROBLEM, x, eq.mu_logits, eq.nu_logits))
    assert abs(at_eq) < 1e-10
    assert abs(np_ni_gap(x, eq.mu_logits, eq.nu_logits)) < 1e-10
    # Any deviation of either player opens the gap.
    assert float(_GAP(PROBLEM, x, eq.mu_logits.at[1, 0].add(0.1), eq.nu_logits)) > 1e-5
    assert float(_GAP(PROBLEM, x, eq.mu_logits, eq.nu_logits.at[2, 1].add(0.1))) > 1e-5


# ----------------------------------------------------------------------------------------------
# Algorithms: exact ascent from two starts; PBRL at fixed rho; one vmapped program each
# ----------------------------------------------------------------------------------------------

ASCENT_ITERS, PBRL_ITERS = 120, 400
# Ascent: Nesterov SGD converges linearly on this strongly concave F (Hessian eigenvalues in
# [-10.7, -0.57] at the optimum); PBRL: Adam (its penalized objective is stiff at rho = 100).
ASCENT_OPTIMIZER = optax.sgd(0.1, momentum=0.5, nesterov=True)
PBRL_LR = 0.2
# PBRL runs: (rho, start). Fixed rho (rho_0 = rho_max), traced under vmap.
PBRL_RUNS = ((1.0, "a"), (10.0, "a"), (100.0, "a"), (100.0, "b"))
STARTS = {"a": X0, "b": X_START_B}
PENALTY_BOUND = 1e-3       # final NI penalty at rho = 100
F_TOLERANCE = 2e-3         # |F(x_pbrl) - F(x_ascent)| at rho = 100


@jax.jit
def _run_ascent(x0s):
    def one(x0):
        algorithm = equilibrium_ascent(ASCENT_OPTIMIZER)
        state = algorithm.init(RUN_PROBLEM, x0, jax.random.key(0))
        return jax.lax.scan(lambda s, _: algorithm.step(RUN_PROBLEM, s), state, None,
                            length=ASCENT_ITERS)
    return jax.vmap(one)(x0s)


@jax.jit
def _run_pbrl(rhos, x0s):
    def one(rho, x0):
        algorithm = ni_pbrl(optax.adam(PBRL_LR), rho_0=rho, rho_max=rho, ramp_iters=1,
                            inner_sweeps=10, track_objective=False)
        state = algorithm.init(RUN_PROBLEM, x0, jax.random.key(0))
        return jax.lax.scan(lambda s, _: algorithm.step(RUN_PROBLEM, s), state, None,
                            length=PBRL_ITERS)
    return jax.vmap(one)(rhos, x0s)


@lru_cache(maxsize=None)
def ascent_runs():
    state, metrics = _run_ascent(jnp.stack([X0, X_START_B]))
    return {"x": np.asarray(state["x"])}, {k: np.asarray(v) for k, v in metrics.items()}


@lru_cache(maxsize=None)
def pbrl_runs():
    rhos = jnp.asarray([rho for rho, _ in PBRL_RUNS])
    state, metrics = _run_pbrl(rhos, jnp.stack([STARTS[start] for _, start in PBRL_RUNS]))
    return {"x": np.asarray(state["x"])}, {k: np.asarray(v) for k, v in metrics.items()}


def test_ascent_reaches_the_unique_optimum_from_two_starts():
    state, metrics = ascent_runs()
    x_a, x_b = state["x"]
    # Both starts end at the same incentive, a stationary point with a negative definite
    # Hessian (central differences of the exact gradient): a strict, here unique, maximum.
    np.testing.assert_allclose(x_a, x_b, atol=1e-6)
    assert np.all(metrics["grad_norm"][:, -1] < 1e-5)
    f_star, _, _, g = objective_and_grads(x_a)
    assert np.max(np.abs(g)) < 1e-5
    hessian = np.zeros((x_a.size, x_a.size))
    for i in range(x_a.size):
        e = np.zeros(x_a.size)
        e[i] = EPS
        e = e.reshape(x_a.shape)
        hessian[:, i] = (objective_and_grads(x_a + e)[3] - objective_and_grads(x_a - e)[3]).ravel()
    hessian /= 2 * EPS
    assert np.max(np.abs(hessian - hessian.T)) < 1e-5
    assert np.max(np.linalg.eigvalsh((hessian + hessian.T) / 2)) < -0.1
    # The metrics: objective is F at each iterate (last one checked against the reference), it
    # improves far beyond F(x0), and the solver's policies are an equilibrium throughout.
    last_x = state["x"][0]
    assert_rel_close(metrics["objective"][0, -1], np_objective(last_x)[0], rtol=1e-6)
    assert f_star > metrics["objective"][0, 0] + 1.0
    assert np.all(np.abs(metrics["equilibrium_gap"]) < 1e-8)
    assert np.all(metrics["follower_residual"] < 1e-8)
    assert not metrics["nonfinite"].any() and np.all(metrics["samples"] == 0)


def test_pbrl_penalty_vanishes_as_rho_grows():
    _, metrics = pbrl_runs()
    final = {PBRL_RUNS[i][0]: metrics["penalty"][i, -1] for i in range(3)}
    assert final[1.0] > 10 * final[10.0] > 100 * final[100.0] > 0
    assert final[100.0] < PENALTY_BOUND
    # The metric equilibrium_gap is the exact NI gap of PBRL's (mu, nu): >= 0, and the penalty
    # (approximate best responses from warm-started sweeps) is close to it at the end.
    assert np.all(metrics["equilibrium_gap"] > -1e-12)
    np.testing.assert_allclose(metrics["penalty"][:, -1], metrics["equilibrium_gap"][:, -1],
                               rtol=1e-3)
    np.testing.assert_array_equal(metrics["rho"][:, -1], [rho for rho, _ in PBRL_RUNS])
    assert not metrics["nonfinite"].any()


def test_pbrl_final_objective_is_close_to_exact_ascent():
    state, _ = pbrl_runs()
    ascent_state, _ = ascent_runs()
    f_star = objective_and_grads(ascent_state["x"][0])[0]
    for i, (rho, start) in enumerate(PBRL_RUNS):
        if rho != 100.0:
            continue
        f_pbrl = objective_and_grads(state["x"][i])[0]
        # Never above the optimum; within F_TOLERANCE of it from both starts.
        assert f_pbrl <= f_star + 1e-9, start
        assert f_star - f_pbrl < F_TOLERANCE, (start, f_star, f_pbrl)
    # At rho = 1 the penalty solution is visibly biased (so the tolerance above is meaningful).
    assert f_star - objective_and_grads(state["x"][0])[0] > 10 * F_TOLERANCE


# ----------------------------------------------------------------------------------------------
# jit / vmap paths
# ----------------------------------------------------------------------------------------------

def np_policy_objective(x, mu_logits, nu_logits):
    """`f(x, mu, nu)`: the designer's value of the joint softmax policies minus the cost."""
    mu, nu = np.exp(np_log_softmax(mu_logits)), np.exp(np_log_softmax(nu_logits))
    return (NP_INIT @ np_joint_evaluation(NP_P, NP_RBAR, GAMMA_BAR, mu, nu)
            - COST * np.sum(np.asarray(x) ** 2))


class VariantsTest(chex.TestCase):
    """PBRL's upper level f(x, mu, nu) and its gradient, vmapped, with and without jit
    (the solver's vmap/jit path is the algorithm runs above: vmapped, scanned, jitted)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_policy_objective_vmapped_matches_reference(self):
        rng = np.random.default_rng(21)
        xs = jnp.asarray(rng.normal(size=(2, S, A, B)))
        mus, nus = jnp.asarray(rng.normal(size=(2, S, A))), jnp.asarray(rng.normal(size=(2, S, B)))

        @self.variant
        def batched(problem, xs, mus, nus):
            def one(x, m, n):
                return (policy_objective(problem, x, m, n),
                        jax.grad(policy_objective, argnums=1)(problem, x, m, n))
            return jax.vmap(one)(xs, mus, nus)

        values, grads = batched(PROBLEM, xs, mus, nus)
        for i in range(2):
            assert_rel_close(values[i], np_policy_objective(xs[i], mus[i], nus[i]), err_msg=str(i))
            # d/dx is -2 c x here (the additive incentive leaves the kernel alone).
            assert_rel_close(grads[i], -2 * COST * np.asarray(xs[i]), rtol=1e-12)


def test_feature_incentive_shifts_the_payoff_linearly():
    problem, x0 = incentive_design_problem(0, S, A, B, num_features=2)
    assert x0.shape == (2,)
    z1, z2 = jnp.asarray([0.7, -0.4]), jnp.asarray([-0.2, 1.1])
    shift = lambda z: np.asarray(problem.incentivized_game(z).rewards) - NP_R  # noqa: E731
    np.testing.assert_allclose(shift(z1 + 2 * z2), shift(z1) + 2 * shift(z2), atol=1e-12)
    assert np.max(np.abs(shift(z1))) > 0.1
    np.testing.assert_allclose(np.asarray(problem.incentivized_game(z1).transitions), NP_P)
    check_incentive_problem(problem, z1)
    with pytest.raises(InvalidArgumentError, match="^x: "):
        check_incentive_problem(problem, jnp.zeros((S, A, B)))


# ----------------------------------------------------------------------------------------------
# Bad input: library errors naming the field
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_field():
    for kwargs, field in (({"num_states": 0}, "num_states"), ({"min_actions": 0}, "min_actions"),
                          ({"max_actions": 1.5}, "max_actions"), ({"discount": 1.0}, "discount"),
                          ({"designer_discount": -0.1}, "designer_discount"),
                          ({"temperature": 0.0}, "temperature"), ({"cost": -1.0}, "cost"),
                          ({"num_features": 0}, "num_features"),
                          ({"solver_tol": 0.0}, "solver_tol"),
                          ({"dtype": jnp.int32}, "dtype")):
        with pytest.raises(InvalidArgumentError, match=f"^{field}: "):
            incentive_design_problem(0, **{"num_states": S, **kwargs})
    validate_incentive_problem(PROBLEM, X0)
    for bad, field in ((PROBLEM.replace(temperature=-1.0), "temperature"),
                       (PROBLEM.replace(cost=-0.5), "cost"),
                       (PROBLEM.replace(designer_discount=1.0), "designer_discount"),
                       (PROBLEM.replace(designer_reward=jnp.zeros((S, A))), "designer_reward"),
                       (PROBLEM.replace(designer_reward=PROBLEM.designer_reward.at[0, 0, 0].set(
                           jnp.nan)), "designer_reward")):
        with pytest.raises(InvalidProblemError, match=f"^{field}: "):
            validate_incentive_problem(bad)
    with pytest.raises(InvalidProblemError, match="^problem: "):
        designer_objective(PROBLEM.game, X0)
    with pytest.raises(InvalidMDPError, match="^transitions: "):
        validate_incentive_problem(PROBLEM.replace(game=PROBLEM.game.replace(
            transitions=PROBLEM.game.transitions * 0.5)))
    with pytest.raises(InvalidArgumentError, match="^x: "):
        designer_objective(PROBLEM, jnp.zeros((S, A)))
    # The solver's and the gap's new options.
    game = PROBLEM.game
    with pytest.raises(InvalidArgumentError, match="^init.v: "):
        solve_game_equilibrium(game, LAM, init=cold_start().replace(v=jnp.zeros(S + 1)))
    with pytest.raises(InvalidArgumentError, match="^init: "):
        solve_game_equilibrium(game, LAM, init=(jnp.zeros(S),))
    with pytest.raises(InvalidArgumentError, match="^tol: "):
        solve_game_equilibrium(game, LAM, tol=-1.0)
    with pytest.raises(InvalidArgumentError, match="^tol: "):
        solve_game_equilibrium(game, LAM, tol=1e-8, differentiation="unroll")
    with pytest.raises(InvalidArgumentError, match="^differentiation: "):
        solve_game_equilibrium(game, LAM, differentiation="autodiff")
    logits = jnp.zeros((S, A)), jnp.zeros((S, B))
    with pytest.raises(InvalidArgumentError, match="^init_q_max: "):
        nikaido_isoda_gap(game, None, *logits, LAM, init_q_max=jnp.zeros((S, A + 1)))
    with pytest.raises(InvalidArgumentError, match="^init_q_min: "):
        nikaido_isoda_gap(game, None, *logits, LAM, init_q_min=jnp.zeros((S,)))
    # Algorithms.
    with pytest.raises(InvalidArgumentError, match="^rho_0, rho_max: "):
        ni_pbrl(optax.sgd(0.1), rho_0=10.0, rho_max=1.0)
    with pytest.raises(InvalidArgumentError, match="^inner_sweeps: "):
        ni_pbrl(optax.sgd(0.1), inner_sweeps=0)
    with pytest.raises(InvalidArgumentError, match="^x: "):
        equilibrium_ascent(optax.sgd(0.1)).init(PROBLEM, jnp.zeros(3), jax.random.key(0))


def test_runner_configs_resolve_and_refuse_with_the_key_path():
    base = {"problem": {"name": "incentive_design", "num_states": S, "min_actions": A,
                        "max_actions": B}, "iterations": 5}
    config = resolve_config({**base, "algorithm": {"name": "ascent"}})
    assert config["problem"]["dtype"] == "float64"
    make_incentive_algorithm(config, optax.sgd(0.1), config["algorithm"])
    bad = resolve_config({**base, "algorithm": {"name": "ascent"}, "estimator": {"name": "hpgd"}})
    with pytest.raises(ConfigError, match="^estimator.name: "):
        make_incentive_algorithm(bad, optax.sgd(0.1), bad["algorithm"])
    bad = resolve_config({**base, "algorithm": {"name": "pbrl", "penalty": "bellman"}})
    with pytest.raises(ConfigError, match="^algorithm.penalty: "):
        make_incentive_algorithm(bad, optax.sgd(0.1), bad["algorithm"])
    with pytest.raises(ConfigError, match="^algorithm.name: "):
        resolve_config({**base, "algorithm": {"name": "decoupled"}})
    with pytest.raises(ConfigError, match="^problem.num_states: "):
        resolve_config({**base, "problem": {"name": "incentive_design", "num_states": 0}})
    with pytest.raises(ConfigError, match="^problem.temperature: "):
        resolve_config({**base, "problem": {"name": "incentive_design", "temperature": 0}})
    # The shipped configs resolve, share the instance, and the pbrl one sweeps rho_max.
    ascent = load_config(os.path.join(CONFIGS, "ascent.yaml"))
    pbrl = load_config(os.path.join(CONFIGS, "pbrl.yaml"))
    assert ascent["problem"] == pbrl["problem"] and ascent["seeds"] == pbrl["seeds"]
    assert len(ascent["seeds"]) >= 5 and ascent["iterations"] == pbrl["iterations"]
    assert ascent["optimizer"] == pbrl["optimizer"]
    assert pbrl["sweep"]["algorithm.rho_max"] == [1.0, 10.0, 100.0, 1000.0]
