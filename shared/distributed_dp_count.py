"""The popularity count under distributed DP, in every dp mode: each device noises its own
bounded 0/1 item vector before SecAgg+ masks it, so the cohort sum the server unmasks already
carries the count's full noise (server/popularity_round.py only post-processes it). One
mechanism whatever the run's model training does: the server never adds the count's noise.

Mechanism (the model payload's, shared/distributed_dp.py, on a vector that is already integer):
1. the device's vector v has at most k = `popularity_max_items` ones
   (`shared.secure_protocol.contribution`); it scales it by an integer gamma (`count_scale`),
   so no rounding is needed and the sensitivities are exact;
2. it adds a symmetric Skellam share of variance mu / m per coordinate, where
   mu = (sigma gamma)^2 k is the released sum's variance (sigma = `popularity_noise`, so the
   noise std in counts is sigma sqrt(k)) and m the fewest contributions a cohort accepts:
   any m shares sum to a Skellam of variance >= mu; a cohort with fewer releases nothing (the
   server drops it, every device refuses to unmask it: client/ddp_mod.py);
3. it reduces the integers mod Q = 2**30 and uploads them as the model payload is uploaded
   (`DDP_QUANTISATION`: Flower's quantiser maps them to themselves).

m: the round config asks for ceil(`ddp_min_fraction` x `popularity_cohort`)
(`count_min_contributions`); a device sizes its share for at most its policy's
`max_assumed_honest` (`count_params(..., max_honest=)`): a server that claims a larger m gets
shares sized for the policy's m (more noise; the variance mu is the same, so the accounting
is too), and the trust assumption "at least m honest devices" stays the device's.

The server forms cohorts of at least `popularity_cohort` devices where it can (fewer devices
than that make one cohort, which releases only with m of them), and at most `MAX_COHORT`.
The active devices a device is told at UNMASK are its SecAgg+ neighbours, a lower bound on
the cohort's: so the device's check that at least m are active never under-counts the noise.

Sensitivities (integer units): add/remove one device: L2 gamma sqrt(k), L1 gamma k. Replace
one device, or (event unit) any change of a device's data, one segment included, turns its
vector into another subset of at most k items: L2 gamma sqrt(2k), L1 2 gamma k.

The device's own floor: a device whose policy asks for more count noise than the round config
(`min_noise["popularity-count"]`) adds its share at its floor, and accounts only what it can
count on, its own share plus m - 1 shares at the config's noise:
mu_device = gamma^2 k ((m - 1) sigma^2 + sigma_own^2) / m >= mu.

Wrap-around: the release is the sum mod Q, a function of the Skellam mechanism's output, so
privacy holds whatever wraps. Utility: a coordinate decodes exactly when |sum| < Q/2. The
signal is at most n gamma for n <= MAX_COHORT contributors; `count_scale` picks gamma <=
2**16 so that MAX_COHORT gamma <= Q/8 and 12 standard deviations of the noise of MAX_COHORT
shares (variance MAX_COHORT mu / m) stay below 3Q/8; a Skellam of variance V exceeds t
with probability <= 2 exp(-t^2 / (2 (V + t/3))) (Bernstein), about 1e-31 at t = 12 sqrt(V).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .config import RunConfig
from .distributed_dp import NOISE_TAIL_SDS, Q, skellam
from .secure_protocol import MAX_SHARES

MAX_COHORT = MAX_SHARES  # one SecAgg+ neighbourhood
MAX_COUNT_SCALE = 2**16  # gamma's cap: the Skellam's excess over the Gaussian is ~1/gamma^2


@dataclass(frozen=True)
class CountParams:
    """One count cohort's distributed-DP parameters as a device (or the server) sees them.

    noise_multiplier: sigma, the config's (every honest device adds at least this);
    own_noise_multiplier: this device's (its policy floor if higher; the server: sigma);
    max_items: k; min_contributions: m of the cohort; scale: gamma (an integer);
    replace: the event unit's replace-one sensitivity (True) or add/remove one device."""

    noise_multiplier: float
    own_noise_multiplier: float
    max_items: int
    min_contributions: int
    scale: int
    replace: bool

    @property
    def central_variance(self) -> float:
        """mu: the released sum's Skellam variance per coordinate (integer units) that this
        device can count on: its own share and m - 1 shares at the config's noise."""
        m, k, g = self.min_contributions, self.max_items, self.scale
        return g * g * k * ((m - 1) * self.noise_multiplier**2
                            + self.own_noise_multiplier**2) / m

    @property
    def share_variance(self) -> float:
        """The Skellam variance of this device's share."""
        return (self.own_noise_multiplier * self.scale) ** 2 * self.max_items \
            / self.min_contributions

    @property
    def l2_sensitivity(self) -> float:
        return self.scale * math.sqrt(self.max_items * (2 if self.replace else 1))

    @property
    def l1_sensitivity(self) -> float:
        return float(self.scale * self.max_items * (2 if self.replace else 1))

    @property
    def released_noise_multiplier(self) -> float:
        """The released count's noise std / sqrt(k), in counts (popularity_noise's unit)."""
        return math.sqrt(self.central_variance / self.max_items) / self.scale

    @property
    def effective_noise_multiplier(self) -> float:
        """sqrt(mu) / L2 sensitivity: the Gaussian this Skellam approaches."""
        return math.sqrt(self.central_variance) / self.l2_sensitivity


def count_min_contributions(cfg: RunConfig) -> int:
    """m of the count: ceil(ddp_min_fraction x popularity_cohort), at least 1."""
    if not 1 <= cfg.popularity_cohort <= MAX_COHORT:
        raise ValueError(f"popularity_cohort: a distributed-DP count cohort has 1 to "
                         f"{MAX_COHORT} devices (one SecAgg+ neighbourhood), not "
                         f"{cfg.popularity_cohort}")
    return max(1, math.ceil(cfg.ddp_min_fraction * cfg.popularity_cohort - 1e-9))


def count_scale(cfg: RunConfig) -> int:
    """gamma: a power of two <= MAX_COUNT_SCALE that keeps MAX_COHORT contributions (signal
    Q/8) and 12 standard deviations of their shares (noise 3Q/8) inside Q/2 (module doc).
    Public: every device and the server compute it from the run config."""
    per_unit_sd = cfg.popularity_noise * math.sqrt(cfg.popularity_max_items * MAX_COHORT
                                                   / count_min_contributions(cfg))
    limit = (Q / 8) / MAX_COHORT
    if per_unit_sd > 0:
        limit = min(limit, (3 * Q / 8) / (NOISE_TAIL_SDS * per_unit_sd))
    if limit < 1:
        raise ValueError(f"popularity_noise {cfg.popularity_noise:g} with popularity_max_items "
                         f"{cfg.popularity_max_items} does not fit the modulus 2**30")
    return int(min(MAX_COUNT_SCALE, 2 ** math.floor(math.log2(limit))))


def count_params(cfg: RunConfig, floor: float = 0.0, max_honest: int | None = None,
                 replace: bool | None = None) -> CountParams:
    """The count's parameters under `cfg` (any dp mode), as a device runs them: the policy's
    noise `floor` applied to its own share (0: the config's noise) and m capped at the
    policy's `max_honest` (None: the config's m; what the server and the audit account).
    `replace`: the relation, replace-one (True) or add/remove one device (False); default
    the ledger the count is charged to: replace-one at ddp-event's unit, else add/remove."""
    sigma = float(cfg.popularity_noise)
    m = count_min_contributions(cfg)
    if max_honest is not None:
        if max_honest < 1:
            raise ValueError(f"max_honest = {max_honest}: a share is sized for >= 1 device")
        m = min(m, int(max_honest))
    return CountParams(noise_multiplier=sigma, own_noise_multiplier=max(sigma, float(floor)),
                       max_items=int(cfg.popularity_max_items), min_contributions=m,
                       scale=count_scale(cfg),
                       replace=cfg.dp == "ddp-event" if replace is None else bool(replace))


def noisy_count(vector: np.ndarray, params: CountParams,
                rng: np.random.Generator) -> np.ndarray:
    """gamma v + this device's Skellam share: int64, the count payload before mod Q."""
    v = np.asarray(vector)
    if not np.all((v == 0) | (v == 1)) or int(v.sum()) > params.max_items:
        raise ValueError(f"a count contribution is a 0/1 vector with at most "
                         f"{params.max_items} ones")
    return v.astype(np.int64) * params.scale + skellam(v.shape, params.share_variance, rng)


def plausible_sum(total: np.ndarray, n: int, params: CountParams) -> bool:
    """Whether an unmasked cohort sum can be n honest noisy counts: every coordinate within
    [-t, n gamma + t], t = 12 standard deviations of n shares at the config's noise, and the
    total signal n k gamma within the same tail. A device outside the protocol can add
    anything mod Q; an honest sum fails this with probability about 1e-31 per coordinate."""
    share = dataclasses.replace(params, own_noise_multiplier=params.noise_multiplier).share_variance
    t = NOISE_TAIL_SDS * math.sqrt(n * share)
    t_total = NOISE_TAIL_SDS * math.sqrt(n * share * total.size)
    return bool(total.min() >= -t and total.max() <= n * params.scale + t
                and total.sum() <= n * params.max_items * params.scale + t_total)
