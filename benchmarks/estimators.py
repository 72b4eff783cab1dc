"""Estimator benchmark: every hypergradient estimator measured against `exact` in the same run.

    python benchmarks/estimators.py [--quick] [--json PATH] [--seeds N] [--time-budget S]
                                    [--methods REGEX] [--problems REGEX] [--no-four-rooms]
                                    [--extra MODULE:FUNCTION ...] [--resume] [--no-simulator]
                                    [--no-plot]

For each problem (random bilevel MDPs of SPEC 7.6 and the Four-Rooms reward-shaping problem of
SPEC 7.1) the exact hypergradient `grad F(x)` is computed once (implicit differentiation, float64),
then every candidate estimator is called at the same `x` with `--seeds` independent keys, each
call from the estimator's fresh `init` state (cold start: warm-startable methods get no history).
Reported per (problem, estimator, budget):

* rel. error  `||g - grad F|| / ||grad F||`: mean and standard deviation over seeds;
* bias        `||mean_seeds g - grad F|| / ||grad F||`, with its noise floor
              `sqrt(tr Cov / seeds) / ||grad F||` (a bias well above the floor is real);
* cosine      `<g, grad F> / (||g|| ||grad F||)`, mean over seeds;
* variance    per-coordinate variance across seeds, averaged over coordinates, `/ ||grad F||^2`;
* cost        per call, in the estimator's own unit: `samples` (transitions, HPGD), `sweeps`
              (Bellman sweeps summed over contexts, AMD / unrolled / exact), `evaluations`
              (of `F`, zero-order);
* ms/call     best wall time of one jitted, non-vmapped `update` (compilation excluded).

Model-free rows (`simulator_candidates`: `hpgd_sim_branching`, `hpgd_sim_branching_critic`,
`hpgd_sim_single_batch`,
`hpgd_sim_soft_q`, `zero_order_sim`) run on `bj.sim.as_simulator` of the random problems (with
`--quick`, of the two S=10 ones), against the same exact gradient; rows marked `warm=K` are
measured from the state after K outer steps at the fixed `x` (learner and critics warm), all
others from `init`. The JSON's `variance_ratio_branching_over_single_sim` (and `_tabular`, for
`hpgd-unbiased` over `hpgd`) is, per problem, the branching variant's variance over the
single-batch variant's at equal transitions (variance times transitions per call); the target
of issue 12 is <= 10. For the simulator it is computed with the critic form
(`hpgd_sim_branching_critic`) on the transitions it *reads* (`ratio`, `ratio_on`), and also
on the transitions simulated (`ratio_simulated`; a fixed-length rollout simulates
`num_envs x horizon` whether or not it is read); `variance_ratio_branching_plain_over_single_sim`
is the same for the plain branching row. `hpgd-unbiased` is the tabular critic form (`unbiased_form="critic"`,
the default; its cost counts the transitions it reads), `hpgd-unbiased-plain` the plain
branching form it replaced.

Deterministic estimators (same output for two keys) are called only a few times; expensive rows
stop drawing seeds after `--time-budget` seconds of calls (at least 4 seeds; the row says how
many). Compilation dominates the runtime (every configuration is its own XLA program: about 3 min
for `--quick` on the shared 2-core machine); `JAX_COMPILATION_CACHE_DIR=DIR` lets reruns reuse
compiled programs.

Outputs: a Markdown table on stdout and in `<stem>.md`, JSON in `<stem>.json` and a log-log plot
of relative error against cost in `<stem>.png`, where `<stem>` is `--json` without `.json`
(default `benchmarks/results/estimators` or `benchmarks/results/estimators_quick`).

Adding an estimator without editing this file
---------------------------------------------
A candidate is `Candidate(label, method, options, cost_label[, cost])` (a plain 4- or 5-tuple
works): `label` names the method family (one line in the plot), `method` is a registered name
(`bj.estimators.register`) or a ready `bj.Estimator` (then `options` must be `{}`), `cost_label`
is the cost unit, read from `info[cost_label]` of each call unless `cost` gives a number or a
function `info -> number`. From the command line, write a module with a function returning a
list of candidates and pass it with `--extra`:

    # my_estimators.py
    import bilevel_jax as bj
    def candidates():                      # may also take a `quick` keyword
        return [("mine", bj.Estimator(my_init, my_update), {}, "samples"),
                ("mine", "hpgd", {"num_envs": 8, "num_steps": 100, "baseline": "none"}, "samples")]

    python benchmarks/estimators.py --quick --extra my_estimators:candidates --methods 'mine|amd'

(`MODULE` is an importable module, looked up from the current directory too, or a path to a
`.py` file.) Programmatically:

    from benchmarks.estimators import Candidate, run_benchmark, random_problems
    rows = run_benchmark(random_problems([10], [8], [False]),
                         [Candidate("mine", my_estimator, {}, "samples")], seeds=16)
"""

from __future__ import annotations

import os

# jaxlib's CPU LAPACK kernels (the unbatched direct solves of policy evaluation and implicit
# differentiation) call scipy's OpenBLAS; its own thread pool next to XLA's made calls erratic on
# the 2-core machine (unrolled, S=200: 25-390 ms per call, against a steady 14 ms with one
# OpenBLAS thread). Set OPENBLAS_NUM_THREADS yourself to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, NamedTuple, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import bilevel_jax as bj  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Options left out of the budget column (they are the same across a family's rows).
_HIDDEN_OPTIONS = ("contexts", "estimate_variance", "values", "learner_options")


class Candidate(NamedTuple):
    """One estimator configuration to compare (see the module docstring).

    The optional trailing fields serve the model-free (simulator) rows: `simulator=True` runs
    the candidate on `bj.sim.as_simulator(case.problem)` (the exact gradient is still the
    tabular problem's); `warm_steps > 0` first takes that many outer steps at the fixed `x`
    (distinct keys) and measures every seed from the resulting state, with the estimator built
    from `warm_options` (default: `options`; same state structure) for the warm-up only.
    """

    label: str
    method: str | bj.Estimator
    options: dict
    cost_label: str
    cost: float | Callable[[dict], float] | None = None
    simulator: bool = False
    warm_steps: int = 0
    warm_options: dict | None = None


class ProblemCase(NamedTuple):
    """A problem to benchmark on: `label`, the `BilevelProblem`, the point `x`, a `kind` tag."""

    label: str
    problem: bj.BilevelProblem
    x: Any
    kind: str = "custom"


# --------------------------------------------------------------------------------------------
# Problems


def random_problems(num_states=(10, 50, 200), dims=(8, 64), transition_dependent=(False, True),
                    *, num_actions=4, num_contexts=2, num_terminal=1, seed=0,
                    dtype=jnp.float64) -> list[ProblemCase]:
    """Random bilevel MDPs of SPEC 7.6 over the product of the given sizes."""
    from bilevel_jax.envs.random_mdp import random_bilevel_problem

    cases = []
    for i, (S, n, td) in enumerate((S, n, td) for S in num_states for n in dims
                                   for td in transition_dependent):
        problem, x = random_bilevel_problem(seed + i, S, num_actions, n,
                                            num_contexts=num_contexts,
                                            transition_dependent=td, num_terminal=num_terminal,
                                            dtype=dtype)
        label = f"random S={S} A={num_actions} n={n} " + ("P(x)" if td else "P fixed")
        cases.append(ProblemCase(label, problem, x, "random"))
    return cases


def four_rooms_problem(temperature: float = 0.005, beta: float = 1.0, *, seed: int = 0,
                       dtype=jnp.float64) -> ProblemCase:
    """Four-Rooms reward shaping (SPEC 7.1) from `bilevel_jax.envs.four_rooms`: `x in R^105`.

    `c = -0.2 softmax(x)[:104]` (`c = 0` at the goal), follower reward `1{s = goal} + c(s)`,
    leader reward `1{s = (8, 4)} - beta 1{s = goal} ||c||_1`, both discounts 0.99, contexts =
    the two goals with probability 1/2, `x ~ N(0, 0.01^2)` (key `seed`).
    """
    from bilevel_jax.envs.four_rooms import four_rooms_problem as build, initial_incentive_params

    problem, num_params = build(beta=beta, temperature=temperature, dtype=dtype)
    x = initial_incentive_params(jax.random.key(seed), num_params, dtype)
    return ProblemCase(f"four_rooms lam={temperature:g} beta={beta:g}", problem, x, "four_rooms")


# --------------------------------------------------------------------------------------------
# Candidates


def default_candidates(quick: bool = False, kind: str = "random") -> list[Candidate]:
    """The default comparison grid (per problem kind)."""
    hp = dict(contexts="all", estimate_variance=False)
    if quick:
        sweeps = (5, 20, 100)
        paper = ((4, 250), (16, 1000))
        unbiased = (1024,)
        directions = (1, 16)
    else:
        sweeps = (5, 20, 100)
        paper = ((4, 250), (16, 250), (16, 1000), (64, 1000))
        unbiased = (256, 1024)
        directions = (1, 16, 256)
    if kind == "four_rooms":
        sweeps = sweeps + (1000,)         # gamma = 0.99: 100 sweeps are far from converged
        directions = tuple(d for d in directions if d <= 64) + (() if quick else (64,))
    cands = [] if quick else [Candidate("exact", "exact", {}, "sweeps")]
    cands += [Candidate("amd", "amd", dict(num_sweeps=k), "sweeps") for k in sweeps]
    cands += [Candidate("unrolled", "unrolled", dict(num_sweeps=k), "sweeps") for k in sweeps]
    cands += [Candidate("hpgd", "hpgd", dict(num_envs=n, num_steps=t, **hp), "samples")
              for n, t in paper]
    # The critic form (default) at about the paper rows' transitions (its cost counts the
    # transitions it reads), and the plain branching form it replaced, for reference.
    cands += [Candidate("hpgd-unbiased", "hpgd",
                        dict(num_envs=n, unbiased=True, samples_per_trajectory=1, **hp), "samples")
              for n in unbiased]
    cands.append(Candidate("hpgd-unbiased-plain", "hpgd",
                           dict(num_envs=16, unbiased=True, unbiased_form="plain", **hp),
                           "samples"))
    if not quick:
        cands.append(Candidate("hpgd-warm20", "hpgd",
                               dict(num_envs=16, num_steps=1000, oracle="warm", oracle_sweeps=20,
                                    **hp), "samples"))
    cands += [Candidate("zero_order", "zero_order", dict(num_directions=d, values="model"),
                        "evaluations", d + 1) for d in directions]
    return cands


def simulator_candidates(quick: bool = False, case: ProblemCase | None = None) -> list[Candidate]:
    """Model-free rows, run on `bj.sim.as_simulator` of a tabular problem (so `exact` is known).

    * `hpgd_sim_branching`: `unbiased=True, unbiased_form="plain"` (independent branches)
      with the exact soft-optimal follower (`soft_vi_tabular`), cold start (it has no critic);
    * `hpgd_sim_branching_critic`: `unbiased=True, unbiased_form="critic"` (leave-one-out
      per-(s, a) critics, the default on discrete observations), exact-policy learner, cold;
      its cost (`samples`) is the transitions it reads, the row's `simulated` the transitions
      its fixed-length rollouts simulate (`num_envs x horizon` and the branches');
    * `hpgd_sim_single_batch`: the default `unbiased=False`, exact-policy learner, its critics
      warm-started by `warm_steps` outer steps at the fixed `x`; the budget is chosen so its
      transitions per call match the branching row's (~16k per context);
    * `hpgd_sim_soft_q`: the default form with a learning follower (`soft_q_tabular`),
      follower and critics warm-started (long fits), then measured with short warm fits; its
      cost adds the learner's own transitions per call;
    * `zero_order_sim`: forward differences of rollout returns, exact-policy learner.
    """
    contexts = case.problem.num_contexts if case is not None else 1
    hp = dict(contexts="all", estimate_variance=False)
    exact_follower = dict(learner="soft_vi_tabular")
    critics = dict(critic_hidden=(32,), critic_steps=10)
    soft_q = dict(num_envs=16, step_exponent=0.6)
    soft_q_updates = 10
    warm = 40 if quick else 100
    learner_samples = contexts * soft_q["num_envs"] * soft_q_updates
    cands = [
        Candidate("hpgd_sim_branching", "hpgd",
                  dict(unbiased=True, unbiased_form="plain", num_envs=16,
                       samples_per_trajectory=4, horizon=60, **exact_follower, **hp),
                  "samples", simulator=True),
        # The critic form (the default on discrete observations) at about the single-batch
        # row's transitions read (~256 x 60 per context; it simulates twice that, the
        # branches included).
        Candidate("hpgd_sim_branching_critic", "hpgd",
                  dict(unbiased=True, unbiased_form="critic", num_envs=256,
                       samples_per_trajectory=1, horizon=60, **exact_follower, **hp),
                  "samples", simulator=True),
        Candidate("hpgd_sim_single_batch", "hpgd",
                  dict(num_envs=64, num_steps=256, **critics, **exact_follower, **hp),
                  "samples", simulator=True, warm_steps=warm),
        Candidate("hpgd_sim_soft_q", "hpgd",
                  dict(num_envs=16, num_steps=64, critic_hidden=(32,), critic_steps=5,
                       learner="soft_q_tabular",
                       learner_options=dict(soft_q, num_updates=soft_q_updates), **hp),
                  "samples", lambda info: info["samples"] + learner_samples, simulator=True,
                  warm_steps=10 if quick else 20,
                  warm_options=dict(num_envs=16, num_steps=64, critic_hidden=(32,),
                                    critic_steps=50, learner="soft_q_tabular",
                                    learner_options=dict(soft_q, num_updates=300), **hp)),
        Candidate("zero_order_sim", "zero_order",
                  dict(num_directions=16, num_envs=32, num_steps=64, **exact_follower),
                  "samples", simulator=True),
    ]
    if not quick:
        cands.insert(1, Candidate("hpgd_sim_branching", "hpgd",
                                  dict(unbiased=True, unbiased_form="plain", num_envs=64,
                                       samples_per_trajectory=4, horizon=60, **exact_follower,
                                       **hp),
                                  "samples", simulator=True))
        cands.insert(4, Candidate("hpgd_sim_single_batch", "hpgd",
                                  dict(num_envs=256, num_steps=256, **critics, **exact_follower,
                                       **hp), "samples", simulator=True, warm_steps=warm))
    return cands


def _simulator_case(case: ProblemCase) -> bool:
    """Simulator rows run on the random problems (Four-Rooms' S=104 sim rows are left out)."""
    return case.kind == "random"


def load_extra(spec: str, quick: bool = False) -> list[Candidate]:
    """Candidates from `MODULE:FUNCTION` (a module name or a path to a `.py` file)."""
    if ":" not in spec:
        raise SystemExit(f"--extra: expected MODULE:FUNCTION, got {spec!r}")
    module_name, func_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        mod_spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(module_name))[0], module_name)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    fn = getattr(module, func_name)
    params = inspect.signature(fn).parameters
    out = fn(quick=quick) if "quick" in params else fn()
    return [as_candidate(c) for c in out]


def as_candidate(c) -> Candidate:
    if isinstance(c, Candidate):
        return c
    return Candidate(*c)


# --------------------------------------------------------------------------------------------
# Measurement


def _budget(c: Candidate) -> str:
    if not isinstance(c.method, str):
        return "custom"
    parts = [f"{k}={v}" for k, v in c.options.items() if k not in _HIDDEN_OPTIONS]
    if len(c) > 6 and c.warm_steps:
        parts.append(f"warm={c.warm_steps}")
    return " ".join(parts) if parts else "-"


def variance_ratios(rows: list[dict], branching: str, single: str) -> dict:
    """Per problem: the branching rows' per-coordinate variance over the single-batch rows', at
    equal transitions (each variance times its transitions per call, i.e. the variance
    rescaled to one common budget, since variance ~ 1/transitions); the best (lowest-cost
    product) row of each family where a family has several budgets."""
    out = {}
    for problem in dict.fromkeys(r["problem"] for r in rows):
        def best(label):
            cands = [r for r in rows if r["problem"] == problem and r["method"] == label
                     and not r.get("error") and r.get("cost") and r.get("rel_variance")
                     and math.isfinite(r["rel_variance"])]
            return min(cands, key=lambda r: r["rel_variance"] * r["cost"], default=None)
        b, s = best(branching), best(single)
        if b is None or s is None:
            continue
        def simulated(r):
            """Transitions simulated: the estimator's own `info["simulated"]`, else its cost
            (an estimator that does not report it reads all it simulates)."""
            return r.get("simulated") or r["cost"]
        ratio_sim = (b["rel_variance"] * simulated(b)) / (s["rel_variance"] * simulated(s))
        out[problem] = {
            # `ratio`: at equal transitions *read* (the rows' cost); `ratio_simulated`: at
            # equal transitions simulated (the same where a row reads all it simulates).
            "ratio": b["rel_variance"] * b["cost"] / (s["rel_variance"] * s["cost"]),
            "ratio_on": "transitions read",
            "ratio_simulated": ratio_sim,
            "raw_ratio": b["rel_variance"] / s["rel_variance"],
            "branching": {"budget": b["budget"], "transitions": b["cost"],
                          "transitions_simulated": simulated(b),
                          "rel_variance": b["rel_variance"]},
            "single": {"budget": s["budget"], "transitions": s["cost"],
                       "transitions_simulated": simulated(s),
                       "rel_variance": s["rel_variance"]},
            "within_10x": b["rel_variance"] * b["cost"] <= 10 * s["rel_variance"] * s["cost"],
            "within_10x_simulated": ratio_sim <= 10,
        }
    return out


def _scalar_info(info: dict) -> dict:
    """Means over seeds of the scalar entries of `info` dicts."""
    out = {}
    for key in info[0]:
        values = [np.asarray(i[key]) for i in info]
        if values[0].shape == ():
            out[key] = float(np.mean(values))
    return out


def _finite_or_none(value):
    """Strict JSON: NaN / inf become null (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _jsonable(options: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
            for k, v in options.items()}


def _measure(case: ProblemCase, cand: Candidate, g_ref: np.ndarray, seeds: int,
             base_key: jax.Array, timing_calls: int, time_budget: float | None,
             min_seeds: int) -> dict:
    est = bj.make_estimator(cand.method, **cand.options)
    problem = bj.sim.as_simulator(case.problem) if cand.simulator else case.problem
    state = est.init(problem, case.x)
    if cand.simulator:
        # Rollout programs compile about 3x faster with rbg keys (tests/test_sample_hpgd.py).
        base_key = jax.random.key(int(jax.random.randint(base_key, (), 0, 2**31 - 1)),
                                  impl="unsafe_rbg")

    def call(x, state, key):
        grad, _, info = est.update(problem, x, state, key)
        info = dict(info)
        variance = info.pop("variance", None)
        scalars = {k: v for k, v in info.items() if jnp.ndim(v) == 0}
        if variance is not None:
            scalars["variance_estimate"] = jnp.mean(ravel_pytree(variance)[0])
        return ravel_pytree(grad)[0], scalars

    warm_s = 0.0
    if cand.warm_steps:
        # Warm start (learner and critics) by outer steps at the fixed x, then every seed is
        # measured from the same warmed state.
        warm_est = (bj.make_estimator(cand.method, **cand.warm_options)
                    if cand.warm_options is not None else est)
        warm_step = jax.jit(lambda x, state, key: warm_est.update(problem, x, state, key)[1])
        warm_key = jax.random.fold_in(base_key, 10**6)
        start = time.perf_counter()
        for i in range(cand.warm_steps):
            state = warm_step(case.x, state, jax.random.fold_in(warm_key, i))
        jax.block_until_ready(state)
        warm_s = time.perf_counter() - start

    update = jax.jit(call)
    keys = [jax.random.fold_in(base_key, i) for i in range(seeds)]
    start = time.perf_counter()
    jax.block_until_ready(update(case.x, state, keys[0]))
    compile_s = time.perf_counter() - start

    grads, infos, times = [], [], []
    deterministic = False
    for i, key in enumerate(keys):
        start = time.perf_counter()
        grad, info = jax.block_until_ready(update(case.x, state, key))
        times.append(time.perf_counter() - start)
        grads.append(np.asarray(grad, np.float64))
        infos.append(jax.device_get(info))
        # Same output for two keys (up to the reduction-order noise of multithreaded CPU
        # kernels): the estimator ignores its key.
        if i == 1 and np.linalg.norm(grads[0] - grads[1]) <= 1e-10 * max(
                np.linalg.norm(grads[0]), 1e-300):
            deterministic = True
            break
        if (time_budget is not None and i + 1 >= min_seeds
                and sum(times) > time_budget and i + 1 < seeds):
            break                  # expensive estimator: fewer seeds (recorded in the row)
    # Best of at least `timing_calls` calls, more for cheap calls (the machine is shared).
    while len(times) < timing_calls or (sum(times) < 0.25 and len(times) < 25):
        start = time.perf_counter()
        jax.block_until_ready(update(case.x, state, keys[0]))
        times.append(time.perf_counter() - start)
    if deterministic:
        grads = [grads[0]] * seeds
    used = len(grads)

    G = np.stack(grads)
    norm = np.linalg.norm(g_ref)
    errors = np.linalg.norm(G - g_ref, axis=1) / norm
    g_norms = np.linalg.norm(G, axis=1)
    cosines = np.where(g_norms > 0, G @ g_ref / np.where(g_norms > 0, g_norms, 1.0) / norm,
                       np.nan)
    mean_g = G.mean(0)
    var = G.var(0, ddof=1) if used > 1 else np.full_like(mean_g, np.nan)
    if deterministic:
        var = np.zeros_like(mean_g)
    info = _scalar_info(infos)
    if cand.cost is None:
        cost = info.get(cand.cost_label, math.nan)
    elif callable(cand.cost):
        cost = float(cand.cost(info))
    else:
        cost = float(cand.cost)
    var_est = info.get("variance_estimate", math.nan)
    return {
        "problem": case.label, "method": cand.label, "budget": _budget(cand),
        "options": _jsonable(cand.options) if isinstance(cand.method, str) else {},
        "estimator": cand.method if isinstance(cand.method, str) else "custom",
        "cost": cost, "cost_label": cand.cost_label,
        "samples": info.get("samples"), "sweeps": info.get("sweeps"),
        "simulated": info.get("simulated"),
        "seeds": used, "deterministic": deterministic,
        "rel_error_mean": float(errors.mean()), "rel_error_std": float(errors.std()),
        "rel_error_median": float(np.median(errors)),
        "bias": float(np.linalg.norm(mean_g - g_ref) / norm),
        "bias_noise_floor": float(np.sqrt(np.sum(var) / used) / norm),
        "cosine_mean": float(np.nanmean(cosines)) if np.isfinite(cosines).any() else math.nan,
        "cosine_std": float(np.nanstd(cosines)) if np.isfinite(cosines).any() else math.nan,
        "rel_variance": float(np.mean(var) / norm**2),
        "rel_total_variance": float(np.sum(var) / norm**2),
        # The estimator's own per-coordinate variance estimate against the empirical one.
        "variance_self_ratio": float(var_est / np.mean(var)) if np.mean(var) > 0 else math.nan,
        "ms_per_call": 1e3 * min(times), "compile_s": compile_s,
        "follower_residual": info.get("follower_residual"),
        "simulator": bool(cand.simulator), "warm_steps": int(cand.warm_steps),
        "warm_s": warm_s,
        "error": None,
    }


def run_benchmark(problems: Sequence, candidates, seeds: int = 16, *, key_seed: int = 0,
                  timing_calls: int = 5, time_budget: float | None = None, min_seeds: int = 4,
                  verbose: bool = True,
                  on_problem_done: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Measures every candidate on every problem against the exact hypergradient.

    Args:
      problems: `ProblemCase`s or `(label, problem, x)` tuples.
      candidates: a list of `Candidate`s (or tuples), or a function `ProblemCase -> list`.
      seeds: independent keys per candidate (deterministic estimators are called fewer times).
      timing_calls: at least this many timed calls (more, up to 25, while they total under
        0.25 s); the reported time is the best one.
      time_budget: seconds of calls per row after which no more seeds are drawn (at least
        `min_seeds`); None: always `seeds`. The row's `seeds` says how many were used.
      on_problem_done: called with all rows so far after each problem (e.g. to save them).

    Returns:
      One dict per (problem, candidate), plus one `method="reference"` row per problem with the
      exact gradient's norm and time. A candidate that raises gets a row with `error` set.
    """
    rows = []
    base_key = jax.random.key(key_seed)
    for case in problems:
        case = case if isinstance(case, ProblemCase) else ProblemCase(*case)
        reference = jax.jit(lambda x, p=case.problem: ravel_pytree(
            jax.grad(lambda y: bj.leader_objective(p, y))(x))[0])
        start = time.perf_counter()
        g_ref = np.asarray(jax.block_until_ready(reference(case.x)), np.float64)
        ref_compile = time.perf_counter() - start
        ref_time = common.best_time(reference, case.x, repeats=timing_calls)
        norm = float(np.linalg.norm(g_ref))
        rows.append({"problem": case.label, "method": "reference", "budget": "jax.grad(F)",
                     "grad_norm": norm, "dim_x": int(g_ref.size),
                     "objective": float(bj.leader_objective(case.problem, case.x)),
                     "ms_per_call": 1e3 * ref_time, "compile_s": ref_compile, "error": None})
        if verbose:
            print(f"\n# {case.label}: ||grad F|| = {norm:.4g}, dim x = {g_ref.size}, "
                  f"exact grad {1e3 * ref_time:.2f} ms", flush=True)
        cands = candidates(case) if callable(candidates) else candidates
        for cand in map(as_candidate, cands):
            try:
                row = _measure(case, cand, g_ref, seeds, base_key, timing_calls, time_budget,
                               min_seeds)
            except Exception as err:  # noqa: BLE001 - one failing candidate must not stop the run
                row = {"problem": case.label, "method": cand.label, "budget": _budget(cand),
                       "cost_label": cand.cost_label, "error": f"{type(err).__name__}: {err}"}
            rows.append(row)
            if verbose:
                print(_progress_line(row), flush=True)
        if on_problem_done is not None:
            on_problem_done(rows)
    return rows


# --------------------------------------------------------------------------------------------
# Output


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def _cost_str(row) -> str:
    cost = row.get("cost")
    if cost is None or (isinstance(cost, float) and math.isnan(cost)):
        return "-"
    unit = {"samples": "smp", "sweeps": "swp", "evaluations": "evals"}.get(
        row["cost_label"], row["cost_label"])
    return f"{cost:.4g} {unit}"


def _progress_line(row) -> str:
    if row.get("error"):
        return f"  {row['method']:<14} {row['budget']:<34} ERROR {row['error']}"
    return (f"  {row['method']:<14} {row['budget']:<34} cost {_cost_str(row):<14} "
            f"err {_fmt(row['rel_error_mean'])} ± {_fmt(row['rel_error_std'])}  "
            f"bias {_fmt(row['bias'])}  {row['ms_per_call']:.2f} ms  "
            f"(compile {row['compile_s']:.1f} s)")


HEADER = ("problem", "method", "budget", "cost/call", "rel. error (mean ± std)",
          "bias (noise floor)", "cosine", "variance", "ms/call")


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    seeds = max((r.get("seeds", 0) for r in rows), default=0)
    out = []
    for row in rows:
        if row["method"] == "reference":
            out.append((row["problem"], "**exact grad F**", "jax.grad",
                        f"‖∇F‖ = {_fmt(row['grad_norm'])}", "-", "-", "-", "-",
                        f"{row['ms_per_call']:.3g}"))
        elif row.get("error"):
            out.append((row["problem"], row["method"], row["budget"], "-",
                        f"error: {row['error'][:60]}", "-", "-", "-", "-"))
        else:
            few = f" [{row['seeds']} seeds]" if row["seeds"] < seeds else ""
            out.append((row["problem"], row["method"], row["budget"], _cost_str(row),
                        f"{_fmt(row['rel_error_mean'])} ± {_fmt(row['rel_error_std'])}{few}",
                        f"{_fmt(row['bias'])} ({_fmt(row['bias_noise_floor'])})",
                        _fmt(row["cosine_mean"]), _fmt(row["rel_variance"]),
                        f"{row['ms_per_call']:.3g}"))
    return out


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    previous = None
    for cells in table_rows(rows):
        shown = ("" if cells[0] == previous else cells[0],) + cells[1:]
        previous = cells[0]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in shown) + " |")
    return "\n".join(lines)


def markdown_report(rows, meta) -> str:
    env = meta["environment"]
    return "\n".join([
        "# Hypergradient estimators against `exact`",
        "",
        f"Generated by `python benchmarks/estimators.py"
        f"{''.join(' ' + a for a in meta.get('argv', ['--quick'] if meta['quick'] else []))}` "
        f"on {env['backend']} ({env['device']}, {env['cpu_count']} cores), jax {env['jax']}, "
        f"float64, {meta['seeds']} seeds per row (fewer, marked, where the calls of a row exceeded "
        f"{meta['time_budget_s']:g} s), total runtime {meta['runtime_s']:.0f} s, "
        f"OPENBLAS_NUM_THREADS={meta.get('openblas_num_threads')}.",
        "",
        "Every call starts from the estimator's `init` state (no warm start). `rel. error` is "
        "`‖g − ∇F‖/‖∇F‖` over seeds; `bias` is `‖mean g − ∇F‖/‖∇F‖` with, in brackets, its "
        "noise floor `sqrt(tr Cov/seeds)/‖∇F‖` (bias well above the floor is systematic); "
        "`variance` is the per-coordinate variance across seeds, averaged over coordinates, "
        "over `‖∇F‖²`; cost per call is in transitions (`smp`), Bellman sweeps summed over "
        "contexts (`swp`) or evaluations of `F` (`evals`); `ms/call` is the best wall time of one "
        "jitted call, compilation excluded. HPGD rows use `contexts=\"all\"` (both contexts per "
        "call, sample cost counts both) and `estimate_variance=False`.",
        "",
        "Rows `*_sim*` are the model-free estimators on `bj.sim.as_simulator` of the same "
        "problem (same exact gradient), cost in transitions per call: `hpgd_sim_branching` "
        "(`unbiased=True, unbiased_form=\"plain\"`, exact soft-optimal follower "
        "`soft_vi_tabular`, cold), `hpgd_sim_branching_critic` (`unbiased_form=\"critic\"`, "
        "the default on discrete observations; its cost is the transitions it *reads*, the "
        "first episodes and the branch steps it needs; its fixed-length rollouts simulate "
        "`num_envs x horizon` plus `2 x num_envs x horizon / 2` branch steps per context, "
        "the JSON rows' `simulated`), "
        "`hpgd_sim_single_batch` (default `unbiased=False`, exact-policy learner, critics "
        "warm-started by `warm=` outer steps at the fixed x; every seed starts from that state), "
        "`hpgd_sim_soft_q` (default form, learning follower `soft_q_tabular` warm-started, cost "
        "includes its own transitions) and `zero_order_sim` (rollout returns, exact-policy "
        "learner; it estimates the smoothed gradient).",
        "",
        markdown_table(rows),
        "",
        _ratio_lines(meta),
    ])


def _ratio_lines(meta) -> str:
    lines = []
    names = {"sim": "sim, critic form `hpgd_sim_branching_critic`",
             "branching_plain_over_single_sim": "sim, plain form `hpgd_sim_branching`",
             "tabular": "tabular, `hpgd-unbiased`"}
    for kind in ("sim", "branching_plain_over_single_sim", "tabular"):
        key = (f"variance_ratio_{kind}" if kind.startswith("branching_")
               else f"variance_ratio_branching_over_single_{kind}")
        ratios = meta.get(key)
        if not ratios:
            continue
        lines.append(f"Variance ratio branching / single-batch at equal transitions read "
                     f"({names[kind]}; target <= 10): " + "; ".join(
                         f"{p}: {_fmt(r['ratio'])} (on transitions simulated: "
                         f"{_fmt(r['ratio_simulated'])})" for p, r in ratios.items()) + ".")
    return "\n\n".join(lines) + ("\n" if lines else "")


FAMILY_COLORS = {"amd": "tab:blue", "unrolled": "tab:orange", "hpgd": "tab:green",
                 "hpgd-unbiased": "tab:red", "hpgd-unbiased-plain": "salmon",
                 "hpgd-warm20": "tab:olive",
                 "zero_order": "tab:purple", "hpgd_sim_branching": "tab:pink",
                 "hpgd_sim_single_batch": "tab:cyan", "hpgd_sim_branching_critic": "darkmagenta",
                 "hpgd_sim_soft_q": "tab:brown",
                 "zero_order_sim": "tab:gray"}
COST_MARKERS = {"samples": "o", "sweeps": "s", "evaluations": "^"}


def plot(rows: list[dict], path: str) -> None:
    """Log-log relative error against cost per call, one panel per problem."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows if r["method"] not in ("reference", "exact") and not r.get("error")
            and r.get("cost") and r["cost"] > 0 and r["rel_error_mean"] > 0]
    problems = list(dict.fromkeys(r["problem"] for r in rows if r["method"] == "reference"))
    families = list(dict.fromkeys(r["method"] for r in data))
    palette = iter(["black", "gold", "navy", "lime", "maroon"] * 4)
    colors = {f: FAMILY_COLORS.get(f) or next(palette) for f in families}
    ncols = 2 if len(problems) <= 4 else 4
    ncols = min(ncols, len(problems))
    nrows = math.ceil(len(problems) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.5 * nrows + 1.0),
                             squeeze=False)
    for ax, problem in zip(axes.flat, problems):
        for family in families:
            pts = sorted((r for r in data if r["problem"] == problem and r["method"] == family),
                         key=lambda r: r["cost"])
            if not pts:
                continue
            units = {r["cost_label"] for r in pts}
            marker = COST_MARKERS.get(next(iter(units)), "D") if len(units) == 1 else "D"
            cost = np.array([r["cost"] for r in pts])
            err = np.array([r["rel_error_mean"] for r in pts])
            std = np.array([r["rel_error_std"] for r in pts])
            ax.plot(cost, err, marker=marker, color=colors[family], label=family, lw=1.5, ms=5)
            ax.fill_between(cost, np.maximum(err - std, err * 0.05), err + std,
                            color=colors[family], alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        ax.set_title(problem, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes.flat[len(problems):]:
        ax.set_visible(False)
    for ax in axes.flat:
        ax.set_xlabel("cost per call", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("rel. error ‖g − ∇F‖ / ‖∇F‖", fontsize=8)
    handles = [plt.Line2D([], [], color=colors[f], lw=2, label=f) for f in families]
    handles += [plt.Line2D([], [], color="gray", marker=m, ls="", label=f"cost in {u}")
                for u, m in COST_MARKERS.items()]
    fig.suptitle("Hypergradient estimators: relative error vs cost per call "
                 "(mean over seeds, band ± 1 std; dotted: error = ‖∇F‖)", fontsize=10)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.9 / (3.5 * nrows + 1.0), 1, 1 - 0.35 / (3.5 * nrows + 1.0)))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: small grid, 8 seeds")
    parser.add_argument("--json", metavar="PATH",
                        help="JSON output (the .md and .png go next to it, same stem)")
    parser.add_argument("--seeds", type=int, help="keys per candidate (default 16, quick 8)")
    parser.add_argument("--extra", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="add the candidates returned by FUNCTION (repeatable)")
    parser.add_argument("--methods", metavar="REGEX", help="keep candidates whose label matches")
    parser.add_argument("--problems", metavar="REGEX", help="keep problems whose label matches")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="per row: stop drawing seeds (min 4) after this many seconds of "
                             "calls (default 30, quick 10)")
    parser.add_argument("--no-four-rooms", action="store_true", help="skip Four-Rooms")
    parser.add_argument("--resume", action="store_true",
                        help="keep the problems already in the JSON (e.g. of a killed run) and "
                             "run only the others")
    parser.add_argument("--no-simulator", action="store_true",
                        help="skip the model-free rows (*_sim*, on bj.sim.as_simulator problems)")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    started = time.perf_counter()
    seeds = args.seeds or (8 if args.quick else 16)
    env = common.environment()
    print(f"bilevel_jax estimator benchmark on {env['backend']} ({env['device']}), jax {env['jax']}"
          + (" [quick]" if args.quick else "") + f", {seeds} seeds")

    if args.quick:
        problems = random_problems((10, 50), (8,), (False, True))
    else:
        problems = random_problems((10, 50, 200), (8, 64), (False, True))
    if not args.no_four_rooms and not args.quick:
        problems.append(four_rooms_problem())
    order = {p.label: i for i, p in enumerate(problems)}
    if args.problems:
        problems = [p for p in problems if re.search(args.problems, p.label)]
    extra = [c for spec in args.extra for c in load_extra(spec, args.quick)]

    # Quick: the simulator rows on the S=10 problems only (their compiles dominate).
    sim_labels = {p.label for p in (problems[:2] if args.quick else problems)
                  if _simulator_case(p)}
    if args.no_simulator:
        sim_labels = set()

    def candidates(case: ProblemCase):
        cands = default_candidates(args.quick, case.kind)
        if case.label in sim_labels:
            cands += simulator_candidates(args.quick, case)
        cands += extra
        if args.methods:
            cands = [c for c in cands if re.search(args.methods, c.label)]
        return cands

    time_budget = args.time_budget or (10.0 if args.quick else 30.0)
    json_path = args.json or os.path.join(
        RESULTS_DIR, "estimators_quick.json" if args.quick else "estimators.json")
    stem = json_path[:-5] if json_path.endswith(".json") else json_path

    previous, previous_runtime = [], 0.0
    if args.resume and os.path.exists(json_path):
        with open(json_path) as handle:
            saved = json.load(handle)
        done = {r["problem"] for r in saved["rows"] if r["method"] == "reference"}
        previous = [r for r in saved["rows"] if r["problem"] in done]
        previous_runtime = saved.get("runtime_s", 0.0)
        problems = [p for p in problems if p.label not in done]
        print(f"resuming: {len(done)} problems kept from {json_path}, {len(problems)} to run")

    def meta(partial):
        return {"environment": env, "quick": args.quick, "seeds": seeds,
                "runtime_s": previous_runtime + time.perf_counter() - started,
                "time_budget_s": time_budget, "x64": True, "partial": partial, "argv": sys.argv[1:],
                "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save_partial(rows_so_far):          # a killed long run keeps its finished problems
        payload = {**meta(True), "rows": previous + rows_so_far}
        common.write_json(json_path, _finite_or_none(payload))

    rows = previous + run_benchmark(problems, candidates, seeds=seeds, time_budget=time_budget,
                                    on_problem_done=save_partial)
    rows.sort(key=lambda r: order.get(r["problem"], len(order)))     # grid order after --resume
    final = meta(False)
    final["variance_ratio_branching_over_single_sim"] = variance_ratios(
        rows, "hpgd_sim_branching_critic", "hpgd_sim_single_batch")
    final["variance_ratio_branching_plain_over_single_sim"] = variance_ratios(
        rows, "hpgd_sim_branching", "hpgd_sim_single_batch")
    final["variance_ratio_branching_over_single_tabular"] = variance_ratios(
        rows, "hpgd-unbiased", "hpgd")
    report = markdown_report(rows, final)
    print("\n" + markdown_table(rows))
    print("\n" + _ratio_lines(final))
    print(f"\nruntime {final['runtime_s']:.0f} s")
    common.write_json(json_path, _finite_or_none({**final, "rows": rows}))
    with open(stem + ".md", "w") as handle:
        handle.write(report)
    print(f"wrote {stem}.md")
    if not args.no_plot:
        plot(rows, stem + ".png")


if __name__ == "__main__":
    main()
