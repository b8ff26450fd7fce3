"""`fedinterest report RUN_DIR`: (re)write report.html from a finished run directory."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write report.html for a finished simulation run",
                       description="Write RUN_DIR/report.html (self-contained HTML: results, "
                                   "plots, privacy statement, sample users' interest "
                                   "timelines) from RUN_DIR/results.json.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of `simulate`")
    p.add_argument("--users", type=int, default=3,
                   help="sample users whose interest timelines are shown (default 3)")
    p.add_argument("--reference", action="append", default=[], metavar="DIR",
                   help="a `fedinterest train-central --out DIR` folder (or its metrics.json), "
                        "or another run directory (e.g. without DP), whose test metrics are "
                        "drawn as reference lines (repeatable)")
    p.add_argument("--no-popularity", action="store_true",
                   help="do not compute the popularity reference on the run's dataset")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fedinterest.simulations.report import write_report

    path = write_report(args.run_dir, n_sample_users=args.users, references=args.reference,
                        popularity=not args.no_popularity)
    print(f"report: {path}")
    return 0
