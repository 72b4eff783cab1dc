"""Four-Rooms (SPEC 7.1): map, slip kernel, simulator vs model, and the reward-shaping problem
against an independent NumPy model built here from the SPEC's map text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
import reference as ref
from bilevel_jax.envs import FourRooms, four_rooms_layout, four_rooms_mdp, four_rooms_problem

SPEC_MAP = [
    "xxxxxxxxxxxxx",
    "x     x     x",
    "x     x     x",
    "x           x",
    "x     x     x",
    "x     x     x",
    "xx xxxx     x",
    "x     xxx xxx",
    "x     x     x",
    "x     x     x",
    "x           x",
    "x     x     x",
    "xxxxxxxxxxxxx",
]
MOVES = [(-1, 0), (0, 1), (1, 0), (0, -1)]


def numpy_model(slip=0.44):
    cells = [(r, c) for r, row in enumerate(SPEC_MAP) for c, ch in enumerate(row) if ch != "x"]
    index = {cell: i for i, cell in enumerate(cells)}
    S = len(cells)
    P = np.zeros((S, 4, S))
    for s, (r, c) in enumerate(cells):
        for a in range(4):
            for m, (dr, dc) in enumerate(MOVES):
                target = (r + dr, c + dc)
                nxt = index.get(target, s)
                P[s, a, nxt] += (1 - slip) if m == a else slip / 3
    return cells, index, P


def test_map_start_goals_and_kernel_match_the_spec():
    cells, index, P = numpy_model()
    layout = four_rooms_layout()
    assert layout.num_states == 104 == len(cells)
    assert [tuple(c) for c in layout.cells] == cells
    mdp = four_rooms_mdp(goal=(11, 11), sparse=False, dtype=jnp.float64)
    np.testing.assert_allclose(np.asarray(mdp.transitions), P, atol=1e-12)
    sparse = four_rooms_mdp(goal=(11, 11), sparse=True, dtype=jnp.float64)
    np.testing.assert_allclose(np.asarray(sparse.transitions.todense()), P, atol=1e-12)
    assert np.asarray(mdp.initial)[index[(4, 1)]] == 1.0
    assert np.flatnonzero(np.asarray(mdp.terminal)).tolist() == [index[(11, 11)]]
    bj.validate_mdp(mdp)
    bj.validate_mdp(sparse)


def test_simulator_transition_frequencies_match_the_model():
    env = FourRooms()
    params = env.default_params(goal=(1, 9))
    _, index, P = numpy_model()
    # a corridor cell, a corner and a door: every slip outcome differs
    starts = [index[(3, 6)], index[(1, 1)], index[(6, 2)]]
    n = 20_000
    keys = jax.random.split(jax.random.key(0), n)

    @jax.jit
    def successors(state, action):
        st = bj.envs.four_rooms.FourRoomsState(state=jnp.asarray(state), time=jnp.asarray(0))
        return jax.vmap(lambda k: env.step(k, st, action, params)[4]["next_state"])(keys)

    for s in starts:
        for a in range(4):
            counts = np.bincount(np.asarray(successors(s, a)), minlength=104) / n
            p = P[s, a]
            se = np.sqrt(p * (1 - p) / n) + 1e-12
            z = np.abs(counts - p) / np.where(p > 0, se, 1.0)
            assert np.all(counts[p == 0] == 0), (s, a)
            assert z.max() < 5, (s, a, z.max())


def test_simulator_resets_at_the_goal_and_the_time_limit():
    env = FourRooms()
    params = env.default_params(goal=(1, 9), max_steps_in_episode=3)
    layout = four_rooms_layout()
    obs, state = env.reset(jax.random.key(0), params)
    assert int(obs) == layout.state((4, 1))
    for t in range(3):
        obs, state, reward, done, info = env.step(jax.random.key(t), state, 0, params)
    assert bool(done) and bool(info["truncated"]) and int(state.time) == 0
    at_goal = bj.envs.four_rooms.FourRoomsState(state=params.goal, time=jnp.asarray(1))
    obs, state, reward, done, info = env.step(jax.random.key(9), at_goal, 1, params)
    assert float(reward) == 1.0 and bool(info["terminated"]) and int(obs) == layout.state((4, 1))


@pytest.mark.parametrize("lam,beta", [(0.005, 1.0), (0.003, 3.0)])
def test_leader_objective_and_gradient_match_numpy(lam, beta):
    cells, index, P = numpy_model()
    S = len(cells)
    problem, num_params = four_rooms_problem(beta=beta, temperature=lam, dtype=jnp.float64)
    assert num_params == 105
    rng = np.random.default_rng(0)
    x = rng.normal(size=105) * 0.5

    def numpy_F(x):
        w = np.exp(x - x.max())
        w = w / w.sum()
        total = 0.0
        for goal in [(1, 9), (11, 11)]:
            g = index[goal]
            c = -0.2 * w[:S]
            c[g] = 0.0
            r = np.zeros(S)
            r[g] = 1.0
            r = np.repeat((r + c)[:, None], 4, axis=1)
            terminal = np.zeros(S, bool)
            terminal[g] = True
            _, _, pi = ref.soft_value_iteration(P, r, 0.99, lam, terminal, tol=1e-12)
            rbar = np.zeros(S)
            rbar[index[(8, 4)]] = 1.0
            rbar[g] -= beta * np.abs(c).sum()
            _, vbar = ref.policy_evaluation(P, np.repeat(rbar[:, None], 4, axis=1), 0.99, pi,
                                            0.0, terminal)
            total += 0.5 * vbar[index[(4, 1)]]
        return total

    F = float(bj.leader_objective(problem, jnp.asarray(x)))
    np.testing.assert_allclose(F, numpy_F(x), rtol=1e-6)
    grad, _ = bj.hypergradient(problem, jnp.asarray(x), "exact")
    direction = rng.normal(size=105)
    eps = 1e-4
    fd = (numpy_F(x + eps * direction) - numpy_F(x - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.dot(grad, direction)), fd, rtol=1e-5)
