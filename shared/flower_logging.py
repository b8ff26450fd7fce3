"""Log output of the processes Flower's runtime starts (`flwr run .`, SuperNodes): each line
once, at INFO, in Flower's format.

Why it needs setting up: importing Opacus (opacus/utils/module_utils.py) calls
`logging.basicConfig`, which puts a handler without a level on the root logger. Flower's
`flwr` logger is at DEBUG with its own console handler (INFO) and propagates, so every Flower
record was printed twice, once by each handler, and its DEBUG records (SecAgg+'s per-node
stage messages) came through the root handler. Our `fedinterest.*` loggers had no level, so
their INFO lines (a device declining a round) were dropped.

`configure_flower_logging` makes Flower's console handler the one printer of both: `flwr`
stops propagating (Flower's own switch for duplicate logs, `set_logger_propagation`) and
`fedinterest` logs through that handler at `level`. `FLWR_LOG_LEVEL=DEBUG` still shows
Flower's DEBUG lines. Two notices that say nothing about a run are dropped: Opacus's empty
Poisson batch and Ray's accelerator tip. Only the entry points of Flower's runtime call it
(server/server_app.py's `main`, client/runtime_app.py): in tests and in `fedinterest simulate`
our loggers keep propagating to the root logger (pytest's caplog, the CLI's own setup);
`fedinterest simulate` drops the Ray tip only (`drop_ray_accelerator_tip`).
"""

from __future__ import annotations

import logging
import warnings

FLOWER_LOGGER = "flwr"
OUR_LOGGER = "fedinterest"
# Opacus warns when a Poisson draw is empty; DP-SGD then takes a noise-only step on purpose
# (client/dp_training.py, _dp_sgd), which the accountant counts: not a problem to report.
OPACUS_EMPTY_BATCH = ("opacus.data_loader", "First batch is empty")
# Ray's notice, at every start of the simulation engine, that it will stop hiding GPUs from
# actors that ask for none: ours ask for none and run CPU torch, so it changes nothing here.
RAY_ACCELERATOR_TIP = "Tip: In future versions of Ray, Ray will no longer override accelerator"


def _not_expected_empty_batch(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(OPACUS_EMPTY_BATCH[1])


def configure_flower_logging(level: int = logging.INFO) -> logging.Handler:
    """Print Flower's records and ours (at `level` and above) once, through Flower's console
    handler; returns that handler. Idempotent; needs the 'flower' extra."""
    from flwr.common.logger import console_handler

    logging.getLogger(FLOWER_LOGGER).propagate = False
    ours = logging.getLogger(OUR_LOGGER)
    ours.setLevel(level)
    ours.propagate = False
    if console_handler not in ours.handlers:
        ours.addHandler(console_handler)
    logging.getLogger(OPACUS_EMPTY_BATCH[0]).addFilter(_not_expected_empty_batch)  # once
    drop_ray_accelerator_tip()
    return console_handler


def drop_ray_accelerator_tip() -> None:
    """Hide Ray's accelerator tip, which `ray.init` warns in the process that starts Ray
    (`fedinterest simulate`'s driver, Flower's runtime)."""
    warnings.filterwarnings("ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning)
