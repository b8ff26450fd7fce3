"""`fedinterest` command line. Each subcommand lives in its own module exposing
`register(subparsers)`; this file only wires them, so adding a command touches one line.

A command line that names its command imports only that command's module: `fedinterest
client recommend` then loads the device SDK, not the simulation stack (torch, Flower, Ray,
the dataset loaders) that the other commands' modules would pull in.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fedinterest.shared.errors import FedinterestError

# command -> (module path relative to fedinterest, the extra it needs or None for the core);
# in --help order
COMMANDS: dict[str, tuple[str, str | None]] = {
    "data": ("simulations.cli.data", None),
    "embed": ("simulations.cli.embed", None),
    "simulate": ("simulations.cli.simulate", "simulation"),
    "prepare": ("simulations.cli.prepare", "flower"),
    "train-central": ("simulations.cli.train_central", "simulation"),
    "report": ("simulations.cli.report", "simulation"),
    "audit": ("simulations.cli.audit", "audit"),
    "experiment": ("simulations.cli.experiment", "simulation"),
    "bench": ("simulations.cli.bench", "simulation"),
    "client": ("simulations.cli.client", None),
}


def version() -> str:
    """The installed distribution's version (the source tree's pyproject when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("fedinterest")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Version(argparse.Action):
    """--version, reading the version only when asked (importlib.metadata costs ~80 ms)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"fedinterest {version()}")
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (`only`) the top level with that one command."""
    parser = argparse.ArgumentParser(
        prog="fedinterest",
        description="Federated, privacy-preserving modelling of evolving interests.",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (mod, _) in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(f"fedinterest.{mod}").register(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command `argv` names (its first non-option word), if it is one of ours."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    args = build_parser(command).parse_args(argv)
    try:
        extra = COMMANDS[args.command][1]
        if extra is not None:
            from fedinterest.shared.optional import require

            require(extra=extra, purpose=f"`fedinterest {args.command}`")
        return int(args.func(args) or 0)
    except FedinterestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
