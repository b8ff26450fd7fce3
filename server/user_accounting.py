"""User-level privacy per device, accounted against the server: no amplification by sampling.

The server draws each round's sample itself (server/strategies.py `sample_round`, a seeded
function it knows) and sees who replies, so "this device was probably not in the round" hides
nothing from it: amplification by sampling does not hold against the server. Each device is
therefore charged the Gaussian mechanism in full for every round it contributed to, composed
(RDP, dp-accounting) with every other user-level release it took part in: today the
popularity count, when it was queried for it.

Unit and relation (USER_UNIT, USER_RELATION): one device's whole data, replace-one (its
contributions replaced by any other device's). One clipped update then moves the sum by up
to 2 x clip, and the noise std is sigma x clip: noise multiplier sigma / 2 per round. One 0/1
popularity vector of at most m ones moves the count by up to sqrt(2 m) in L2, and the noise
std is popularity_noise x sqrt(m): multiplier popularity_noise / sqrt(2).
"""

from __future__ import annotations

import math

import dp_accounting as dpa
from dp_accounting import rdp

USER_UNIT = "all of one device's data (its update in every round it joins, its popularity vector)"
USER_RELATION = ("replace one device (all its contributions); no amplification by sampling: "
                 "the server chooses and sees the sample")
ACCOUNTANT = ("dp-accounting RDP per device: the Gaussian mechanism composed over the rounds it "
              "contributed to, plus the popularity release if it was queried")


def device_user_epsilon(rounds: int, noise_multiplier: float, delta: float,
                        popularity_noise: float | None = None) -> float:
    """Epsilon of one device after `rounds` contributions to DP-FedAvg sums (`noise_multiplier`
    relative to the clip) and, if `popularity_noise` is given, one popularity release (relative
    to sqrt(max items)); replace-one, see the module docstring."""
    events = []
    if rounds > 0:
        if noise_multiplier <= 0:
            return float("inf")
        events.append(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(noise_multiplier / 2.0),
                                              rounds))
    if popularity_noise is not None:
        if popularity_noise <= 0:
            return float("inf")
        events.append(dpa.GaussianDpEvent(popularity_noise / math.sqrt(2.0)))
    if not events:
        return 0.0
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))
