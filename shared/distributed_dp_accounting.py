"""Privacy accounting of distributed DP (shared/distributed_dp.py): the Skellam mechanism's RDP,
amplified by the device's own Poisson sampling at event level, composed over the rounds a
device joined. Every device can compute its own epsilon from public parameters and refuse.

- Skellam RDP (Agarwal, Kairouz, Liu 2021, Thm. 3.5 / Cor. 3.6): for integer order a > 1,
  integer L2 / L1 sensitivities D2, D1 and total per-coordinate variance mu,
      eps(a) <= a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu));
  the first term is the Gaussian's, so for large mu it tends to the Gaussian mechanism with
  noise multiplier sqrt(mu) / D2 (tests/privacy/test_distributed_dp.py checks that limit).
- Event level (unit: one training segment; add/remove one segment): each device samples its
  segments with probability q from the OS CSPRNG and nothing that depends on how many it has
  leaves it, so the server, which sees only the noisy sum, cannot tell which segments were
  drawn: Poisson subsampling amplifies. We use the general upper bound of Zhu & Wang 2019
  ("Poisson Subsampled Renyi Differential Privacy", Thm. 6), valid for any base mechanism.
- User level (unit: all of a device's data; add/remove one device): the server chooses the
  devices, so no amplification: every round a device joins costs the full Skellam RDP.
- The popularity count (shared/distributed_dp_count.py) is charged to the same ledger: each
  device adds a Skellam share to its scaled 0/1 vector, so the released cohort sum is the
  same Skellam mechanism (RDP `count_rdp`) with the count's integer sensitivities: at the user
  unit add/remove one device (L2 gamma sqrt(max_items), L1 gamma max_items); at the event unit
  any change of one device's data, one segment included, can replace its vector by another
  subset (L2 gamma sqrt(2 max_items), L1 2 gamma max_items), which covers every event-level
  neighbour. No amplification (the server chooses the devices it counts).
RDP converts to (epsilon, delta) as Opacus' accountant does (Balle et al. 2020).

Orders below 2 are not used: the Skellam bound above (Agarwal et al. 2021, Thm. 3.5) and
the Zhu-Wang amplification are proven for integer orders only, and RDP's monotonicity in the
order gives nothing below 2 (eps(a) <= eps(2) makes the conversion at a < 2 worse than at 2).
So the conversion may pick order 2; `rdp_to_epsilon` says so without Opacus' warning, which
suggests adding orders the bound does not cover.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy.special import gammaln, logsumexp

from .config import RunConfig
from .distributed_dp import DDPParams, accounting_sample_rate, params_for
from .distributed_dp_count import CountParams, count_params
from .noise_calibration import smallest_noise

ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256)
DDP_EVENT_UNIT = "one disjoint segment of a user's event history (one DP-FedSGD example)"
DDP_EVENT_RELATION = ("add/remove one segment; the device Poisson-samples segments at rate q "
                      "with OS randomness and the server sees only the SecAgg+ sum")
DDP_USER_UNIT = "all of one device's data (its clipped round update)"
DDP_USER_RELATION = "add/remove one device; no amplification from the server's sampling"
THREAT_MODEL = ("the server and the wire see only the SecAgg+ sum, which carries the full "
                "noise if at least min_contributions honest devices add their shares")


def count_noise_multiplier(cfg: RunConfig) -> float:
    """The popularity count's effective multiplier (noise std / L2 sensitivity) at the run's
    distributed-DP unit: popularity_noise at the user unit, popularity_noise / sqrt(2) at the
    event unit (replace-one bound, which covers every event-level neighbour)."""
    if cfg.dp == "ddp-event":
        return cfg.popularity_noise / math.sqrt(2.0)
    return cfg.popularity_noise


def gaussian_rdp(noise_multiplier: float) -> tuple[float, ...]:
    """RDP curve over ORDERS of one Gaussian release (std = multiplier x L2 sensitivity)."""
    if noise_multiplier <= 0:
        return tuple(math.inf for _ in ORDERS)
    return tuple(a / (2.0 * noise_multiplier**2) for a in ORDERS)


def count_rdp(count: CountParams) -> tuple[float, ...]:
    """RDP curve over ORDERS of the distributed count: the Skellam bound at the count's
    integer sensitivities and the variance the device can count on (no amplification)."""
    return skellam_curve(count.l1_sensitivity, count.l2_sensitivity, count.central_variance)


def skellam_curve(l1: float, l2: float, mu: float) -> tuple[float, ...]:
    if mu <= 0:
        return tuple(math.inf for _ in ORDERS)
    return tuple(skellam_rdp(a, l1, l2, mu) for a in ORDERS)


def skellam_rdp(order: int, l1: float, l2: float, mu: float) -> float:
    """Agarwal, Kairouz, Liu 2021: RDP of the Skellam mechanism at integer `order`."""
    if order != int(order) or order < 2:
        raise ValueError(f"the Skellam RDP bound holds at integer orders >= 2, not {order}")
    a = int(order)
    return a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2),
                                      3 * l1 / (2 * mu))


def poisson_subsampled_rdp(order: int, q: float, rdp_of) -> float:
    """Zhu & Wang 2019, Thm. 6: RDP at integer `order` of a mechanism with RDP curve `rdp_of`
    run on a Poisson subsample of rate q (add/remove relation); never above the unsampled one."""
    a = int(order)
    base = rdp_of(a)
    if q >= 1.0:
        return base
    if q <= 0.0:
        return 0.0
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [(a - 1) * log_1q + math.log1p((a - 1) * q),  # (1-q)^(a-1) (aq - q + 1)
             _log_comb(a, 2) + 2 * log_q + (a - 2) * log_1q + rdp_of(2)]
    for j in range(3, a + 1):
        terms.append(math.log(3.0) + _log_comb(a, j) + j * log_q + (a - j) * log_1q
                     + (j - 1) * rdp_of(j))
    return min(base, float(logsumexp(terms)) / (a - 1))


def _log_comb(n: int, k: int) -> float:
    return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))


@functools.lru_cache(maxsize=256)
def round_rdp(params: DDPParams, sample_rate: float) -> tuple[float, ...]:
    """One round's RDP curve over ORDERS (sample_rate 1 = no amplification, user level)."""
    l1, l2, mu = params.l1_sensitivity, params.l2_sensitivity, params.central_variance
    if mu <= 0:
        return tuple(math.inf for _ in ORDERS)
    base = functools.lru_cache(maxsize=None)(lambda a: skellam_rdp(a, l1, l2, mu))
    return tuple(poisson_subsampled_rdp(a, sample_rate, base) for a in ORDERS)


def rdp_to_epsilon(curve: np.ndarray, delta: float) -> float:
    if not np.all(np.isfinite(curve)):
        return math.inf
    with warnings.catch_warnings():  # order 2 is the smallest the bound allows (module doc)
        warnings.filterwarnings("ignore", message="Optimal order is the smallest")
        eps, _ = opacus_rdp.get_privacy_spent(orders=list(ORDERS), rdp=curve, delta=delta)
    return float(eps)


def ddp_epsilon(params: DDPParams, sample_rate: float, rounds: int, delta: float,
                count: CountParams | None = None) -> float:
    """Epsilon after `rounds` joined rounds with the same parameters, composed with the
    popularity count's Skellam release `count` when the device was counted."""
    curve = rounds * np.asarray(round_rdp(params, sample_rate)) if rounds > 0 else \
        np.zeros(len(ORDERS))
    if count is not None:
        curve = curve + np.asarray(count_rdp(count))
    elif rounds <= 0:
        return 0.0
    return rdp_to_epsilon(curve, delta)


def count_epsilon(count: CountParams, delta: float) -> float:
    """The count's epsilon alone (one release, no amplification)."""
    return rdp_to_epsilon(np.asarray(count_rdp(count)), delta)


def run_epsilon(cfg: RunConfig, dim: int, rounds: int, counted: bool | None = None) -> float:
    """A device's epsilon under `cfg` after `rounds` rounds and, when `counted` (default: the
    run has a popularity release), the popularity count at the config's noise: what its
    ledger would show (a device whose policy floor raises its count noise shows less)."""
    counted = cfg.popularity if counted is None else counted
    return ddp_epsilon(params_for(cfg, dim), accounting_sample_rate(cfg), rounds, cfg.delta,
                       count_params(cfg) if counted else None)


def calibrate_noise(cfg: RunConfig, dim: int, epsilon: float, rounds: int,
                    lo: float = 0.3, hi: float = 100.0) -> float:
    """Smallest training noise multiplier (the unit's: `noise_multiplier` at event level,
    `user_noise_multiplier` at user level; bisection to 0.5%) with which a device that joins
    `rounds` rounds, and the popularity count if the run has one, stays within `epsilon`."""
    key = "noise_multiplier" if cfg.dp == "ddp-event" else "user_noise_multiplier"

    def eps(nm: float) -> float:
        return run_epsilon(dataclasses.replace(cfg, **{key: nm}), dim, rounds)

    try:
        hi = smallest_noise(eps, epsilon, lo, hi)
    except ValueError:
        raise ValueError(f"epsilon {epsilon:g} is out of reach with {rounds} round(s) and the "
                         f"count at popularity_noise {cfg.popularity_noise:g}, even with "
                         f"noise multiplier {hi:g}") from None
    return round(hi, 3) if eps(round(hi, 3)) <= epsilon else hi


@dataclass
class DDPLedger:
    """A device's distributed-DP history: one entry per joined round, composed in RDP. Kept in
    the device's store next to the local DP-SGD ledger and never reset by `forget`."""

    delta: float = 1e-5
    unit: str = "event"  # "event" or "user"
    rounds: list[dict] = field(default_factory=list)
    # other releases charged here: the popularity count, {"round", "label",
    # "noise_multiplier" (effective), "l1", "l2", "mu"} (a Skellam; without "mu": a Gaussian
    # of that multiplier, as ledgers kept before the count's noise moved to the devices)
    releases: list[dict] = field(default_factory=list)

    def _curve(self, extra: tuple[DDPParams, float] | None = None,
               extra_count: CountParams | None = None) -> np.ndarray:
        total = np.zeros(len(ORDERS))
        entries = [(_params(r), r["sample_rate"]) for r in self.rounds]
        for params, q in [*entries, *([extra] if extra else [])]:
            total += np.asarray(round_rdp(params, q))
        for r in self.releases:
            total += np.asarray(skellam_curve(r["l1"], r["l2"], r["mu"]) if "mu" in r
                                else gaussian_rdp(r["noise_multiplier"]))
        if extra_count is not None:
            total += np.asarray(count_rdp(extra_count))
        return total

    def epsilon(self) -> float:
        if not (self.rounds or self.releases):
            return 0.0
        return rdp_to_epsilon(self._curve(), self.delta)

    def epsilon_after(self, params: DDPParams, sample_rate: float) -> float:
        return rdp_to_epsilon(self._curve((params, sample_rate)), self.delta)

    def epsilon_after_release(self, count: CountParams) -> float:
        """The epsilon after the popularity count `count` too."""
        return rdp_to_epsilon(self._curve(extra_count=count), self.delta)

    def record_release(self, server_round: int, label: str, count: CountParams) -> float:
        self.releases.append({"round": int(server_round), "label": label,
                              "noise_multiplier": count.effective_noise_multiplier,
                              "own_noise_multiplier": count.own_noise_multiplier,
                              "l1": count.l1_sensitivity, "l2": count.l2_sensitivity,
                              "mu": count.central_variance})
        eps = self.epsilon()
        self.releases[-1]["epsilon"] = eps
        return eps

    def record(self, server_round: int, params: DDPParams, sample_rate: float) -> float:
        self.rounds.append({"round": int(server_round), "sample_rate": float(sample_rate),
                            "params": params.__dict__.copy()})
        eps = self.epsilon()
        self.rounds[-1]["epsilon"] = eps
        return eps

    def to_json(self) -> str:
        return json.dumps({"delta": self.delta, "unit": self.unit, "rounds": self.rounds,
                           "releases": self.releases,
                           "accountant": "Skellam RDP (Agarwal et al. 2021), Poisson "
                                         "subsampling (Zhu & Wang 2019) at event level; "
                                         "the popularity count is a Skellam too"})

    @classmethod
    def from_json(cls, text: str) -> DDPLedger:
        d = json.loads(text)
        return cls(delta=d["delta"], unit=d["unit"], rounds=list(d["rounds"]),
                   releases=list(d.get("releases", [])))


def _params(entry: dict) -> DDPParams:
    return DDPParams(**entry["params"])
