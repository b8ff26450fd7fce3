"""User-level privacy per device, accounted against the server: no amplification by sampling.

The server draws each round's sample itself (server/strategies.py `sample_round`, a seeded
function it knows) and sees who replies, so "this device was probably not in the round" hides
nothing from it: amplification by sampling does not hold against the server. Each device is
therefore charged the Gaussian mechanism in full for every round it contributed to, composed
(RDP, dp-accounting) with every other user-level release it took part in: today the
popularity count, when it was queried for it.

Unit and relation (USER_UNIT, USER_RELATION): one device's whole data, replace-one (its
contributions replaced by any other device's). One clipped update then moves the sum by up
to 2 x clip, and the noise std is sigma x clip: noise multiplier sigma / 2 per round. The
popularity count is the devices' distributed Skellam (shared/distributed_dp_count.py): its RDP
bound at the replace-one sensitivities (a 0/1 vector of at most k ones, scaled by gamma, moves
the sum by gamma sqrt(2 k) in L2). One RDP curve at the Skellam bound's integer orders
(shared/distributed_dp_accounting.py) composes both.
"""

from __future__ import annotations

import numpy as np
from fedinterest.shared.distributed_dp_accounting import (
    ORDERS,
    count_rdp,
    gaussian_rdp,
    rdp_to_epsilon,
)
from fedinterest.shared.distributed_dp_count import CountParams

USER_UNIT = "all of one device's data (its update in every round it joins, its popularity vector)"
USER_RELATION = ("replace one device (all its contributions); no amplification by sampling: "
                 "the server chooses and sees the sample")
ACCOUNTANT = ("RDP per device at integer orders: the Gaussian mechanism composed over the "
              "rounds it contributed to, plus the popularity count's distributed Skellam "
              "(Agarwal et al. 2021) if it was queried")


def device_user_epsilon(rounds: int, noise_multiplier: float, delta: float,
                        count: CountParams | None = None) -> float:
    """Epsilon of one device after `rounds` contributions to DP-FedAvg sums (`noise_multiplier`
    relative to the clip) and, if `count` is given, the popularity count (its parameters at
    the replace-one relation: `count_params(cfg, replace=True)`); see the module docstring."""
    curve = np.zeros(len(ORDERS))
    if rounds > 0:
        if noise_multiplier <= 0:
            return float("inf")
        curve += rounds * np.asarray(gaussian_rdp(noise_multiplier / 2.0))
    if count is not None:
        curve += np.asarray(count_rdp(count))
    elif rounds <= 0:
        return 0.0
    return rdp_to_epsilon(curve, delta)
