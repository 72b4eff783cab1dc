"""RLHF on simulators (bilevel_jax.preferences_sim, bilevel_jax.algorithms.rlhf_sim).

References are independent and written here: NumPy float64 enumeration of every 3-step
trajectory of a tiny tabular MDP (run through `bj.as_simulator`, the same code as a gymnax
environment), the exact expected Bradley-Terry loss `L(x, Y)` as the double sum over trajectory
pairs, its gradients by central finite differences; statistical checks within 4 standard errors
on fixed seeds.
"""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax.algorithms.rlhf_sim import (draw_pairs, rlhf_sim_decoupled, rlhf_sim_pbrl,
                                             rlhf_sim_problem, rlhf_sim_true_reward)
from bilevel_jax.algorithms.sample_pbrl import SamplePBRLConfig
from bilevel_jax.errors import InvalidArgumentError
from bilevel_jax.learners import make_learner
from bilevel_jax.preferences import RewardModel
from bilevel_jax.preferences_sim import (annotate, bradley_terry_nll, cnn_reward_model, empty_buffer,
                                         episodic_returns, mlp_reward_model, preference_gradients,
                                         push_pairs, segments_from_rollout, true_returns)

jax.config.update("jax_enable_x64", True)

Z_MAX = 4.0
S, A, H = 3, 2, 3
_rng = np.random.default_rng(3)
P_NP = _rng.dirichlet(np.ones(S), size=(S, A))
MU_NP = np.array([0.5, 0.3, 0.2])
R_TRUE_NP = _rng.normal(size=(S, A))
X_NP = 0.5 * _rng.normal(size=(S, A))        # reward-model table r_x(s, a)
Y_NP = _rng.normal(size=(S, A))              # policy logits pi_Y(a|s) = softmax(Y[s])
NOISE = 0.8


def tabular_sim(terminal=None, temperature=0.5):
    mdp = bj.TabularMDP(transitions=jnp.asarray(P_NP), rewards=jnp.asarray(R_TRUE_NP),
                        discount=0.9, initial=jnp.asarray(MU_NP),
                        terminal=None if terminal is None else jnp.asarray(terminal))
    base = bj.BilevelProblem(follower=lambda x, c: mdp,
                             leader_reward=lambda x, c: jnp.zeros((S, A)),
                             leader_discount=0.9, temperature=temperature)
    return bj.as_simulator(base)


def table_model():
    """`r_x(obs, a) = (one_hot(s) @ x)[a]`: the tabular reward model through observations."""
    return RewardModel(init=lambda key: jnp.zeros((S, A)),
                       apply=lambda x, obs, a: (obs @ x)[a])


def table_policy(y, obs):
    return obs @ y


def make_problem(num_envs, num_steps=H, segment_length=H, **kw):
    terminal = kw.pop("terminal", None)
    options = dict(noise=NOISE, segment_length=segment_length, num_envs=num_envs,
                   num_steps=num_steps, initial_pairs=8, warmup_epochs=5, pairs_per_epoch=4,
                   buffer_size=16, heldout_pairs=8)
    options.update(kw)
    return rlhf_sim_problem(tabular_sim(terminal), table_model(), **options)


# ----------------------------------------------------------------------------------------------
# Reward models
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_reward_model_shapes_and_gradients(kind):
    obs_shape = (10, 10, 4) if kind == "cnn" else (7,)
    if kind == "cnn":
        model = cnn_reward_model(obs_shape, 3, channels=(4,), hidden=(8,), dtype=jnp.float64)
    else:
        model = mlp_reward_model(obs_shape, 3, hidden=(8, 8), dtype=jnp.float64)
    params = jax.jit(model.init)(jax.random.key(0))
    obs = jax.random.bernoulli(jax.random.key(1), 0.3, (5,) + obs_shape).astype(jnp.float64)
    actions = jnp.array([0, 1, 2, 1, 0])
    out = jax.jit(jax.vmap(model.apply, (None, 0, 0)))(params, obs, actions)
    assert out.shape == (5,) and out.dtype == jnp.float64
    assert model.apply(params, obs[0], 2).shape == ()
    # Actions select different outputs of the same observation.
    per_action = np.asarray(jax.vmap(model.apply, (None, None, 0))(params, obs[0], jnp.arange(3)))
    assert np.ptp(per_action) > 0

    @jax.jit
    def total(p):
        return jnp.sum(jax.vmap(model.apply, (None, 0, 0))(p, obs, actions) ** 2)

    grads = jax.jit(jax.grad(total))(params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    gflat = jax.flatten_util.ravel_pytree(grads)[0]
    direction = jax.random.normal(jax.random.key(2), flat.shape, flat.dtype)
    eps = 1e-6
    fd = (total(unravel(flat + eps * direction)) - total(unravel(flat - eps * direction))) / (2 * eps)
    np.testing.assert_allclose(float(gflat @ direction), float(fd), rtol=1e-6)
    assert float(jnp.linalg.norm(gflat)) > 0


@pytest.mark.parametrize("kernel", [2, 3])
def test_cnn_reward_model_matches_numpy_convolution(kernel):
    """The CNN's convolution (shifted copies times the kernel) against a direct NumPy float64
    SAME convolution (stride 1, TensorFlow/flax padding: the extra row/column at the end)."""
    model = cnn_reward_model((6, 5, 3), 2, channels=(4,), kernel=kernel, hidden=(3,),
                             dtype=jnp.float64)
    params = model.init(jax.random.key(0))
    conv = params["params"]["Conv_0"]
    w, b = np.asarray(conv["kernel"]), np.asarray(conv["bias"]) + 0.1
    dense = {k: np.asarray(v) for k, v in params["params"]["Dense_0"].items()}
    head = {k: np.asarray(v) for k, v in params["params"]["Dense_1"].items()}
    params = jax.tree_util.tree_map(jnp.asarray, {"params": {**params["params"], "Conv_0": {
        "kernel": w, "bias": b}}})
    image = np.random.default_rng(0).normal(size=(6, 5, 3))
    low = (kernel - 1) // 2
    padded = np.pad(image, ((low, kernel - 1 - low), (low, kernel - 1 - low), (0, 0)))
    out = np.zeros((6, 5, 4))
    for r in range(6):
        for c in range(5):
            out[r, c] = np.einsum("ijk,ijkf->f", padded[r:r + kernel, c:c + kernel], w) + b
    h = np.maximum(np.maximum(out, 0).reshape(-1) @ dense["kernel"] + dense["bias"], 0)
    expected = h @ head["kernel"] + head["bias"]
    for a in range(2):
        np.testing.assert_allclose(float(model.apply(params, jnp.asarray(image), a)),
                                   expected[a], rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# Segments
# ----------------------------------------------------------------------------------------------

def _np_valid_starts(done, length):
    t, n = done.shape
    valid = np.zeros((t - length + 1, n), bool)
    for lane in range(n):
        for t0 in range(t - length + 1):
            valid[t0, lane] = not done[t0:t0 + length - 1, lane].any()
    return valid


def test_segments_match_the_rollout():
    sim = tabular_sim(terminal=np.array([False, False, True]))
    policy = lambda obs: table_policy(jnp.asarray(Y_NP), obs)  # noqa: E731
    length, pairs_n = 4, 6

    @jax.jit
    def draw(k1, k2):
        traj = bj.sim.rollout(k1, sim, None, None, policy, 12, 20)
        return traj, segments_from_rollout(k2, traj, length, pairs_n)

    traj, pairs = draw(jax.random.key(0), jax.random.key(1))
    obs, act, rew, done = (np.asarray(a) for a in (traj.obs, traj.action, traj.reward, traj.done))
    assert done.any()                              # episodes do end inside the window
    valid = _np_valid_starts(done, length)
    lanes, starts = np.asarray(pairs.lane).ravel(), np.asarray(pairs.start).ravel()
    assert len(set(lanes.tolist())) == 2 * pairs_n  # distinct lanes while 2M <= N
    p_obs = np.asarray(pairs.obs).reshape(2 * pairs_n, length, S)
    p_act = np.asarray(pairs.actions).reshape(2 * pairs_n, length)
    p_rew = np.asarray(pairs.rewards).reshape(2 * pairs_n, length)
    p_alive = np.asarray(pairs.alive).reshape(2 * pairs_n, length)
    for j, (lane, t0) in enumerate(zip(lanes, starts)):
        steps = t0 + np.arange(length)
        np.testing.assert_array_equal(p_obs[j], obs[steps, lane])
        if valid[:, lane].any():
            assert valid[t0, lane]
            assert p_alive[j].all()
        np.testing.assert_array_equal(p_act[j], np.where(p_alive[j], act[steps, lane], 0))
        np.testing.assert_allclose(p_rew[j], np.where(p_alive[j], rew[steps, lane], 0.0))
    np.testing.assert_allclose(np.asarray(true_returns(pairs)).ravel(), p_rew.sum(-1))


def test_segment_starts_uniform_over_valid_and_fallback():
    t, n, length = 6, 2, 3
    done = np.zeros((t, n), bool)
    done[2, 0] = True                     # lane 0: valid starts {0, 3}
    done[[0, 2, 4], 1] = True             # lane 1: no valid start -> fallback, alive masked
    traj = types.SimpleNamespace(
        obs=jnp.arange(t * n, dtype=jnp.float64).reshape(t, n, 1),
        action=jnp.ones((t, n), jnp.int32), reward=jnp.ones((t, n)), done=jnp.asarray(done))
    pairs = jax.jit(jax.vmap(lambda k: segments_from_rollout(k, traj, length, 1)))(
        jax.random.split(jax.random.key(0), 2000))
    lanes, starts = np.asarray(pairs.lane)[:, 0], np.asarray(pairs.start)[:, 0]
    alive = np.asarray(pairs.alive)[:, 0]
    for lane, start, al in ((lanes[:, 0], starts[:, 0], alive[:, 0]),
                            (lanes[:, 1], starts[:, 1], alive[:, 1])):
        for ln in (0, 1):
            sel = lane == ln
            got = start[sel]
            if ln == 0:
                assert set(got.tolist()) == {0, 3}
                frac = np.mean(got == 0)
                assert abs(frac - 0.5) < Z_MAX * np.sqrt(0.25 / sel.sum())
                assert al[sel].all()
            else:
                assert set(got.tolist()) == {0, 1, 2, 3}
                for s0 in range(4):
                    seg_done = done[s0:s0 + length, 1]
                    expect = (np.cumsum(seg_done) - seg_done) == 0
                    np.testing.assert_array_equal(al[sel][got == s0], expect[None].repeat(
                        np.sum(got == s0), 0))


# ----------------------------------------------------------------------------------------------
# Annotator
# ----------------------------------------------------------------------------------------------

def test_labels_follow_annotator_probabilities():
    problem = make_problem(num_envs=64, num_steps=10, segment_length=4)
    policy = lambda obs: table_policy(jnp.asarray(Y_NP), obs)  # noqa: E731
    pairs, _, _ = jax.jit(lambda k: draw_pairs(problem, k, jnp.zeros((S, A)), policy, 4000))(
        jax.random.key(5))
    g = np.asarray(true_returns(pairs))
    gap = g[:, 0] - g[:, 1]
    for noise in (NOISE, 3.0):
        labels = np.asarray(jax.jit(annotate)(jax.random.key(6), pairs, noise))
        p = 1.0 / (1.0 + np.exp(-gap / noise))
        z = (labels.sum() - p.sum()) / np.sqrt(np.sum(p * (1 - p)))
        assert abs(z) < Z_MAX, z
        # Per-sign check: pairs where segment 0 is much better are labelled 1 more often.
        hi, lo = gap > 1.0, gap < -1.0
        assert labels[hi].mean() > labels[lo].mean()
    hard = np.asarray(annotate(jax.random.key(7), pairs, 0.0))
    np.testing.assert_array_equal(hard[gap > 0], 1.0)
    np.testing.assert_array_equal(hard[gap < 0], 0.0)


# ----------------------------------------------------------------------------------------------
# The NLL gradient with the score term, against finite differences of the exact loss
# ----------------------------------------------------------------------------------------------

def _exact_loss(x, y, noise=NOISE):
    pi = np.exp(y - y.max(1, keepdims=True))
    pi /= pi.sum(1, keepdims=True)
    probs, model, true = [], [], []
    for seq in itertools.product(range(S * A), repeat=H):
        s = [c // A for c in seq]
        a = [c % A for c in seq]
        p = MU_NP[s[0]]
        for k in range(H):
            p *= pi[s[k], a[k]]
            if k + 1 < H:
                p *= P_NP[s[k], a[k], s[k + 1]]
        probs.append(p)
        model.append(sum(x[s[k], a[k]] for k in range(H)))
        true.append(sum(R_TRUE_NP[s[k], a[k]] for k in range(H)))
    probs, model, true = map(np.array, (probs, model, true))
    d = model[:, None] - model[None, :]
    q = 1.0 / (1.0 + np.exp(-(true[:, None] - true[None, :]) / noise))
    loss = q * np.logaddexp(0.0, -d) + (1 - q) * np.logaddexp(0.0, d)
    return probs @ loss @ probs


def _fd(fn, z, eps=1e-6):
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        e = np.zeros_like(z)
        e[idx] = eps
        g[idx] = (fn(z + e) - fn(z - e)) / (2 * eps)
    return g


def test_nll_gradient_with_score_term_matches_finite_differences(baseline="leave_one_out"):
    num_pairs, batches = 32, 300
    problem = make_problem(num_envs=2 * num_pairs)        # T = L = 3: segments are episodes
    x, y = jnp.asarray(X_NP), jnp.asarray(Y_NP)
    model = table_model()

    def one(key):
        pairs, labels, _ = draw_pairs(problem, key, x, lambda o: table_policy(y, o), num_pairs)
        return preference_gradients(model.apply, x, table_policy, y, pairs, labels,
                                    baseline=baseline)

    loss, gx, gy = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(11), batches))
    exact = _exact_loss(X_NP, Y_NP)
    fd_x = _fd(lambda z: _exact_loss(z, Y_NP), X_NP)
    fd_y = _fd(lambda z: _exact_loss(X_NP, z), Y_NP)
    for est, ref in ((np.asarray(loss), exact), (np.asarray(gx), fd_x), (np.asarray(gy), fd_y)):
        mean = est.mean(0)
        se = est.std(0, ddof=1) / np.sqrt(batches)
        z = np.abs(mean - ref) / np.maximum(se, 1e-12)
        assert np.all(z < Z_MAX), (mean, ref, se)
    # The score term matters: it is far from zero at these logits.
    # (a zero score term would be |fd_y| / se > 2 Z_MAX standard errors off)
    assert np.max(np.abs(fd_y) / (np.asarray(gy).std(0, ddof=1) / np.sqrt(batches))) > 2 * Z_MAX


# ----------------------------------------------------------------------------------------------
# Buffer, returns metric
# ----------------------------------------------------------------------------------------------

def test_buffer_fifo_and_episodic_returns():
    problem = make_problem(num_envs=8, num_steps=6, segment_length=2)
    policy = lambda obs: table_policy(jnp.asarray(Y_NP), obs)  # noqa: E731
    pairs, labels, _ = jax.jit(lambda k: draw_pairs(problem, k, jnp.zeros((S, A)), policy, 5))(
        jax.random.key(0))
    buf = empty_buffer(7, pairs, labels.dtype)
    buf = push_pairs(buf, pairs, jnp.arange(5.0))
    buf = push_pairs(buf, pairs, jnp.arange(5.0, 10.0))
    np.testing.assert_array_equal(np.asarray(buf.labels), [7, 8, 9, 3, 4, 5, 6])
    assert int(buf.count) == 10 and bool(jnp.all(buf.valid))
    np.testing.assert_array_equal(np.asarray(buf.pairs.actions[0]), np.asarray(pairs.actions[2]))
    # episodic_returns: lane 0 holds episodes [1, 2 | 3 | 4 (cut)], lane 1 [5 (cut)].
    rewards = np.array([[1.0, 5.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    time = np.array([[0, 0], [1, 1], [0, 2], [0, 3]])
    done = np.array([[False, False], [True, False], [True, False], [False, False]])
    mean, count = episodic_returns(jnp.asarray(rewards), jnp.asarray(time), jnp.asarray(done))
    assert int(count) == 2 and float(mean) == pytest.approx((3.0 + 3.0) / 2)


def test_minibatch_reward_loss_is_unbiased_over_the_filled_slots():
    """`fit_batch_size`: the minibatch NLL and its gradient average (within 4 SE over 400 draws)
    to the NLL of the filled slots only (9 of 16 filled: empty slots never drawn)."""
    from bilevel_jax.algorithms.rlhf_sim import _buffer_loss
    full = make_problem(num_envs=8, num_steps=6, segment_length=2)
    mini = make_problem(num_envs=8, num_steps=6, segment_length=2, fit_batch_size=3)
    policy = lambda obs: table_policy(jnp.asarray(Y_NP), obs)  # noqa: E731
    pairs, labels, _ = jax.jit(lambda k: draw_pairs(full, k, jnp.zeros((S, A)), policy, 9))(
        jax.random.key(0))
    buf = push_pairs(empty_buffer(16, pairs, labels.dtype), pairs, labels)
    x = jnp.asarray(X_NP)
    target = float(_buffer_loss(full, x, buf, None))
    target_grad = np.asarray(jax.grad(lambda p: _buffer_loss(full, p, buf, None))(x))
    keys = jax.random.split(jax.random.key(1), 400)
    values, grads = jax.vmap(jax.value_and_grad(lambda p, k: _buffer_loss(mini, p, buf, k)),
                             (None, 0))(x, keys)
    values, grads = np.asarray(values), np.asarray(grads)
    assert abs(values.mean() - target) <= Z_MAX * values.std(ddof=1) / np.sqrt(400)
    se = grads.std(0, ddof=1) / np.sqrt(400)
    assert np.all(np.abs(grads.mean(0) - target_grad) <= Z_MAX * se + 1e-12)
    assert values.std() > 0   # it is a draw, not the full batch
    with pytest.raises(InvalidArgumentError, match="fit_batch_size"):
        make_problem(num_envs=4, fit_batch_size=0)


def test_reward_fit_and_accuracy_vmap_over_members_as_they_run_alone():
    """`_fit` and the held-out accuracy run their vmapped members one after another on CPU
    (`jax.custom_batching.sequential_vmap`): vmapped over two reward models they give what
    each gives alone (jit, fit with minibatches of the buffer and with all of it)."""
    from bilevel_jax.algorithms.rlhf_sim import _evaluation, _fit
    for fit_batch_size in (None, 3):
        problem = make_problem(num_envs=8, num_steps=6, segment_length=2,
                               fit_batch_size=fit_batch_size)
        policy = lambda obs: table_policy(jnp.asarray(Y_NP), obs)  # noqa: E731
        pairs, labels, stats = jax.jit(lambda k: draw_pairs(problem, k, jnp.zeros((S, A)),
                                                            policy, 9))(jax.random.key(0))
        buf = push_pairs(empty_buffer(16, pairs, labels.dtype), pairs, labels)
        gaps = true_returns(pairs)
        heldout = {"pairs": pairs, "gaps": gaps[:, 0] - gaps[:, 1]}
        opt = optax.adam(0.1)
        xs = jnp.stack([jnp.asarray(X_NP), -jnp.asarray(X_NP)])
        keys = jax.random.split(jax.random.key(1), 2)

        def member(x, key):
            x_new, _, nll, grad_norm = _fit(problem, opt, x, opt.init(x), buf, 3, key)
            return x_new, nll, grad_norm, _evaluation(problem, x_new, heldout, stats, nll,
                                                      True)["preference_accuracy"]

        batched = jax.jit(jax.vmap(member))(xs, keys)
        for i in range(2):
            alone = jax.jit(member)(xs[i], keys[i])
            for b, a in zip(batched, alone):
                np.testing.assert_allclose(np.asarray(b[i]), np.asarray(a), rtol=1e-5, atol=1e-7)
        assert not np.allclose(np.asarray(batched[0][0]), np.asarray(batched[0][1]))


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_field():
    with pytest.raises(InvalidArgumentError, match="segment_length"):
        make_problem(num_envs=4, num_steps=5, segment_length=6)
    traj = types.SimpleNamespace(obs=jnp.zeros((5, 2, 1)), action=jnp.zeros((5, 2), jnp.int32),
                                 reward=jnp.zeros((5, 2)), done=jnp.zeros((5, 2), bool))
    with pytest.raises(InvalidArgumentError, match="segment_length"):
        segments_from_rollout(jax.random.key(0), traj, 6, 1)
    vector = RewardModel(init=lambda key: jnp.zeros((S, A)), apply=lambda x, obs, a: obs @ x)
    with pytest.raises(InvalidArgumentError, match="reward_model"):
        rlhf_sim_problem(tabular_sim(), vector, segment_length=2, num_steps=4)
    with pytest.raises(InvalidArgumentError, match="noise"):
        make_problem(num_envs=4, noise=-1.0)
    with pytest.raises(InvalidArgumentError, match="buffer_size"):
        make_problem(num_envs=4, initial_pairs=20, buffer_size=16)
    with pytest.raises(InvalidArgumentError, match="base"):
        rlhf_sim_problem(object(), table_model())


# ----------------------------------------------------------------------------------------------
# Algorithms (smoke + the warm-up's fit)
# ----------------------------------------------------------------------------------------------

def _learner():
    return make_learner("soft_ppo", num_envs=2, num_steps=4, num_minibatches=1, update_epochs=1,
                        num_updates=1, hidden=(4,), learning_rate=1e-2)


# One algorithm per case (each costs its compilation): both algorithms fit through the same
# `fit_batch_size` branch and evaluate through the same `track_accuracy` switch, so each
# branch is run once.
@pytest.mark.parametrize("name, fit_batch_size, track_accuracy",
                         [("pbrl", 8, True), ("decoupled", None, False)])
def test_algorithms_run_and_report(name, fit_batch_size, track_accuracy):
    problem = make_problem(num_envs=6, num_steps=8, segment_length=3, initial_pairs=16,
                           warmup_epochs=30, buffer_size=24, noise=0.3,
                           fit_batch_size=fit_batch_size)
    x0 = jnp.zeros((S, A))
    opt = optax.adam(0.05)
    cfg = SamplePBRLConfig(num_envs=2, num_steps=4, policy_hidden=(), baseline_hidden=(4,),
                           baseline_steps=1)
    if name == "pbrl":
        algo = rlhf_sim_pbrl(opt, _learner(), cfg, rho_0=1.0, rho_max=10.0, ramp_iters=2,
                             track_accuracy=track_accuracy)
    else:
        algo = rlhf_sim_decoupled(opt, _learner(), fit_steps=2, track_accuracy=track_accuracy)
    state = jax.jit(algo.init)(problem, x0, jax.random.key(0))
    # The warm-up fitted the initial pairs: their NLL fell from log 2 (at x0 = 0).
    nll = lambda x: bradley_terry_nll(problem.reward_fn, x, state["buffer"].pairs,  # noqa: E731
                                      state["buffer"].labels, state["buffer"].valid)
    assert float(nll(x0)) == pytest.approx(np.log(2))
    assert float(nll(state["x"])) < 0.8 * np.log(2)
    step = jax.jit(algo.step)
    for _ in range(2):
        state, metrics = step(problem, state)
    for key in ("objective", "true_return", "preference_accuracy", "labels", "samples",
                "grad_norm", "follower_residual", "nonfinite", "env_reward", "preference_loss"):
        assert key in metrics, (name, key)
    assert not bool(metrics["nonfinite"]), name
    assert np.isfinite(float(metrics["env_reward"]))
    assert float(metrics["labels"]) == 16 + 2 * 4
    assert int(state["buffer"].count) == 16 + 2 * 4
    assert np.isfinite(float(metrics["preference_loss"]))
    # The held-out accuracy only when tracked (NaN otherwise: the runner's track_every schedule).
    assert np.isfinite(float(metrics["preference_accuracy"])) == track_accuracy
    if name == "pbrl":
        assert float(metrics["score_norm"]) > 0 and np.isfinite(float(metrics["penalty"]))


def test_hidden_reward_and_true_reward_ceiling_problem():
    """The follower sees r_x, never the environment's reward; the ceiling's world sees it."""
    problem = make_problem(num_envs=4, num_steps=6, segment_length=2)
    x = jnp.asarray(X_NP)
    policy = lambda obs: table_policy(jnp.asarray(Y_NP), obs)  # noqa: E731

    @jax.jit
    def both(key):
        a = bj.sim.rollout(key, problem.sim, x, None, policy, 4, 6, keep_states=True)
        b = bj.sim.rollout(key, problem.true_reward_sim(), x, None, policy, 4, 6)
        return a, b

    a, b = both(jax.random.key(3))
    s, act = np.asarray(a.state.state), np.asarray(a.action)
    np.testing.assert_allclose(np.asarray(a.follower_reward), X_NP[s, act], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(a.reward), R_TRUE_NP[s, act], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(a.leader_reward), 0.0)
    np.testing.assert_allclose(np.asarray(b.follower_reward), R_TRUE_NP[s, act], rtol=1e-6)
    assert callable(rlhf_sim_true_reward(_learner()).step)
