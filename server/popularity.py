"""Item popularity for the public catalog, released under DP that holds against the server.

Titles and genres alone rank below popularity, so the text model needs a popularity feature,
but the server never sees interactions. Each device contributes a 0/1 vector over the catalog
with at most `max_items` ones (its training items, a random subset if more), scaled and
noised on the device with its Skellam share before SecAgg+ masks it
(shared/distributed_dp_count.py, client/popularity_count.py): the sum the server unmasks
already carries the noise, so the server only post-processes it (`release_noisy_sum`: divide
by gamma, clamp negatives). One mechanism in every dp mode; the server never draws the
count's noise. Released once per run (server/popularity_round.py).
"""

from __future__ import annotations

import math

import numpy as np
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp_accounting import count_epsilon
from fedinterest.shared.distributed_dp_count import count_params


def release_noisy_sum(total: np.ndarray, cfg: RunConfig) -> tuple[np.ndarray, dict]:
    """The published counts from the unmasked sum of the devices' noisy integer vectors
    (already carrying the noise: nothing is added here), and the release's statement.
    Post-processing only: divide by gamma, clamp negatives to 0."""
    count = count_params(cfg)  # the relation of the ledger the devices charge
    user = count_params(cfg, replace=False)  # add/remove one device
    counts = np.maximum(np.asarray(total, np.float64) / count.scale, 0.0)
    statement = {
        "mechanism": "distributed Skellam, one release: each device adds its noise share to "
                     "its scaled 0/1 vector before SecAgg+ masks it (Agarwal, Kairouz, Liu "
                     "2021); the server adds no noise",
        "noise_added_by": "the devices; the server only divides by the scale and clamps "
                          "negatives to 0",
        "unit": "one user (all their items)",
        "l2_sensitivity": math.sqrt(cfg.popularity_max_items),
        "noise_std": float(cfg.popularity_noise * math.sqrt(cfg.popularity_max_items)),
        "noise_multiplier": float(cfg.popularity_noise), "scale": count.scale,
        "min_contributions": count.min_contributions, "delta": cfg.delta,
        "epsilon": count_epsilon(user, cfg.delta),  # add/remove one device
        "run_unit_epsilon": count_epsilon(count, cfg.delta),  # the ddp ledger's charge
        "charged_to": ("each counted device's distributed-DP ledger (its budget) at the "
                       f"run's unit (dp = {cfg.dp}), and its device ledger's user unit"
                       if cfg.distributed_dp else
                       "each counted device's device ledger, user unit (add/remove one "
                       "device)"),
        "threat_model": "holds against the server and the wire if at least min_contributions "
                        "honest devices of a cohort add their shares (SecAgg+ holds); each "
                        "device sizes its share for at most its policy's max_assumed_honest "
                        "devices, whatever m the server asks for"}
    return counts.astype(np.float32), statement
