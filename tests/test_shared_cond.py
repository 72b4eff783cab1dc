"""`learners.shared_cond`: the results of `lax.cond` per member, and under `vmap` a branch that
runs only at the steps where some member takes it (not a select that runs it every step)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bilevel_jax.learners.base import shared_cond


def _branches(scale):
    return (lambda o: (jnp.sin(o[0]) * scale + o[1], o[1] * 2),
            lambda o: (o[0] - 1.0, o[1]))


def _reference(pred, x, n, scale):
    out = []
    for p, xi, ni, si in zip(np.asarray(pred).ravel(), np.asarray(x).ravel(),
                             np.asarray(n).ravel(), np.asarray(scale).ravel()):
        out.append((np.sin(xi) * si + ni, ni * 2) if p else (xi - 1.0, ni))
    return [np.array(v).reshape(np.shape(pred)) for v in zip(*out)]


def _fn(pred, x, n, scale):
    true_fn, false_fn = _branches(scale)   # closes over a (possibly batched) float
    return shared_cond(pred, true_fn, false_fn, (x, n))


def test_matches_cond_unbatched_vmapped_and_nested():
    pred = jnp.array([[True, False, True], [False, False, False]])
    x = jnp.arange(6.0).reshape(2, 3)
    n = jnp.arange(6).reshape(2, 3)
    scale = jnp.linspace(0.5, 3.0, 6).reshape(2, 3)
    expected = _reference(pred, x, n, scale)
    for i in range(2):
        for j in range(3):
            got = jax.jit(_fn)(pred[i, j], x[i, j], n[i, j], scale[i, j])
            np.testing.assert_allclose([got[0], got[1]], [expected[0][i, j], expected[1][i, j]],
                                       rtol=1e-6)
    for fn in (jax.vmap(jax.vmap(_fn)), jax.vmap(jax.vmap(_fn), 1, 1)):
        got = jax.jit(fn)(pred, x, n, scale)
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
        np.testing.assert_array_equal(got[1], expected[1])
        assert got[1].dtype == n.dtype
    # an unbatched predicate with batched operands, and a batched int closed over
    got = jax.jit(jax.vmap(lambda xi, ni: shared_cond(True, lambda o: o * ni, lambda o: o, xi)))(
        x[0], n[0])
    np.testing.assert_allclose(got, x[0] * n[0])


def test_branch_runs_only_where_some_member_takes_it():
    """The true branch's side effect fires only at step 3 (member 0 takes it there); a
    `lax.cond` under vmap would run it at every step."""
    calls = []

    def record(step):
        calls.append(int(np.max(step)))

    def run(member):
        def body(c, step):
            pred = (step == 3) & (member == 0)

            def true_fn(o):
                jax.debug.callback(record, step)
                return o + 1.0

            return shared_cond(pred, true_fn, lambda o: o, c), None
        return lax.scan(body, jnp.float32(0), jnp.arange(6))[0]

    out = jax.jit(jax.vmap(run))(jnp.arange(2))
    np.testing.assert_array_equal(out, [1.0, 0.0])
    assert set(calls) == {3}, calls

    calls.clear()

    def run_cond(member):   # the check can fail: plain lax.cond runs the branch every step
        def body(c, step):
            def true_fn(o):
                jax.debug.callback(record, step)
                return o + 1.0
            return lax.cond((step == 3) & (member == 0), true_fn, lambda o: o, c), None
        return lax.scan(body, jnp.float32(0), jnp.arange(6))[0]

    jax.jit(jax.vmap(run_cond))(jnp.arange(2))
    assert set(calls) == set(range(6))
