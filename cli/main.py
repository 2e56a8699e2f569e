"""The `tia2` command: the parser of its commands (each module's COMMANDS, in the order of
`tia2 --help`) and `main`, which runs one; a user mistake is one line on stderr and exit code 2,
never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from cli import annotate, benchmark, data, finetuning, images, metrics, preferences, sql, train_reward
from cli.command import CommandLineError, CommandParser, Parser
from tia2.errors import UserError

COMMANDS = (*data.COMMANDS, *images.COMMANDS, *metrics.COMMANDS, *preferences.COMMANDS, *sql.COMMANDS,
            *finetuning.COMMANDS, *train_reward.COMMANDS, *annotate.COMMANDS, *benchmark.COMMANDS)

EPILOG = """\
environment:
  TIA2_STORE           store root: a folder or a file:// URL (default ./storage); --store overrides it
  TIA2_SOURCE          folder or URL of the TIA2 release, for ingest-tia2 and benchmark
  MLFLOW_TRACKING_URI  MLflow tracking store (default sqlite:///<cwd>/mlruns/mlflow.db)
  PREFECT_HOME         Prefect's state for benchmark (default ./.prefect)
  HF_HUB_OFFLINE=1     load model weights only from the local cache (no network)

state: where these are not set, a command keeps its state in the folder it runs in (./storage,
  ./mlruns, ./.prefect), wherever the project is; `tia2 benchmark` ends by saying where it went.
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS,
                        help="store root (default: $TIA2_STORE or ./storage)")
    parser = Parser(
        prog="tia2", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark text-to-image reward models against human labels (TIA2) and "
                    "fine-tune generators against them.",
        epilog=EPILOG)
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: local mlruns/)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for command in COMMANDS:
        sub.add_parser(command.name, command=command, parents=[common], help=command.help,
                       description=textwrap.dedent(command.description),
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tia2")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CommandLineError as exc:
        print(exc, file=sys.stderr)
        return 2
    args.store = getattr(args, "store", None)
    if args.mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.mlflow_uri
    try:
        return args.func(args)
    except UserError as exc:
        print(f"tia2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
