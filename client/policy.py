"""The device's privacy policy: what the device owner allows, never what the server asks.

Set at provisioning (`Device.set_policy`; `Device.open` gives a new store `PrivacyPolicy()`,
the strict default) and kept encrypted in the device's store. A round config from the server
is a *request*: `review` declines any request weaker than the policy (DP off or a mode the
policy does not allow, noise below its minimum, a clip above its maximum, a budget above its
maximum, a delta above its own) with a `DeclineReason`, a small integer from a closed enum,
the only thing about the decline that leaves the device. A stronger request is followed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Self

from fedinterest.shared.config import DP_MODES, RunConfig
from fedinterest.shared.errors import ConfigError

POLICY_BLOB = "privacy-policy"
EVENT, USER = "event", "user"  # the units of shared.privacy.DeviceLedger (not imported here:
# the accountants take seconds to import, and recording or recommending needs none)
# mechanisms with a minimum noise multiplier: DP-SGD on the device (event level), the user-level
# Gaussian on the sum of clipped updates, the popularity count's noise (the device's own share)
MECHANISMS = ("dp-sgd", "user-gaussian", "popularity-count")


class DeclineReason(IntEnum):
    """Why a device declined a round; the server sees only the number (`decline-reason`)."""

    NONE = 0
    MODE_NOT_ALLOWED = 1  # dp off, or a mode the policy does not allow
    NOISE_TOO_LOW = 2  # a noise multiplier below the policy's minimum for its mechanism
    CLIP_TOO_LARGE = 3  # a per-example clip above the policy's maximum
    BUDGET_TOO_HIGH = 4  # a requested budget above the policy's maximum for its unit
    DELTA_TOO_HIGH = 5  # a delta above the policy's
    BUDGET_SPENT = 6  # the round would take the ledger past the budget
    ROUND_REPLAYED = 7  # this run's round was answered before
    LEDGER_UNTRUSTED = 8  # the ledger was rolled back, deleted or edited
    NO_DATA = 9  # too few events to train on


class Decline(str):
    """A decline: the text stays on the device (logs), `reason` is what the server sees."""

    reason: DeclineReason

    def __new__(cls, reason: DeclineReason, text: str) -> Self:
        obj = super().__new__(cls, text)
        obj.reason = reason
        return obj


def decline_reason(refused: str | None) -> DeclineReason:
    """The reason code of a TrainResult.refused (NONE when the round was trained)."""
    if not refused:
        return DeclineReason.NONE
    return getattr(refused, "reason", DeclineReason.BUDGET_SPENT)


# The most honest devices a device relies on for a distributed-DP noise share by default:
# today's default m (the count's, ceil(0.8 x 31) = 25; the default train round's is 8 <= 25).
DEFAULT_MAX_ASSUMED_HONEST = 25


def _default_min_noise() -> dict[str, float]:
    return {"dp-sgd": 0.5, "user-gaussian": 0.5, "popularity-count": 1.0}


@dataclass(frozen=True)
class PrivacyPolicy:
    """What this device accepts. Defaults are strict: DP on the device always.

    Attributes:
        allowed_modes: RunConfig.dp values the device takes part in; "off" only if listed and
            `allow_off`. Default: DP-SGD on the device ("event", "both").
        allow_off: whether a round without any DP may train at all (default False).
        min_noise: minimum noise multiplier per mechanism (MECHANISMS).
        max_clip: maximum per-example L2 clip of DP-SGD.
        max_epsilon: maximum epsilon per unit ("event", "user") over the device's lifetime.
        delta: the delta every epsilon of this device is accounted at (a request may ask for a
            smaller one, which the budget check then also honours; never a larger one).
        min_secagg_contributors: fewest devices a SecAgg+ release may sum.
        max_assumed_honest: the most honest devices this device relies on to add noise
            shares to a distributed-DP sum (the popularity count in every mode, the
            ddp-event / ddp-user rounds): it sizes its share for m = min(the round's m, this),
            so its share variance is at least the released variance / this, whatever m the
            server claims, and refuses to unmask a sum of fewer than that m devices.
        reproducible_seeds: experiments only: derive training randomness from a device secret
            and (run seed, round) so a run repeats; off, it comes from the OS CSPRNG.
    """

    allowed_modes: tuple[str, ...] = ("event", "both")
    allow_off: bool = False
    min_noise: dict[str, float] = field(default_factory=_default_min_noise)
    max_clip: float = 1.0
    max_epsilon: dict[str, float] = field(
        default_factory=lambda: {EVENT: 8.0, USER: 8.0})
    delta: float = 1e-5
    min_secagg_contributors: int = 3
    max_assumed_honest: int = DEFAULT_MAX_ASSUMED_HONEST
    reproducible_seeds: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_modes", tuple(self.allowed_modes))
        object.__setattr__(self, "min_noise", {**_default_min_noise(), **self.min_noise})
        object.__setattr__(self, "max_epsilon", {EVENT: 8.0, USER: 8.0, **self.max_epsilon})
        self._validate()

    def _validate(self) -> None:
        bad = [m for m in self.allowed_modes if m not in DP_MODES]
        if bad or not self.allowed_modes:
            raise ConfigError(f"privacy policy: allowed_modes {list(self.allowed_modes)}: "
                              f"expected a non-empty subset of {list(DP_MODES)}")
        if "off" in self.allowed_modes and not self.allow_off:
            raise ConfigError("privacy policy: allowed_modes lists 'off' but allow_off is "
                              "False; set allow_off=True to let rounds train without DP")
        for name, v in self.min_noise.items():
            if name not in MECHANISMS or not _number(v) or v < 0:
                raise ConfigError(f"privacy policy: min_noise[{name!r}] = {v!r}: expected a "
                                  f"number >= 0 for one of {list(MECHANISMS)}")
        for unit, v in self.max_epsilon.items():  # inf: no maximum (a non-DP experiment)
            if unit not in (EVENT, USER) or not (_number(v) or v == math.inf) or not v > 0:
                raise ConfigError(f"privacy policy: max_epsilon[{unit!r}] = {v!r}: expected "
                                  "a positive number (or inf) for 'event' or 'user'")
        if not _number(self.max_clip) or self.max_clip <= 0:
            raise ConfigError(f"privacy policy: max_clip = {self.max_clip!r}: expected > 0")
        if not _number(self.delta) or not 0 < self.delta < 1:
            raise ConfigError(f"privacy policy: delta = {self.delta!r}: expected in (0, 1)")
        if isinstance(self.min_secagg_contributors, bool) or not isinstance(
                self.min_secagg_contributors, int) or self.min_secagg_contributors < 2:
            raise ConfigError("privacy policy: min_secagg_contributors = "
                              f"{self.min_secagg_contributors!r}: expected an integer >= 2")
        if isinstance(self.max_assumed_honest, bool) or not isinstance(
                self.max_assumed_honest, int) or self.max_assumed_honest < 1:
            raise ConfigError("privacy policy: max_assumed_honest = "
                              f"{self.max_assumed_honest!r}: expected an integer >= 1")
        for flag in ("allow_off", "reproducible_seeds"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"privacy policy: {flag} must be true or false")

    @classmethod
    def for_run(cls, cfg: RunConfig, **overrides: Any) -> PrivacyPolicy:
        """The policy a researcher provisions simulated devices with: the run's mode, noise,
        clip, event budget, delta, `reproducible_seeds`, and the run's m as the most honest
        devices assumed (never below the default). The user-level maximum is the
        larger of the run's `user_epsilon` and what the run's releases cost a device that
        joins every round, without amplification by sampling (the server chooses who joins;
        shared/privacy.py DeviceLedger), so the device's ledger reports that honest figure
        while the run proceeds as configured."""
        kw: dict[str, Any] = {
            "allowed_modes": (cfg.dp,), "allow_off": cfg.dp == "off",
            "min_noise": {"dp-sgd": cfg.noise_multiplier,
                          "user-gaussian": cfg.user_noise_multiplier,
                          "popularity-count": cfg.popularity_noise},
            "max_clip": cfg.max_grad_norm, "delta": cfg.delta,
            "max_epsilon": {EVENT: cfg.device_epsilon,
                            USER: max(cfg.user_epsilon, _planned_user_epsilon(cfg))},
            "reproducible_seeds": cfg.reproducible_seeds,
            "max_assumed_honest": max(DEFAULT_MAX_ASSUMED_HONEST, _run_m(cfg))}
        kw.update(overrides)
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "privacy policy") -> PrivacyPolicy:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{where}: not JSON ({e})") from None
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{where}: unknown fields {sorted(unknown)}")
        return cls(**d)

    def review(self, cfg: RunConfig) -> Decline | None:
        """None when the round's request is at least as strong as the policy, else why not."""
        if cfg.dp not in self.allowed_modes or (cfg.dp == "off" and not self.allow_off):
            return Decline(DeclineReason.MODE_NOT_ALLOWED,
                           f"dp={cfg.dp!r} is not allowed (allowed: {list(self.allowed_modes)})")
        checks = [(cfg.delta > self.delta, DeclineReason.DELTA_TOO_HIGH,
                   f"delta {cfg.delta:g} > the policy's {self.delta:g}")]
        if cfg.event_dp or cfg.dp == "ddp-event":  # distributed DP: the same keys
            checks += [
                (cfg.noise_multiplier < self.min_noise["dp-sgd"], DeclineReason.NOISE_TOO_LOW,
                 f"DP-SGD noise {cfg.noise_multiplier:g} < {self.min_noise['dp-sgd']:g}"),
                (cfg.max_grad_norm > self.max_clip, DeclineReason.CLIP_TOO_LARGE,
                 f"clip {cfg.max_grad_norm:g} > {self.max_clip:g}"),
                (cfg.device_epsilon > self.max_epsilon[EVENT], DeclineReason.BUDGET_TOO_HIGH,
                 f"event budget {cfg.device_epsilon:g} > {self.max_epsilon[EVENT]:g}")]
        if cfg.user_dp or cfg.dp == "ddp-user":
            checks += [
                (cfg.user_noise_multiplier < self.min_noise["user-gaussian"],
                 DeclineReason.NOISE_TOO_LOW,
                 f"user noise {cfg.user_noise_multiplier:g} < {self.min_noise['user-gaussian']:g}"),
                (cfg.user_epsilon > self.max_epsilon[USER], DeclineReason.BUDGET_TOO_HIGH,
                 f"user budget {cfg.user_epsilon:g} > {self.max_epsilon[USER]:g}")]
        for failed, reason, text in checks:
            if failed:
                return Decline(reason, text)
        return None

    def review_count(self, cfg: RunConfig) -> Decline | None:
        """The popularity count query's request: only its delta can be too weak. The noise
        is the device's own (it adds its share at its `min_noise` floor when the config asks
        for less, and sizes it for at most `max_assumed_honest` devices), and what that
        costs is its ledger's to refuse (client/private_round.py, count_round)."""
        if cfg.delta > self.delta:
            return Decline(DeclineReason.DELTA_TOO_HIGH, f"delta {cfg.delta:g} > {self.delta:g}")
        return None


def _run_m(cfg: RunConfig) -> int:
    """The largest m the run's config asks devices to size a noise share for (1: none)."""
    from fedinterest.shared.distributed_dp import min_contributions
    from fedinterest.shared.distributed_dp_count import MAX_COHORT, count_min_contributions

    m = min_contributions(cfg) if cfg.distributed_dp else 1
    if cfg.popularity and 1 <= cfg.popularity_cohort <= MAX_COHORT:
        m = max(m, count_min_contributions(cfg))
    return m


def _planned_user_epsilon(cfg: RunConfig) -> float:
    """A run's user-level releases for a device in every round (and the popularity count)."""
    from fedinterest.shared.distributed_dp_count import MAX_COHORT, count_params
    from fedinterest.shared.privacy import DeviceLedger, gaussian_event, skellam_count_event

    led = DeviceLedger(delta=cfg.delta)
    if cfg.popularity and 1 <= cfg.popularity_cohort <= MAX_COHORT:
        led.charge(USER, skellam_count_event(count_params(cfg, replace=False)),
                   "popularity-count", 0)
    if cfg.user_dp:
        led.charge(USER, gaussian_event(cfg.user_noise_multiplier / 2.0, cfg.rounds),
                   "dp-fedavg update", 0)
    return led.epsilon(USER)


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
