"""The smallest noise multiplier within a budget: one bisection for every accountant.

Every calibration in the project (on-device DP-SGD, DP-FedAvg, distributed DP, the privacy
table's cells) asks the same question of a different epsilon function that falls as the noise
grows; this answers it once, always from above, so a calibrated noise never overspends.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def smallest_noise(spent: Callable[[float], float], epsilon: float, lo: float = 0.3,
                   hi: float = 100.0, precision: float = 1.005) -> float:
    """The smallest noise multiplier z (bisection on a log scale, to the ratio `precision`)
    with `spent(z) <= epsilon`. Returns the bracket's upper end, which never spends more than
    `epsilon`. ValueError if even `hi` does."""
    if spent(hi) > epsilon:
        raise ValueError(f"epsilon {epsilon:g} is out of reach even with noise multiplier {hi:g}")
    while hi / lo > precision:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if spent(mid) > epsilon else (lo, mid)
    return hi
