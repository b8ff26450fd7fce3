"""The device's own evaluation report: federated evaluation that never leaves the device.

Per-device hit/NDCG/MRR on the held-out events are functions of the user's last two items,
for a model the server chooses: a server that sends crafted models reads those items back
from the metrics (docs/PRIVACY.md, finding 3). So the `evaluate` handler replies with nothing
but an acknowledgement and keeps the sums in the device's encrypted store, under
`REPORT_BLOB`, stamped with the round. Who may read them is whoever holds the device's key:
the user, and in a simulation the runner that provisioned every store (it reads them after
each evaluation round, see simulations/simulate.py); never the server.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .store import DeviceStore

REPORT_BLOB = "evaluation-report"


def write_report(store: DeviceStore, server_round: int, sums: dict[str, float]) -> None:
    """Keep this round's evaluation sums (Device.evaluate's dict) in the encrypted store."""
    clean = {k: float(v) for k, v in sums.items() if math.isfinite(float(v))}
    store.put_blob(REPORT_BLOB, json.dumps({"round": int(server_round),
                                            "sums": clean}).encode())


def read_report(store: DeviceStore) -> dict | None:
    """{"round", "sums"} of the device's latest evaluation, or None if it has none."""
    blob = store.get_blob(REPORT_BLOB)
    return None if blob is None else json.loads(blob.decode())


def sum_reports(devices_dir: Path, n_devices: int, server_round: int) -> dict[str, float]:
    """The sums over every provisioned device (simulation layout `device-<p>.db/.key`)
    whose latest report is of `server_round`, and under `KEY^2` the sums of the squares of
    the devices' values (for the standard error of each mean). Read by the simulation
    runner, which holds the devices' keys because it provisioned them; a deployment has no
    such reader."""
    totals: dict[str, float] = {}
    for p in range(n_devices):
        store_path = Path(devices_dir) / f"device-{p}.db"
        if not store_path.exists():
            continue
        with DeviceStore.open(store_path, key_file=Path(devices_dir) / f"device-{p}.key",
                              create=False, verify=False) as store:
            report = read_report(store)
        if report is None or report.get("round") != server_round:
            continue
        for key, value in report["sums"].items():
            totals[key] = totals.get(key, 0.0) + float(value)
            totals[f"{key}^2"] = totals.get(f"{key}^2", 0.0) + float(value) ** 2
    return totals
