"""Input validation: every malformed MDP raises `InvalidMDPError` naming the offending field, and
non-positive temperatures raise `InvalidArgumentError` (a `ValueError`) naming "temperature"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
import reference as ref

S, A, B = 4, 2, 2


def valid_parts(terminal=True):
    r = ref.random_mdp(np.random.default_rng(0), S, A, num_terminal=1 if terminal else 0,
                       branching=B)
    return dict(P=r.P.copy(), indices=r.indices.astype(np.int32), probs=r.probs.copy(),
                rewards=r.rewards.copy(), initial=r.initial.copy(),
                terminal=None if r.terminal is None else r.terminal.copy(), discount=0.9)


def dense(p):
    return bj.TabularMDP(transitions=jnp.asarray(p["P"]), rewards=jnp.asarray(p["rewards"]),
                         discount=p["discount"], initial=jnp.asarray(p["initial"]),
                         terminal=None if p["terminal"] is None else jnp.asarray(p["terminal"]))


def sparse(p):
    transitions = bj.SparseTransitions(indices=jnp.asarray(p["indices"]),
                                       probs=jnp.asarray(p["probs"]))
    return dense(p).replace(transitions=transitions)


# ----------------------------------------------------------------------------------------------
# Valid inputs pass
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [dense, sparse])
@pytest.mark.parametrize("terminal", [False, True])
def test_valid_mdps_pass_and_are_returned(build, terminal):
    mdp = build(valid_parts(terminal))
    assert bj.validate_mdp(mdp) is mdp


def test_valid_edge_cases_pass():
    p = valid_parts()
    p["P"][p["terminal"]] = 0.0          # terminal rows may be all zero
    bj.validate_mdp(dense(p))
    p["discount"] = 0.0                  # discount 0 is allowed
    bj.validate_mdp(dense(p))
    # float32 rows summing to 1 up to float32 round-off are fine.
    mdp32 = bj.TabularMDP(transitions=jnp.asarray(p["P"], jnp.float32),
                          rewards=jnp.asarray(p["rewards"], jnp.float32), discount=0.99,
                          initial=jnp.asarray(p["initial"] * (1 + 3e-7), jnp.float32),
                          terminal=jnp.asarray(p["terminal"]))
    bj.validate_mdp(mdp32)


# ----------------------------------------------------------------------------------------------
# Invalid inputs: each case breaks exactly one thing
# ----------------------------------------------------------------------------------------------

def _set(**changes):
    def apply(p):
        p.update({k: (v(p) if callable(v) else v) for k, v in changes.items()})
        return p
    return apply


def _edit(key, fn):
    def apply(p):
        fn(p[key])
        return p
    return apply


def _idx(p):
    p["indices"][1, 1, 0] = S     # out of range
    return p


def _neg_idx(p):
    p["indices"][0, 0, 1] = -1
    return p


DENSE_CASES = {
    # shapes
    "transitions_wrong_num_states": (_set(P=lambda p: p["P"][:, :, :-1]), "transitions"),
    "transitions_wrong_num_actions": (_set(P=lambda p: p["P"][:, :1]), "transitions"),
    "transitions_2d": (_set(P=lambda p: p["P"][:, 0]), "transitions"),
    "rewards_wrong_shape": (_set(rewards=lambda p: p["rewards"][:-1]), "transitions"),
    "rewards_1d": (_set(rewards=lambda p: p["rewards"][:, 0]), "rewards"),
    "initial_wrong_shape": (_set(initial=lambda p: np.append(p["initial"], 0.0)), "initial"),
    "initial_scalar": (_set(initial=1.0), "initial"),
    "terminal_wrong_shape": (_set(terminal=np.zeros(S + 1, bool)), "terminal"),
    "terminal_not_bool": (_set(terminal=np.array([0, 1, 0, 0])), "terminal"),
    "terminal_float": (_set(terminal=np.array([0.0, 1.0, 0.0, 0.0])), "terminal"),
    # probabilities
    "negative_probability": (_edit("P", lambda P: P.__setitem__((0, 0), [-0.5, 1.5, 0, 0])),
                             "transitions"),
    "nan_probability": (_edit("P", lambda P: P.__setitem__((2, 1, 0), np.nan)), "transitions"),
    "inf_probability": (_edit("P", lambda P: P.__setitem__((2, 1, 0), np.inf)), "transitions"),
    "row_not_summing_to_one": (_edit("P", lambda P: P.__setitem__((1, 0), P[1, 0] * 0.9)),
                               "transitions"),
    "row_summing_slightly_off": (_edit("P", lambda P: P.__setitem__((1, 1), P[1, 1] * (1 + 1e-6))),
                                 "transitions"),
    "all_zero_row_of_nonterminal": (_edit("P", lambda P: P.__setitem__((1, 0), 0.0)),
                                    "transitions"),
    "integer_transitions": (_set(P=lambda p: np.eye(S, dtype=np.int32)[None].repeat(A, 0)
                                 .transpose(1, 0, 2)), "transitions"),
    "initial_not_summing_to_one": (_set(initial=lambda p: p["initial"] * 0.5), "initial"),
    "initial_negative": (_set(initial=np.array([1.5, -0.5, 0.0, 0.0])), "initial"),
    "initial_nan": (_set(initial=np.array([np.nan, 0.5, 0.5, 0.0])), "initial"),
    # rewards
    "nan_reward": (_edit("rewards", lambda r: r.__setitem__((1, 1), np.nan)), "rewards"),
    "inf_reward": (_edit("rewards", lambda r: r.__setitem__((0, 1), np.inf)), "rewards"),
    "neg_inf_reward": (_edit("rewards", lambda r: r.__setitem__((3, 0), -np.inf)), "rewards"),
    "integer_rewards": (_set(rewards=lambda p: np.ones((S, A), np.int32)), "rewards"),
    # discount
    "discount_one": (_set(discount=1.0), "discount"),
    "discount_above_one": (_set(discount=1.5), "discount"),
    "discount_negative": (_set(discount=-0.1), "discount"),
    "discount_nan": (_set(discount=float("nan")), "discount"),
}


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_invalid_dense_mdp_raises_naming_the_field(case):
    breaker, field = DENSE_CASES[case]
    p = breaker(valid_parts())
    with pytest.raises(bj.InvalidMDPError, match=field) as info:
        bj.validate_mdp(dense(p))
    assert isinstance(info.value, ValueError)


SPARSE_CASES = {
    "indices_out_of_range": (_idx, "transitions.indices"),
    "indices_negative": (_neg_idx, "transitions.indices"),
    "indices_not_integer": (_set(indices=lambda p: p["indices"].astype(np.float64)),
                            "transitions.indices"),
    "indices_wrong_num_states": (_set(indices=lambda p: p["indices"][:-1],
                                      probs=lambda p: p["probs"][:-1]), "transitions.indices"),
    "probs_shape_mismatch": (_set(probs=lambda p: p["probs"][:, :, :1]), "transitions.probs"),
    "probs_negative": (_edit("probs", lambda q: q.__setitem__((0, 0), [-0.5, 1.5])),
                       "transitions.probs"),
    "probs_nan": (_edit("probs", lambda q: q.__setitem__((0, 1, 0), np.nan)), "transitions.probs"),
    "probs_not_summing_to_one": (_edit("probs", lambda q: q.__setitem__((2, 0), q[2, 0] * 1.1)),
                                 "transitions.probs"),
}


@pytest.mark.parametrize("case", sorted(SPARSE_CASES))
def test_invalid_sparse_mdp_raises_naming_the_field(case):
    breaker, field = SPARSE_CASES[case]
    p = breaker(valid_parts())
    with pytest.raises(bj.InvalidMDPError, match=field.replace(".", r"\.")):
        bj.validate_mdp(sparse(p))


def test_not_an_mdp():
    with pytest.raises(bj.InvalidMDPError):
        bj.validate_mdp({"transitions": np.ones((2, 1, 2)) / 2})


def test_solvers_reject_shape_mismatches_without_validate():
    # The solvers run the (jit-safe) shape checks themselves.
    p = valid_parts()
    p["initial"] = np.append(p["initial"], 0.0)
    with pytest.raises(bj.InvalidMDPError, match="initial"):
        bj.soft_value_iteration(dense(p), 1.0)
    p = valid_parts()
    bad = dense(p).replace(rewards=jnp.zeros((S + 1, A)))
    with pytest.raises(bj.InvalidMDPError, match="transitions"):
        jax.jit(lambda m: bj.soft_value_iteration(m, 1.0).v)(bad)
    with pytest.raises(bj.InvalidMDPError, match="transitions"):
        bj.sample_trajectories(jax.random.PRNGKey(0), bad, jnp.ones((S + 1, A)) / A,
                               num_envs=2, num_steps=2)


def test_validate_under_jit_raises_invalid_mdp_error():
    """validate_mdp checks values, so it must run outside jit; under jit it should say so with
    an InvalidMDPError (its code catches the concretization error to do exactly that)."""
    mdp = dense(valid_parts())
    with pytest.raises(bj.InvalidMDPError, match="outside jit"):
        jax.jit(bj.validate_mdp)(mdp)


# ----------------------------------------------------------------------------------------------
# Other arguments
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), -1e-12])
def test_non_positive_temperature_raises(temperature):
    mdp = dense(valid_parts())
    with pytest.raises(bj.InvalidArgumentError, match="temperature") as info:
        bj.soft_value_iteration(mdp, temperature)
    assert isinstance(info.value, ValueError)


def test_temperature_as_array_is_checked_too():
    mdp = dense(valid_parts())
    with pytest.raises(ValueError, match="temperature"):
        bj.soft_value_iteration(mdp, jnp.asarray(0.0))
    with pytest.raises(ValueError, match="temperature"):
        bj.soft_value_iteration(mdp, np.array([0.5, -0.5]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(differentiation="backprop"), "differentiation"),
    (dict(differentiation="unroll"), "num_sweeps"),
    (dict(num_sweeps=-1), "num_sweeps"),
    (dict(max_iters=0), "max_iters"),
    (dict(init_q=jnp.zeros((S, A + 1))), "init_q"),
])
def test_bad_solver_options_raise(kwargs, name):
    mdp = dense(valid_parts())
    with pytest.raises(bj.InvalidArgumentError, match=name):
        bj.soft_value_iteration(mdp, 1.0, **kwargs)


def test_bad_policy_and_rollout_arguments_raise():
    mdp = dense(valid_parts())
    policy = jnp.ones((S, A)) / A
    with pytest.raises(bj.InvalidArgumentError, match="policy"):
        bj.visitation(mdp, jnp.ones((S, A + 1)) / (A + 1))
    with pytest.raises(bj.InvalidArgumentError, match="policy"):
        bj.policy_evaluation(mdp, jnp.ones((S + 1, A)) / A)
    key = jax.random.PRNGKey(0)
    for kwargs, name in [(dict(num_envs=0, num_steps=3), "num_envs"),
                         (dict(num_envs=2, num_steps=0), "num_steps"),
                         (dict(num_envs=2, num_steps=3, max_episode_steps=0), "max_episode_steps")]:
        with pytest.raises(bj.InvalidArgumentError, match=name):
            bj.sample_trajectories(key, mdp, policy, **kwargs)
    with pytest.raises(bj.InvalidArgumentError, match="policy"):
        bj.sample_trajectories(key, mdp, jnp.ones((S, A + 1)) / 3, num_envs=2, num_steps=3)
