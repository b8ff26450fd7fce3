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
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fedinterest.simulations.report import write_report

    print(f"report: {write_report(args.run_dir, n_sample_users=args.users)}")
    return 0
