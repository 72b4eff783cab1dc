"""Benchmark of the tabular core: soft VI bandwidth, rollouts, implicit gradient cost, batching.

Every figure is a ratio against a baseline measured in the same process (copy bandwidth,
matrix-product FLOP/s, the forward solve), because the machines are shared and noisy.

    python benchmarks/core.py [--quick] [--json PATH]

Targets (issue 2): softvi_bandwidth_fraction >= 0.5, rollout_transitions_per_s >= 1e7 on the
2-core CPU machine, implicit_vjp_over_forward <= 3.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import bilevel_jax as bj  # noqa: E402
from bilevel_jax.envs import GridLayout, four_rooms_mdp, grid_transitions  # noqa: E402


def random_dense_mdp(key, num_states, num_actions, discount, batch_rewards=None):
    k_p, k_r = jax.random.split(key)
    transitions = jax.random.uniform(k_p, (num_states, num_actions, num_states), jnp.float32)
    transitions = transitions / transitions.sum(-1, keepdims=True)
    reward_shape = (num_states, num_actions) if batch_rewards is None else (
        batch_rewards, num_states, num_actions)
    rewards = jax.random.normal(k_r, reward_shape, jnp.float32)
    initial = jnp.full((num_states,), 1.0 / num_states, jnp.float32)
    return bj.TabularMDP(transitions=transitions, rewards=rewards, discount=discount,
                         initial=initial)


def bench_softvi_bandwidth(copy_bw, repeats, sweeps=20):
    mdp = random_dense_mdp(jax.random.key(0), 4000, 8, 0.9)
    run = jax.jit(lambda m: bj.soft_value_iteration(m, 0.1, num_sweeps=sweeps).q)
    sweep_time = common.best_time(run, mdp, repeats=repeats) / sweeps
    read_bw = mdp.transitions.nbytes / sweep_time
    return {"softvi_sweep_s": sweep_time, "softvi_read_bytes_per_s": read_bw,
            "softvi_bandwidth_fraction": read_bw / copy_bw}


def bench_rollout(repeats, num_steps):
    mdp = four_rooms_mdp(sparse=True)
    key = jax.random.key(0)
    policy = jax.nn.softmax(jax.random.normal(key, (mdp.num_states, 4)), -1)
    num_envs = 1000
    run = jax.jit(lambda k: bj.sample_trajectories(
        k, mdp, policy, num_envs=num_envs, num_steps=num_steps, max_episode_steps=200).states)
    seconds = common.best_time(run, key, repeats=repeats)
    dense = four_rooms_mdp(sparse=False)
    run_dense = jax.jit(lambda k: bj.sample_trajectories(
        k, dense, policy, num_envs=num_envs, num_steps=num_steps, max_episode_steps=200).states)
    seconds_dense = common.best_time(run_dense, key, repeats=repeats)
    return {"rollout_transitions_per_s": num_envs * num_steps / seconds,
            "rollout_dense_transitions_per_s": num_envs * num_steps / seconds_dense}


def bench_implicit(repeats, discount):
    num_states, num_actions = 500, 8
    mdp = random_dense_mdp(jax.random.key(1), num_states, num_actions, discount)

    def objective(rewards):
        sol = bj.soft_value_iteration(mdp.replace(rewards=rewards), 0.1)
        return jnp.dot(mdp.initial, sol.v)

    forward = jax.jit(objective)
    forward_time = common.best_time(forward, mdp.rewards, repeats=repeats)
    _, vjp_fn = jax.jit(lambda r: jax.vjp(objective, r))(mdp.rewards)
    backward = jax.jit(lambda fn, ct: fn(ct))
    backward_time = common.best_time(backward, vjp_fn, jnp.ones((), jnp.float32), repeats=repeats)
    sweeps = int(bj.soft_value_iteration(mdp, 0.1).num_iters)
    return {"forward_s": forward_time, "vjp_s": backward_time, "forward_sweeps": sweeps,
            "ratio": backward_time / forward_time}


def bench_batched(repeats, flops_baseline, sweeps=20, batch=64, num_states=1000, num_actions=8):
    mdp = random_dense_mdp(jax.random.key(2), num_states, num_actions, 0.9, batch_rewards=batch)
    axes = bj.TabularMDP(transitions=None, rewards=0, discount=None, initial=None)
    batched = jax.jit(jax.vmap(lambda m: bj.soft_value_iteration(m, 0.1, num_sweeps=sweeps).q,
                               in_axes=(axes,)))
    batched_time = common.best_time(batched, mdp, repeats=repeats) / sweeps
    single_mdp = mdp.replace(rewards=mdp.rewards[0])
    single = jax.jit(lambda m: bj.soft_value_iteration(m, 0.1, num_sweeps=sweeps).q)
    single_time = common.best_time(single, single_mdp, repeats=repeats) / sweeps
    flops = 2 * batch * num_states * num_actions * num_states / batched_time
    return {"batched_mdp_sweeps_per_s": batch / batched_time,
            "single_mdp_sweeps_per_s": 1 / single_time,
            "batched_speedup_over_loop": single_time * batch / batched_time,
            "batched_flops_fraction": flops / flops_baseline}


def bench_sparse_grid(repeats, copy_bw, side=316, sweeps=20):
    layout = GridLayout.open(side, side)
    transitions = grid_transitions(layout, 0.44, sparse=True)
    num_states = layout.num_states
    rewards = jax.random.normal(jax.random.key(3), (num_states, 4), jnp.float32)
    mdp = bj.TabularMDP(transitions=transitions, rewards=rewards, discount=0.99,
                        initial=jnp.full((num_states,), 1.0 / num_states, jnp.float32))
    run = jax.jit(lambda m: bj.soft_value_iteration(m, 0.1, num_sweeps=sweeps).q)
    sweep_time = common.best_time(run, mdp, repeats=repeats) / sweeps
    # Must move: indices + probs once, rewards once, q written once (gathers of V hit cache).
    bytes_moved = (transitions.indices.nbytes + transitions.probs.nbytes
                   + 2 * rewards.nbytes)
    return {"sparse_grid_states": num_states, "sparse_grid_sweep_s": sweep_time,
            "sparse_grid_bandwidth_fraction": bytes_moved / sweep_time / copy_bw}


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    repeats = 3 if args.quick else 10
    env = common.environment()
    print(f"bilevel_jax core benchmark on {env['backend']} ({env['device']}), jax {env['jax']}"
          + (" [quick]" if args.quick else ""))
    copy_bw = common.copy_bandwidth(repeats=repeats)
    flops = common.matmul_flops(repeats=repeats)
    results = {"environment": env, "quick": args.quick, "copy_bytes_per_s": copy_bw,
               "matmul_flops_per_s": flops}
    results.update(bench_softvi_bandwidth(copy_bw, repeats))
    results.update(bench_rollout(repeats, num_steps=500 if args.quick else 2000))
    implicit = bench_implicit(repeats, 0.9)
    implicit_99 = bench_implicit(repeats, 0.99)
    results["implicit_vjp_over_forward"] = implicit["ratio"]
    results["implicit"] = {"gamma_0.9": implicit, "gamma_0.99": implicit_99}
    results.update(bench_batched(repeats, flops))
    results.update(bench_sparse_grid(repeats, copy_bw))

    rows = [
        ("copy bandwidth (baseline)", f"{copy_bw / 1e9:.1f} GB/s", "in-place scale, read+write"),
        ("matmul (baseline)", f"{flops / 1e9:.0f} GFLOP/s", "float32 2048^3"),
        ("softvi_bandwidth_fraction", f"{results['softvi_bandwidth_fraction']:.2f}",
         f"S=4000 A=8 dense f32, {results['softvi_sweep_s'] * 1e3:.1f} ms/sweep; target >= 0.5"),
        ("rollout_transitions_per_s", f"{results['rollout_transitions_per_s']:.3g}",
         "Four-Rooms sparse, 1000 envs; target >= 1e7"),
        ("  dense kernel", f"{results['rollout_dense_transitions_per_s']:.3g}",
         "same, dense [S, A, S] (binary search)"),
        ("implicit_vjp_over_forward", f"{implicit['ratio']:.2f}",
         f"S=500 A=8 gamma 0.9 ({implicit['forward_sweeps']} sweeps); target <= 3"),
        ("  at gamma 0.99", f"{implicit_99['ratio']:.2f}",
         f"{implicit_99['forward_sweeps']} sweeps"),
        ("batched_speedup_over_loop", f"{results['batched_speedup_over_loop']:.1f}x",
         f"64 MDPs sharing P (S=1000 A=8): {results['batched_mdp_sweeps_per_s']:.0f} MDP-sweeps/s"),
        ("batched_flops_fraction", f"{results['batched_flops_fraction']:.2f}", "of matmul FLOP/s"),
        ("sparse_grid_sweep_s", f"{results['sparse_grid_sweep_s'] * 1e3:.2f} ms",
         f"{results['sparse_grid_states']} states, branching 4"),
        ("sparse_grid_bandwidth_fraction", f"{results['sparse_grid_bandwidth_fraction']:.2f}",
         "of copy bandwidth"),
    ]
    common.print_table("results", rows)
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
