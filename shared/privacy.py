"""Privacy accounting both sides agree on, with the unit each epsilon protects stated.

Event level (device, DP-SGD): the unit is one disjoint segment of a user's history (one
training example; every event sits in exactly one). Each device keeps one ledger of every
DP-SGD step it ever took, composed across all rounds it joined (never reset per round), and
accounted with Opacus' RDP accountant under Poisson sampling (add/remove-one example).

User level (server, DP-FedAvg): the unit is a device's whole contribution in a round. Flower
samples a fixed number of devices without replacement, so we account with dp-accounting's
SampledWithoutReplacement event under the replace-one relation: replacing one clipped update
moves the sum by at most 2C, and Flower adds noise of std sigma*C to the sum, so the noise
multiplier relative to the replace-one sensitivity is sigma/2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import dp_accounting as dpa
from dp_accounting import rdp
from opacus.accountants import RDPAccountant

EVENT_UNIT = "one disjoint segment of a user's event history (one DP-SGD training example)"
EVENT_RELATION = "add/remove one segment (Poisson sampling of segments)"
USER_UNIT = "all of one device's data in a round (one client update)"
USER_RELATION = "replace one device (fixed-size sampling without replacement)"


@dataclass
class EventLedger:
    """The device's DP-SGD history: (noise_multiplier, sample_rate, steps) per training run."""

    delta: float = 1e-5
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)  # per joined round: round, steps, epsilon

    def _accountant(self, extra: tuple[float, float, int] | None = None) -> RDPAccountant:
        acc = RDPAccountant()
        acc.history = list(self.history) + ([extra] if extra else [])
        return acc

    def epsilon(self) -> float:
        if not self.history:
            return 0.0
        return float(self._accountant().get_epsilon(self.delta))

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon if a run with these parameters were added: used to refuse over-budget rounds."""
        if steps <= 0:
            return self.epsilon()
        return float(self._accountant((noise_multiplier, sample_rate, steps)).get_epsilon(
            self.delta))

    def record(self, server_round: int, noise_multiplier: float, sample_rate: float,
               steps: int) -> float:
        if steps > 0:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        eps = self.epsilon()
        self.rounds.append({"round": int(server_round), "steps": int(steps),
                            "noise_multiplier": float(noise_multiplier),
                            "sample_rate": float(sample_rate), "epsilon": eps})
        return eps

    def to_json(self) -> str:
        return json.dumps({"delta": self.delta, "history": self.history, "rounds": self.rounds,
                           "unit": EVENT_UNIT, "relation": EVENT_RELATION,
                           "accountant": "opacus RDP"})

    @classmethod
    def from_json(cls, text: str) -> EventLedger:
        d = json.loads(text)
        return cls(delta=d["delta"], history=[tuple(h) for h in d["history"]],
                   rounds=d.get("rounds", []))


def user_level_epsilon(n_devices: int, per_round: int, noise_multiplier: float, rounds: int,
                       delta: float) -> float:
    """DP-FedAvg epsilon after `rounds` rounds of Flower's fixed-size client sampling."""
    if rounds <= 0 or noise_multiplier <= 0:
        return 0.0 if rounds <= 0 else float("inf")
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    gauss = dpa.GaussianDpEvent(noise_multiplier / 2.0)
    if per_round >= n_devices:
        event = gauss
    else:
        event = dpa.SampledWithoutReplacementDpEvent(n_devices, per_round, gauss)
    acc.compose(dpa.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(delta))


def gaussian_epsilon(noise_multiplier: float, delta: float, count: int = 1) -> float:
    """Epsilon of `count` releases of a Gaussian mechanism (noise std = multiplier x L2
    sensitivity), e.g. the one-off popularity count release."""
    acc = rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(noise_multiplier), count))
    return float(acc.get_epsilon(delta))
