"""PBRL penalties (SPEC 6): value and Bellman penalties of the contextual problem, and the
Nikaido-Isoda gap of an entropy-regularized zero-sum Markov game.

Runs in float64 (tests/conftest.py enables x64). Values and gradients are checked against an
independent NumPy float64 implementation written here (soft value iteration by sweeps, policy
evaluation and visitation by dense linear solves, the game value by evaluating the joint policy)
and against central finite differences (eps = 1e-5, relative 1e-6).
"""

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax.errors import InvalidArgumentError, InvalidMDPError
from bilevel_jax.games import (TabularGame, game_value, nikaido_isoda_gap,
                               solve_game_equilibrium, validate_game)
from bilevel_jax.penalties import bellman_penalty, value_penalty
from bilevel_jax.problem import BilevelProblem, InvalidProblemError
from helpers import assert_rel_close, soft_vi

jax.config.update("jax_enable_x64", True)

S, A, D, K = 6, 3, 4, 2
GAMMA, LAM = 0.9, 0.5
EPS = 1e-5
PROBS = np.array([0.3, 0.7])
TERMINAL = np.array([False, False, False, False, True, False])
VARIANTS = ("reward", "transition")  # rewards linear in x / also transitions softmax(L + D x)

_rng = np.random.default_rng(2024)
R0 = _rng.uniform(-1, 1, size=(K, S, A))
PHI = _rng.normal(size=(K, S, A, D))
LOGITS0 = _rng.normal(size=(K, S, A, S))
DX = 0.5 * _rng.normal(size=(S, A, S, D))
INITIAL = _rng.dirichlet(np.ones(S), size=K)
X0 = 0.3 * _rng.normal(size=D)


# ----------------------------------------------------------------------------------------------
# The library side
# ----------------------------------------------------------------------------------------------

def make_contexts(variant):
    """Context data of a variant: both variants share one follower function (one compilation).

    "reward": rewards linear in x, fixed transitions, state 4 terminal.
    "transition": rewards linear in x and transitions softmax(L + D x), no terminal state.
    """
    dynamic = variant == "transition"
    terminal = np.zeros(S, bool) if dynamic else TERMINAL
    return {"r0": jnp.asarray(R0), "phi": jnp.asarray(PHI), "logits": jnp.asarray(LOGITS0),
            "initial": jnp.asarray(INITIAL), "dynamic": jnp.full(K, float(dynamic)),
            "terminal": jnp.asarray(np.stack([terminal] * K))}


def follower(x, c):
    logits = c["logits"] + c["dynamic"] * (jnp.asarray(DX) @ x)
    return bj.TabularMDP(transitions=jax.nn.softmax(logits, axis=-1),
                         rewards=c["r0"] + c["phi"] @ x, discount=GAMMA,
                         initial=c["initial"], terminal=c["terminal"])


def leader_reward(x, c):
    return c["r0"]


def make_problem(variant, temperature=LAM):
    return BilevelProblem(follower=follower, leader_reward=leader_reward, leader_discount=GAMMA,
                          temperature=temperature, contexts=make_contexts(variant),
                          context_probs=jnp.asarray(PROBS))


PENALTIES = {
    "value": lambda problem, x, y, weights=None: value_penalty(problem, x, y, weights=weights),
    "bellman_initial": lambda problem, x, y, weights=None: bellman_penalty(
        problem, x, y, weighting="initial", weights=weights),
    "bellman_visitation": lambda problem, x, y, weights=None: bellman_penalty(
        problem, x, y, weighting="visitation", weights=weights),
}


def _all_values(problem, x, y, weights):
    return {name: fn(problem, x, y, weights) for name, fn in PENALTIES.items()}


def _all_values_and_grads(problem, x, y, weights):
    return {name: jax.value_and_grad(fn, argnums=(1, 2))(problem, x, y, weights)
            for name, fn in PENALTIES.items()}


_values_and_grads = jax.jit(_all_values_and_grads)
_values_batched = jax.jit(jax.vmap(_all_values, in_axes=(None, 0, 0, None)))


def penalties(variant, x, y, weights=PROBS):
    """`{name: (value, (grad_x, grad_y))}` of every penalty (one jit compilation for all)."""
    out = _values_and_grads(make_problem(variant), jnp.asarray(x), jnp.asarray(y),
                            jnp.asarray(weights))
    return {name: (float(v), tuple(np.asarray(g) for g in grads))
            for name, (v, grads) in out.items()}


def random_logits(seed, scale=1.0):
    return scale * np.random.default_rng(seed).normal(size=(K, S, A))


def optimal_logits(variant, x):
    problem = make_problem(variant)
    pis = [soft_vi(problem.follower(jnp.asarray(x), problem.context(k)), LAM).policy
           for k in range(K)]
    return jnp.log(jnp.stack(pis))


# ----------------------------------------------------------------------------------------------
# The NumPy reference
# ----------------------------------------------------------------------------------------------

def np_softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_follower(variant, x, k):
    """`(P, r, mu, keep)` of context k."""
    dynamic = variant == "transition"
    P = np_softmax(LOGITS0[k] + (DX @ x if dynamic else 0.0))
    keep = np.ones(S) if dynamic else 1.0 - TERMINAL
    return P, R0[k] + PHI[k] @ x, INITIAL[k], keep


def np_soft_vi(P, r, keep, lam=LAM, gamma=GAMMA):
    """`(q, v, pi)` by soft Bellman sweeps until the update is below 1e-15."""
    q = np.zeros_like(r)
    for _ in range(100_000):
        m = q.max(-1)
        v = m + lam * np.log(np.exp((q - m[:, None]) / lam).sum(-1))
        q_new = r + gamma * keep[:, None] * (P @ v)
        if np.max(np.abs(q_new - q)) < 1e-15:
            q = q_new
            break
        q = q_new
    m = q.max(-1)
    v = m + lam * np.log(np.exp((q - m[:, None]) / lam).sum(-1))
    return q, v, np_softmax(q / lam)


def np_evaluate(P, r, keep, pi, log_pi, lam=LAM, gamma=GAMMA):
    """Soft `(q, v)` of `pi` by one dense solve."""
    P_pi = keep[:, None] * np.einsum("sa,sat->st", pi, P)
    r_pi = np.sum(pi * (r - lam * log_pi), -1)
    v = np.linalg.solve(np.eye(len(r_pi)) - gamma * P_pi, r_pi)
    return r + gamma * keep[:, None] * (P @ v), v


def np_visitation(P, keep, pi, mu, gamma=GAMMA):
    P_pi = keep[:, None] * np.einsum("sa,sat->st", pi, P)
    return np.linalg.solve((np.eye(len(mu)) - gamma * P_pi).T, mu)


def np_value_penalty(variant, x, y, form="danskin"):
    total = 0.0
    for k in range(K):
        P, r, mu, keep = np_follower(variant, x, k)
        _, v_star, pi_star = np_soft_vi(P, r, keep)
        log_pi = np_log_softmax(y[k])
        pi = np.exp(log_pi)
        if form == "danskin":
            _, v = np_evaluate(P, r, keep, pi, log_pi)
            total += PROBS[k] * mu @ (v_star - v)
        else:  # sum_s d^{pi_y}(s) lam KL(pi_y || pi*)
            d = np_visitation(P, keep, pi, mu)
            kl = np.sum(pi * (log_pi - np.log(pi_star)), -1)
            total += PROBS[k] * d @ (LAM * kl)
    return total


def np_bellman_penalty(variant, x, y, weighting):
    total = 0.0
    for k in range(K):
        P, r, mu, keep = np_follower(variant, x, k)
        log_pi = np_log_softmax(y[k])
        pi = np.exp(log_pi)
        q, _ = np_evaluate(P, r, keep, pi, log_pi)
        kl = np.sum(pi * (log_pi - np_log_softmax(q / LAM)), -1)
        w = mu if weighting == "initial" else np_visitation(P, keep, pi, mu)
        total += PROBS[k] * w @ (LAM * kl)
    return total


NP_PENALTIES = {
    "value": lambda v, x, y: np_value_penalty(v, x, y),
    "bellman_initial": lambda v, x, y: np_bellman_penalty(v, x, y, "initial"),
    "bellman_visitation": lambda v, x, y: np_bellman_penalty(v, x, y, "visitation"),
}


def central_diff(f, z, eps=EPS):
    """Central finite-difference gradient of a scalar function of an array."""
    z = np.asarray(z, np.float64)
    grad = np.zeros(z.size)
    for i in range(z.size):
        e = np.zeros(z.size)
        e[i] = eps
        e = e.reshape(z.shape)
        grad[i] = (f(z + e) - f(z - e)) / (2 * eps)
    return grad.reshape(z.shape)


# ----------------------------------------------------------------------------------------------
# Value and Bellman penalties
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_penalties_positive_and_match_reference(variant):
    for seed in range(3):
        y = random_logits(seed, scale=1.0 + seed)
        for name, (value, _) in penalties(variant, X0, y).items():
            assert value > 1e-6, name
            assert_rel_close(value, NP_PENALTIES[name](variant, X0, y), rtol=1e-9, err_msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_penalties_vanish_at_the_soft_optimal_policy(variant):
    y = optimal_logits(variant, X0)
    for name, (value, (gx, gy)) in penalties(variant, X0, y).items():
        assert abs(value) < 1e-10, name
        # A minimum: the gradients vanish too.
        assert np.max(np.abs(gx)) < 1e-9 and np.max(np.abs(gy)) < 1e-9, name
    # A small perturbation of one context's policy makes every penalty strictly positive.
    for name, (value, _) in penalties(variant, X0, y.at[1, 0, 0].add(1e-2)).items():
        assert value > 1e-9, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_value_penalty_identity_and_gradient_formulas(variant):
    """p = sum_s d^{pi_y} lam KL(pi_y || pi*); Danskin's grad_x; the soft policy gradient in y."""
    y = random_logits(11)
    value, (gx, gy) = penalties(variant, X0, y)["value"]
    assert_rel_close(value, np_value_penalty(variant, X0, y, form="kl"), rtol=1e-9)

    expected_gy = np.zeros((K, S, A))
    for k in range(K):
        P, r, mu, keep = np_follower(variant, X0, k)
        log_pi = np_log_softmax(y[k])
        pi = np.exp(log_pi)
        q, v = np_evaluate(P, r, keep, pi, log_pi)
        d = np_visitation(P, keep, pi, mu)
        # grad_y of -mu.V^{pi_y}: -d(s) pi(a|s) (Q(s,a) - lam log pi(a|s) - V(s)).
        expected_gy[k] = -PROBS[k] * d[:, None] * pi * (q - LAM * log_pi - v[:, None])
    assert_rel_close(gy, expected_gy, rtol=1e-8, atol_scale=1e-10)

    if variant == "reward":
        # grad_x p = E^{pi*}[sum_t gamma^t phi] - E^{pi_y}[sum_t gamma^t phi]: feature expectations.
        expected_gx = np.zeros(D)
        for k in range(K):
            P, r, mu, keep = np_follower(variant, X0, k)
            _, _, pi_star = np_soft_vi(P, r, keep)
            pi = np_softmax(y[k])
            for policy, sign in ((pi_star, 1.0), (pi, -1.0)):
                d = np_visitation(P, keep, policy, mu)
                expected_gx += sign * PROBS[k] * np.einsum("s,sa,sad->d", d, policy, PHI[k])
        assert_rel_close(gx, expected_gx, rtol=1e-8, atol_scale=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_penalty_gradients_match_finite_differences(variant):
    y = random_logits(5)
    for name, (_, (gx, gy)) in penalties(variant, X0, y).items():
        reference = NP_PENALTIES[name]
        fd_x = central_diff(lambda x: reference(variant, x, y), X0)
        fd_y = central_diff(lambda yy: reference(variant, X0, yy), y)
        assert_rel_close(gx, fd_x, rtol=1e-6, atol_scale=1e-8, err_msg=name)
        assert_rel_close(gy, fd_y, rtol=1e-6, atol_scale=1e-8, err_msg=name)


def test_value_penalty_x_gradient_holds_the_solver_policy_fixed():
    """With a truncated solver (3 sweeps) the x-gradient is still the policy-fixed (Danskin) one:
    nothing is differentiated through the solver, so no second derivatives are formed."""
    problem = make_problem("reward")
    y = random_logits(3)
    grad = jax.jit(jax.grad(lambda x: value_penalty(problem, x, jnp.asarray(y), num_sweeps=3)))(
        jnp.asarray(X0))
    expected = np.zeros(D)
    for k in range(K):
        P, r, mu, keep = np_follower("reward", X0, k)
        q = np.zeros((S, A))
        for _ in range(3):
            m = q.max(-1)
            v = m + LAM * np.log(np.exp((q - m[:, None]) / LAM).sum(-1))
            q = r + GAMMA * keep[:, None] * (P @ v)
        for policy, sign in ((np_softmax(q / LAM), 1.0), (np_softmax(y[k]), -1.0)):
            d = np_visitation(P, keep, policy, mu)
            expected += sign * PROBS[k] * np.einsum("s,sa,sad->d", d, policy, PHI[k])
    assert_rel_close(grad, expected, rtol=1e-8, atol_scale=1e-10)


def test_value_penalty_warm_start_and_weights():
    problem = make_problem("transition")
    x, y = jnp.asarray(X0), jnp.asarray(random_logits(8))
    exact = penalties("transition", X0, y)["value"][0]
    q_star = jnp.stack([soft_vi(problem.follower(x, problem.context(k)), LAM).q
                        for k in range(K)])
    # Warm-started at Q*, a single sweep recovers the exact penalty.
    assert_rel_close(value_penalty(problem, x, y, init_q=q_star, num_sweeps=1), exact, rtol=1e-10)
    # Explicit context weights replace the problem's probabilities.
    per_context = [penalties("transition", X0, y, weights=np.eye(K)[k])["value"][0]
                   for k in range(K)]
    assert_rel_close(np.dot(PROBS, per_context), exact, rtol=1e-12)


def test_context_free_problem_accepts_a_single_table():
    """A problem without contexts takes y as [S, A] (or [1, S, A]); here it is context 0."""
    context = make_problem("reward").context(0)
    problem = BilevelProblem(follower=lambda x, c: follower(x, context),
                             leader_reward=lambda x, c: context["r0"], temperature=LAM)
    y = random_logits(4)
    expected = penalties("reward", X0, y, weights=np.array([1.0, 0.0]))
    x = jnp.asarray(X0)
    for name, fn in PENALTIES.items():
        single = fn(problem, x, jnp.asarray(y[0]))
        assert_rel_close(single, expected[name][0], rtol=1e-12, err_msg=name)
    single = bellman_penalty(problem, x, jnp.asarray(y[0]))
    assert_rel_close(bellman_penalty(problem, x, jnp.asarray(y[:1])), single, rtol=1e-14)


def test_jit_and_vmap_agree_with_eager():
    """Eager, jit, and vmap over a batch of (x, y) pairs give the same penalties."""
    problem = make_problem("transition")
    xs = X0 + 0.2 * np.random.default_rng(0).normal(size=(3, D))
    ys = np.stack([random_logits(seed) for seed in range(3)])
    batched = _values_batched(problem, jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(PROBS))
    for name, fn in PENALTIES.items():
        eager = float(fn(problem, jnp.asarray(xs[0]), jnp.asarray(ys[0])))
        jitted = [penalties("transition", xs[i], ys[i])[name][0] for i in range(3)]
        assert_rel_close(jitted[0], eager, rtol=1e-12, err_msg=name)
        assert_rel_close(batched[name], jitted, rtol=1e-12, err_msg=name)


def test_penalty_bad_inputs_name_the_field():
    problem = make_problem("reward")
    x, y = jnp.asarray(X0), jnp.asarray(random_logits(0))
    for fn in (value_penalty, bellman_penalty):
        with pytest.raises(InvalidArgumentError, match="^y: .*\\[K, S, A\\]"):
            fn(problem, x, y[0])
        with pytest.raises(InvalidArgumentError, match="^y: "):
            fn(problem, x, y[:, :, :2])
        with pytest.raises(InvalidArgumentError, match="^weights: "):
            fn(problem, x, y, weights=jnp.ones(3) / 3)
        for bad in (0.0, -1.0):
            with pytest.raises(InvalidProblemError, match="^temperature: "):
                fn(make_problem("reward", temperature=bad), x, y)
    with pytest.raises(InvalidArgumentError, match="^weighting: "):
        bellman_penalty(problem, x, y, weighting="uniform")
    with pytest.raises(InvalidArgumentError, match="^init_q: "):
        value_penalty(problem, x, y, init_q=jnp.zeros((S, A)))


# ----------------------------------------------------------------------------------------------
# Zero-sum Markov game: Nikaido-Isoda gap and equilibrium
# ----------------------------------------------------------------------------------------------

GA, GB, GD = 3, 2, 3  # mu's actions (min player), nu's actions (max player), incentive features
GAME_TERMINAL = np.array([False, False, True, False, False, False])
_grng = np.random.default_rng(77)
G_P = _grng.dirichlet(np.ones(S), size=(S, GA, GB))
G_R = _grng.uniform(-1, 1, size=(S, GA, GB))
G_INITIAL = _grng.dirichlet(np.ones(S))
G_FEAT = _grng.normal(size=(S, GA, GB, GD))
G_LOGITS = _grng.normal(size=(S, GA, GB, S))
G_DYN = 0.5 * _grng.normal(size=(S, GA, GB, S, GD))
G_X = 0.3 * _grng.normal(size=(S, GA, GB))   # default incentive: added to the rewards
G_Z = 0.3 * _grng.normal(size=GD)            # incentive of the custom parameterization


def make_game(terminal=True):
    """The game (always with a terminal array, so both variants share compilations)."""
    return TabularGame(transitions=jnp.asarray(G_P), rewards=jnp.asarray(G_R), discount=GAMMA,
                       initial=jnp.asarray(G_INITIAL),
                       terminal=jnp.asarray(GAME_TERMINAL if terminal else np.zeros(S, bool)))


def feature_incentive(game, z):
    """Rewards linear in z and transitions softmax(L + H z): both depend on the incentive."""
    return game.replace(rewards=game.rewards + jnp.asarray(G_FEAT) @ z,
                        transitions=jax.nn.softmax(jnp.asarray(G_LOGITS) + jnp.asarray(G_DYN) @ z,
                                                   axis=-1))


GAP_CASES = {  # name -> (incentive_fn, incentive)
    "additive": (None, G_X),
    "features": (feature_incentive, G_Z),
}


def _gap_fn(incentive_fn):
    return lambda game, x, m, n: nikaido_isoda_gap(game, x, m, n, LAM, incentive_fn)


_GAP_VALUE_AND_GRAD = {case: jax.jit(jax.value_and_grad(_gap_fn(fn), argnums=(1, 2, 3)))
                       for case, (fn, _) in GAP_CASES.items()}
_solve_equilibrium = jax.jit(solve_game_equilibrium, static_argnums=(2,))


def gap(case, x, mu_logits, nu_logits, terminal=True):
    """`(gap, (grad_x, grad_mu_logits, grad_nu_logits))`, jitted."""
    value, grads = _GAP_VALUE_AND_GRAD[case](make_game(terminal), jnp.asarray(x),
                                             jnp.asarray(mu_logits), jnp.asarray(nu_logits))
    return float(value), tuple(np.asarray(g) for g in grads)


def incentivized_game(case, terminal=True):
    incentive_fn, x = GAP_CASES[case]
    game = make_game(terminal)
    if incentive_fn is None:
        return game.replace(rewards=game.rewards + jnp.asarray(x))
    return incentive_fn(game, jnp.asarray(x))


@lru_cache(maxsize=None)
def equilibrium(case, terminal=True):
    return _solve_equilibrium(incentivized_game(case, terminal), LAM, 400)


def np_game(case, x):
    if case == "additive":
        return G_P, G_R + x
    return np_softmax(G_LOGITS + G_DYN @ x), G_R + G_FEAT @ x


def np_joint_value(P, R, keep, log_mu, log_nu):
    """`J(mu, nu)` by evaluating the joint policy on the (a, b) action product: no induced MDPs.

    SPEC 6 convention: the stage payoff is `r + lam log mu - lam log nu` (nu maximizes `J` with
    its entropy bonus `-lam log nu`, mu minimizes it with its bonus `+lam log mu`).
    """
    mu, nu = np.exp(log_mu), np.exp(log_nu)
    joint = (mu[:, :, None] * nu[:, None, :]).reshape(S, GA * GB)
    stage = R + LAM * log_mu[:, :, None] - LAM * log_nu[:, None, :]
    P_pi = keep[:, None] * np.einsum("sj,sjt->st", joint, P.reshape(S, GA * GB, S))
    r_pi = np.sum(joint * stage.reshape(S, GA * GB), -1)
    return np.linalg.solve(np.eye(S) - GAMMA * P_pi, r_pi)


def np_best_responses(case, x, mu_logits, nu_logits, terminal=True):
    """`(max_nu' J(mu, nu'), min_mu' J(mu', nu))`: nu is the maximizer, mu the minimizer.

    Best responses by soft VI on induced MDPs built here; their values are re-checked on the
    joint policy (which does not use the induced MDPs' entropy terms).
    """
    P, R = np_game(case, x)
    keep = 1.0 - GAME_TERMINAL if terminal else np.ones(S)
    log_mu, log_nu = np_log_softmax(mu_logits), np_log_softmax(nu_logits)
    mu, nu = np.exp(log_mu), np.exp(log_nu)
    # nu (max player) vs mu, over the B actions: rewards E_a[r + lam log mu], kernel E_a[P].
    r_max = np.einsum("sab,sa->sb", R, mu) + LAM * np.sum(mu * log_mu, -1)[:, None]
    _, v_max, br_nu = np_soft_vi(np.einsum("sabt,sa->sbt", P, mu), r_max, keep)
    # mu (min player) vs nu, over the A actions, as a maximization of -J:
    # rewards E_b[-r + lam log nu], kernel E_b[P].
    r_min = -np.einsum("sab,sb->sa", R, nu) + LAM * np.sum(nu * log_nu, -1)[:, None]
    _, v_min, br_mu = np_soft_vi(np.einsum("sabt,sb->sat", P, nu), r_min, keep)
    best_max = np_joint_value(P, R, keep, log_mu, np.log(br_nu))
    best_min = np_joint_value(P, R, keep, np.log(br_mu), log_nu)
    np.testing.assert_allclose(best_max, v_max, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(best_min, -v_min, rtol=1e-10, atol=1e-12)
    return G_INITIAL @ best_max, G_INITIAL @ best_min


def np_value(case, x, mu_logits, nu_logits, terminal=True):
    P, R = np_game(case, x)
    keep = 1.0 - GAME_TERMINAL if terminal else np.ones(S)
    return G_INITIAL @ np_joint_value(P, R, keep, np_log_softmax(mu_logits),
                                      np_log_softmax(nu_logits))


def random_players(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return scale * rng.normal(size=(S, GA)), scale * rng.normal(size=(S, GB))


@pytest.mark.parametrize("terminal", [True, None], ids=["term", "none"])
def test_game_value_convention_matches_the_joint_policy(terminal):
    game = make_game()
    if terminal is None:
        game = game.replace(terminal=None)
    mu_logits, nu_logits = random_players(1)
    value = game_value(game, jax.nn.softmax(jnp.asarray(mu_logits)),
                       jax.nn.softmax(jnp.asarray(nu_logits)), LAM)
    keep = np.ones(S) if terminal is None else 1.0 - GAME_TERMINAL
    expected = G_INITIAL @ np_joint_value(G_P, G_R, keep, np_log_softmax(mu_logits),
                                          np_log_softmax(nu_logits))
    assert_rel_close(value, expected, rtol=1e-12)


@pytest.mark.parametrize("terminal", [True, False], ids=["term", "noterm"])
@pytest.mark.parametrize("case", list(GAP_CASES))
def test_ni_gap_positive_and_matches_reference(case, terminal):
    x = GAP_CASES[case][1]
    for seed in range(3):
        mu_logits, nu_logits = random_players(seed, scale=1.0 + seed)
        value, _ = gap(case, x, mu_logits, nu_logits, terminal)
        best_max, best_min = np_best_responses(case, x, mu_logits, nu_logits, terminal)
        assert value > 1e-6
        assert_rel_close(value, best_max - best_min, rtol=1e-9)
        # The best responses do at least as well as the pair itself and as other policies:
        # nu' raises J (max player), mu' lowers it (min player).
        pair = np_value(case, x, mu_logits, nu_logits, terminal)
        assert best_min < pair < best_max
        for other in range(3):
            mu_prime, nu_prime = random_players(100 + other)
            assert np_value(case, x, mu_logits, nu_prime, terminal) < best_max
            assert np_value(case, x, mu_prime, nu_logits, terminal) > best_min


@pytest.mark.parametrize("terminal", [True, False], ids=["term", "noterm"])
@pytest.mark.parametrize("case", list(GAP_CASES))
def test_ni_gap_vanishes_at_the_computed_equilibrium(case, terminal):
    eq = equilibrium(case, terminal)
    assert float(eq.stage_residual) < 1e-10
    assert float(eq.residual) < 1e-12
    x = GAP_CASES[case][1]
    value, (_, g_mu, g_nu) = gap(case, x, eq.mu_logits, eq.nu_logits, terminal)
    assert abs(value) < 1e-10
    # A minimum of the gap: its gradient in the policies vanishes.
    assert np.max(np.abs(g_mu)) < 1e-9 and np.max(np.abs(g_nu)) < 1e-9
    # Equilibrium values are the joint policy's values (NumPy), and any deviation opens a gap.
    P, R = np_game(case, x)
    keep = 1.0 - GAME_TERMINAL if terminal else np.ones(S)
    assert_rel_close(eq.v, np_joint_value(P, R, keep, np.asarray(eq.mu_logits),
                                          np.asarray(eq.nu_logits)), rtol=1e-10)
    assert gap(case, x, eq.mu_logits.at[0, 0].add(0.05), eq.nu_logits, terminal)[0] > 1e-6
    assert gap(case, x, eq.mu_logits, eq.nu_logits.at[3, 1].add(0.05), terminal)[0] > 1e-6
    # The NumPy best responses close the gap too, and the stage games are solved in the SPEC 6
    # convention: Q = R + gamma keep P V, mu = softmax(-Q nu / lam) (minimizer),
    # nu = softmax(Q^T mu / lam) (maximizer), V = mu^T Q nu + lam mu.log mu - lam nu.log nu.
    best_max, best_min = np_best_responses(case, x, np.asarray(eq.mu_logits),
                                           np.asarray(eq.nu_logits), terminal)
    assert abs(best_max - best_min) < 1e-10
    log_mu, log_nu, v = (np.asarray(a) for a in (eq.mu_logits, eq.nu_logits, eq.v))
    mu, nu = np.exp(log_mu), np.exp(log_nu)
    q = R + GAMMA * keep[:, None, None] * np.einsum("sabt,t->sab", P, v)
    assert_rel_close(eq.q, q, rtol=1e-12)
    np.testing.assert_allclose(log_mu, np_log_softmax(-np.einsum("sab,sb->sa", q, nu) / LAM),
                               atol=1e-10)
    np.testing.assert_allclose(log_nu, np_log_softmax(np.einsum("sab,sa->sb", q, mu) / LAM),
                               atol=1e-10)
    stage = (np.einsum("sa,sab,sb->s", mu, q, nu) + LAM * np.sum(mu * log_mu, -1)
             - LAM * np.sum(nu * log_nu, -1))
    assert_rel_close(v, stage, rtol=1e-12)


def test_game_convention_nu_maximizes_and_mu_minimizes():
    """A separable game r(s, a, b) = c(s, a) + d(s, b) with action-independent transitions:
    J splits into mu's part (minimized, with bonus +lam log mu) and nu's part (maximized, with
    bonus -lam log nu), so the equilibrium is mu = softmax(-c / lam), nu = softmax(d / lam)."""
    rng = np.random.default_rng(31)
    c, d = rng.uniform(-1, 1, size=(S, GA)), rng.uniform(-1, 1, size=(S, GB))
    kernel = rng.dirichlet(np.ones(S), size=S)
    game = make_game().replace(
        rewards=jnp.asarray(c[:, :, None] + d[:, None, :]),
        transitions=jnp.asarray(np.broadcast_to(kernel[:, None, None, :], (S, GA, GB, S))))
    eq = _solve_equilibrium(game, LAM, 400)
    mu_star, nu_star = np_log_softmax(-c / LAM), np_log_softmax(d / LAM)
    np.testing.assert_allclose(eq.mu_logits, mu_star, atol=1e-10)
    np.testing.assert_allclose(eq.nu_logits, nu_star, atol=1e-10)

    def gap_at(mu_logits, nu_logits):
        return float(_GAP_VALUE_AND_GRAD["additive"](
            game, jnp.zeros((S, GA, GB)), jnp.asarray(mu_logits), jnp.asarray(nu_logits))[0])

    assert abs(gap_at(mu_star, nu_star)) < 1e-10
    # The roles swapped (mu maximizing c, nu minimizing d) are far from the equilibrium.
    assert gap_at(c / LAM, -d / LAM) > 0.1
    def value(mu_logits, nu_logits):
        return float(game_value(game, jax.nn.softmax(jnp.asarray(mu_logits)),
                                jax.nn.softmax(jnp.asarray(nu_logits)), LAM))

    # J at the equilibrium: nu's deviations lower it, mu's raise it.
    assert value(mu_star, d / LAM + 0.3 * rng.normal(size=(S, GB))) < value(mu_star, nu_star)
    assert value(-c / LAM + 0.3 * rng.normal(size=(S, GA)), nu_star) > value(mu_star, nu_star)


@pytest.mark.parametrize("case", list(GAP_CASES))
def test_ni_gap_gradients_match_finite_differences(case):
    """Directional central differences along random directions of x and of both logits."""
    x = GAP_CASES[case][1]
    mu_logits, nu_logits = random_players(9)
    _, grads = gap(case, x, mu_logits, nu_logits)
    point = (x, mu_logits, nu_logits)
    rng = np.random.default_rng(5)
    for arg in range(3):
        for _ in range(3):
            direction = rng.normal(size=np.shape(point[arg]))

            def along(t):
                moved = list(point)
                moved[arg] = point[arg] + t * direction
                return gap(case, *moved)[0]

            fd = (along(EPS) - along(-EPS)) / (2 * EPS)
            assert_rel_close(np.sum(grads[arg] * direction), fd, rtol=1e-6, err_msg=str(arg))


def test_ni_gap_vmap_and_jit_agree_with_eager():
    game = make_game()
    xs = G_Z + 0.2 * np.random.default_rng(1).normal(size=(3, GD))
    mu_logits, _ = random_players(2)
    nus = np.stack([random_players(seed)[1] for seed in range(3)])
    eager = float(nikaido_isoda_gap(game, jnp.asarray(xs[0]), jnp.asarray(mu_logits),
                                    jnp.asarray(nus[0]), LAM, feature_incentive))
    jitted = [gap("features", xs[i], mu_logits, nus[i])[0] for i in range(3)]
    assert_rel_close(jitted[0], eager, rtol=1e-12)
    batched = jax.jit(jax.vmap(_gap_fn(feature_incentive), in_axes=(None, 0, None, 0)))(
        game, jnp.asarray(xs), jnp.asarray(mu_logits), jnp.asarray(nus))
    assert_rel_close(batched, np.array(jitted), rtol=1e-12)


def test_game_bad_inputs_name_the_field():
    game = make_game()
    mu_logits, nu_logits = (jnp.asarray(z) for z in random_players(0))
    validate_game(game)
    with pytest.raises(InvalidArgumentError, match="^temperature: "):
        nikaido_isoda_gap(game, None, mu_logits, nu_logits, 0.0)
    with pytest.raises(InvalidArgumentError, match="^temperature: "):
        solve_game_equilibrium(game, -1.0)
    with pytest.raises(InvalidArgumentError, match="^mu_logits: "):
        nikaido_isoda_gap(game, None, nu_logits, nu_logits, LAM)
    with pytest.raises(InvalidArgumentError, match="^nu_logits: "):
        nikaido_isoda_gap(game, None, mu_logits, mu_logits, LAM)
    with pytest.raises(InvalidArgumentError, match="^x: "):
        nikaido_isoda_gap(game, jnp.zeros((S, GA)), mu_logits, nu_logits, LAM)
    with pytest.raises(InvalidMDPError, match="^transitions: .*sum to 1"):
        validate_game(game.replace(transitions=game.transitions * 0.9))
    with pytest.raises(InvalidMDPError, match="^transitions: expected shape"):
        validate_game(game.replace(transitions=game.transitions[:, :, :1]))
    with pytest.raises(InvalidMDPError, match="^initial: "):
        validate_game(game.replace(initial=game.initial * 2))
    with pytest.raises(InvalidMDPError, match="^discount: "):
        validate_game(game.replace(discount=1.0))
    with pytest.raises(InvalidMDPError, match="^rewards: "):
        validate_game(game.replace(rewards=game.rewards.at[0, 0, 0].set(jnp.nan)))
    with pytest.raises(InvalidMDPError, match="^terminal: "):
        validate_game(game.replace(terminal=jnp.zeros(S)))
    # Terminal states may have all-zero transition rows.
    validate_game(game.replace(transitions=game.transitions.at[2].set(0.0)))
