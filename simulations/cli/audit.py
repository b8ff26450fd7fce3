"""`fedinterest audit RUN_DIR`: the privacy audit of a finished run
(simulations/audit/report.py)."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Self

# the checks of simulations/audit/report.py, in report order (kept here so `fedinterest --help`
# does not import torch; tests/simulations/audit/test_audit.py checks the two agree)
CHECKS = ("egress", "accounting", "mechanism", "canary", "inference", "secagg", "ledger")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit", help="privacy audit of a run directory (audit.json + audit.html)",
        description="Check what left the devices, recompute every epsilon, audit the DP-SGD "
                    "mechanism (canaries, interaction inference), secure aggregation and the "
                    "ledger's hash chain; write RUN_DIR/audit.json and a self-contained "
                    "RUN_DIR/audit.html. Exit status 1 when any check fails.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of `simulate`")
    p.add_argument("--checks", default=",".join(CHECKS),
                   help=f"comma-separated checks to run (default: all of {','.join(CHECKS)})")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out")
    p.add_argument("--canary", action="append", default=[], metavar="TEXT",
                   help="a string planted on devices that must never leave them (repeatable; "
                        "RUN_DIR/canaries.json, a JSON list, is read too)")
    p.add_argument("--canaries", type=int, default=None, metavar="M",
                   help="canary segments of the one-run membership audit (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the audit's own experiments")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import logging

    import torch
    from fedinterest.simulations.audit.report import AUDIT_HTML, AUDIT_JSON, run_audit

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("flwr", "opacus"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    checks = [c.strip() for c in args.checks.split(",") if c.strip() and c.strip() not in skip]
    options: dict[str, dict] = {name: {"seed": args.seed}
                                for name in ("mechanism", "canary", "inference")}
    if args.canaries is not None:
        options["canary"]["m"] = args.canaries
    with StepProgress() as progress:
        audit = run_audit(args.run_dir, checks, args.canary, options, progress=progress)
    width = max(len(c["title"]) for c in audit["checks"])
    for c in audit["checks"]:
        print(f"{c['number']:>2} {c['title']:<{width}}  {c['verdict']:<14} {c['reason']}")
    print(f"audit: {args.run_dir}/{AUDIT_JSON}\n       {args.run_dir}/{AUDIT_HTML}")
    return 1 if any(c["verdict"] == "fail" for c in audit["checks"]) else 0


class StepProgress:
    """Progress of the audit's steps on stderr: each step as it starts, then, while it runs
    longer than `every` seconds, its elapsed time every `every` seconds (the egress scan of a
    large message log or the canary training runs for minutes), and its time when it ends."""

    def __init__(self, every: float = 5.0, stream=None):
        self.every, self.stream = every, stream or sys.stderr
        self._name: str | None = None
        self._start = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, name: str) -> None:
        self._finish()
        self._name, self._start = name, time.monotonic()
        self._say(f"audit: {name} ...")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, args=(name, self._stop),
                                        daemon=True)
        self._thread.start()

    def _tick(self, name: str, stop: threading.Event) -> None:
        while not stop.wait(self.every):
            self._say(f"audit: {name} still running, {time.monotonic() - self._start:.0f} s")

    def _finish(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._say(f"audit: {self._name} done in {time.monotonic() - self._start:.1f} s")
        self._thread = None

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._finish()
