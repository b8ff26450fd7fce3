"""Item popularity for the public catalog, released under user-level DP.

Titles and genres alone rank below popularity, so the text model needs a popularity feature,
but the server never sees interactions. Each device contributes a 0/1 vector over the catalog
with at most `max_items` ones (its training items, a random subset if more), so one user moves
the sum by at most sqrt(max_items) in L2; the sum gets Gaussian noise of std
noise * sqrt(max_items): a Gaussian mechanism with noise multiplier `noise`, released once.
Only the noised sum is published. The devices' vectors (shared.secure_protocol.contribution,
computed on the device) are summed under hardened SecAgg+ (server/popularity_round.py).

Two mechanisms: outside distributed DP the server adds the Gaussian after it has unmasked the
exact sum (`release_counts`), so that epsilon holds against readers of the catalog, not the
server; in a distributed-DP run each device adds a Skellam share before masking
(shared/distributed_dp_count.py) and the server only post-processes the noisy sum it unmasks
(`release_noisy_sum`: divide by gamma, clamp negatives), so the epsilon holds against it.
"""

from __future__ import annotations

import math

import numpy as np
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp_accounting import count_epsilon
from fedinterest.shared.distributed_dp_count import count_params
from fedinterest.shared.privacy import gaussian_epsilon


def release_counts(summed: np.ndarray, max_items: int, noise: float, delta: float,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, dict]:
    """Noised counts and the privacy statement of this one release."""
    rng = rng or np.random.default_rng(np.random.SeedSequence())
    std = noise * np.sqrt(max_items)
    noised = summed + rng.normal(0.0, std, summed.shape)
    statement = {"mechanism": "Gaussian, one release", "unit": "one user (all their items)",
                 "l2_sensitivity": float(np.sqrt(max_items)), "noise_std": float(std),
                 "noise_multiplier": noise, "delta": delta,
                 "epsilon": gaussian_epsilon(noise, delta)}
    return np.maximum(noised, 0.0).astype(np.float32), statement


def release_noisy_sum(total: np.ndarray, cfg: RunConfig) -> tuple[np.ndarray, dict]:
    """The published counts from the unmasked sum of the devices' noisy integer vectors
    (already carrying the noise: nothing is added here), and the release's statement.
    Post-processing only: divide by gamma, clamp negatives to 0."""
    count = count_params(cfg)
    user = count_params(cfg.replace(dp="ddp-user"))  # add/remove one device
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
        "threat_model": "holds against the server and the wire if at least min_contributions "
                        "honest devices of a cohort add their shares (SecAgg+ holds)"}
    return counts.astype(np.float32), statement
