"""Command line of bilevel_jax: run experiments from YAML configs, list what is available, report.

    bilevel-jax run CONFIG [--set key.path=value ...] [--out DIR] [--resume] [--distributed ...]
    bilevel-jax list
    bilevel-jax report RUN_DIR [RUN_DIR ...] [--out DIR]

Exit codes: 0 success; 1 the run stopped (NaN or inf, or another error while running);
2 bad command line or configuration (refused before anything is run or written), a run directory
locked by another run, or a checkpoint refused by --resume; 130 interrupted (SIGINT or SIGTERM:
the last checkpoint is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import signal
import sys
import threading

ALGORITHM_DOCS = {
    "ascent": "hypergradient ascent: the estimator's grad F(x) fed to the optax optimizer",
    "pbrl": "penalty method: joint descent on (x, follower logits y) of -f + rho * penalty "
            "(on a simulator problem: policy networks y, a best-response learner, sampled "
            "gradients; value penalty)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilevel-jax", description="Bilevel reinforcement learning in JAX: experiments.",
        epilog="Exit codes: 0 ok, 1 run stopped, 2 bad command line or config, 130 interrupted.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,list,report}")
    run = sub.add_parser("run", help="run the experiment described by a YAML config",
                         description="Runs every grid point x seed of CONFIG and writes the run "
                                     "directory (config.yaml, metrics.csv, summary.json, plots/, "
                                     "checkpoint.msgpack), locked against other runs "
                                     "while it runs.")
    run.add_argument("config", help="path to a YAML config (e.g. configs/quickstart.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY.PATH=VALUE",
                     help="override a config value (YAML syntax; repeatable), e.g. "
                          "--set optimizer.learning_rate=0.3 --set 'sweep.problem.temperature=[0.05, 0.1]'")
    run.add_argument("--out", metavar="DIR", help="run directory (default: output.dir, runs/<name>)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the run directory's checkpoint (same config, same "
                          "device count); without one, start from iteration 0")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist = run.add_argument_group(
        "multi-process runs", "--distributed joins a jax.distributed run (one command per "
        "process, same config): the runs split over every process's devices and process 0 "
        "writes the run directory. Unset values come from the environment variables named, else "
        "from jax's cluster detection (SLURM, Open MPI, ...).")
    dist.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize before running")
    dist.add_argument("--coordinator", metavar="HOST:PORT",
                      help="process 0's address (default $JAX_COORDINATOR_ADDRESS)")
    dist.add_argument("--num-processes", type=int, metavar="N",
                      help="number of processes (default $JAX_NUM_PROCESSES)")
    dist.add_argument("--process-id", type=int, metavar="I",
                      help="this process's index, 0 to N-1 (default $JAX_PROCESS_ID)")
    sub.add_parser("list", help="list problems, estimators, algorithms and shipped configs")
    report = sub.add_parser("report", help="table and comparison plots across run directories")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    report.add_argument("--out", metavar="DIR",
                        help="where to write the plots (default: RUN_DIR/report of the first run)")
    report.add_argument("--metric", dest="metrics", action="append", metavar="NAME",
                        help="plot only these metrics (repeatable)")
    return parser


def _error(message: str) -> int:
    print(f"bilevel-jax: error: {message}", file=sys.stderr)
    return 2


def start_distributed(args) -> int:
    """`jax.distributed.initialize` for `run --distributed` (before any jax computation); 0 or 2."""
    given = [flag for flag, value in (("--coordinator", args.coordinator),
                                      ("--num-processes", args.num_processes),
                                      ("--process-id", args.process_id)) if value is not None]
    if not args.distributed:
        return _error(f"{given[0]}: only with --distributed") if given else 0

    def from_env(value, name):
        if value is not None or name not in os.environ:
            return value
        try:
            return int(os.environ[name])
        except ValueError:
            raise ValueError(f"${name}: expected an integer, got {os.environ[name]!r}") from None

    from bilevel_jax.algorithms import initialize_distributed
    try:
        initialize_distributed(args.coordinator, from_env(args.num_processes, "JAX_NUM_PROCESSES"),
                               from_env(args.process_id, "JAX_PROCESS_ID"))
    except (ValueError, TypeError, RuntimeError) as err:
        return _error(f"--distributed: {err}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C (exit 130)."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises `Terminated` (a KeyboardInterrupt) like SIGINT does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _refusal(err) -> int:
    from bilevel_jax.runner.io import CheckpointError, RunDirectoryError

    # These messages name the flag or file themselves; the others a key of the config.
    own = isinstance(err, (CheckpointError, RunDirectoryError)) or str(err).startswith("--")
    return _error(str(err) if own else f"config: {err}")


def resolve_run_config(args) -> dict:
    """The config of `bilevel-jax run` with `--out` applied; `ConfigError` naming the key."""
    from bilevel_jax.runner.config import ConfigError, load_config

    config = load_config(args.config, args.overrides)
    if args.out is not None:
        if not args.out.strip():
            raise ConfigError("--out: expected a directory path, got an empty string")
        config["output"]["dir"] = args.out
    directory = config["output"]["dir"]
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"output.dir: expected a directory, got the file {directory!r}")
    return config


def command_run(args) -> int:
    from bilevel_jax.errors import BilevelJaxError
    from bilevel_jax.runner.config import ConfigError

    try:
        config = resolve_run_config(args)
    except ConfigError as err:
        return _refusal(err)

    from bilevel_jax.algorithms import NonFiniteError
    from bilevel_jax.runner.run import run_experiment

    try:
        with sigterm_as_interrupt():
            run_experiment(config, resume=args.resume, progress=not args.no_progress)
    except NonFiniteError as err:
        print(f"\nbilevel-jax: run stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        what = f"terminated ({err})" if isinstance(err, Terminated) else "interrupted"
        print(f"\nbilevel-jax: {what}; continue with --resume (run directory "
              f"{config['output']['dir']})", file=sys.stderr)
        return 130
    except ConfigError as err:
        return _refusal(err)
    except (BilevelJaxError, OSError) as err:
        print(f"\nbilevel-jax: run failed: {err}", file=sys.stderr)
        return 1
    return 0


def shipped_configs() -> list[str]:
    """YAML configs under ./configs and the source checkout's configs/ (deduplicated)."""
    import bilevel_jax

    roots = [os.path.join(os.getcwd(), "configs"),
             os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(bilevel_jax.__file__))),
                          "configs")]
    found, seen = [], set()
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "*.yaml"))):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                found.append(os.path.relpath(path) if real.startswith(os.getcwd()) else path)
    return found


def _first_comment(path: str) -> str:
    try:
        with open(path) as handle:
            for line in handle:
                line = line.strip()
                if line.startswith("#"):
                    return line.lstrip("#").strip()
                if line:
                    break
    except OSError:
        pass
    return ""


def _fields_text(fields: dict) -> str:
    from bilevel_jax.runner.fields import show_default
    return ", ".join(f"{k}={show_default(f.default)}" for k, f in fields.items())


def command_list(args) -> int:
    import textwrap

    from bilevel_jax.runner.config import estimator_fields, estimator_names
    from bilevel_jax.runner.fields import show_default
    from bilevel_jax.runner.problems import problem_names, problem_spec

    def block(text: str, indent: int) -> str:
        return textwrap.fill(text, width=100, initial_indent=" " * indent,
                             subsequent_indent=" " * indent)

    print("Problems (problem.name; fields marked * may be swept inside one compiled program):")
    for name in problem_names():
        spec = problem_spec(name)
        print(f"  {name:<12}{' ' if len(name) >= 12 else ''}{spec.doc}")
        print(block(", ".join(f"{k}{'*' if f.traced else ''}={show_default(f.default)}"
                              for k, f in spec.fields.items()), 14))
    print("\nEstimators (estimator.name; options under estimator.<name>):")
    for name in estimator_names():
        print(f"  {name:<12}" + block(_fields_text(estimator_fields(name)), 14).lstrip())
    print("\nAlgorithms (algorithm.name):")
    for name, doc in ALGORITHM_DOCS.items():
        print(f"  {name:<12}" + block(doc, 14).lstrip())
    from bilevel_jax.runner.config import ALGORITHM_FIELDS
    print("  options (algorithm.<key>):")
    print(block(_fields_text(ALGORITHM_FIELDS), 14))
    configs = shipped_configs()
    print("\nShipped configs (bilevel-jax run PATH):")
    for path in configs:
        print(f"  {path:<28}{_first_comment(path)}")
    if not configs:
        print("  (none found under ./configs)")
    return 0


def command_report(args) -> int:
    from bilevel_jax.runner.fields import ConfigError
    from bilevel_jax.runner.report import load_run, report

    try:
        for directory in args.runs:
            load_run(directory)
        report(args.runs, args.out, metrics=args.metrics)
    except ConfigError as err:
        return _error(str(err))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command == "run" and start_distributed(args):
        return 2
    commands = {"run": command_run, "list": command_list, "report": command_report}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
