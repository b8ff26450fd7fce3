"""`fedinterest audit` reports every step as it starts, its elapsed time while it runs past
the interval, and its time when it ends."""

from __future__ import annotations

import io
import re
import time

from fedinterest.simulations.cli.audit import StepProgress


def test_long_steps_report_their_elapsed_time_and_short_ones_do_not():
    out = io.StringIO()
    with StepProgress(every=0.05, stream=out) as progress:
        progress("egress")
        time.sleep(0.3)
        progress("ledger")  # ends at once: no "still running"
    lines = out.getvalue().splitlines()
    assert lines[0] == "audit: egress ..."
    ticks = [line for line in lines if line.startswith("audit: egress still running")]
    assert len(ticks) >= 2
    assert re.fullmatch(r"audit: egress done in 0\.\d s", lines[len(ticks) + 1])
    assert lines[-2:][0] == "audit: ledger ..." and lines[-1].startswith("audit: ledger done")
    assert not any("ledger still running" in line for line in lines)
