"""The bilevel problem (SPEC 3): `leader_objective`, the exact hypergradient, and validation.

The ground truth is an independent NumPy float64 implementation written here (on top of the
soft value iteration / policy evaluation of `tests/reference.py`, which does not import
`bilevel_jax`): the follower's MDP and the leader's reward are rebuilt from explicit NumPy arrays,
the follower is solved by soft value iteration (Newton-polished to machine precision), the
leader's values by `np.linalg.solve`, and `F(x) = sum_k p_k mu_k . Vbar_k`. Gradients are
Richardson-extrapolated central finite differences of that NumPy `F`.

`test_estimators.py` imports the problem builders and the reference from this module.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
import reference as ref
from bilevel_jax.envs.random_mdp import random_bilevel_problem
from helpers import assert_rel_close


def test_x64_is_enabled():
    # Everything below compares float64 results at 1e-6 or tighter: it needs x64 (conftest.py).
    assert jax.config.jax_enable_x64
    assert jnp.zeros(()).dtype == jnp.float64


# ----------------------------------------------------------------------------------------------
# Problems as explicit NumPy arrays, and their NumPy reference objective
# ----------------------------------------------------------------------------------------------

class Spec(NamedTuple):
    """A bilevel problem as plain arrays (flat leader variable of size `n`).

    Follower of context k:  P = softmax(base_logits + D x) (rows over s'),
                            r = r0 + Phi x + shift[k],   mu = softmax(mu_logits + M x).
    Leader reward:          rbar = leader[k] + tanh(Psi x).
    `shift is None` means a context-free problem (`contexts=None`, one leader table).
    `pytree_shapes` (if given) splits the flat x into a dict {"a": ..., "b": ...} of arrays.
    """

    base_logits: np.ndarray          # [S, A, S]
    D: np.ndarray | None             # [S, A, S, n]  (None: transitions do not depend on x)
    r0: np.ndarray                   # [S, A]
    Phi: np.ndarray                  # [S, A, n]
    mu_logits: np.ndarray            # [S]
    M: np.ndarray | None             # [S, n]        (None: initial does not depend on x)
    Psi: np.ndarray                  # [S, A, n]
    shift: np.ndarray | None         # [K, S, A]
    leader: np.ndarray               # [K, S, A]
    probs: np.ndarray                # [K]
    terminal: np.ndarray | None      # [S] bool
    gamma: float
    gamma_bar: float
    lam: float
    pytree_shapes: tuple | None = None

    @property
    def n(self) -> int:
        return self.Phi.shape[-1]

    @property
    def num_contexts(self) -> int:
        return self.leader.shape[0]


def make_spec(seed, S, A, n, *, num_contexts=2, transitions=False, initial=False,
              num_terminal=0, gamma=0.9, gamma_bar=0.85, lam=0.2, contexts=True,
              pytree_shapes=None) -> Spec:
    rng = np.random.default_rng(seed)
    K = num_contexts if contexts else 1
    terminal = None
    if num_terminal:
        terminal = np.zeros(S, bool)
        terminal[S - num_terminal:] = True
    return Spec(
        base_logits=np.log(rng.dirichlet(np.ones(S), size=(S, A))),
        D=rng.normal(size=(S, A, S, n)) * 0.7 if transitions else None,
        r0=rng.normal(size=(S, A)),
        Phi=rng.normal(size=(S, A, n)) / np.sqrt(n),
        mu_logits=rng.normal(size=S),
        M=rng.normal(size=(S, n)) if initial else None,
        Psi=rng.normal(size=(S, A, n)) / np.sqrt(n),
        shift=rng.normal(size=(K, S, A)) * 0.5 if contexts else None,
        leader=rng.normal(size=(K, S, A)),
        probs=rng.dirichlet(2.0 * np.ones(K)) if contexts else np.ones(1),
        terminal=terminal, gamma=gamma, gamma_bar=gamma_bar, lam=lam,
        pytree_shapes=pytree_shapes)


def spec_x(spec: Spec, seed=1, scale=0.5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=spec.n) * scale


def to_tree(spec: Spec, xf):
    """Flat x -> the problem's leader variable (a dict of arrays when `pytree_shapes`)."""
    xf = jnp.asarray(xf, jnp.float64)
    if spec.pytree_shapes is None:
        return xf
    shape_a, shape_b = spec.pytree_shapes
    size_a = int(np.prod(shape_a))
    return {"a": xf[..., :size_a].reshape(xf.shape[:-1] + shape_a),
            "b": xf[..., size_a:].reshape(xf.shape[:-1] + shape_b)}


def tree_to_flat(spec: Spec, x) -> np.ndarray:
    if spec.pytree_shapes is None:
        return np.asarray(x)
    return np.concatenate([np.asarray(x["a"]).ravel(), np.asarray(x["b"]).ravel()])


def np_model(spec: Spec, xf, k):
    """(P, r, mu, rbar) of context k at flat x, in NumPy."""
    logits = spec.base_logits if spec.D is None else spec.base_logits + spec.D @ xf
    P = ref.softmax(logits, axis=-1)
    r = spec.r0 + spec.Phi @ xf + (0.0 if spec.shift is None else spec.shift[k])
    mu = ref.softmax(spec.mu_logits if spec.M is None else spec.mu_logits + spec.M @ xf)
    rbar = spec.leader[k] + np.tanh(spec.Psi @ xf)
    return P, r, mu, rbar


def np_context_values(spec: Spec, xf) -> np.ndarray:
    """`[K]` values f(x, xi_k): soft VI (NumPy) then the leader's values by np.linalg.solve."""
    xf = np.asarray(xf, np.float64)
    values = []
    for k in range(spec.num_contexts):
        P, r, mu, rbar = np_model(spec, xf, k)
        _, _, pi = ref.soft_value_iteration(P, r, spec.gamma, spec.lam, spec.terminal, tol=1e-9)
        S = r.shape[0]
        keep = ref.continuation(spec.terminal, S)
        P_pi = keep[:, None] * np.einsum("sa,sat->st", pi, P)
        v_bar = np.linalg.solve(np.eye(S) - spec.gamma_bar * P_pi, np.sum(pi * rbar, -1))
        values.append(mu @ v_bar)
    return np.array(values)


def np_objective(spec: Spec, xf) -> float:
    """F(x) = sum_k p_k mu_k . Vbar_k."""
    return float(spec.probs @ np_context_values(spec, xf))


def richardson_gradient(fn, xf, h=1e-3) -> np.ndarray:
    """Central differences at h and h/2 combined to cancel the h^2 term (error O(h^4))."""
    xf = np.asarray(xf, np.float64)
    grad = np.zeros_like(xf)
    for i in range(xf.size):
        e = np.zeros_like(xf)
        e[i] = 1.0
        d1 = (fn(xf + h * e) - fn(xf - h * e)) / (2 * h)
        d2 = (fn(xf + 0.5 * h * e) - fn(xf - 0.5 * h * e)) / h
        grad[i] = (4 * d2 - d1) / 3
    return grad


def np_gradient(spec: Spec, xf) -> np.ndarray:
    return richardson_gradient(lambda z: np_objective(spec, z), xf)


def make_problem(spec: Spec) -> bj.BilevelProblem:
    """The same problem as a `bj.BilevelProblem` (JAX code written from the same formulas)."""
    base = jnp.asarray(spec.base_logits)
    D = None if spec.D is None else jnp.asarray(spec.D)
    r0, Phi, Psi = jnp.asarray(spec.r0), jnp.asarray(spec.Phi), jnp.asarray(spec.Psi)
    mu_logits = jnp.asarray(spec.mu_logits)
    M = None if spec.M is None else jnp.asarray(spec.M)
    terminal = None if spec.terminal is None else jnp.asarray(spec.terminal)
    leader0 = jnp.asarray(spec.leader[0])

    def flat(x):
        if spec.pytree_shapes is None:
            return x
        return jnp.concatenate([x["a"].ravel(), x["b"].ravel()])

    def follower(x, context):
        xf = flat(x)
        logits = base if D is None else base + D @ xf
        rewards = r0 + Phi @ xf
        if context is not None:
            rewards = rewards + context["shift"]
        mu = jax.nn.softmax(mu_logits if M is None else mu_logits + M @ xf)
        return bj.TabularMDP(transitions=jax.nn.softmax(logits, axis=-1), rewards=rewards,
                             discount=spec.gamma, initial=mu, terminal=terminal)

    def leader_reward(x, context):
        table = leader0 if context is None else context["leader"]
        return table + jnp.tanh(Psi @ flat(x))

    if spec.shift is None:
        contexts = probs = None
    else:
        contexts = {"shift": jnp.asarray(spec.shift), "leader": jnp.asarray(spec.leader)}
        probs = jnp.asarray(spec.probs)
    return bj.BilevelProblem(follower=follower, leader_reward=leader_reward,
                             leader_discount=spec.gamma_bar, temperature=spec.lam,
                             contexts=contexts, context_probs=probs)


CASES = {
    # name: make_spec kwargs
    "reward_only_2ctx": dict(seed=10, S=6, A=3, n=4, num_contexts=2),
    "reward_only_terminal_3ctx": dict(seed=11, S=6, A=3, n=3, num_contexts=3, num_terminal=2),
    "transitions_terminal_3ctx": dict(seed=13, S=6, A=2, n=3, num_contexts=3, transitions=True,
                                      num_terminal=1, gamma=0.8, gamma_bar=0.95, lam=0.5),
    "pytree_initial_2ctx": dict(seed=14, S=5, A=3, n=6, num_contexts=2, transitions=True,
                                initial=True, num_terminal=1, pytree_shapes=((2,), (2, 2))),
    "no_contexts_initial": dict(seed=16, S=5, A=2, n=3, contexts=False, initial=True, lam=0.05),
}


class Case(NamedTuple):
    spec: Spec
    problem: bj.BilevelProblem
    x: object        # the problem's leader variable (array or dict)
    xf: np.ndarray   # its flat NumPy version


_CASE_CACHE: dict = {}


def get_case(name: str) -> Case:
    """Built once per session (the NumPy finite differences are reused across test files)."""
    if name not in _CASE_CACHE:
        spec = make_spec(**CASES[name])
        xf = spec_x(spec)
        _CASE_CACHE[name] = Case(spec, make_problem(spec), to_tree(spec, xf), xf)
    return _CASE_CACHE[name]


_GRAD_CACHE: dict = {}


def reference_gradient(name: str) -> np.ndarray:
    if name not in _GRAD_CACHE:
        case = get_case(name)
        _GRAD_CACHE[name] = np_gradient(case.spec, case.xf)
    return _GRAD_CACHE[name]


# jit caches are keyed on the function object: one wrapper each, reused by every test. The
# graphs are tiny, so XLA's backend optimizations and fusion emitters are switched off:
# compilation is about 3x faster.
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
objective_jit = jax.jit(bj.leader_objective, compiler_options=FAST)
objective_grad_jit = jax.jit(jax.grad(bj.leader_objective, argnums=1), compiler_options=FAST)


@functools.partial(jax.jit, compiler_options=FAST)
def _objective_and_exact(problem, x):
    grad, info = bj.hypergradient(problem, x, "exact")
    return bj.leader_objective(problem, x), grad, info


_EXACT_CACHE: dict = {}


def library_exact(name: str):
    """`(leader_objective, exact grad, info)` of a case: one compilation per case."""
    if name not in _EXACT_CACHE:
        case = get_case(name)
        _EXACT_CACHE[name] = jax.device_get(_objective_and_exact(case.problem, case.x))
    return _EXACT_CACHE[name]


# ----------------------------------------------------------------------------------------------
# Sanity of the reference itself
# ----------------------------------------------------------------------------------------------

def test_reference_gradient_is_accurate():
    """The Richardson FD of the NumPy F agrees with plain central differences (eps 1e-5), so
    its own error is far below the 1e-6 tolerance used against the library."""
    case = get_case("pytree_initial_2ctx")
    g = reference_gradient("pytree_initial_2ctx")
    fd = ref.central_jacobian(lambda z: np_objective(case.spec, z), case.xf, eps=1e-5)
    assert_rel_close(fd, g, rtol=1e-6, atol_scale=1e-7)
    assert np.linalg.norm(g) > 1e-2   # a non-trivial gradient


def test_reference_objective_shift_identity():
    """F is affine in the leader's reward table: F(leader + c) = F(leader) + c * (expected
    discounted episode length under the leader's discount), via the reference visitation."""
    case = get_case("reward_only_terminal_3ctx")
    spec = case.spec
    shifted = spec._replace(leader=spec.leader + 1.0)
    lengths = []
    for k in range(spec.num_contexts):
        P, r, mu, _ = np_model(spec, case.xf, k)
        _, _, pi = ref.soft_value_iteration(P, r, spec.gamma, spec.lam, spec.terminal)
        lengths.append(ref.visitation(P, spec.gamma_bar, pi, mu, spec.terminal).sum())
    expected = np_objective(spec, case.xf) + spec.probs @ np.array(lengths)
    np.testing.assert_allclose(np_objective(shifted, case.xf), expected, rtol=1e-12)


def test_reference_gradient_depends_on_every_channel():
    """Guard against cases that would pass trivially: switching off the x-dependence of the
    transitions / the initial distribution / the leader's reward changes the gradient."""
    case = get_case("pytree_initial_2ctx")
    g_full = reference_gradient("pytree_initial_2ctx")
    for spec in (case.spec._replace(D=np.zeros_like(case.spec.D)),
                 case.spec._replace(M=np.zeros_like(case.spec.M)),
                 case.spec._replace(Psi=np.zeros_like(case.spec.Psi))):
        g = np_gradient(spec, case.xf)
        assert np.linalg.norm(g - g_full) > 0.05 * np.linalg.norm(g_full)


# ----------------------------------------------------------------------------------------------
# leader_objective and the exact hypergradient against the NumPy reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_leader_objective_matches_numpy_reference(name):
    case = get_case(name)
    value, _, info = library_exact(name)
    assert value.dtype == np.float64 and value.shape == ()
    expected = np_objective(case.spec, case.xf)
    np.testing.assert_allclose(value, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(info["objective"], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_exact_hypergradient_matches_finite_differences(name):
    case = get_case(name)
    expected = reference_gradient(name)
    _, grad, info = library_exact(name)
    # x's structure is kept (a dict of two arrays for the pytree case)
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(case.x)
    for g, x in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(case.x)):
        assert g.shape == x.shape and g.dtype == np.float64
    assert_rel_close(tree_to_flat(case.spec, grad), expected, rtol=1e-6, atol_scale=1e-7,
                     err_msg=name)
    assert float(info["follower_residual"]) < 1e-9
    assert int(info["samples"]) == 0
    assert info["state"]["q"].shape == (case.spec.num_contexts,) + case.spec.r0.shape


def test_grad_of_leader_objective_is_the_exact_hypergradient():
    """`jax.grad(leader_objective)` differentiates through the implicit solver."""
    name = "transitions_terminal_3ctx"
    case = get_case(name)
    grad = objective_grad_jit(case.problem, case.x)
    assert_rel_close(grad, reference_gradient(name), rtol=1e-6, atol_scale=1e-7)


def test_leader_objective_weights_contexts_by_probs():
    """Per-context values of the reference, recombined with other probabilities."""
    case = get_case("reward_only_terminal_3ctx")
    values = np_context_values(case.spec, case.xf)
    for probs in (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.25, 0.75])):
        problem = case.problem.replace(context_probs=jnp.asarray(probs))
        np.testing.assert_allclose(float(objective_jit(problem, case.x)), probs @ values,
                                   rtol=1e-9)
    uniform = case.problem.replace(context_probs=None)
    np.testing.assert_allclose(float(objective_jit(uniform, case.x)), values.mean(), rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# random_bilevel_problem re-implemented in NumPy (SPEC 7.6)
# ----------------------------------------------------------------------------------------------

def np_random_bilevel(seed, S, A, n, K, branching, transition_dependent, num_terminal,
                      gamma=0.9, gamma_bar=0.9, lam=0.1):
    """The generator's random draws, in the same order, and its maths in NumPy."""
    rng = np.random.default_rng(seed)
    width = S if branching is None else branching
    if branching is not None:
        succ = np.stack([np.stack([rng.choice(S, size=width, replace=False) for _ in range(A)])
                         for _ in range(S)])
    else:
        succ = np.broadcast_to(np.arange(S), (S, A, S))
    base_logits = np.log(rng.dirichlet(np.ones(width), size=(S, A)))
    feature_r = rng.normal(size=(S, A, n)) / np.sqrt(n)
    feature_p = rng.normal(size=(S, A, width, n)) / np.sqrt(n) if transition_dependent else None
    reward0 = rng.normal(size=(S, A))
    shift = rng.normal(size=(K, S, A)) * 0.5
    leader = rng.normal(size=(K, S, A))
    initial = rng.dirichlet(np.ones(S))
    terminal = np.zeros(S, bool)
    terminal[S - num_terminal:] = True
    terminal = terminal if num_terminal else None
    probs = rng.dirichlet(np.ones(K) * 2.0)
    x0 = rng.normal(size=n) * 0.1

    def objective(x):
        logits = base_logits if feature_p is None else base_logits + feature_p @ x
        row = ref.softmax(logits, axis=-1)
        P = ref.dense_from_sparse(succ, row, S) if branching is not None else row
        total = 0.0
        for k in range(K):
            r = reward0 + feature_r @ x + shift[k]
            _, _, pi = ref.soft_value_iteration(P, r, gamma, lam, terminal, tol=1e-9)
            _, v_bar = ref.policy_evaluation(P, leader[k], gamma_bar, pi, 0.0, terminal)
            total += probs[k] * initial @ v_bar
        return total

    return objective, x0


@pytest.mark.parametrize("branching,transition_dependent,num_terminal,sparse", [
    (3, True, 2, True)])
def test_random_bilevel_problem_matches_numpy_reimplementation(branching, transition_dependent,
                                                               num_terminal, sparse):
    S, A, n, K = 6, 3, 4, 3
    problem, x0 = random_bilevel_problem(5, S, A, n, num_contexts=K, branching=branching,
                                         transition_dependent=transition_dependent,
                                         num_terminal=num_terminal, sparse=sparse)
    objective, x0_ref = np_random_bilevel(5, S, A, n, K, branching, transition_dependent,
                                          num_terminal)
    np.testing.assert_allclose(np.asarray(x0), x0_ref, rtol=1e-15)
    x = x0 * 5.0   # a point where the gradient is not tiny
    value, grad, _ = _objective_and_exact(problem, x)
    np.testing.assert_allclose(float(value), objective(np.asarray(x)), rtol=1e-9)
    assert_rel_close(grad, richardson_gradient(objective, np.asarray(x)), rtol=1e-6,
                     atol_scale=1e-7)


# ----------------------------------------------------------------------------------------------
# Validation: bad problems raise errors that name the field
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good():
    return get_case("reward_only_terminal_3ctx")


def test_good_problem_passes_checks(good):
    bj.check_problem(good.problem, good.x)
    assert bj.validate_problem(good.problem, good.x) is good.problem


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_temperature(good, temperature):
    problem = good.problem.replace(temperature=temperature)
    for call in (lambda: bj.check_problem(problem, good.x),
                 lambda: bj.leader_objective(problem, good.x),
                 lambda: bj.hypergradient(problem, good.x, "exact")):
        with pytest.raises(bj.InvalidProblemError, match="temperature"):
            call()


@pytest.mark.parametrize("gamma_bar", [1.0, 1.5, -0.1, float("nan")])
def test_bad_leader_discount(good, gamma_bar):
    problem = good.problem.replace(leader_discount=gamma_bar)
    with pytest.raises(bj.InvalidProblemError, match="leader_discount"):
        bj.check_problem(problem, good.x)
    with pytest.raises(bj.InvalidProblemError, match="leader_discount"):
        bj.leader_objective(problem, good.x)
    with pytest.raises(bj.InvalidProblemError, match="leader_discount"):
        bj.hypergradient(problem, good.x, "amd")


def test_leader_discount_must_be_scalar(good):
    problem = good.problem.replace(leader_discount=jnp.array([0.9, 0.9]))
    with pytest.raises(bj.InvalidProblemError, match="leader_discount"):
        bj.check_problem(problem, good.x)


@pytest.mark.parametrize("probs", [
    [0.5, 0.3, 0.3],              # sums to 1.1
    [0.5, 0.2, 0.2],              # sums to 0.9
    [1.2, -0.1, -0.1],            # sums to 1 but negative entries
    [0.5, 0.5],                   # wrong shape (K = 3)
    [[0.2, 0.3, 0.5]],            # wrong shape
    [0.2, 0.3, float("nan")],
])
def test_bad_context_probs(good, probs):
    problem = good.problem.replace(context_probs=jnp.asarray(probs))
    with pytest.raises(bj.InvalidProblemError, match="context_probs"):
        bj.check_problem(problem, good.x)
    with pytest.raises(bj.InvalidProblemError, match="context_probs"):
        bj.leader_objective(problem, good.x)


def test_inconsistent_context_leading_axes(good):
    contexts = dict(good.problem.contexts)
    contexts["leader"] = contexts["leader"][:2]           # K = 2 vs K = 3
    problem = good.problem.replace(contexts=contexts, context_probs=None)
    with pytest.raises(bj.InvalidProblemError, match="contexts"):
        bj.check_problem(problem, good.x)
    with pytest.raises(bj.InvalidProblemError, match="contexts"):
        bj.hypergradient(problem, good.x, "exact")


def test_scalar_context_leaf_is_rejected(good):
    contexts = dict(good.problem.contexts, extra=jnp.asarray(1.0))
    problem = good.problem.replace(contexts=contexts)
    with pytest.raises(bj.InvalidProblemError, match="contexts"):
        bj.check_problem(problem, good.x)


@pytest.mark.parametrize("shape", [(6, 2), (5, 3), (6,), (6, 3, 1)])
def test_leader_reward_of_wrong_shape(good, shape):
    problem = good.problem.replace(leader_reward=lambda x, c: jnp.zeros(shape))
    with pytest.raises(bj.InvalidProblemError, match="leader_reward"):
        bj.check_problem(problem, good.x)
    with pytest.raises(bj.InvalidProblemError, match="leader_reward"):
        bj.leader_objective(problem, good.x)


def test_nonfinite_leader_reward_is_rejected_by_validate(good):
    base = good.problem.leader_reward
    problem = good.problem.replace(leader_reward=lambda x, c: base(x, c).at[0, 0].set(jnp.nan))
    bj.check_problem(problem, good.x)    # shapes are fine
    with pytest.raises(bj.InvalidProblemError, match="leader_reward"):
        bj.validate_problem(problem, good.x)


def test_follower_must_return_a_tabular_mdp(good):
    problem = good.problem.replace(follower=lambda x, c: (jnp.zeros((6, 3)),))
    with pytest.raises(bj.InvalidProblemError, match="follower"):
        bj.check_problem(problem, good.x)


def test_follower_that_fails_is_reported(good):
    def follower(x, context):
        return good.problem.follower(x[:2] @ jnp.ones((3, 3)), context)   # shape error
    problem = good.problem.replace(follower=follower)
    with pytest.raises(bj.InvalidProblemError, match="follower"):
        bj.check_problem(problem, good.x)


def test_follower_transitions_not_summing_to_one(good):
    base = good.problem.follower

    def follower(x, context):
        mdp = base(x, context)
        return mdp.replace(transitions=mdp.transitions * 1.01)

    problem = good.problem.replace(follower=follower)
    bj.check_problem(problem, good.x)    # shapes are fine: only validate_problem looks at values
    with pytest.raises(bj.InvalidMDPError, match="transitions"):
        bj.validate_problem(problem, good.x)


def test_follower_with_bad_initial_is_rejected(good):
    base = good.problem.follower

    def follower(x, context):
        mdp = base(x, context)
        return mdp.replace(initial=mdp.initial.at[0].add(0.5))

    with pytest.raises(bj.InvalidMDPError, match="initial"):
        bj.validate_problem(good.problem.replace(follower=follower), good.x)


def test_follower_with_inconsistent_shapes_raises_mdp_error(good):
    base = good.problem.follower

    def follower(x, context):
        mdp = base(x, context)
        return mdp.replace(initial=jnp.ones(4) / 4)

    problem = good.problem.replace(follower=follower)
    with pytest.raises(bj.InvalidMDPError, match="initial"):
        bj.validate_problem(problem, good.x)
    with pytest.raises(bj.InvalidMDPError, match="initial"):
        bj.leader_objective(problem, good.x)


def test_not_a_problem():
    with pytest.raises(bj.InvalidProblemError, match="problem"):
        bj.check_problem(object(), jnp.zeros(3))


def test_problem_errors_are_value_errors():
    assert issubclass(bj.InvalidProblemError, ValueError)
    assert issubclass(bj.InvalidProblemError, bj.BilevelJaxError)
