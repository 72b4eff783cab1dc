"""Command line of bilevel_jax: run experiments from YAML configs, list what is available, report.

    bilevel-jax run CONFIG [--set key.path=value ...] [--out DIR] [--resume]
    bilevel-jax list
    bilevel-jax report RUN_DIR [RUN_DIR ...] [--out DIR]

Exit codes: 0 success; 1 the run stopped (NaN or inf, or another error while running);
2 bad command line or configuration (refused before anything is run or written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

ALGORITHM_DOCS = {
    "ascent": "hypergradient ascent: the estimator's grad F(x) fed to the optax optimizer",
    "pbrl": "penalty method: joint descent on (x, follower logits y) of -f + rho * penalty",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilevel-jax", description="Bilevel reinforcement learning in JAX: experiments.",
        epilog="Exit codes: 0 ok, 1 run stopped, 2 bad command line or config, 130 interrupted.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,list,report}")
    run = sub.add_parser("run", help="run the experiment described by a YAML config",
                         description="Runs every grid point x seed of CONFIG and writes the run "
                                     "directory (config.yaml, metrics.csv, summary.json, plots/, "
                                     "checkpoint.pkl).")
    run.add_argument("config", help="path to a YAML config (e.g. configs/quickstart.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY.PATH=VALUE",
                     help="override a config value (YAML syntax; repeatable), e.g. "
                          "--set optimizer.learning_rate=0.3 --set 'sweep.problem.temperature=[0.05, 0.1]'")
    run.add_argument("--out", metavar="DIR", help="run directory (default: output.dir, runs/<name>)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the run directory's checkpoint (same config)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
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


def command_run(args) -> int:
    from bilevel_jax.errors import BilevelJaxError
    from bilevel_jax.runner.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
        if args.out:
            config["output"]["dir"] = args.out
        if os.path.exists(config["output"]["dir"]) and not os.path.isdir(config["output"]["dir"]):
            raise ConfigError(f"output.dir: expected a directory, got the file "
                              f"{config['output']['dir']!r}")
        checkpoint = None
        if args.resume:
            from bilevel_jax.runner.run import check_resume
            checkpoint = check_resume(config)
    except ConfigError as err:
        return _error(f"config: {err}")

    from bilevel_jax.algorithms import NonFiniteError
    from bilevel_jax.runner.run import run_experiment

    try:
        run_experiment(config, resume=args.resume, checkpoint=checkpoint,
                       progress=not args.no_progress)
    except NonFiniteError as err:
        print(f"\nbilevel-jax: run stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nbilevel-jax: interrupted; continue with --resume (run directory "
              f"{config['output']['dir']})", file=sys.stderr)
        return 130
    except ConfigError as err:
        return _error(f"config: {err}")
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
    from bilevel_jax.runner.fields import show_value
    return ", ".join(f"{k}={show_value(f.default)}" for k, f in fields.items())


def command_list(args) -> int:
    import textwrap

    from bilevel_jax.runner.config import estimator_fields, estimator_names
    from bilevel_jax.runner.fields import show_value
    from bilevel_jax.runner.problems import problem_names, problem_spec

    def block(text: str, indent: int) -> str:
        return textwrap.fill(text, width=100, initial_indent=" " * indent,
                             subsequent_indent=" " * indent)

    print("Problems (problem.name; fields marked * may be swept inside one compiled program):")
    for name in problem_names():
        spec = problem_spec(name)
        print(f"  {name:<12}{spec.doc}")
        print(block(", ".join(f"{k}{'*' if f.traced else ''}={show_value(f.default)}"
                              for k, f in spec.fields.items()), 14))
    print("\nEstimators (estimator.name; options under estimator.<name>):")
    for name in estimator_names():
        print(f"  {name:<12}" + block(_fields_text(estimator_fields(name)), 14).lstrip())
    print("\nAlgorithms (algorithm.name):")
    for name, doc in ALGORITHM_DOCS.items():
        print(f"  {name:<12}{doc}")
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
    commands = {"run": command_run, "list": command_list, "report": command_report}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
