"""Command-line entry point: `bilevel-jax run CONFIG`.

Exit codes: 0 success, 2 bad command line or configuration (nothing is run or written).
"""

from __future__ import annotations

import argparse
import sys
import time

import yaml

from bilevel_jax.errors import BilevelJaxError

QUICKSTART_SCHEMA = {
    "env": (str, lambda v: v == "four_rooms", "'four_rooms'"),
    "temperature": (float, lambda v: v > 0, "a number > 0"),
    "slip_prob": (float, lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "discount": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "num_envs": (int, lambda v: v >= 1, "an int >= 1"),
    "num_steps": (int, lambda v: v >= 1, "an int >= 1"),
    "max_episode_steps": (int, lambda v: v >= 1, "an int >= 1"),
    "seed": (int, lambda v: True, "an int"),
}


class ConfigError(BilevelJaxError, ValueError):
    """A configuration file is malformed: the message names the key and what was expected."""


def load_config(path: str) -> dict:
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    for key in config:
        if key not in QUICKSTART_SCHEMA:
            raise ConfigError(f"{key}: unknown key; expected one of {sorted(QUICKSTART_SCHEMA)}")
    for key, (kind, ok, expected) in QUICKSTART_SCHEMA.items():
        if key not in config:
            raise ConfigError(f"{key}: missing; expected {expected}")
        value = config[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or not ok(value):
            raise ConfigError(f"{key}: expected {expected}, got {value!r}")
        config[key] = value
    return config


def run_quickstart(config: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bilevel_jax as bj
    from bilevel_jax.envs import GOALS, START, four_rooms_layout, four_rooms_mdp

    layout = four_rooms_layout()
    lam = config["temperature"]
    key = jax.random.key(config["seed"])
    print(f"Four-Rooms follower: {layout.num_states} states, temperature {lam}, "
          f"slip {config['slip_prob']}, discount {config['discount']}")
    for goal in GOALS:
        mdp = bj.validate_mdp(four_rooms_mdp(goal, slip_prob=config["slip_prob"],
                                             discount=config["discount"]))
        start = time.perf_counter()
        sol = jax.block_until_ready(bj.soft_value_iteration(mdp, lam))
        solve_s = time.perf_counter() - start
        exact = bj.visitation(mdp, sol.policy)

        def start_value(bonus):
            return bj.soft_value_iteration(mdp.replace(rewards=mdp.rewards + bonus[:, None]), lam).v[
                layout.state(START)]

        sensitivity = jax.grad(start_value)(jnp.zeros(layout.num_states, jnp.float32))
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        traj = jax.block_until_ready(bj.sample_trajectories(
            sub, mdp, sol.policy, num_envs=config["num_envs"], num_steps=config["num_steps"],
            max_episode_steps=config["max_episode_steps"]))
        roll_s = time.perf_counter() - start
        episodes = int(traj.dones.sum())
        finished = int(traj.terminated.sum())
        print(f"\ngoal {goal}: solved in {int(sol.num_iters)} sweeps ({solve_s:.2f} s incl. "
              f"compile), residual {float(sol.residual):.1e}")
        print(f"  soft value at start {float(sol.v[layout.state(START)]):.4f}; "
              f"discounted visits {float(exact.sum()):.1f} (expected discounted episode length)")
        print(f"  rollouts: {traj.states.size:,} transitions in {roll_s:.2f} s; "
              f"{episodes:,} episodes ended, {finished / max(episodes, 1):.1%} at the goal")
        top = np.argsort(-np.asarray(sensitivity))[:3]
        cells = ", ".join(f"{tuple(int(c) for c in layout.cells[i])}: {float(sensitivity[i]):.3f}" for i in top)
        print(f"  d V(start) / d bonus(cell), largest (implicit differentiation): {cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bilevel-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the experiment described by a YAML config")
    run.add_argument("config", help="path to a YAML config")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"bilevel-jax: config error: {err}", file=sys.stderr)
        return 2
    run_quickstart(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
