"""Batched rollouts: statistics against the exact quantities, and the auto-reset bookkeeping.

Statistical checks use a fixed seed and a tolerance of a few standard errors (stated per test);
zero-probability events must never happen at all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
import reference as ref

GAMMA = 0.9
NUM_ENVS, NUM_STEPS = 2000, 500
Z_MAX = 5.0     # per-cell z-score bound (Bonferroni-safe for the ~100 cells checked per test)


def wide_mdp():
    """S = 20 > 16, so dense rows and `initial` are sampled by the binary-search path. A = 2.

    Four terminal states (one with an all-zero row); every row is supported on 5 states, never
    the first or the last one (zero-probability entries at both ends of every CDF); states 0 and
    19 are reachable only as start states; some actions have probability 0.
    """
    rng = np.random.default_rng(8)
    S, A = 20, 2
    P = np.zeros((S, A, S))
    for s in range(S):
        for a in range(A):
            support = rng.choice(np.arange(1, S - 1), size=5, replace=False)
            P[s, a, support] = rng.dirichlet(np.ones(5))
    terminal = np.zeros(S, bool)
    terminal[[4, 9, 13, 18]] = True
    P[18] = 0.0
    rewards = rng.uniform(-1, 1, size=(S, A))
    initial = np.zeros(S)
    initial[[0, 7, 19]] = [0.5, 0.3, 0.2]
    policy = rng.dirichlet(np.ones(A), size=S)
    policy[1] = [0.0, 1.0]
    policy[7] = [1.0, 0.0]
    return P, rewards, initial, terminal, policy


def small_mdp():
    """S = 6, A = 2 with two terminal states, zero-probability successors, actions and starts."""
    rng = np.random.default_rng(7)
    S, A = 6, 2
    P = rng.dirichlet(np.ones(S), size=(S, A))
    P[P < 0.08] = 0.0                     # some successors impossible
    P[0, 0, 5] = 0.0
    P /= P.sum(-1, keepdims=True)
    rewards = rng.uniform(-1, 1, size=(S, A))
    initial = np.array([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])   # never start in 3, 4, 5
    terminal = np.array([False, False, False, False, True, True])
    P[5] = 0.0                            # a terminal state with an all-zero row (allowed)
    policy = rng.dirichlet(np.ones(A), size=S)
    policy[1] = [0.0, 1.0]                # action 0 never taken in state 1
    return P, rewards, initial, terminal, policy


def as_mdp(P, rewards, initial, terminal, transitions=None):
    return bj.TabularMDP(transitions=jnp.asarray(P) if transitions is None else transitions,
                         rewards=jnp.asarray(rewards), discount=GAMMA,
                         initial=jnp.asarray(initial),
                         terminal=None if terminal is None else jnp.asarray(terminal))


sample = jax.jit(bj.sample_trajectories,
                 static_argnames=("num_envs", "num_steps", "max_episode_steps"))


def rbg_key(seed):
    """A key of the "rbg" PRNG: the library is key-agnostic, and an rbg sampler compiles in a
    fraction of the time of a threefry one (~0.3 s instead of ~2.5 s on CPU), which keeps the
    suite fast. The main statistical fixture uses the default threefry key."""
    return jax.random.key(seed, impl="rbg")


def to_numpy(traj):
    return {k: np.asarray(getattr(traj, k)) for k in
            ("states", "actions", "rewards", "next_states", "dones", "terminated", "times")}


@pytest.fixture(scope="module")
def rollout():
    P, rewards, initial, terminal, policy = wide_mdp()
    mdp = bj.validate_mdp(as_mdp(P, rewards, initial, terminal))
    traj = sample(jax.random.PRNGKey(0), mdp, jnp.asarray(policy), num_envs=NUM_ENVS,
                  num_steps=NUM_STEPS)
    return mdp, policy, to_numpy(traj)


def z_scores(counts, totals, probs):
    """z-scores of multinomial frequencies `counts / totals` against `probs` (rows)."""
    totals = totals[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(probs * (1 - probs) / totals)
        z = np.where(se > 0, (counts / totals - probs) / se, 0.0)
    return np.where(totals > 0, z, 0.0)


def check_frequencies(counts, probs, min_total=100):
    """Rows of `counts` are multinomial draws from rows of `probs`: zero-probability cells are
    never hit and every other cell is within `Z_MAX` standard errors."""
    totals = counts.sum(-1)
    assert np.all(counts[probs == 0] == 0), "sampled a zero-probability outcome"
    well_visited = totals >= min_total
    assert well_visited.any()
    z = z_scores(counts, totals, probs)[well_visited]
    assert np.max(np.abs(z)) < Z_MAX, f"max |z| = {np.max(np.abs(z)):.2f}"


# ----------------------------------------------------------------------------------------------
# Shapes, jit, vmap
# ----------------------------------------------------------------------------------------------

def test_shapes_and_dtypes(rollout):
    _, _, traj = rollout
    for name, x in traj.items():
        assert x.shape == (NUM_STEPS, NUM_ENVS), name
    for name in ("states", "actions", "next_states", "times"):
        assert np.issubdtype(traj[name].dtype, np.integer), name
    assert traj["dones"].dtype == bool and traj["terminated"].dtype == bool
    assert np.issubdtype(traj["rewards"].dtype, np.floating)


def test_jit_and_vmap_over_keys_match_separate_calls(rollout):
    # Same MDP and sizes as the fixture, so the separate jitted calls reuse its compilation.
    # (threefry keys: their streams are invariant under vmap; rbg streams are not.)
    mdp, policy, first = rollout
    keys = jnp.stack([jax.random.PRNGKey(0), jax.random.PRNGKey(1)])
    policy = jnp.asarray(policy)
    separate = [first, to_numpy(sample(keys[1], mdp, policy, num_envs=NUM_ENVS,
                                       num_steps=NUM_STEPS))]
    vmapped = to_numpy(jax.jit(jax.vmap(lambda k: bj.sample_trajectories(
        k, mdp, policy, num_envs=NUM_ENVS, num_steps=NUM_STEPS)))(keys))
    for name in separate[0]:
        assert vmapped[name].shape == (2, NUM_STEPS, NUM_ENVS)
        for i in range(2):
            np.testing.assert_array_equal(vmapped[name][i], separate[i][name], err_msg=name)
    assert not np.array_equal(separate[0]["actions"], separate[1]["actions"])


# ----------------------------------------------------------------------------------------------
# Bookkeeping: rewards, terminal flags, auto-reset
# ----------------------------------------------------------------------------------------------

def test_rewards_and_terminal_flags(rollout):
    mdp, _, traj = rollout
    terminal = np.asarray(mdp.terminal)
    np.testing.assert_array_equal(traj["rewards"],
                                  np.asarray(mdp.rewards)[traj["states"], traj["actions"]])
    np.testing.assert_array_equal(traj["terminated"], terminal[traj["states"]])
    # No time limit: an episode ends exactly when acting in a terminal state.
    np.testing.assert_array_equal(traj["dones"], traj["terminated"])
    assert traj["terminated"].sum() > 1000


def test_auto_reset_after_terminal(rollout):
    mdp, _, traj = rollout
    initial = np.asarray(mdp.initial)
    done = traj["dones"][:-1]
    nxt_states, nxt_times = traj["states"][1:], traj["times"][1:]
    # After the end of an episode: time restarts at 0 in a state drawn from `initial`.
    np.testing.assert_array_equal(nxt_times[done], 0)
    assert np.all(initial[nxt_states[done]] > 0)
    # Otherwise the episode continues from the sampled successor.
    np.testing.assert_array_equal(nxt_states[~done], traj["next_states"][:-1][~done])
    np.testing.assert_array_equal(nxt_times[~done], traj["times"][:-1][~done] + 1)
    # Every env starts at time 0 in a state drawn from `initial`.
    np.testing.assert_array_equal(traj["times"][0], 0)
    # Start states (t = 0 and every reset) follow `initial`.
    starts = traj["states"][traj["times"] == 0]
    counts = np.bincount(starts, minlength=len(initial)).astype(float)
    check_frequencies(counts[None], initial[None])


def test_action_frequencies_match_policy(rollout):
    mdp, policy, traj = rollout
    S, A = policy.shape
    counts = np.zeros((S, A))
    np.add.at(counts, (traj["states"], traj["actions"]), 1)
    check_frequencies(counts, policy)


def test_transition_frequencies_match_P(rollout):
    mdp, _, traj = rollout
    P = np.asarray(mdp.transitions)
    S, A, _ = P.shape
    live = ~traj["terminated"]          # no successor follows a terminal state
    counts = np.zeros((S, A, S))
    np.add.at(counts, (traj["states"][live], traj["actions"][live], traj["next_states"][live]), 1)
    check_frequencies(counts.reshape(S * A, S), P.reshape(S * A, S))
    assert np.all(counts[np.asarray(mdp.terminal)] == 0)


def test_time_limit_resets():
    P, rewards, initial, terminal, policy = small_mdp()
    mdp = as_mdp(P, rewards, initial, terminal)
    max_steps = 4
    traj = to_numpy(sample(rbg_key(1), mdp, jnp.asarray(policy), num_envs=1000,
                           num_steps=40, max_episode_steps=max_steps))
    term = terminal[traj["states"]]
    assert traj["times"].max() == max_steps - 1
    assert np.all(traj["times"] < max_steps)
    np.testing.assert_array_equal(traj["terminated"], term)
    np.testing.assert_array_equal(traj["dones"], term | (traj["times"] == max_steps - 1))
    truncated = traj["dones"] & ~traj["terminated"]
    assert truncated.sum() > 100
    done = traj["dones"][:-1]
    np.testing.assert_array_equal(traj["times"][1:][done], 0)
    assert np.all(initial[traj["states"][1:][done]] > 0)
    np.testing.assert_array_equal(traj["times"][1:][~done], traj["times"][:-1][~done] + 1)
    np.testing.assert_array_equal(traj["states"][1:][~done], traj["next_states"][:-1][~done])
    # S = 6 <= 16: this MDP exercises the linear-scan sampling path; check its frequencies too.
    S, A = policy.shape
    actions = np.zeros((S, A))
    np.add.at(actions, (traj["states"], traj["actions"]), 1)
    check_frequencies(actions, policy)
    live = ~traj["terminated"]
    counts = np.zeros((S, A, S))
    np.add.at(counts, (traj["states"][live], traj["actions"][live], traj["next_states"][live]), 1)
    check_frequencies(counts.reshape(S * A, S), P.reshape(S * A, S))
    starts = traj["states"][traj["times"] == 0]
    check_frequencies(np.bincount(starts, minlength=S)[None].astype(float), initial[None])


# ----------------------------------------------------------------------------------------------
# Discounted visitation from samples
# ----------------------------------------------------------------------------------------------

def test_empirical_discounted_visitation_matches_visitation(rollout):
    """d_hat(s) = (1 / #episodes) sum_episodes sum_t gamma^t 1[s_t = s] vs bj.visitation.

    Only episodes started at t0 <= NUM_STEPS - H are counted (a choice made before the episode
    is played, so the estimate stays unbiased); their visits after the window carry weight at
    most gamma^H = 0.9^200 ~ 7e-10. Tolerance: 4 standard errors of the mean of the per-episode
    sums (fixed seed), plus 1e-6 for the truncation.
    """
    mdp, policy, traj = rollout
    S = policy.shape[0]
    H = 200
    times, states = traj["times"], traj["states"]
    t = np.arange(NUM_STEPS)[:, None]
    start_time = t - times
    counted = start_time <= NUM_STEPS - H
    # Global episode id of every step: episodes are numbered per env, then offset per env.
    episode = np.cumsum(times == 0, axis=0) - 1
    per_env = episode.max(axis=0) + 1
    episode = episode + np.concatenate([[0], np.cumsum(per_env)[:-1]])[None, :]
    starts = (times == 0) & counted
    num_episodes = int(starts.sum())
    assert num_episodes > 20000
    ids = episode[counted]
    # Relabel counted episodes 0..n-1 (they are exactly the episodes whose first step counts).
    _, ids = np.unique(ids, return_inverse=True)
    assert ids.max() + 1 == num_episodes
    weights = GAMMA ** times[counted]
    sums = np.bincount(ids * S + states[counted], weights=weights,
                       minlength=num_episodes * S).reshape(num_episodes, S)
    d_hat = sums.mean(axis=0)
    se = sums.std(axis=0, ddof=1) / np.sqrt(num_episodes)

    d = np.asarray(bj.visitation(mdp, jnp.asarray(policy)))
    P, terminal = np.asarray(mdp.transitions), np.asarray(mdp.terminal)
    np.testing.assert_allclose(d, ref.visitation(P, GAMMA, policy, np.asarray(mdp.initial),
                                                 terminal), rtol=1e-9)
    assert np.all(np.abs(d_hat - d) <= 4 * se + 1e-6), (d_hat, d, se)
    # The check has power: the standard errors are small compared with d.
    assert np.all(se[d > 0.05] < 0.02 * d[d > 0.05])


# ----------------------------------------------------------------------------------------------
# Sparse transitions and large dense rows (binary-search sampling path)
# ----------------------------------------------------------------------------------------------

def test_sparse_rollout_frequencies():
    rng = np.random.default_rng(11)
    r = ref.random_mdp(rng, 8, 2, branching=4, num_terminal=1)
    probs = r.probs.copy()
    probs[:, :, 0] = 0.0            # a padding-like zero entry in front of each row
    probs[:, :, -1] = 0.0           # and one at the end
    probs /= probs.sum(-1, keepdims=True)
    transitions = bj.SparseTransitions(indices=jnp.asarray(r.indices, jnp.int32),
                                       probs=jnp.asarray(probs))
    P = ref.dense_from_sparse(r.indices, probs, 8)
    policy = rng.dirichlet(np.ones(2), size=8)
    mdp = bj.validate_mdp(as_mdp(P, r.rewards, r.initial, r.terminal, transitions=transitions))
    traj = to_numpy(sample(rbg_key(4), mdp, jnp.asarray(policy), num_envs=1000,
                           num_steps=200))
    live = ~traj["terminated"]
    counts = np.zeros((8, 2, 8))
    np.add.at(counts, (traj["states"][live], traj["actions"][live], traj["next_states"][live]), 1)
    check_frequencies(counts.reshape(16, 8), P.reshape(16, 8))
    np.testing.assert_array_equal(traj["terminated"], r.terminal[traj["states"]])


def test_given_start_states_and_actions():
    # The first step uses the given states and actions (even ones of probability zero under
    # `initial` and the policy); every later episode starts from `initial` and follows the policy.
    P, rewards, initial, terminal, policy = small_mdp()
    mdp = as_mdp(P, rewards, initial, terminal)
    n = 600
    start_states = jnp.asarray(np.arange(n) % 6, jnp.int32)
    start_actions = jnp.asarray(np.where(np.arange(n) % 6 == 1, 0, np.arange(n) % 2), jnp.int32)
    traj = to_numpy(sample(rbg_key(6), mdp, jnp.asarray(policy), num_envs=n, num_steps=20,
                           start_states=start_states, start_actions=start_actions))
    np.testing.assert_array_equal(traj["states"][0], np.asarray(start_states))
    np.testing.assert_array_equal(traj["actions"][0], np.asarray(start_actions))
    np.testing.assert_array_equal(traj["times"][0], 0)
    np.testing.assert_array_equal(traj["terminated"][0], terminal[np.asarray(start_states)])
    # After the first step: policy actions only (action 0 has probability 0 in state 1) ...
    later_states, later_actions = traj["states"][1:], traj["actions"][1:]
    assert not np.any((later_states == 1) & (later_actions == 0))
    assert np.any((later_states == 1) & (later_actions == 1))
    # ... the first steps' successors follow P, and resets draw from `initial`.
    live = ~traj["terminated"][0]
    s0, a0, s1 = traj["states"][0][live], traj["actions"][0][live], traj["next_states"][0][live]
    assert np.all(P[s0, a0, s1] > 0)
    resets = traj["states"][1:][traj["times"][1:] == 0]
    assert resets.size > 0 and np.all(initial[resets] > 0)
    with pytest.raises(bj.InvalidArgumentError, match="start_states"):
        bj.sample_trajectories(rbg_key(0), mdp, jnp.asarray(policy), num_envs=4, num_steps=2,
                               start_states=jnp.zeros(5, jnp.int32))


# ----------------------------------------------------------------------------------------------
# Fast uniforms, and R runs as one rollout (the batched form estimators use under vmap)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_uniform_runs_are_jax_random_uniform_bit_for_bit(dtype):
    """`uniform_runs` (an unrolled threefry laid out with the run axis anywhere) draws exactly
    `jax.random.uniform`'s numbers: typed and raw threefry keys, both float widths, every run
    axis position, odd sizes; other PRNGs (rbg) go through `vmap(jax.random.uniform)`."""
    from bilevel_jax.core.rollout import uniform_runs

    typed = jax.random.split(jax.random.key(3), 3)
    raw = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1, 2**31 + 5)])
    rbg = jax.random.split(rbg_key(4), 3)
    for keys in (typed, raw, rbg):
        for shape in ((7,), (5, 1, 3), (4, 2, 3)):
            if keys is rbg:       # its streams depend on vmap: the reference is the vmap
                expected = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, shape, dtype))(keys))
            else:
                expected = np.stack([np.asarray(jax.random.uniform(k, shape, dtype))
                                     for k in keys])
            for axis in range(len(shape) + 1):
                got = np.asarray(jax.jit(uniform_runs, static_argnums=(1, 2, 3))(
                    keys, shape, dtype, axis))
                assert got.dtype == np.dtype(dtype)
                np.testing.assert_array_equal(got, np.moveaxis(expected, 0, axis))
    assert expected.min() >= 0.0 and expected.max() < 1.0


sample_runs = jax.jit(bj.core.rollout.sample_runs,
                      static_argnames=("num_envs", "num_steps", "max_episode_steps", "pack_limit"))


def _runs_case(sparse, per_run, seed=12):
    """Three runs of one small MDP: per-run policies, and per-run (or shared) kernels and
    start distributions (run 1 of the per-run case starts deterministically). Returns the
    batched `TabularMDP` (leading run axis 3 or 1), the policies and each run's own MDP."""
    rng = np.random.default_rng(seed)
    S, A, R = 7, 3, 3
    base = ref.random_mdp(rng, S, A, branching=4, num_terminal=2, zero_terminal_rows=True)
    count = R if per_run else 1
    probs = np.stack([base.probs] + [ref.random_mdp(rng, S, A, branching=4).probs
                                     for _ in range(count - 1)])
    probs[:, base.terminal] = 0.0
    initial = np.stack([base.initial] + [rng.dirichlet(np.ones(S)) for _ in range(count - 1)])
    if per_run:
        initial[1] = np.eye(S)[4]
    indices = np.broadcast_to(base.indices, probs.shape)
    dense = np.stack([ref.dense_from_sparse(base.indices, p, S) for p in probs])
    transitions = (bj.SparseTransitions(indices=jnp.asarray(indices, jnp.int32),
                                        probs=jnp.asarray(probs)) if sparse else jnp.asarray(dense))
    runs = bj.TabularMDP(transitions=transitions, rewards=jnp.asarray(base.rewards)[None],
                         discount=GAMMA, initial=jnp.asarray(initial),
                         terminal=jnp.asarray(base.terminal)[None])
    own = [as_mdp(dense[r % count], base.rewards, initial[r % count], base.terminal,
                  transitions=None if not sparse else bj.SparseTransitions(
                      indices=jnp.asarray(base.indices, jnp.int32),
                      probs=jnp.asarray(probs[r % count])))
           for r in range(R)]
    policies = rng.dirichlet(np.ones(A), size=(R, S))
    policies[0, 2] = [0.0, 1.0, 0.0]
    return runs, jnp.asarray(policies), own


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("per_run", [False, True])
def test_sample_runs_give_each_run_its_own_trajectory(sparse, per_run):
    """`sample_runs` (R runs as one loop over R * N lanes) gives run r exactly the trajectory of
    `sample_trajectories(keys[r], mdp_r, policy_r)`: sparse and dense kernels, shared or per-run
    kernels and start distributions, with and without a time limit."""
    runs, policies, own = _runs_case(sparse, per_run)
    keys = jax.random.split(jax.random.key(21), 3)
    for max_steps in (None, 4):
        batch = to_numpy(sample_runs(keys, runs, policies, num_envs=5, num_steps=30,
                                     max_episode_steps=max_steps))
        for r in range(3):
            single = to_numpy(sample(keys[r], own[r], policies[r], num_envs=5, num_steps=30,
                                     max_episode_steps=max_steps))
            for name in single:
                assert batch[name].shape == (30, 3, 5), name
                np.testing.assert_array_equal(batch[name][:, r], single[name],
                                              err_msg=f"run {r}: {name}")
        assert not np.array_equal(batch["actions"][:, 0], batch["actions"][:, 1])


def test_int32_codes_packed_or_not_give_the_same_trajectory():
    """Each step stacks `(time * S + state) * outcomes + outcome` as one int32 when that fits,
    else the two codes as two rows: both give the same trajectory; when even `time * S` would
    overflow, the error names `num_steps`."""
    runs, policies, _ = _runs_case(True, False)
    keys = jax.random.split(jax.random.key(2), 3)
    packed = to_numpy(sample_runs(keys, runs, policies, num_envs=5, num_steps=30))
    limit = 30 * 7 + 1                     # > T * S, < T * S * A * B: two rows per step
    unpacked = to_numpy(sample_runs(keys, runs, policies, num_envs=5, num_steps=30,
                                    pack_limit=limit))
    for name in packed:
        np.testing.assert_array_equal(packed[name], unpacked[name], err_msg=name)
    with pytest.raises(bj.InvalidArgumentError, match="num_steps"):
        bj.core.rollout.sample_runs(keys, runs, policies, num_envs=5, num_steps=30,
                                    pack_limit=30 * 7)


@pytest.mark.parametrize("sparse", [True, False])
def test_all_zero_rows_of_terminal_states_keep_actions_valid(sparse):
    """A terminal state may have an all-zero transition row (validate_mdp allows it): acting
    there still follows the policy (sparse kernels draw action and successor jointly, so the
    zero row must not swallow the action) and every sampled index stays in range."""
    rng = np.random.default_rng(13)
    r = ref.random_mdp(rng, 6, 3, branching=3, num_terminal=2, zero_terminal_rows=True,
                       initial_support=6)
    transitions = (bj.SparseTransitions(indices=jnp.asarray(r.indices, jnp.int32),
                                        probs=jnp.asarray(r.probs)) if sparse else None)
    mdp = bj.validate_mdp(as_mdp(r.P, r.rewards, r.initial, r.terminal, transitions=transitions))
    policy = rng.dirichlet(np.ones(3), size=6)
    traj = to_numpy(sample(rbg_key(17), mdp, jnp.asarray(policy), num_envs=1000, num_steps=40))
    assert traj["actions"].min() >= 0 and traj["actions"].max() < 3
    assert traj["next_states"].min() >= 0 and traj["next_states"].max() < 6
    at_terminal = r.terminal[traj["states"]]
    assert at_terminal.sum() > 3000
    counts = np.zeros((6, 3))
    np.add.at(counts, (traj["states"][at_terminal], traj["actions"][at_terminal]), 1)
    check_frequencies(counts[r.terminal], policy[r.terminal])
