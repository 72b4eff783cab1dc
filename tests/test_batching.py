"""jit and vmap: chex variants agree with the reference, and batched MDPs (vmap over a batch of
MDPs, or over rewards with shared transitions) give the same as a Python loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import bilevel_jax as bj
import reference as ref
from helpers import assert_rel_close, soft_vi, to_mdp

S, A, K = 7, 3, 4   # S, A as in test_soft_vi: the jitted helpers' compilations are reused
LAM = 0.3


def ref_mdp(seed, terminal=True):
    return ref.random_mdp(np.random.default_rng(seed), S, A, discount=0.9,
                          num_terminal=1 if terminal else 0)


def stack_mdps(mdps):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *mdps)


class VariantsTest(chex.TestCase):
    """The same computations with and without jit agree with the NumPy reference."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_soft_vi_and_evaluation(self):
        r = ref_mdp(100)

        @self.variant
        def solve(mdp, lam):
            sol = bj.soft_value_iteration(mdp, lam)
            out = bj.policy_evaluation(mdp, sol.policy, lam)
            return sol, out.v, bj.visitation(mdp, sol.policy)

        sol, v_eval, d = solve(to_mdp(r), LAM)
        q, v, pi = ref.soft_value_iteration(r.P, r.rewards, r.discount, LAM, r.terminal)
        assert_rel_close(sol.q, q)
        assert_rel_close(sol.v, v)
        assert_rel_close(sol.policy, pi)
        assert_rel_close(v_eval, v)
        assert_rel_close(d, ref.visitation(r.P, r.discount, pi, r.initial, r.terminal))

    @chex.variants(with_jit=True, without_jit=True)
    def test_vmap_over_a_batch_of_mdps(self):
        refs = [ref_mdp(200 + k) for k in range(K)]
        discounts = [0.5, 0.8, 0.9, 0.95]
        refs = [rk._replace(discount=g) for rk, g in zip(refs, discounts)]
        batch = stack_mdps([to_mdp(rk, discount=jnp.asarray(rk.discount)) for rk in refs])
        assert batch.rewards.shape == (K, S, A) and batch.terminal.shape == (K, S)

        @self.variant
        def solve_all(mdps):
            def one(mdp):
                sol = bj.soft_value_iteration(mdp, LAM)
                return sol.q, sol.v, sol.policy, bj.visitation(mdp, sol.policy)
            return jax.vmap(one)(mdps)

        q_b, v_b, pi_b, d_b = solve_all(batch)
        for k, rk in enumerate(refs):
            q, v, pi = ref.soft_value_iteration(rk.P, rk.rewards, rk.discount, LAM, rk.terminal)
            assert_rel_close(q_b[k], q, err_msg=f"mdp {k}")
            assert_rel_close(v_b[k], v, err_msg=f"mdp {k}")
            assert_rel_close(pi_b[k], pi, err_msg=f"mdp {k}")
            assert_rel_close(d_b[k], ref.visitation(rk.P, rk.discount, pi, rk.initial,
                                                    rk.terminal), err_msg=f"mdp {k}")


def test_vmap_over_rewards_with_shared_transitions_equals_python_loop():
    r = ref_mdp(300)
    mdp = to_mdp(r)
    rewards = jnp.asarray(np.random.default_rng(301).uniform(-1, 1, size=(K, S, A)))

    # 1) a function of (transitions, rewards) with in_axes=(None, 0)
    def solve(transitions, rw):
        return bj.soft_value_iteration(mdp.replace(transitions=transitions, rewards=rw), LAM)

    batched = jax.jit(jax.vmap(solve, in_axes=(None, 0)))(mdp.transitions, rewards)

    # 2) the MDP itself, with a TabularMDP-shaped in_axes (None for every shared field)
    in_axes = bj.TabularMDP(transitions=None, rewards=0, discount=None, initial=None,
                            terminal=None)
    batch_mdp = mdp.replace(rewards=rewards)
    batched2 = jax.jit(jax.vmap(lambda m: bj.soft_value_iteration(m, LAM), in_axes=(in_axes,)))(
        batch_mdp)

    loop_q = []
    for k in range(K):
        one = soft_vi(mdp.replace(rewards=rewards[k]), LAM)
        loop_q.append(np.asarray(one.q))
        q, v, pi = ref.soft_value_iteration(r.P, np.asarray(rewards[k]), r.discount, LAM,
                                            r.terminal)
        assert_rel_close(batched.q[k], q)
        assert_rel_close(batched.policy[k], pi)
    np.testing.assert_allclose(np.asarray(batched.q), np.stack(loop_q), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(batched2.q), np.stack(loop_q), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(batched2.v), np.asarray(batched.v), rtol=1e-10,
                               atol=1e-12)


def test_vmap_of_implicit_grad_over_rewards_equals_reference_loop():
    r = ref_mdp(400)
    mdp = to_mdp(r)
    rewards = np.random.default_rng(402).uniform(-1, 1, size=(K, S, A))

    def objective(rw):
        return jnp.dot(mdp.initial, bj.soft_value_iteration(mdp.replace(rewards=rw), LAM).v)

    batched = np.asarray(jax.jit(jax.vmap(jax.grad(objective)))(jnp.asarray(rewards)))
    for k in range(K):
        # Envelope theorem: d(mu . V*)/dr(s, a) = d*(s) pi*(a|s), from the reference.
        _, _, pi = ref.soft_value_iteration(r.P, rewards[k], r.discount, LAM, r.terminal)
        d = ref.visitation(r.P, r.discount, pi, r.initial, r.terminal)
        assert_rel_close(batched[k], d[:, None] * pi, err_msg=f"rewards {k}")


def test_vmap_over_temperature():
    r = ref_mdp(500)
    temps = jnp.asarray([1.0, 0.1, 0.003])
    sols = jax.jit(jax.vmap(lambda lam: bj.soft_value_iteration(to_mdp(r), lam)))(temps)
    for k, lam in enumerate([1.0, 0.1, 0.003]):
        q, v, pi = ref.soft_value_iteration(r.P, r.rewards, r.discount, lam, r.terminal)
        assert_rel_close(sols.q[k], q, err_msg=f"lam={lam}")
        assert_rel_close(sols.policy[k], pi, err_msg=f"lam={lam}")
