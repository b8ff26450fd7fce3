"""Item popularity for the public catalog, released under user-level DP.

Titles and genres alone rank below popularity, so the text model needs a popularity feature,
but the server never sees interactions. Each device contributes a 0/1 vector over the catalog
with at most `max_items` ones (its training items, a random subset if more), so one user moves
the sum by at most sqrt(max_items) in L2; the sum gets Gaussian noise of std
noise * sqrt(max_items): a Gaussian mechanism with noise multiplier `noise`, released once.
Only the noised sum is published. The devices' vectors (shared.secure_protocol.contribution,
computed on the device) are summed under hardened SecAgg+ (server/popularity_round.py).
"""

from __future__ import annotations

import numpy as np
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
