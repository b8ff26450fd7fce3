"""`fedinterest` command line. Each subcommand lives in its own module exposing
`register(subparsers)`; this file only wires them, so adding a command touches one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from fedinterest.shared.errors import FedinterestError

# module path (relative to fedinterest) of each command group, in --help order
COMMANDS = [
    "simulations.cli.data",
    "simulations.cli.embed",
    "simulations.cli.simulate",
    "simulations.cli.prepare",
    "simulations.cli.train_central",
    "simulations.cli.report",
    "simulations.cli.audit",
    "simulations.cli.experiment",
    "simulations.cli.bench",
    "simulations.cli.client",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedinterest",
        description="Federated, privacy-preserving modelling of evolving interests.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMANDS:
        importlib.import_module(f"fedinterest.{mod}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedinterestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
