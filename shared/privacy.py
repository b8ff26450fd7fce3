"""Privacy accounting both sides agree on, with the unit each epsilon protects stated.

Event level (device, DP-SGD): the unit is one disjoint segment of a user's history (one
training example; every event sits in exactly one). Each device keeps one ledger of every
DP-SGD step it ever took, composed across all rounds it joined (never reset per round), and
accounted with Opacus' RDP accountant under Poisson sampling (add/remove-one example).

User level (server, DP-FedAvg): the unit is a device's whole contribution in a round. The
server samples a fixed number of devices without replacement (server/strategies.py), so we
account with dp-accounting's SampledWithoutReplacement event under the replace-one relation:
replacing one clipped update moves the sum by at most 2C, and the server adds noise of std
sigma*C to the sum, so the noise multiplier relative to the replace-one sensitivity is sigma/2.
The server draws the sample and the noise, so this epsilon holds against readers of the
released model, not against the server (docs/DESIGN.md).

The device's own ledger (`DeviceLedger`) composes every release the device takes part in, per
unit: DP-SGD steps at the event level; its update under user-level DP and the popularity count
at the user level, without amplification by sampling (the server chooses who joins). One RDP
accountant (Opacus' orders; the curves add under composition) turns it into epsilons.
The count is a distributed Skellam (shared/distributed_dp_count.py), for which dp-accounting
has no event: `RdpCurveDpEvent` carries its RDP curve (at integer orders), stored in the
ledger as it was charged; ledgers that charged the count as a Gaussian still load.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import attr
import dp_accounting as dpa
import numpy as np
from dp_accounting import rdp
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from .distributed_dp_accounting import ORDERS as CURVE_ORDERS
from .distributed_dp_accounting import count_rdp
from .distributed_dp_count import CountParams

EVENT_UNIT = ("one segment of segment_len consecutive events of a user's history, segments cut "
              "from the start of the history (one DP-SGD training example)")
EVENT_RELATION = ("add/remove one segment (Poisson sampling of segments at a fixed rate, a fixed "
                  "number of steps per round, a fixed divisor; nothing that leaves the device "
                  "depends on the number of segments); appending events changes only the last "
                  "segment; an edit inside one segment is a replacement, covered only by group "
                  "privacy over two add/remove steps")
USER_UNIT = "all of one device's data in a round (one client update)"
USER_RELATION = "replace one device (fixed-size sampling without replacement)"
DEVICE_USER_UNIT = "all of one device's data (every release it takes part in)"
DEVICE_USER_RELATION = ("add/remove or replace one device's contribution as each mechanism's "
                        "sensitivity states it, no amplification by sampling")
EVENT, USER = "event", "user"  # the units of the device ledger
LEDGER_FORMAT = "fedinterest.device-ledger/1"


@dataclass
class EventLedger:
    """The device's DP-SGD history: (noise_multiplier, sample_rate, steps) per training run."""

    delta: float = 1e-5
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)  # per joined round: round, steps, epsilon

    def _rdp(self, extra: tuple[float, float, int] | None = None) -> np.ndarray:
        """The composed RDP curve over Opacus' orders: the same sum Opacus' RDPAccountant
        forms, but each (noise, rate) pair's one-step curve is computed once per process
        (`_step_rdp`) and scaled by its steps, since RDP composes additively. Opacus
        recomputes every history entry on each call (about 1.6 s per call after 20 rounds)."""
        total = np.zeros(len(_ORDERS))
        for nm, q, steps in [*self.history, *([extra] if extra else [])]:
            total += steps * _step_rdp(float(nm), float(q))
        return total

    def epsilon(self) -> float:
        if not self.history:
            return 0.0
        return _epsilon(self._rdp(), self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon if a run with these parameters were added: used to refuse over-budget rounds."""
        if steps <= 0:
            return self.epsilon()
        return _epsilon(self._rdp((noise_multiplier, sample_rate, steps)), self.delta)

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
        """An EventLedger's JSON, or the DP-SGD part of a `DeviceLedger`'s."""
        d = json.loads(text)
        if d.get("format") == LEDGER_FORMAT:
            return DeviceLedger.from_json(text).dp_sgd_ledger()
        return cls(delta=d["delta"], history=[tuple(h) for h in d["history"]],
                   rounds=d.get("rounds", []))


def dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dpa.DpEvent:
    """`steps` DP-SGD steps: Poisson-sampled Gaussian (noise relative to the clip norm)."""
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(
        float(sample_rate), dpa.GaussianDpEvent(float(noise_multiplier))), int(steps))


def gaussian_event(noise_multiplier: float, count: int = 1) -> dpa.DpEvent:
    """`count` Gaussian releases, noise std = `noise_multiplier` x the L2 sensitivity of the
    unit's neighbouring relation (e.g. sigma / 2 for a sum of C-clipped updates under
    replace-one)."""
    return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(float(noise_multiplier)), int(count))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RdpCurveDpEvent(dpa.DpEvent):
    """A mechanism dp-accounting has no event for, given by an RDP bound: `rdp[i]` bounds its
    Renyi divergence at order `orders[i]` (ascending). `parameters` name what the curve was
    computed from (kept in the ledger for readers; the accounting uses the curve)."""

    mechanism: str
    orders: tuple[float, ...]
    rdp: tuple[float, ...]
    parameters: tuple[tuple[str, float], ...] = ()

    def at(self, orders: tuple[float, ...]) -> np.ndarray:
        """The curve at `orders`: at each order a, the bound at the smallest stored order
        >= a (Renyi divergence never decreases with the order, so that bound holds at a;
        an order above every stored one gets inf, i.e. it is not used)."""
        stored = np.asarray(self.orders, np.float64)
        values = np.asarray(self.rdp, np.float64)
        idx = np.searchsorted(stored, np.asarray(orders, np.float64) - 1e-12)
        return np.where(idx < len(stored), values[np.minimum(idx, len(stored) - 1)], np.inf)


def skellam_count_event(count: CountParams) -> RdpCurveDpEvent:
    """The popularity count as this device runs it: the distributed Skellam's RDP bound
    (`shared.distributed_dp_accounting.count_rdp`) at its sensitivities and the variance the
    device can count on; `count.replace` picks the relation (replace-one or add/remove)."""
    return RdpCurveDpEvent(
        "distributed Skellam count (Agarwal, Kairouz, Liu 2021, Thm. 3.5)",
        tuple(float(a) for a in CURVE_ORDERS), tuple(float(v) for v in count_rdp(count)),
        (("l1", count.l1_sensitivity), ("l2", count.l2_sensitivity),
         ("mu", count.central_variance), ("min_contributions", count.min_contributions),
         ("own_noise_multiplier", count.own_noise_multiplier)))


def _event_rdp(event: dpa.DpEvent) -> np.ndarray:
    """The RDP curve of a dp-accounting event at Opacus' orders (the supported kinds)."""
    if isinstance(event, RdpCurveDpEvent):
        return event.at(_ORDERS)
    if isinstance(event, dpa.SelfComposedDpEvent):
        return event.count * _event_rdp(event.event)
    if isinstance(event, dpa.ComposedDpEvent):
        return sum((_event_rdp(e) for e in event.events), np.zeros(len(_ORDERS)))
    if isinstance(event, dpa.NoOpDpEvent):
        return np.zeros(len(_ORDERS))
    if isinstance(event, dpa.GaussianDpEvent):
        return _step_rdp(float(event.noise_multiplier), 1.0)
    if isinstance(event, dpa.PoissonSampledDpEvent) and isinstance(event.event,
                                                                   dpa.GaussianDpEvent):
        return _step_rdp(float(event.event.noise_multiplier), float(event.sampling_probability))
    raise ValueError(f"the device ledger cannot account {type(event).__name__}")


def _event_to_json(event: dpa.DpEvent) -> dict:
    if isinstance(event, RdpCurveDpEvent):
        return {"rdp_curve": {"mechanism": event.mechanism, "orders": list(event.orders),
                              "rdp": list(event.rdp), "parameters": dict(event.parameters)}}
    if isinstance(event, dpa.SelfComposedDpEvent):
        return {"times": event.count, "of": _event_to_json(event.event)}
    if isinstance(event, dpa.ComposedDpEvent):
        return {"all": [_event_to_json(e) for e in event.events]}
    if isinstance(event, dpa.GaussianDpEvent):
        return {"gaussian": event.noise_multiplier}
    if isinstance(event, dpa.PoissonSampledDpEvent):
        return {"poisson": event.sampling_probability, "of": _event_to_json(event.event)}
    if isinstance(event, dpa.NoOpDpEvent):
        return {"none": True}
    raise ValueError(f"the device ledger cannot record {type(event).__name__}")


def _event_from_json(d: dict) -> dpa.DpEvent:
    if "rdp_curve" in d:
        c = d["rdp_curve"]
        if len(c["orders"]) != len(c["rdp"]) or list(c["orders"]) != sorted(c["orders"]):
            raise ValueError(f"device ledger: an RDP curve needs ascending orders, one bound "
                             f"each: {c.get('mechanism')!r}")
        return RdpCurveDpEvent(str(c["mechanism"]), tuple(float(a) for a in c["orders"]),
                               tuple(float(v) for v in c["rdp"]),
                               tuple((str(k), float(v)) for k, v in c.get("parameters",
                                                                           {}).items()))
    if "times" in d:
        return dpa.SelfComposedDpEvent(_event_from_json(d["of"]), int(d["times"]))
    if "all" in d:
        return dpa.ComposedDpEvent([_event_from_json(e) for e in d["all"]])
    if "gaussian" in d:
        return dpa.GaussianDpEvent(float(d["gaussian"]))
    if "poisson" in d:
        return dpa.PoissonSampledDpEvent(float(d["poisson"]), _event_from_json(d["of"]))
    if d.get("none"):
        return dpa.NoOpDpEvent()
    raise ValueError(f"device ledger: unknown event {d!r}")


@dataclass
class DeviceLedger:
    """Every release one device took part in, per unit (EVENT, USER), and the rounds it
    answered. Kept in the device's store as a versioned blob (client/store.py), so an older
    copy put back or a deleted one is detected.

    Each charge: {"round", "label", "event" (dp-accounting event as JSON), "epsilon" (of its
    unit after it)}. `answered`: [run id, round, stage] of every round the device answered,
    so a replayed round is declined (client/device.py)."""

    delta: float = 1e-5
    charges: dict[str, list[dict]] = field(default_factory=lambda: {EVENT: [], USER: []})
    answered: list[list] = field(default_factory=list)

    def _rdp(self, unit: str, extra: dpa.DpEvent | None = None) -> np.ndarray:
        total = np.zeros(len(_ORDERS))
        for c in self.charges[unit]:
            total += _event_rdp(_event_from_json(c["event"]))
        return total + (_event_rdp(extra) if extra is not None else 0.0)

    def epsilon(self, unit: str, delta: float | None = None) -> float:
        """The unit's epsilon over every charge so far, at `delta` (default: the ledger's)."""
        if not self.charges[unit]:
            return 0.0
        return _epsilon(self._rdp(unit), self.delta if delta is None else delta)

    def epsilon_after(self, unit: str, event: dpa.DpEvent, delta: float | None = None) -> float:
        """The unit's epsilon if `event` were charged: to decline before releasing."""
        return _epsilon(self._rdp(unit, event), self.delta if delta is None else delta)

    def charge(self, unit: str, event: dpa.DpEvent, label: str, server_round: int) -> float:
        """Record a release; returns the unit's epsilon after it."""
        self.charges[unit].append({"round": int(server_round), "label": str(label),
                                   "event": _event_to_json(event)})
        eps = self.epsilon(unit)
        self.charges[unit][-1]["epsilon"] = eps
        return eps

    def answered_before(self, run_id: int, server_round: int, stage: str) -> bool:
        return [int(run_id), int(server_round), str(stage)] in self.answered

    def mark_answered(self, run_id: int, server_round: int, stage: str) -> None:
        self.answered.append([int(run_id), int(server_round), str(stage)])

    def event_view(self, deltas: tuple[float, ...] = ()) -> EventView:
        """The EventLedger interface DP-SGD training uses (client/dp_training.py), charging
        this ledger's EVENT unit; budget checks take the largest epsilon over `deltas` too."""
        return EventView(self, tuple(deltas))

    def dp_sgd_ledger(self) -> EventLedger:
        """The DP-SGD charges as an EventLedger (same epsilons), for readers of that format."""
        led = EventLedger(delta=self.delta)
        for c in self.charges[EVENT]:
            ev = c["event"]
            if c["label"] != "dp-sgd":
                continue
            nm, q, steps = ev["of"]["of"]["gaussian"], ev["of"]["poisson"], ev["times"]
            led.record(c["round"], nm, q, steps)
        return led

    def to_json(self) -> str:
        return json.dumps({"format": LEDGER_FORMAT, "delta": self.delta,
                           "units": {EVENT: [EVENT_UNIT, EVENT_RELATION],
                                     USER: [DEVICE_USER_UNIT, DEVICE_USER_RELATION]},
                           "accountant": "RDP (Opacus orders)", "charges": self.charges,
                           "answered": self.answered})

    @classmethod
    def from_json(cls, text: str) -> DeviceLedger:
        """A DeviceLedger, or an older EventLedger's JSON (its DP-SGD history carried over)."""
        d = json.loads(text)
        if d.get("format") == LEDGER_FORMAT:
            return cls(delta=float(d["delta"]), charges={EVENT: [], USER: [], **d["charges"]},
                       answered=[list(a) for a in d.get("answered", [])])
        led = cls(delta=float(d["delta"]))
        rounds = [r for r in d.get("rounds", []) if r.get("steps", 0) > 0]
        history = [tuple(h) for h in d["history"]]
        for i, (nm, q, steps) in enumerate(history):
            rnd = rounds[i]["round"] if i < len(rounds) else 0
            led.charge(EVENT, dp_sgd_event(nm, q, steps), "dp-sgd", rnd)
        return led


class EventView:
    """EventLedger's interface over a DeviceLedger's EVENT unit (see `event_view`)."""

    def __init__(self, ledger: DeviceLedger, deltas: tuple[float, ...]):
        self.ledger, self.delta = ledger, ledger.delta
        self._deltas = (ledger.delta, *deltas)

    def epsilon(self) -> float:
        return self.ledger.epsilon(EVENT)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        event = dp_sgd_event(noise_multiplier, sample_rate, steps)
        return max(self.ledger.epsilon_after(EVENT, event, d) for d in self._deltas)

    def record(self, server_round: int, noise_multiplier: float, sample_rate: float,
               steps: int) -> float:
        if steps <= 0:
            return self.epsilon()
        return self.ledger.charge(EVENT, dp_sgd_event(noise_multiplier, sample_rate, steps),
                                  "dp-sgd", server_round)


_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=1024)
def _step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at each of Opacus' default orders."""
    curve = opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                   orders=list(_ORDERS))
    curve = np.asarray(curve, dtype=np.float64)
    curve.setflags(write=False)  # shared by every caller of the cache
    return curve


def _epsilon(rdp_curve: np.ndarray, delta: float) -> float:
    eps, _ = opacus_rdp.get_privacy_spent(orders=list(_ORDERS), rdp=rdp_curve, delta=delta)
    return float(eps)


def user_level_epsilon(n_devices: int, per_round: int, noise_multiplier: float, rounds: int,
                       delta: float) -> float:
    """DP-FedAvg epsilon after `rounds` rounds of fixed-size sampling of `per_round` of
    `n_devices` devices without replacement, noise multiplier `noise_multiplier` on the sum."""
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
    sensitivity), e.g. an older run's server-noised popularity release (the audit)."""
    acc = rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(noise_multiplier), count))
    return float(acc.get_epsilon(delta))
