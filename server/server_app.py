"""The Flower ServerApp. `flwr run .` loads `app`; `fedinterest simulate` builds one with
`make_server_app` around a prepared run (catalog published, devices provisioned).

The server holds no interactions: it publishes the catalog (public item text vectors and the
DP popularity release) and aggregates model updates; devices keep their evaluation results
(in a simulation the runner reads them from the stores it provisioned).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fedinterest.shared.config import RunConfig
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.fed_model import federated_model_config, wire_schema
from fedinterest.shared.flower_logging import configure_flower_logging
from fedinterest.shared.model import build_model, get_weights
from fedinterest.shared.published_catalog import PublishedCatalog
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .federation import Federation, RoundRecord
from .message_log import RecordingGrid
from .results import build_results, write_results
from .windowed_grid import WindowedGrid

log = logging.getLogger("fedinterest.server")
# what each epsilon of a round line covers (docs/PRIVACY.md); the adversary is the server
EVENT_UNIT = "event level (one training segment), the most any device spent"
USER_UNIT = "user level (one device's whole contribution)"
DDP_UNIT = "distributed DP, a device that joined every round"


def initial_weights(cfg: RunConfig, catalog: PublishedCatalog) -> list[np.ndarray]:
    torch.manual_seed(cfg.seed)
    return get_weights(build_model(federated_model_config(cfg, catalog)))


def run_server(grid: Grid, cfg: RunConfig, catalog_path: Path, devices_dir: Path,
               resume: bool = False, on_round: Callable[[RoundRecord], None] | None = None,
               evaluation_reader: Callable[[int], dict] | None = None) -> Federation:
    """`evaluation_reader(round)`: sums of the devices' own evaluation reports of that round,
    for a simulation runner that holds the device stores (Federation._evaluate)."""
    catalog = PublishedCatalog.load(catalog_path)
    grid = WindowedGrid(grid)  # a query to every device stays O(N), not O(N^2), in the driver
    if cfg.message_log:
        grid = RecordingGrid(grid, Path(cfg.out_dir) / "messages" / "messages.log")
    fed = Federation(cfg, wire_schema(cfg, catalog), initial_weights(cfg, catalog),
                     {"catalog-path": str(catalog_path), "catalog-version": catalog.version,
                      "devices-dir": str(devices_dir)}, Path(cfg.out_dir), on_round=on_round,
                     evaluation_reader=evaluation_reader)
    if resume:
        fed.resume()
    try:
        fed.run(grid)
    finally:
        if isinstance(grid, RecordingGrid):
            grid.close()
    return fed


def make_server_app(cfg: RunConfig, catalog_path: Path, devices_dir: Path,
                    resume: bool = False, on_round=None,
                    result: dict | None = None, evaluation_reader=None) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        fed = run_server(grid, cfg, catalog_path, devices_dir, resume, on_round,
                         evaluation_reader)
        if result is not None:
            result["federation"] = fed

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .`: the run config names a prepared run directory (see README)."""
    configure_flower_logging()
    cfg = RunConfig.from_mapping({k: v for k, v in context.run_config.items()
                                  if k not in ("prepared",)}, source="run config")
    run_dir = Path(cfg.out_dir)
    if not run_dir.is_absolute():  # the ServerApp runs in the SuperLink's working directory
        raise ConfigError(f"out-dir: '{cfg.out_dir}' must be an absolute path under flwr run")
    try:
        prepared = json.loads((run_dir / "prepared.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir}/prepared.json: no prepared run here; run "
                          "`fedinterest prepare --out-dir ...` first") from None
    fixed = prepared.get("run_config", {})
    for key in ("dataset", "seed", "holdout", "delta"):
        if key in fixed and fixed[key] != getattr(cfg, key):
            raise ConfigError(f"run config '{key}'={getattr(cfg, key)!r} differs from the "
                              f"prepared run's {fixed[key]!r} ({run_dir}/prepared.json)")
    fed = run_server(grid, cfg, Path(prepared["catalog_path"]), Path(prepared["devices_dir"]),
                     on_round=functools.partial(log_round, cfg=cfg))
    path = write_results(run_dir, build_results(fed, cfg, int(prepared["n_devices"])))
    log.info("results: %s (report: fedinterest report %s)", path, run_dir)


def log_round(rec: RoundRecord, cfg: RunConfig) -> None:
    """One INFO line per finished round: who took part, what the run has spent (each
    epsilon with its unit) and the metrics of an evaluation round."""
    took_part = f"{rec.sampled} of {rec.population} devices, {rec.accepted} accepted"
    parts = [f"round {rec.round}/{cfg.rounds}: sampled {took_part}, {rec.failed} failed"]
    for unit, value in ((EVENT_UNIT, rec.device_epsilon_max), (USER_UNIT, rec.user_epsilon),
                        (DDP_UNIT, rec.ddp_epsilon)):
        if value is not None:
            parts.append(f"epsilon {value:.3g} at delta {cfg.delta:g}, {unit}")
    parts += [f"{k} {v:.4f}" for k, v in sorted(rec.metrics.items())
              if isinstance(v, (int, float))]
    log.info("; ".join(parts))
