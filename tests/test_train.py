"""Leader training loops: chunked scans, determinism, NaN stops, PBRL, batched and sharded runs."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax.algorithms import NonFiniteError, batched_fns, hypergradient_ascent, pbrl, train
from bilevel_jax.envs.random_mdp import random_bilevel_problem


@pytest.fixture(scope="module")
def problem():
    return random_bilevel_problem(0, num_states=6, num_actions=3, dim_x=4, num_terminal=1,
                                  temperature=0.2)


def test_exact_ascent_increases_objective_and_metrics_have_one_row_per_iteration(problem):
    pb, x0 = problem
    result = train(pb, "amd", optax.sgd(0.1), 60, jax.random.key(0), x0=x0, chunk_size=30,
                   num_sweeps=20)
    objective = result.metrics["objective"]
    assert objective.shape == (60,)
    assert set(bj.algorithms.METRICS) <= set(result.metrics)
    assert objective[-1] > objective[0] + 0.1
    # the first recorded objective is F(x0), computed independently
    np.testing.assert_allclose(objective[0], float(bj.leader_objective(pb, x0)), rtol=1e-6)
    assert len(result.chunk_seconds) == 2


@pytest.mark.parametrize("method,options,exact_objective", [
    ("exact", {}, True), ("zero_order", {"values": "model"}, True),
    ("zero_order", {"values": "rollout", "num_envs": 4, "num_steps": 20}, False),
    ("amd", {"num_sweeps": 3}, False)])
def test_tracked_objective_is_f_at_the_iterate_with_or_without_an_extra_solve(
        problem, method, options, exact_objective):
    """`objective[t]` is F(x_t) whether it comes from the estimator (exact F, no second solve in
    the state) or from the loop's own warm-started solve."""
    pb, x0 = problem
    algo = hypergradient_ascent(method, optax.sgd(0.3), **options)
    assert bj.estimators.make_estimator(method, **options).exact_objective is exact_objective
    short = train(pb, algo, None, 3, jax.random.key(5), x0=x0, chunk_size=3)
    longer = train(pb, algo, None, 4, jax.random.key(5), x0=x0, chunk_size=4)
    assert ("objective_q" in short.state) is not exact_objective
    assert not np.allclose(short.state["x"], x0)
    np.testing.assert_allclose(longer.metrics["objective"][3],
                               float(bj.leader_objective(pb, short.state["x"])), rtol=1e-5)
    np.testing.assert_allclose(longer.metrics["objective"][0],
                               float(bj.leader_objective(pb, x0)), rtol=1e-5)


def test_chunking_does_not_change_results_and_same_seed_repeats(problem):
    pb, x0 = problem
    algo = hypergradient_ascent("hpgd", optax.sgd(0.1), num_envs=8, num_steps=50)
    a = train(pb, algo, None, 12, jax.random.key(3), x0=x0, chunk_size=12)
    b = train(pb, algo, None, 12, jax.random.key(3), x0=x0, chunk_size=6)
    c = train(pb, algo, None, 12, jax.random.key(4), x0=x0, chunk_size=12)
    for name in a.metrics:
        np.testing.assert_array_equal(a.metrics[name], b.metrics[name])
    np.testing.assert_array_equal(a.state["x"], b.state["x"])
    assert not np.array_equal(a.state["x"], c.state["x"])


def test_nonfinite_gradient_stops_with_iteration_and_keeps_last_good_state(problem):
    pb, x0 = problem
    base = bj.estimators.exact()

    def init(problem, x):
        return {"inner": base.init(problem, x), "calls": jnp.zeros((), jnp.int32)}

    def poisoned_update(problem, x, state, key):
        grad, inner, info = base.update(problem, x, state["inner"], key)
        grad = jnp.where(state["calls"] >= 7, jnp.nan, grad)
        return grad, {"inner": inner, "calls": state["calls"] + 1}, info

    poisoned = bj.Estimator(init, poisoned_update)
    with pytest.raises(NonFiniteError, match="iteration 7") as err:
        train(pb, poisoned, optax.sgd(0.1), 20, jax.random.key(0), x0=x0, chunk_size=5)
    good = err.value.last_good_state
    assert int(good["step"]) == 5
    assert np.all(np.isfinite(good["x"]))


def test_pbrl_penalty_shrinks_as_rho_grows_and_lands_near_exact_ascent():
    pb, x0 = random_bilevel_problem(0, num_states=6, num_actions=3, dim_x=4, num_terminal=1,
                                    temperature=0.2)
    # A quadratic cost on x bounds F, so both methods converge to the same maximizer.
    pb = pb.replace(leader_reward=lambda x, c: c["leader"] - 0.05 * jnp.sum(x ** 2))
    exact = train(pb, "exact", optax.sgd(0.1), 1000, jax.random.key(0), x0=x0, chunk_size=1000)
    algo = pbrl(optax.sgd(0.5), rho_0=1.0, rho_max=100.0, ramp_iters=700)
    result = train(pb, algo, None, 1000, jax.random.key(0), x0=x0, chunk_size=1000)
    m = result.metrics
    assert m["rho"][0] == pytest.approx(1.0) and m["rho"][-1] == pytest.approx(100.0)
    assert abs(m["penalty"][0]) < 1e-10          # y starts at the soft-optimal policy of x0
    early, late = m["penalty"][50:150].mean(), m["penalty"][-100:].mean()
    assert late < early / 4, (early, late)
    assert late < 5e-3
    f_exact, f_pbrl = exact.metrics["objective"][-1], m["objective"][-1]
    assert abs(f_pbrl - f_exact) < 0.03 * abs(f_exact), (f_pbrl, f_exact)
    # the reported objective is the exact bilevel F at PBRL's x, not the penalized proxy
    np.testing.assert_allclose(m["objective"][0], float(bj.leader_objective(pb, x0)), rtol=1e-6)
    assert m["penalized_objective"][0] == pytest.approx(-m["policy_objective"][0], rel=1e-6)


def _build(pb):
    def build(hp):
        problem = pb.replace(temperature=hp["temperature"])
        optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(hp["lr"]))
        return problem, hypergradient_ascent("zero_order", optimizer, num_directions=2)
    return build


def test_batched_runs_equal_individual_runs(problem):
    pb, x0 = problem
    grid = {"lr": jnp.array([0.1, 0.5]), "temperature": jnp.array([0.2, 0.1])}
    keys = jax.random.split(jax.random.key(1), 2)
    init, chunk = batched_fns(_build(pb), chunk_size=6)
    states = init(grid, jnp.stack([x0] * 2), keys)
    states, metrics = chunk(grid, states)
    for r in range(2):
        problem_r, algo = _build(pb)({"lr": grid["lr"][r], "temperature": grid["temperature"][r]})
        single = train(problem_r, algo, None, 6, keys[r], x0=x0, chunk_size=6)
        np.testing.assert_allclose(np.asarray(metrics["objective"][r]), single.metrics["objective"],
                                   rtol=1e-9)
        np.testing.assert_allclose(np.asarray(states["x"][r]), np.asarray(single.state["x"]),
                                   rtol=1e-9, atol=1e-12)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    from bilevel_jax.algorithms import batched_fns, hypergradient_ascent, run_mesh, shard_runs, pad_runs, padded_size
    from bilevel_jax.envs.random_mdp import random_bilevel_problem
    assert jax.device_count() == 4, jax.devices()
    pb, x0 = random_bilevel_problem(0, num_states=6, num_actions=3, dim_x=4, num_terminal=1)
    def build(hp):
        opt = optax.sgd(hp["lr"])
        return pb.replace(temperature=hp["temperature"]), hypergradient_ascent("zero_order", opt, num_directions=2)
    runs = 6
    grid = {"lr": jnp.linspace(0.1, 0.6, runs), "temperature": jnp.linspace(0.1, 0.3, runs)}
    keys = jax.random.split(jax.random.key(0), runs)
    x0s = jnp.stack([x0] * runs)
    init, chunk = batched_fns(build, chunk_size=5)
    plain = chunk(grid, init(grid, x0s, keys))
    mesh = run_mesh()
    size = padded_size(runs, mesh)
    args = shard_runs(pad_runs((grid, x0s, keys), size), mesh)
    states = init(*args)
    sharded = chunk(args[0], states)
    assert len(sharded[0]["x"].sharding.device_set) == 4
    for a, b in zip(jax.tree_util.tree_leaves(plain[1]), jax.tree_util.tree_leaves(sharded[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b)[:runs], rtol=1e-12, atol=1e-12)
    print("SHARDED_OK")
""")


def test_sharded_batch_equals_unsharded_on_four_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED_OK" in out.stdout


def test_pbrl_gradients_stay_finite_when_float32_softmax_underflows():
    from bilevel_jax.algorithms.pbrl import policy_objective
    pb, x = random_bilevel_problem(0, dtype=jnp.float32)
    y = jnp.zeros((2, 10, 4), jnp.float32).at[:, :, 0].set(200.0)  # exact zeros after softmax
    assert float(jnp.min(jax.nn.softmax(y, -1))) == 0.0
    g = jax.grad(lambda y: bj.value_penalty(pb, x, y) + policy_objective(pb, x, y))(y)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_xla_elimination_pivots():
    # The batched solve off CPU: exact where a zero sits on the diagonal (pivoting needed).
    from bilevel_jax.core.linear import _eliminate
    rng = np.random.default_rng(1)
    system = rng.normal(size=(7, 7))
    system[0, 0] = 0.0
    rhs = rng.normal(size=7)
    np.testing.assert_allclose(np.asarray(jax.jit(_eliminate)(system, rhs)),
                               np.linalg.solve(system, rhs), rtol=1e-9, atol=1e-12)


def test_batched_direct_solve_avoids_lapack_batching_and_matches_it():
    # jaxlib's batched CPU LU deadlocked vmapped PBRL runs: under one or two vmaps every LAPACK
    # call stays unbatched (one system per call, in a loop).
    import re
    from bilevel_jax.core.linear import dense_solve
    rng = np.random.default_rng(0)
    systems = np.eye(30)[None] - 0.99 * rng.dirichlet(np.ones(30), size=(6, 30))
    rhs = rng.normal(size=(6, 30))
    expected = np.linalg.solve(systems, rhs[..., None])[..., 0]
    for batched, args, shape in (
            (jax.jit(jax.vmap(dense_solve)), (systems, rhs), (6, 30)),
            (jax.jit(jax.vmap(jax.vmap(dense_solve))),
             (systems.reshape(2, 3, 30, 30), rhs.reshape(2, 3, 30)), (2, 3, 30)),
            (jax.jit(jax.vmap(jax.vmap(dense_solve, in_axes=(None, 0)), in_axes=(0, None))),
             (systems, rhs[:2]), None)):
        hlo = batched.lower(*args).as_text()
        calls = re.findall(r"custom_call @lapack_\w+.*", hlo)
        assert calls and all('num_batch_dims = "0"' in call for call in calls), calls
        got = np.asarray(batched(*args))
        if shape is None:         # system i with right-hand side j
            np.testing.assert_allclose(got, np.linalg.solve(systems[:, None], np.broadcast_to(
                rhs[:2][None, :, :, None], (6, 2, 30, 1)))[..., 0], rtol=1e-10, atol=1e-12)
        else:
            np.testing.assert_allclose(got, expected.reshape(shape), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dense_solve(systems[0], rhs[0])), expected[0], rtol=1e-10)
