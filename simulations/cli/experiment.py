"""`fedinterest experiment privacy-utility` (see simulations/experiment.py)."""

from __future__ import annotations

import argparse
import logging

from fedinterest.shared.config import load_config, parse_overrides

from .vocabulary import add_data, add_out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="multi-run experiments (privacy-utility)")
    s = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    pu = s.add_parser("privacy-utility",
                      help="central reference, federated without DP, event-level DP at several "
                           "epsilons, user-level DP and both, on one dataset",
                      description="Runs every arm in one invocation and writes "
                                  "privacy_utility.{json,md,png} to --out.")
    add_data(pu, default="synthetic")
    add_out(pu, "output folder (privacy_utility.json/.md/.png and one run per arm)",
            default="runs/privacy-utility")
    pu.add_argument("--epsilons", default="8,2",
                    help="per-device event-level budgets, comma-separated (default 8,2)")
    pu.add_argument("--config", help="TOML file with run settings shared by every arm")
    pu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run settings shared by every arm, e.g. --set rounds=20")
    pu.add_argument("--central-epochs", type=int, default=40,
                    help="epochs of the centralized reference; 0 skips the central arms")
    pu.add_argument("--popularity-from", metavar="RUN_DIR",
                    help="an earlier run whose DP popularity release every arm publishes "
                         "(default: the first federated arm counts, the others reuse it)")
    pu.add_argument("--engine", choices=("ray", "inprocess"), default="ray",
                    help="the federated arms' engine, as `fedinterest simulate --engine`")
    pu.add_argument("--quiet", action="store_true", help="no progress bars")
    pu.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fedinterest.shared.errors import ConfigError
    from fedinterest.simulations.data import load_dataset
    from fedinterest.simulations.experiment import privacy_utility

    try:
        eps = [float(x) for x in args.epsilons.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons '{args.epsilons}': expected numbers like 8,2") from None
    if not eps or min(eps) <= 0:
        raise ConfigError("--epsilons: give at least one positive budget")
    base = load_config(args.config, {"dataset": args.data, **parse_overrides(args.set)})
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("flwr", "ray"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    ds = load_dataset(base.dataset)
    res = privacy_utility(ds, base, args.out, eps, args.central_epochs, args.quiet,
                          args.popularity_from, args.engine)
    from fedinterest.simulations.experiment import table_markdown

    print(table_markdown(res))
    print(f"written: {args.out}/privacy_utility.json, .md, .png")
    return 0
