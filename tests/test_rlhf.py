"""RLHF as bilevel RL (SPEC 7.4): trajectory pairs, the annotator, the Bradley-Terry loss and
its gradients, the FIFO buffer, the PBRL and decoupled algorithms, the runner's `rlhf` problem.

Runs in float64 (tests/conftest.py). References are written here in NumPy: the distribution of
fixed-horizon trajectories with absorbing terminal states by explicit enumeration
(`itertools.product`), the exact expected loss `L(x, pi)` as the double sum over trajectory
pairs, its gradients by central finite differences (eps = 1e-6 on logits, relative 1e-6), and
the Bradley-Terry NLL and its gradient for a linear reward model in closed form. Stochastic
quantities are checked on fixed seeds: means within 4.5 standard errors of the exact values
(two-sided, about 7e-6 per coordinate for a Gaussian mean).
"""

import functools
import itertools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import bilevel_jax as bj
from bilevel_jax.algorithms.rlhf import rlhf_decoupled, rlhf_pbrl
from bilevel_jax.envs.preference import (PreferenceEnv, linear_fit_residual, preference_gridworld,
                                         random_preference_env)
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.preferences import (TrajectoryPairs, annotate, buffer_in_order, empty_buffer,
                                     enumerate_trajectories, exact_preference_loss,
                                     labels_from_uniforms, linear_reward_model, mlp_reward_model,
                                     preference_accuracy, preference_nll, push_pairs,
                                     rlhf_problem, sample_pairs, stochastic_gradients)
from bilevel_jax.runner.config import load_config, resolve_config
from bilevel_jax.runner.fields import ConfigError
from helpers import assert_rel_close

jax.config.update("jax_enable_x64", True)

Z_MAX = 4.5          # allowed |mean - exact| / SE for the statistical checks
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------
# A tiny instance: S = 3, A = 2, H = 3, state 2 terminal, linear reward model with d = 3
# ----------------------------------------------------------------------------------------------

S, A, H, D = 3, 2, 3, 3
_rng = np.random.default_rng(7)
P_NP = _rng.dirichlet(np.ones(S), size=(S, A))
MU_NP = np.array([0.5, 0.3, 0.2])
TERMINAL_NP = np.array([False, False, True])
R_TRUE_NP = _rng.normal(size=(S, A))
PHI_NP = _rng.normal(size=(S, A, D))
W_NP = _rng.normal(size=D)
LOGITS_NP = _rng.normal(size=(S, A))
NOISE = 0.7


def tiny_problem(noise=NOISE):
    mdp = bj.TabularMDP(transitions=jnp.asarray(P_NP), rewards=jnp.asarray(R_TRUE_NP),
                        discount=0.9, initial=jnp.asarray(MU_NP),
                        terminal=jnp.asarray(TERMINAL_NP))
    env = PreferenceEnv(mdp=mdp, features=jnp.asarray(PHI_NP))
    return rlhf_problem(env, linear_reward_model(D, dtype=jnp.float64), temperature=0.5,
                        noise=noise, horizon=H, initial_pairs=4, warmup_epochs=0,
                        pairs_per_epoch=4, buffer_size=8, heldout_pairs=4)


TINY = tiny_problem()
X_TINY = {"w": jnp.asarray(W_NP)}


# ----------------------------------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------------------------------

def softmax(y):
    z = np.exp(y - y.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def softplus(z):
    return np.logaddexp(0.0, z)


def np_trajectories(pi):
    """Every canonical trajectory `(states, actions, alive)` with its probability."""
    out = []
    for codes in itertools.product(range(S * A), repeat=H):
        s = [c // A for c in codes]
        a = [c % A for c in codes]
        prob, alive, flags = MU_NP[s[0]], True, []
        for t in range(H):
            flags.append(alive)
            if not alive:
                if (s[t], a[t]) != (0, 0):
                    prob = 0.0
                continue
            prob *= pi[s[t], a[t]]
            if TERMINAL_NP[s[t]]:
                alive = False
            elif t + 1 < H:
                prob *= P_NP[s[t], a[t], s[t + 1]]
        out.append((np.array(s), np.array(a), np.array(flags), prob))
    return out


def np_return(table, traj):
    s, a, alive, _ = traj
    return float(np.sum(table[s, a] * alive))


def np_annotator(gap, noise):
    if noise == 0:
        return np.where(gap > 0, 1.0, np.where(gap < 0, 0.0, 0.5))
    return 1.0 / (1.0 + np.exp(-gap / noise))


def np_exact_loss(w, logits, noise=NOISE):
    trajs = np_trajectories(softmax(logits))
    p = np.array([t[3] for t in trajs])
    model = np.array([np_return(PHI_NP @ w, t) for t in trajs])
    true = np.array([np_return(R_TRUE_NP, t) for t in trajs])
    d = model[:, None] - model[None, :]
    q = np_annotator(true[:, None] - true[None, :], noise)
    return p @ (q * softplus(-d) + (1 - q) * softplus(d)) @ p


def central_diff(f, z, eps=1e-6):
    grad = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (f(up) - f(down)) / (2 * eps)
    return grad


def np_score_gradient(w, logits, noise=NOISE):
    """`sum_ij p_i p_j lbar_ij (grad log p_i + grad log p_j)` by enumeration."""
    pi = softmax(logits)
    trajs = np_trajectories(pi)
    p = np.array([t[3] for t in trajs])
    model = np.array([np_return(PHI_NP @ w, t) for t in trajs])
    true = np.array([np_return(R_TRUE_NP, t) for t in trajs])
    d = model[:, None] - model[None, :]
    q = np_annotator(true[:, None] - true[None, :], noise)
    lbar = q * softplus(-d) + (1 - q) * softplus(d)
    scores = np.zeros((len(trajs), S, A))
    for i, (s, a, alive, _) in enumerate(trajs):
        for t in range(H):
            if alive[t]:
                scores[i, s[t], a[t]] += 1.0
                scores[i, s[t]] -= pi[s[t]]
    weight = p[:, None] * p[None, :] * lbar
    return (np.einsum("ij,isa->sa", weight, scores) + np.einsum("ij,jsa->sa", weight, scores))


# ----------------------------------------------------------------------------------------------
# Exact loss and its gradients
# ----------------------------------------------------------------------------------------------

@jax.jit
def exact_loss_and_grads(problem, x, logits):
    """`L(x, softmax(logits))` by enumeration and its gradients in `(x, logits)`."""
    return jax.value_and_grad(
        lambda x, y: exact_preference_loss(problem, x, jax.nn.softmax(y, axis=-1)),
        argnums=(0, 1))(x, logits)


enumerate_jitted = jax.jit(enumerate_trajectories, static_argnums=2)
sample_jitted = jax.jit(sample_pairs, static_argnums=(3, 4))
nll_jitted = jax.jit(preference_nll)


def test_enumeration_matches_reference():
    pi = softmax(LOGITS_NP)
    traj, probs = enumerate_jitted(TINY.mdp, jnp.asarray(pi), H)
    ref = {(tuple(s), tuple(a)): (tuple(alive), prob) for s, a, alive, prob in np_trajectories(pi)}
    states, actions, alive = (np.asarray(traj[k]) for k in ("states", "actions", "alive"))
    assert len(ref) == len(probs) == (S * A) ** H
    for i in range(len(probs)):
        flags, prob = ref[(tuple(states[i]), tuple(actions[i]))]
        assert tuple(alive[i]) == flags
        assert abs(float(probs[i]) - prob) <= 1e-12
    assert abs(float(jnp.sum(probs)) - 1.0) < 1e-12


@pytest.mark.parametrize("noise", [NOISE, 0.0])
def test_exact_loss_and_its_gradients_match_finite_differences(noise):
    value, (grad_x, grad_y) = exact_loss_and_grads(tiny_problem(noise), X_TINY,
                                                   jnp.asarray(LOGITS_NP))
    assert_rel_close(value, np_exact_loss(W_NP, LOGITS_NP, noise))
    fd_y = central_diff(lambda y: np_exact_loss(W_NP, y, noise), LOGITS_NP.copy())
    fd_w = central_diff(lambda w: np_exact_loss(w, LOGITS_NP, noise), W_NP.copy())
    assert_rel_close(grad_y, fd_y, rtol=1e-6, atol_scale=1e-6)
    assert_rel_close(grad_x["w"], fd_w, rtol=1e-6, atol_scale=1e-6)
    # The policy gradient is the score-function term: the expectation of
    # loss * (grad log p(tau1) + grad log p(tau2)).
    assert_rel_close(np_score_gradient(W_NP, LOGITS_NP, noise), fd_y, rtol=1e-6,
                     atol_scale=1e-6)


@jax.jit
def _estimates(keys):
    def one(key):
        k_pairs, k_labels = jax.random.split(key)
        logits = jnp.asarray(LOGITS_NP)
        pairs = sample_pairs(k_pairs, TINY.mdp, jax.nn.softmax(logits, axis=-1), H, 8)
        labels = annotate(k_labels, TINY.env.true_reward, pairs, TINY.noise)
        out = {}
        for baseline in ("leave_one_out", "none"):
            loss, gx, gy = stochastic_gradients(TINY, X_TINY, logits, pairs, labels,
                                                baseline=baseline)
            out[baseline] = (loss, gx["w"], gy)
        return out
    return jax.vmap(one)(keys)


def test_sampled_gradient_is_unbiased():
    """Mean of the estimator over 4,000 batches of 8 pairs (seed 0) within Z_MAX SE of the
    exact gradient, for both baselines; the leave-one-out baseline lowers the variance."""
    out = _estimates(jax.random.split(jax.random.key(0), 4000))
    exact_y = central_diff(lambda y: np_exact_loss(W_NP, y), LOGITS_NP.copy())
    exact_w = central_diff(lambda w: np_exact_loss(w, LOGITS_NP), W_NP.copy())
    exact_value = np_exact_loss(W_NP, LOGITS_NP)
    variances = {}
    for baseline, (loss, gw, gy) in out.items():
        for name, samples, exact in (("loss", loss, exact_value), ("grad_x", gw, exact_w),
                                     ("grad_y", gy, exact_y)):
            samples = np.asarray(samples)
            mean = samples.mean(0)
            se = samples.std(0, ddof=1) / np.sqrt(len(samples))
            z = np.abs(mean - exact) / np.maximum(se, 1e-12)
            assert np.all(z < Z_MAX), (baseline, name, z, mean, exact)
        variances[baseline] = np.asarray(gy).var(0).sum()
    assert variances["leave_one_out"] < variances["none"], variances


# ----------------------------------------------------------------------------------------------
# The Bradley-Terry NLL in x
# ----------------------------------------------------------------------------------------------

def test_nll_and_x_gradient_match_numpy():
    pairs = sample_jitted(jax.random.key(3), TINY.mdp, jax.nn.softmax(jnp.asarray(LOGITS_NP)),
                          H, 12)
    labels = jnp.asarray(np.random.default_rng(1).uniform(size=12))   # soft labels too
    weights = jnp.asarray((np.arange(12) % 3 != 0).astype(float))
    value, grad = jax.jit(jax.value_and_grad(preference_nll, argnums=1))(
        TINY, X_TINY, pairs, labels, weights)
    states, actions, alive = (np.asarray(a) for a in (pairs.states, pairs.actions, pairs.alive))
    feats = np.einsum("npt,nptd->npd", alive, PHI_NP[states, actions])          # [N, 2, d]
    d = (feats[:, 0] - feats[:, 1]) @ W_NP
    lab, wt = np.asarray(labels), np.asarray(weights)
    losses = lab * softplus(-d) + (1 - lab) * softplus(d)
    sigma = 1.0 / (1.0 + np.exp(-d))
    assert_rel_close(value, np.sum(wt * losses) / wt.sum())
    expected = ((wt * (sigma - lab))[:, None] * (feats[:, 0] - feats[:, 1])).sum(0) / wt.sum()
    assert_rel_close(grad["w"], expected)


def test_mlp_reward_model_gradient_matches_finite_differences():
    model = mlp_reward_model(D, (5,), dtype=jnp.float64)
    params = model.init(jax.random.key(0))
    problem = TINY.replace(reward_fn=model.apply)
    assert problem.reward(params).shape == (S, A)
    pairs = sample_jitted(jax.random.key(4), TINY.mdp, jnp.full((S, A), 0.5), H, 12)
    labels = jnp.asarray(np.random.default_rng(2).uniform(size=12))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    f = lambda v: float(nll_jitted(problem, unravel(jnp.asarray(v)), pairs, labels))  # noqa
    grad = jax.jit(jax.grad(lambda v: preference_nll(problem, unravel(v), pairs, labels)))(flat)
    assert_rel_close(grad, central_diff(f, np.asarray(flat)), rtol=1e-6, atol_scale=1e-6)


# ----------------------------------------------------------------------------------------------
# Sampling and the annotator
# ----------------------------------------------------------------------------------------------

def test_sampled_pairs_follow_the_exact_distribution():
    pi = softmax(LOGITS_NP)
    n = 20_000
    pairs = sample_jitted(jax.random.key(11), TINY.mdp, jnp.asarray(pi), H, n)
    assert pairs.states.shape == (n, 2, H) and pairs.alive.dtype == jnp.bool_
    ref = np_trajectories(pi)
    index = {(tuple(s), tuple(a)): i for i, (s, a, _, _) in enumerate(ref)}
    probs = np.array([t[3] for t in ref])
    states, actions, alive = (np.asarray(a) for a in (pairs.states, pairs.actions, pairs.alive))
    codes = np.array([[index[(tuple(states[i, j]), tuple(actions[i, j]))] for j in range(2)]
                      for i in range(n)])
    for j in range(2):                                       # each side: the exact distribution
        freq = np.bincount(codes[:, j], minlength=len(probs)) / n
        assert np.all(freq[probs == 0] == 0)
        se = np.sqrt(probs * (1 - probs) / n)
        assert np.all(np.abs(freq - probs) <= Z_MAX * se + 1e-12)
    # the two sides are independent: P(tau1 = tau2) = sum p^2
    same = np.mean(codes[:, 0] == codes[:, 1])
    p_same = np.sum(probs ** 2)
    assert abs(same - p_same) <= Z_MAX * np.sqrt(p_same * (1 - p_same) / n)
    # the alive flags are the reference's
    flags = np.array([t[2] for t in ref])
    assert np.array_equal(alive, flags[codes])


def test_annotator_label_frequency_is_sigmoid_of_the_return_gap():
    # 5 hand-made pairs with known true return gaps (single-step trajectories).
    true = jnp.asarray([[0.0, 1.0], [0.5, -0.5]])               # r(s, a), S = 2, A = 2
    states = jnp.asarray([[[0], [1]], [[1], [0]], [[0], [0]], [[1], [1]], [[0], [1]]])
    actions = jnp.asarray([[[0], [0]], [[0], [1]], [[1], [0]], [[0], [1]], [[1], [1]]])
    pairs = TrajectoryPairs(states=states, actions=actions, alive=jnp.ones(states.shape, bool))
    gaps = np.array([0 - 0.5, 0.5 - 1.0, 1.0 - 0.0, 0.5 + 0.5, 1.0 + 0.5])
    n = 20_000
    draw = jax.jit(jax.vmap(annotate, in_axes=(0, None, None, None)))
    keys = jax.random.split(jax.random.key(5), n)
    for noise in (0.3, 1.0):
        freq = np.asarray(draw(keys, true, pairs, noise)).mean(0)
        p = 1.0 / (1.0 + np.exp(-gaps / noise))
        assert np.all(np.abs(freq - p) <= Z_MAX * np.sqrt(p * (1 - p) / n)), (noise, freq, p)
    # noiseless: the higher return always wins; a tie is a fair coin
    labels = np.asarray(draw(keys, true, pairs, 0.0))
    assert np.all(labels == (gaps > 0).astype(float))
    tied = TrajectoryPairs(states=jnp.asarray([[[0], [1]]]), actions=jnp.asarray([[[0], [1]]]),
                           alive=jnp.asarray([[[True], [False]]]))       # 0 vs (absorbed) 0
    assert float(trajectory_gap(true, tied)) == 0.0
    freq = float(np.asarray(draw(keys, true, tied, 0.0)).mean())
    assert abs(freq - 0.5) <= Z_MAX * np.sqrt(0.25 / n)


def trajectory_gap(table, pairs):
    states, actions = np.asarray(pairs.states), np.asarray(pairs.actions)
    ret = (np.asarray(table)[states, actions] * np.asarray(pairs.alive)).sum(-1)
    return ret[0, 0] - ret[0, 1]


def test_preference_accuracy_counts_sign_agreement():
    pairs = TrajectoryPairs(states=jnp.asarray([[[0], [1]]] * 4), actions=jnp.zeros((4, 2, 1), int),
                            alive=jnp.ones((4, 2, 1), bool))
    reward = jnp.asarray([[1.0], [0.0]])                          # R(tau1) - R(tau2) = 1
    gaps = jnp.asarray([2.0, -1.0, 0.0, 3.0])                      # right, wrong, tie, right
    assert float(preference_accuracy(reward, pairs, gaps)) == pytest.approx(2 / 3)
    assert float(preference_accuracy(jnp.zeros((2, 1)), pairs, gaps)) == pytest.approx(0.5)
    assert np.isnan(float(preference_accuracy(reward, pairs, jnp.zeros(4))))


# ----------------------------------------------------------------------------------------------
# The FIFO buffer
# ----------------------------------------------------------------------------------------------

def _numbered_pairs(start, n, horizon=2):
    ids = jnp.arange(start, start + n, dtype=jnp.int32)
    states = jnp.broadcast_to(ids[:, None, None], (n, 2, horizon))
    return (TrajectoryPairs(states=states, actions=states % 2, alive=jnp.ones(states.shape, bool)),
            (ids % 2).astype(jnp.float64))


def test_buffer_keeps_the_last_pairs_in_order():
    push, order = jax.jit(push_pairs), jax.jit(buffer_in_order)
    buffer = empty_buffer(5, 2, jnp.float64)
    pushed = 0
    for batch in (3, 3, 1, 4):
        pairs, labels = _numbered_pairs(pushed, batch)
        buffer = push(buffer, pairs, labels)
        pushed += batch
        held, held_labels, valid = order(buffer)
        kept = min(pushed, 5)
        expected = np.arange(pushed - kept, pushed)
        assert int(buffer.count) == pushed
        assert np.array_equal(np.asarray(valid), np.arange(5) < kept)
        assert np.array_equal(np.asarray(held.states)[:kept, 0, 0], expected)
        assert np.array_equal(np.asarray(held_labels)[:kept], expected % 2)
        assert int(np.asarray(buffer.valid).sum()) == kept


# ----------------------------------------------------------------------------------------------
# The algorithms
# ----------------------------------------------------------------------------------------------

GRID_ENV = preference_gridworld(3, features="state", dtype=jnp.float64)
GRID_MODEL = linear_reward_model(GRID_ENV.num_features, dtype=jnp.float64)
GRID = rlhf_problem(GRID_ENV, GRID_MODEL, temperature=0.1, noise=0.0, horizon=6,
                    initial_pairs=8, warmup_epochs=0, pairs_per_epoch=8, buffer_size=64,
                    heldout_pairs=64)
GRID_X0 = GRID_MODEL.init(jax.random.key(0))
ALGORITHMS = {
    "pbrl_value": rlhf_pbrl(optax.sgd(0.2), penalty="value", rho_0=1.0, rho_max=10.0,
                            ramp_iters=60),
    "pbrl_bellman": rlhf_pbrl(optax.sgd(0.2), penalty="bellman", rho_0=1.0, rho_max=10.0,
                              ramp_iters=60),
    "decoupled": rlhf_decoupled(optax.sgd(0.2), fit_steps=2),
}


ITERATIONS = 60
KEYS = jax.random.split(jax.random.key(1), 2)


def _run(name, keys):
    algorithm = ALGORITHMS[name]

    def one(key):
        state = algorithm.init(GRID, GRID_X0, key)
        return jax.lax.scan(lambda s, _: algorithm.step(GRID, s), state, None,
                            length=ITERATIONS)
    return jax.vmap(one)(keys)


class AlgorithmTest(chex.TestCase):
    """Each algorithm, jitted and vmapped over 2 seeds, 60 iterations on a noiseless 3x3 grid
    from the uniform policy (x0 = 0, no warm-up, 8 initial pairs)."""

    _results = {}

    def run_algorithm(self, name):
        if name not in self._results:
            run = self.variant(functools.partial(_run, name))
            state, metrics = run(KEYS)
            state = {k: v for k, v in state.items() if k != "key"}
            self._results[name] = jax.tree_util.tree_map(np.asarray, (state, metrics))
        return self._results[name]

    @chex.variants(with_jit=True)
    @parameterized.parameters("pbrl_value", "pbrl_bellman", "decoupled")
    def test_runs_counts_and_improves(self, name):
        state, metrics = self.run_algorithm(name)
        for key in bj.algorithms.METRICS + ("preference_accuracy", "labels", "preference_loss",
                                            "true_return"):
            assert metrics[key].shape == (2, ITERATIONS), (name, key)
        assert not np.any(metrics["nonfinite"])
        # labels: 8 initial + 8 per iteration; the buffer holds the last 64 of them
        assert np.array_equal(metrics["labels"], np.tile(8 + 8 * np.arange(1, 61), (2, 1)))
        assert np.array_equal(state["buffer"].count, [488, 488])
        assert state["buffer"].labels.shape == (2, 64)
        assert np.array_equal(state["step"], [ITERATIONS] * 2)
        accuracy = metrics["preference_accuracy"]
        assert np.all((accuracy >= 0) & (accuracy <= 1))
        objective = metrics["objective"]
        assert np.all((objective >= -1e-9) & (objective <= 1 + 1e-9))
        uniform = float((GRID.returns[1] - GRID.returns[0]) / (GRID.returns[2] - GRID.returns[0]))
        assert np.allclose(objective[:, 0], uniform, atol=1e-6)      # pi*_{x0} is uniform
        # a test that can fail: the learned policy's true return clearly above the uniform's
        assert np.all(objective[:, -10:].mean(1) > 0.9), objective[:, -10:].mean(1)
        assert uniform < 0.6
        if name.startswith("pbrl"):
            assert np.all(metrics["penalty"] > -1e-9)
            assert np.allclose(metrics["rho"][:, 0], 1.0)
            assert np.allclose(metrics["rho"][:, 1], 10 ** (1 / 60))
        # both algorithms draw the same held-out set from the same seed
        self.run_algorithm("decoupled")
        held = state["heldout"]["pairs"].states
        assert np.array_equal(held, self._results["decoupled"][0]["heldout"]["pairs"].states)


# ----------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------

def test_environments_and_specification():
    for features, specified in (("onehot", True), ("state", True), ("rbf", False)):
        env = preference_gridworld(5, features=features, dtype=jnp.float64)
        assert env.features.shape[:2] == (25, 4)
        residual = linear_fit_residual(env)
        assert (residual < 1e-10) == specified, (features, residual)
        bj.validate_mdp(env.mdp)
    terminal = preference_gridworld(4, goal_terminal=True, start=(0, 0), dtype=jnp.float64)
    assert bool(terminal.mdp.terminal[15]) and float(terminal.mdp.initial[0]) == 1.0
    for realizable in (True, False):
        env = random_preference_env(3, 6, 2, 3, realizable=realizable, dtype=jnp.float64)
        bj.validate_mdp(env.mdp)
        assert env.features.shape == (6, 2, 3)
        assert (linear_fit_residual(env) < 1e-10) == realizable


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def test_bad_input_names_the_field():
    env = GRID_ENV
    with pytest.raises(InvalidArgumentError, match="noise"):
        rlhf_problem(env, GRID_MODEL, noise=-0.1)
    with pytest.raises(InvalidArgumentError, match="horizon"):
        rlhf_problem(env, GRID_MODEL, horizon=0)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        rlhf_problem(env, GRID_MODEL, temperature=0.0)
    with pytest.raises(InvalidArgumentError, match="buffer_size"):
        rlhf_problem(env, GRID_MODEL, initial_pairs=10, buffer_size=5)
    with pytest.raises(InvalidArgumentError, match="features"):
        rlhf_problem(env.replace(features=env.features[:, :2]), GRID_MODEL)
    with pytest.raises(InvalidArgumentError, match="horizon"):
        sample_pairs(jax.random.key(0), env.mdp, jnp.full((9, 4), 0.25), 0, 3)
    with pytest.raises(InvalidArgumentError, match="policy"):
        sample_pairs(jax.random.key(0), env.mdp, jnp.full((9, 3), 1 / 3), 2, 3)
    pairs = sample_jitted(jax.random.key(0), env.mdp, jnp.full((9, 4), 0.25), 2, 3)
    with pytest.raises(InvalidArgumentError, match="noise"):
        annotate(jax.random.key(0), env.true_reward, pairs, -1.0)
    with pytest.raises(InvalidArgumentError, match="labels"):
        preference_nll(GRID, GRID_X0, pairs, jnp.zeros(4))
    with pytest.raises(InvalidArgumentError, match="uniforms"):
        labels_from_uniforms(jnp.zeros(2), env.true_reward, pairs, 0.0)
    with pytest.raises(InvalidArgumentError, match="pairs.alive"):
        preference_nll(GRID, GRID_X0, pairs.replace(alive=pairs.alive[:, :, :1]), jnp.zeros(3))
    with pytest.raises(InvalidArgumentError, match="x"):
        ALGORITHMS["decoupled"].init(GRID, {"w": jnp.zeros(5)}, jax.random.key(0))
    with pytest.raises(InvalidArgumentError, match="pairs"):
        push_pairs(empty_buffer(2, 2), pairs, jnp.zeros(3))
    with pytest.raises(InvalidArgumentError, match="penalty"):
        rlhf_pbrl(optax.sgd(0.1), penalty="kl")
    with pytest.raises(InvalidArgumentError, match="rho_0"):
        rlhf_pbrl(optax.sgd(0.1), rho_0=10.0, rho_max=1.0)
    with pytest.raises(InvalidArgumentError, match="fit_steps"):
        rlhf_decoupled(optax.sgd(0.1), fit_steps=0)
    with pytest.raises(InvalidArgumentError, match="horizon"):
        exact_preference_loss(GRID, GRID_X0, jnp.full((9, 4), 0.25))   # (36)^6: refused
    with pytest.raises(InvalidArgumentError, match="start"):
        preference_gridworld(3, start="corner")


def test_config_refusals_and_shipped_configs():
    base = {"problem": {"name": "rlhf"}, "algorithm": {"name": "pbrl"}}
    with pytest.raises(ConfigError, match="problem.noise"):
        resolve_config({**base, "problem": {"name": "rlhf", "noise": -1.0}})
    with pytest.raises(ConfigError, match="problem.buffer_size"):
        resolve_config({**base, "problem": {"name": "rlhf", "initial_pairs": 64,
                                            "buffer_size": 32}})
    with pytest.raises(ConfigError, match="problem.horizon"):
        resolve_config({**base, "problem": {"name": "rlhf", "horizon": 0}})
    with pytest.raises(ConfigError, match="algorithm.name"):
        resolve_config({**base, "algorithm": {"name": "ascent"}})
    configs = [os.path.join(ROOT, "configs", "rlhf", f)
               for f in sorted(os.listdir(os.path.join(ROOT, "configs", "rlhf")))]
    assert len(configs) >= 2
    for path in configs:
        config = load_config(path)
        assert config["problem"]["name"] == "rlhf"
        assert len(config["seeds"]) >= 5
        assert len(config["sweep"]["problem.noise"]) >= 2
