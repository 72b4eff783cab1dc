"""Tax design (CB-RL's second experiment, SPEC 7.2): a household economy and its tabular twin.

A government (the leader) sets an income tax `tau` and a VAT rate `y_i` per good; a household
(the follower) chooses each step how many hours to work and how much of 3 goods to consume:

    reward   r(a, h, c)  = u(a) - 0.1 h^2 + prod_i (c_i / (p_i (1 + y_i)))^{xi_i}
    u(a)                 = log(a / 20 + 1) if a > 0 else a
    budget   m(a, h, c)  = clip(a + (1 - tau) w h - sum_i c_i, -100, 100)
    next     a' ~ N(m, 5^2) truncated to [-100, 100]
    welfare  rbar(a,h,c) = min(a, 0) + 15 mean_i(c_i / (1 + y_i)) / 5
                           + 5 log(1 + sum_i y_i c_i / (1 + y_i) + tau w h)

with hours `h = 0.89 * action[0]` (10 levels), consumption `c_i = 1.25 * action[1 + i]`
(5 levels each), wage `w = 1`, prices `p = 1`, preferences `xi` (the context) in
`{(0.6, 0.3, 0.1), (0.1, 0.7, 0.2)}` with probability 1/2 each, reset `a = sqrt(2) N(0, 1)`,
200-step episodes (a time limit: truncation, never termination). Rewards and welfare are earned
on the state before the move. VAT enters only the household's utility (and the welfare), the
income tax only the budget (and the welfare).

Three objects:

* `TaxDesignEnv` with `TaxDesignParams`: a gymnax environment whose params pytree holds every
  constant above (the reference's defaults), including `income_tax`, `vat` and `preferences`,
  so `x` and the context configure the world through the params.
* `tax_design_problem(...)`: the `bj.SimulatorProblem` (leader variable `w`, 4 logits).
* `tax_design_tabular(...)`: the exact tabular twin as a `bj.BilevelProblem` (assets on bins).

The reference (lasgroup/HPGD) computes the transition log-density with standardized bounds, so
its "truncated" normal is effectively untruncated; here the truncation is true in the sampler,
in `transition_log_prob` and in the twin's kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces
from jax.scipy.special import ndtr

from bilevel_jax.core.mdp import TabularMDP
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.sim.problem import SimulatorProblem, Step

Array = jax.Array

NUM_GOODS = 3
PREFERENCES = ((0.6, 0.3, 0.1), (0.1, 0.7, 0.2))  # the two contexts xi (SPEC 7.2)
INITIAL_RATE = 0.3                                 # every rate starts at 2 * sigmoid(w0) = 0.3


# --------------------------------------------------------------------------------------------
# Params and state
# --------------------------------------------------------------------------------------------

@struct.dataclass
class TaxDesignParams(environment.EnvParams):
    """Every constant of the economy (SPEC 7.2; defaults = the reference's config).

    Scalars are Python floats (weakly typed: they take the dtype of what they meet), vectors
    tuples or arrays of shape `[G]` (`G = 3` goods); the level counts and the time limit are
    static (they fix the action space and the episode length).

    Attributes:
      income_tax: `tau`, taxes the wage income in the budget (leader-controlled).
      vat: `y` `[G]`, VAT per good; enters the utility and the welfare (leader-controlled).
      preferences: `xi` `[G]`, the Cobb-Douglas exponents (the context).
      prices: `p` `[G]`.
      wage: `w`.
      hours_scale, consumption_scale: `h = hours_scale * action[0]`,
        `c_i = consumption_scale * action[1 + i]`.
      work_disutility: the `0.1` of `-0.1 h^2`.
      asset_utility_scale, asset_utility_width: `u(a) = scale * log(a / width + 1)` for `a > 0`,
        `a` otherwise.
      welfare_asset_scale: the same form in the welfare with this scale; the reference's 0 makes
        it `min(a, 0)` (positive assets count for nothing, debt linearly).
      welfare_consumption_scale: the `15` of `15 mean_i(c_i / (1 + y_i)) / c_max`, with `c_max =
        consumption_scale * (num_consumption_levels - 1) = 5` (derived, as in the reference).
      welfare_tax_scale: the `5` of `5 log(1 + VAT revenue + income tax revenue)`.
      noise_std: std of the Gaussian budget noise before truncation (0: deterministic moves).
      asset_low, asset_high: the asset bounds (clip and truncation).
      reset_std: `a_0 = reset_std * N(0, 1)` (clipped to the bounds, which it never reaches).
      discount: the household's discount `gamma`.
      num_hours_levels, num_consumption_levels: `Discrete(10)`, `Discrete(5)` per good.
      max_steps_in_episode: the time limit (truncation).
    """

    income_tax: Any = INITIAL_RATE
    vat: Any = (INITIAL_RATE,) * NUM_GOODS
    preferences: Any = PREFERENCES[0]
    prices: Any = (1.0,) * NUM_GOODS
    wage: Any = 1.0
    hours_scale: Any = 0.89
    consumption_scale: Any = 1.25
    work_disutility: Any = 0.1
    asset_utility_scale: Any = 1.0
    asset_utility_width: Any = 20.0
    welfare_asset_scale: Any = 0.0
    welfare_consumption_scale: Any = 15.0
    welfare_tax_scale: Any = 5.0
    noise_std: Any = 5.0
    asset_low: Any = -100.0
    asset_high: Any = 100.0
    reset_std: Any = math.sqrt(2.0)
    discount: Any = 0.9
    num_hours_levels: int = struct.field(pytree_node=False, default=10)
    num_consumption_levels: int = struct.field(pytree_node=False, default=5)
    max_steps_in_episode: int = struct.field(pytree_node=False, default=200)

    @property
    def num_goods(self) -> int:
        return int(np.shape(self.prices)[0])

    @property
    def action_heads(self) -> tuple[int, ...]:
        """`(10, 5, 5, 5)`: the sizes of the tuple action's heads."""
        return (self.num_hours_levels,) + (self.num_consumption_levels,) * self.num_goods


@struct.dataclass
class TaxDesignState(environment.EnvState):
    """`assets` float `[]` and the in-episode `time` (int `[]`, from `EnvState`)."""

    assets: Array


# --------------------------------------------------------------------------------------------
# The economy as pure functions (one state, one action; vmap for batches)
#
# The public ones are jitted: called eagerly (`validate_simulator` probes a transition, tests
# evaluate single steps) op-by-op dispatch of the truncated-normal sampler alone took seconds;
# inside an outer jit, grad or vmap a nested jit is inlined and costs nothing.
# --------------------------------------------------------------------------------------------

def _vec(value) -> Array:
    return jnp.asarray(value)


def hours_and_consumption(params: TaxDesignParams, action) -> tuple[Array, Array]:
    """`action` int `[1 + G]` (hours level, consumption level per good) -> `(h [], c [G])`."""
    action = jnp.asarray(action)
    return params.hours_scale * action[0], params.consumption_scale * action[1:]


def _asset_utility(assets: Array, scale, width) -> Array:
    # `maximum` keeps log's argument >= 1 on the branch `where` discards (a <= -width would
    # give NaN there, and NaN gradients through `where`).
    return jnp.where(assets > 0, scale * jnp.log1p(jnp.maximum(assets, 0.0) / width), assets)


def consumption_utility(params: TaxDesignParams, consumption: Array) -> Array:
    """Cobb-Douglas `prod_i (c_i / (p_i (1 + y_i)))^{xi_i}`, `consumption` `[G]` -> `[]`.

    Computed as `exp(sum_i xi_i log(...))` over the goods consumed; a good with `c_i = 0` and
    `xi_i > 0` makes the product exactly 0 (and its gradient in `y` exactly 0, not NaN: the log
    is never taken of 0), a good with `xi_i = 0` contributes a factor 1 (`0^0 = 1`, as
    `jnp.power` in the reference).
    """
    xi = _vec(params.preferences)
    price = _vec(params.prices) * (1.0 + _vec(params.vat))
    consumed = consumption > 0
    log_ratio = jnp.log(jnp.where(consumed, consumption, 1.0)) - jnp.log(price)
    log_prod = jnp.sum(jnp.where(consumed, xi * log_ratio, 0.0))
    starved = jnp.any(~consumed & (xi > 0))
    return jnp.where(starved, 0.0, jnp.exp(log_prod))


@jax.jit
def follower_utility(params: TaxDesignParams, assets, action) -> Array:
    """The household's reward on the state before the move: `u(a) - 0.1 h^2 + CD(c)`, `[]`."""
    hours, consumption = hours_and_consumption(params, action)
    return (_asset_utility(assets, params.asset_utility_scale, params.asset_utility_width)
            - params.work_disutility * hours ** 2 + consumption_utility(params, consumption))


@jax.jit
def social_welfare(params: TaxDesignParams, assets, action) -> Array:
    """The government's reward (SPEC 7.2), `[]`: `min(a, 0) + 15 mean_i(c_i / (1 + y_i)) / 5 +
    5 log(1 + sum_i y_i c_i / (1 + y_i) + tau w h)` at the defaults."""
    hours, consumption = hours_and_consumption(params, action)
    vat = _vec(params.vat)
    max_consumption = params.consumption_scale * (params.num_consumption_levels - 1)
    net = consumption / (1.0 + vat)           # consumption at pre-tax value
    revenue = jnp.sum(vat * net) + params.income_tax * params.wage * hours
    return (_asset_utility(assets, params.welfare_asset_scale, params.asset_utility_width)
            + params.welfare_consumption_scale * jnp.mean(net) / max_consumption
            + params.welfare_tax_scale * jnp.log1p(revenue))


@jax.jit
def budget(params: TaxDesignParams, assets, action) -> Array:
    """The pre-noise next assets `clip(a + (1 - tau) w h - sum_i c_i, low, high)`, `[]`.

    VAT does not enter (the reference's budget), prices neither.
    """
    hours, consumption = hours_and_consumption(params, action)
    income = (1.0 - params.income_tax) * params.wage * hours
    return jnp.clip(assets + income - jnp.sum(consumption), params.asset_low, params.asset_high)


def _standardized_bounds(params: TaxDesignParams, mean: Array) -> tuple[Array, Array]:
    std = params.noise_std
    return (params.asset_low - mean) / std, (params.asset_high - mean) / std


@jax.jit
def noise_log_density(params: TaxDesignParams, mean, next_assets) -> Array:
    """`log p(a' | m)` of `N(m, std^2)` truly truncated to `[low, high]`; `-inf` outside.

    `mean` is the clipped budget (inside the bounds), so the normalizer `Phi(beta) - Phi(alpha)`
    has `alpha <= 0 <= beta` and is at least `Phi((high - low) / (2 std)) - 1/2` (no underflow).
    """
    alpha, beta = _standardized_bounds(params, mean)
    z = (next_assets - mean) / params.noise_std
    log_pdf = -0.5 * z ** 2 - 0.5 * jnp.log(2.0 * jnp.pi) - jnp.log(params.noise_std)
    inside = (next_assets >= params.asset_low) & (next_assets <= params.asset_high)
    return jnp.where(inside, log_pdf - jnp.log(ndtr(beta) - ndtr(alpha)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("dtype",))
def sample_next_assets(key: Array, params: TaxDesignParams, mean, dtype=jnp.float32) -> Array:
    """`a' ~ N(mean, std^2)` truncated to `[low, high]` (inverse CDF, `jax.random.
    truncated_normal`), `[]` of `dtype`; `noise_std = 0` returns `mean` (the reference's switch).
    """
    std = jnp.asarray(params.noise_std, dtype)
    safe_std = jnp.where(std > 0, std, 1.0)   # no 0/0 in the branch `where` discards
    mean = jnp.asarray(mean, dtype)
    alpha = (params.asset_low - mean) / safe_std
    beta = (params.asset_high - mean) / safe_std
    z = jax.random.truncated_normal(key, alpha, beta, (), dtype)
    # the clip only guards the last ulp of `mean + std * z` in float32
    noisy = jnp.clip(mean + safe_std * z, params.asset_low, params.asset_high)
    return jnp.where(std > 0, noisy, mean)


def _action_array(action) -> Array:
    # gymnax's own `Tuple.sample` returns a tuple of scalars; bilevel_jax's samplers an `[D]`.
    if isinstance(action, (tuple, list)):
        return jnp.stack([jnp.asarray(a, jnp.int32) for a in action])
    return jnp.asarray(action, jnp.int32)


# --------------------------------------------------------------------------------------------
# The gymnax environment
# --------------------------------------------------------------------------------------------

class TaxDesignEnv(environment.Environment):
    """The household economy as a gymnax environment over `TaxDesignParams`.

    State `TaxDesignState(time, assets)`, observation `assets[None]` (`[1]`, `dtype`), action
    `Tuple(Discrete(10), Discrete(5), Discrete(5), Discrete(5))` given as int `[4]` (or a tuple).
    `step_env` returns the household's utility at the params' taxes on the state before the
    move, never terminates (`terminated = False`); the time limit `max_steps_in_episode`
    truncates (`is_truncated`, read by gymnax's `step` and by `bj.sim.rollout`).
    `info["social_welfare"]` is the government's reward of the same transition.

    Args:
      dtype: the float dtype of the assets and observations (float32: what the learners use;
        the economy's functions take float64 params and states too).
    """

    def __init__(self, dtype=jnp.float32):
        self.dtype = dtype

    @property
    def name(self) -> str:
        return "TaxDesign"

    @property
    def default_params(self) -> TaxDesignParams:
        return TaxDesignParams()

    @property
    def num_actions(self) -> int:
        return int(np.prod(self.default_params.action_heads))

    def action_space(self, params: TaxDesignParams | None = None):
        params = self.default_params if params is None else params
        return spaces.Tuple([spaces.Discrete(n) for n in params.action_heads])

    def observation_space(self, params: TaxDesignParams):
        return spaces.Box(params.asset_low, params.asset_high, (1,), self.dtype)

    def state_space(self, params: TaxDesignParams):
        return spaces.Dict({"assets": self.observation_space(params),
                            "time": spaces.Discrete(params.max_steps_in_episode)})

    def get_obs(self, state: TaxDesignState, params: TaxDesignParams | None = None, key=None):
        return _obs(state, self.dtype)

    def reset_env(self, key, params: TaxDesignParams):
        return _reset_env(key, params, self.dtype)

    def step_env(self, key, state: TaxDesignState, action, params: TaxDesignParams):
        return _step_env(key, state, _action_array(action), params, self.dtype)

    def is_terminated(self, state: TaxDesignState, params: TaxDesignParams) -> Array:
        return jnp.zeros((), bool)


def _obs(state: TaxDesignState, dtype) -> Array:
    return jnp.reshape(state.assets, (1,)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _reset_env(key, params: TaxDesignParams, dtype):
    assets = params.reset_std * jax.random.normal(key, (), dtype)
    assets = jnp.clip(assets, params.asset_low, params.asset_high).astype(dtype)
    state = TaxDesignState(time=jnp.zeros((), jnp.int32), assets=assets)
    return _obs(state, dtype), state


@functools.partial(jax.jit, static_argnames=("dtype",))
def _step_env(key, state: TaxDesignState, action, params: TaxDesignParams, dtype):
    reward = follower_utility(params, state.assets, action)
    welfare = social_welfare(params, state.assets, action)
    mean = budget(params, state.assets, action)
    # the state keeps one dtype whatever the params' (a float64 tau must not change the dtype
    # of a scan's carry)
    assets = sample_next_assets(key, params, mean, dtype)
    next_state = TaxDesignState(time=state.time + 1, assets=assets)
    return (_obs(next_state, dtype), next_state, jnp.asarray(reward, dtype),
            jnp.zeros((), bool), {"social_welfare": jnp.asarray(welfare, dtype)})


# --------------------------------------------------------------------------------------------
# The leader's variable
# --------------------------------------------------------------------------------------------

def tax_rates(w) -> tuple[Array, Array]:
    """`w` `[1 + G]` logits -> `(tau [], vat [G])`, each `2 * sigmoid(w)` (rates in (0, 2))."""
    rates = 2.0 * jax.nn.sigmoid(jnp.asarray(w))
    return rates[0], rates[1:]


def initial_tax_params(dtype=jnp.float32, num_goods: int = NUM_GOODS) -> Array:
    """`w0 = logit(0.15)` `[1 + G]`: every rate starts at 0.3 (SPEC 7.2)."""
    p = INITIAL_RATE / 2.0
    return jnp.full((1 + num_goods,), math.log(p / (1.0 - p)), dtype)


def _preference_contexts(dtype) -> tuple[Array, Array]:
    contexts = jnp.asarray(PREFERENCES, dtype)
    return contexts, jnp.full((contexts.shape[0],), 1.0 / contexts.shape[0], dtype)


def _taxed(base: TaxDesignParams, w, context) -> TaxDesignParams:
    tau, vat = tax_rates(w)
    return base.replace(income_tax=tau, vat=vat, preferences=context)


# --------------------------------------------------------------------------------------------
# The simulator problem
# --------------------------------------------------------------------------------------------

def tax_design_problem(*, temperature=0.1, discount: float = 0.9, leader_discount: float = 0.9,
                       params: TaxDesignParams | None = None, reference_bins: int | None = None,
                       dtype=jnp.float32):
    """The tax-design bilevel problem over `TaxDesignEnv` (SPEC 7.2, 9).

    Leader variable `w` `[4]`: `(tau, y_1, y_2, y_3) = 2 * sigmoid(w)`. Context: the preference
    vector `xi` `[3]`, `{(0.6, 0.3, 0.1), (0.1, 0.7, 0.2)}` with probability 1/2 each.
    `follower_reward` is the utility at the taxes (`x` enters through VAT), `leader_reward` the
    social welfare (through both), `transition_log_prob` the truncated-normal log-density of
    `a'` given the clipped budget (through `tau`: the score term of the income tax; zero where
    the budget is clipped, which no tax moves). Episodes: the env's 200-step time limit.

    Args:
      temperature: the household's `lam` (the reference runs 0.1, 0.2, 0.3).
      discount, leader_discount: `gamma`, `gammabar` (0.9 and 0.9).
      params: base `TaxDesignParams` (None: the defaults); its taxes and preferences are
        replaced by `w` and the context.
      reference_bins: when given, the problem's `reference` is `tax_design_tabular` on that many
        asset bins (the exact `F` of the twin, for reports: `bj.sim.reference_model`).
      dtype: of `w0`, the contexts and the env's states.

    Returns:
      `(problem, w0)` with `w0 = logit(0.15)` `[4]` (every rate 0.3).
    """
    env = TaxDesignEnv(dtype)
    base = (env.default_params if params is None else params).replace(discount=discount)
    contexts, probs = _preference_contexts(dtype)

    def env_params(w, context):
        return _taxed(base, w, context)

    def follower_reward(w, context, step: Step):
        return follower_utility(env_params(w, context), step.state.assets, step.action)

    def leader_reward(w, context, step: Step):
        return social_welfare(env_params(w, context), step.state.assets, step.action)

    def transition_log_prob(w, context, state, action, next_state):
        world = env_params(w, context)
        return noise_log_density(world, budget(world, state.assets, action), next_state.assets)

    problem = SimulatorProblem(
        env=env, env_params=env_params, follower_reward=follower_reward,
        leader_reward=leader_reward, transition_log_prob=transition_log_prob,
        temperature=temperature, discount=discount, leader_discount=leader_discount,
        contexts=contexts, context_probs=probs,
        reference=None if reference_bins is None else tax_design_tabular(
            reference_bins, temperature=temperature, discount=discount,
            leader_discount=leader_discount, params=params, dtype=dtype)[0])
    return problem, initial_tax_params(dtype, base.num_goods)


# --------------------------------------------------------------------------------------------
# The exact tabular twin
# --------------------------------------------------------------------------------------------

def asset_bins(num_bins: int, params: TaxDesignParams | None = None,
               dtype=jnp.float32) -> tuple[Array, Array]:
    """`(edges [N + 1], centers [N])` of `N` equal bins over `[low, high]`."""
    params = TaxDesignParams() if params is None else params
    edges = np.linspace(float(params.asset_low), float(params.asset_high), num_bins + 1)
    return jnp.asarray(edges, dtype), jnp.asarray(0.5 * (edges[:-1] + edges[1:]), dtype)


def asset_bin(assets, num_bins: int, params: TaxDesignParams | None = None) -> Array:
    """The twin's state (bin index, int) holding `assets` (any shape); the bounds map inside."""
    params = TaxDesignParams() if params is None else params
    width = (params.asset_high - params.asset_low) / num_bins
    index = jnp.floor((jnp.asarray(assets) - params.asset_low) / width).astype(jnp.int32)
    return jnp.clip(index, 0, num_bins - 1)


def joint_actions(params: TaxDesignParams | None = None) -> Array:
    """int `[A, 1 + G]`: the tuple action of each joint index, row-major (`A = 10 * 5^3 = 1250`;
    index = `((h * 5 + c_1) * 5 + c_2) * 5 + c_3`, as `jnp.unravel_index`)."""
    params = TaxDesignParams() if params is None else params
    heads = params.action_heads
    grid = np.stack(np.unravel_index(np.arange(int(np.prod(heads))), heads), axis=-1)
    return jnp.asarray(grid, jnp.int32)


def _bin_masses(z: Array) -> Array:
    """Standard-normal mass of the intervals between consecutive standardized edges `z [..., N+1]`.

    Bins above the mean use the upper tail, `Phi(-z_k) - Phi(-z_{k+1})`: the CDF form there
    would subtract numbers near 1 and lose the small masses in float32. Both forms are finite,
    so `where` passes clean gradients.
    """
    lower, upper = z[..., :-1], z[..., 1:]
    return jnp.where(lower >= 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))


def tabular_kernel(params: TaxDesignParams, centers: Array, edges: Array,
                   actions: Array) -> Array:
    """Dense `P[s, a, s']` `[N, A, N]`: the truncated normal around the budget of the bin center
    `centers[s]` under `actions[a]`, integrated over each bin `[edges[s'], edges[s'+1]]`.

    Rows are normalized by their own sum (the truncation's normalizer up to rounding), so each
    row is a distribution to the last bit whatever the dtype.
    """
    mean = jax.vmap(lambda a: jax.vmap(lambda act: budget(params, a, act))(actions))(centers)
    z = (edges - mean[..., None]) / params.noise_std               # [N, A, N + 1]
    masses = _bin_masses(z)
    return masses / jnp.sum(masses, axis=-1, keepdims=True)


def _table(fn, params: TaxDesignParams, centers: Array, actions: Array) -> Array:
    return jax.vmap(lambda a: jax.vmap(lambda act: fn(params, a, act))(actions))(centers)


def reset_distribution(params: TaxDesignParams, edges: Array) -> Array:
    """`[N]`: the mass of `reset_std * N(0, 1)` in each bin (the outer bins take the tails,
    as the env's clip does)."""
    z = edges / params.reset_std
    z = z.at[0].set(-jnp.inf).at[-1].set(jnp.inf)
    masses = _bin_masses(z)
    return masses / jnp.sum(masses)


def tax_design_tabular(num_asset_bins: int = 41, *, temperature=0.1, discount: float = 0.9,
                       leader_discount: float = 0.9, params: TaxDesignParams | None = None,
                       dtype=jnp.float32):
    """The exact tabular twin of `tax_design_problem` as a `bj.BilevelProblem`.

    States: `N = num_asset_bins` equal bins over `[-100, 100]` (odd `N` puts a bin centred on
    0, where the reset mass is); state `s` stands for the assets at its center. Actions: the
    tuple action flattened to one `Discrete(1250)` (`joint_actions` gives the tuple of each
    index; a softmax over the joint action is the exact soft-optimal policy, which a factorized
    one is not). Kernel: dense `[N, 1250, N]` (`tabular_kernel`), the truncated-normal noise
    around the center's budget integrated over each bin; dense, not `SparseTransitions`,
    because the bins holding mass move with `tau`, and a kernel whose support jumps with `x`
    would not be differentiable. Rewards: utility and welfare at the center, as functions of
    `w` (the exact hypergradient flows through VAT in the rewards and through `tau` in the
    kernel). Initial distribution: the reset distribution integrated over the bins. Contexts:
    the same two preference vectors.

    How it approximates the continuous economy:
    * within a bin, rewards and the budget are read at the center (the bin width is
      `200 / N`: 4.9 at N = 41, about one noise std), and the successor's position inside its
      bin is forgotten;
    * the twin is infinite-horizon discounted, the simulator cuts episodes at 200 steps: with
      `gamma = gammabar = 0.9`, `0.9^200 = 7e-10` of the discounted return is beyond the cut,
      far below any other error.
    `tests/test_tax_design.py` measures the leader value of the twin's soft-optimal policy
    against simulations of the continuous economy under that policy (mapped to bins).

    Args:
      num_asset_bins: `N` (21-41 keeps the exact solve to seconds).
      temperature, discount, leader_discount, params: as `tax_design_problem`.
      dtype: of the tables, `w0` and the contexts.

    Returns:
      `(problem, w0)` with `w0 = logit(0.15)` `[4]`.
    """
    base = (TaxDesignParams() if params is None else params).replace(discount=discount)
    edges, centers = asset_bins(num_asset_bins, base, dtype)
    actions = joint_actions(base)
    initial = reset_distribution(base, edges).astype(dtype)
    contexts, probs = _preference_contexts(dtype)

    def follower(w, context):
        world = _taxed(base, w, context)
        return TabularMDP(
            transitions=tabular_kernel(world, centers, edges, actions).astype(dtype),
            rewards=_table(follower_utility, world, centers, actions).astype(dtype),
            discount=discount, initial=initial)

    def leader_reward(w, context):
        return _table(social_welfare, _taxed(base, w, context), centers, actions).astype(dtype)

    problem = BilevelProblem(follower=follower, leader_reward=leader_reward,
                             leader_discount=leader_discount, temperature=temperature,
                             contexts=contexts, context_probs=probs)
    return problem, initial_tax_params(dtype, base.num_goods)
