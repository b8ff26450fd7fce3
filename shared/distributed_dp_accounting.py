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
RDP converts to (epsilon, delta) as Opacus' accountant does (Balle et al. 2020).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

import numpy as np
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy.special import gammaln, logsumexp

from .distributed_dp import DDPParams

ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256)
DDP_EVENT_UNIT = "one disjoint segment of a user's event history (one DP-FedSGD example)"
DDP_EVENT_RELATION = ("add/remove one segment; the device Poisson-samples segments at rate q "
                      "with OS randomness and the server sees only the SecAgg+ sum")
DDP_USER_UNIT = "all of one device's data (its clipped round update)"
DDP_USER_RELATION = "add/remove one device; no amplification from the server's sampling"
THREAT_MODEL = ("the server and the wire see only the SecAgg+ sum, which carries the full "
                "noise if at least min_contributions honest devices add their shares")


def skellam_rdp(order: int, l1: float, l2: float, mu: float) -> float:
    """Agarwal, Kairouz, Liu 2021: RDP of the Skellam mechanism at integer `order`."""
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
    eps, _ = opacus_rdp.get_privacy_spent(orders=list(ORDERS), rdp=curve, delta=delta)
    return float(eps)


def ddp_epsilon(params: DDPParams, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` joined rounds with the same parameters."""
    if rounds <= 0:
        return 0.0
    return rdp_to_epsilon(rounds * np.asarray(round_rdp(params, sample_rate)), delta)


@dataclass
class DDPLedger:
    """A device's distributed-DP history: one entry per joined round, composed in RDP. Kept in
    the device's store next to the local DP-SGD ledger and never reset by `forget`."""

    delta: float = 1e-5
    unit: str = "event"  # "event" or "user"
    rounds: list[dict] = field(default_factory=list)

    def _curve(self, extra: tuple[DDPParams, float] | None = None) -> np.ndarray:
        total = np.zeros(len(ORDERS))
        entries = [(_params(r), r["sample_rate"]) for r in self.rounds]
        for params, q in [*entries, *([extra] if extra else [])]:
            total += np.asarray(round_rdp(params, q))
        return total

    def epsilon(self) -> float:
        return rdp_to_epsilon(self._curve(), self.delta) if self.rounds else 0.0

    def epsilon_after(self, params: DDPParams, sample_rate: float) -> float:
        return rdp_to_epsilon(self._curve((params, sample_rate)), self.delta)

    def record(self, server_round: int, params: DDPParams, sample_rate: float) -> float:
        self.rounds.append({"round": int(server_round), "sample_rate": float(sample_rate),
                            "params": params.__dict__.copy()})
        eps = self.epsilon()
        self.rounds[-1]["epsilon"] = eps
        return eps

    def to_json(self) -> str:
        return json.dumps({"delta": self.delta, "unit": self.unit, "rounds": self.rounds,
                           "accountant": "Skellam RDP (Agarwal et al. 2021), Poisson "
                                         "subsampling (Zhu & Wang 2019) at event level"})

    @classmethod
    def from_json(cls, text: str) -> DDPLedger:
        d = json.loads(text)
        return cls(delta=d["delta"], unit=d["unit"], rounds=list(d["rounds"]))


def _params(entry: dict) -> DDPParams:
    return DDPParams(**entry["params"])
