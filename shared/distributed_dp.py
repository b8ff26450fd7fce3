"""Distributed DP under SecAgg+: what a device does to its clipped contribution before
masking, and how the server decodes the sum. Both sides import this one module.

Mechanism (after TFF's ddp_secure_aggregator; Agarwal, Kairouz, Liu 2021, "The Skellam
Mechanism for Differentially Private Federated Learning"):

1. the device clips each example's gradient (event level) or its round update (user level)
   to L2 norm C, scales it by gamma and rounds it to integers with *conditional randomised
   rounding* (Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism",
   Sec. 4.1): randomised rounding is redrawn until the integer vector's norm is at most
   `rounded_l2_bound(gamma C, beta, d)`, so that bound is the L2 sensitivity with certainty;
2. it adds a symmetric Skellam share Sk(mu / m) (Poisson(mu / 2m) - Poisson(mu / 2m)) per
   coordinate, with m the fewest contributions a round accepts: the sum of n >= m shares is
   Skellam with variance n mu / m >= mu (Skellam is closed under addition), so the released
   sum carries at least the noise the accounting assumes (shared/distributed_dp_accounting.py);
3. it reduces the integers modulo Q = 2**30 and uploads them through SecAgg+ as integers
   that Flower's quantiser maps to themselves (step 1, `DDP_QUANTISATION`);
4. the server unmasks sum_i v_i, reduces it mod Q into [-Q/2, Q/2) and divides by gamma.

Wrap-around: the release is (sum of integers) mod Q, a function of the Skellam mechanism's
output, so privacy holds whatever wraps (post-processing). Utility: the decoded coordinate
is exact when |signal + noise| < Q/2. `scale_for` picks gamma so that the signal part is at
most Q/8 whenever the round's clipped contributions sum to at most `headroom` clipping norms
on one coordinate, and the noise part stays below 3Q/8 = 12 noise standard deviations; a
Skellam of variance V exceeds t with probability <= 2 exp(-t^2 / (2 (V + t / 3)))
(Bernstein; Poisson is sub-exponential), about 1e-31 at t = 12 sqrt(V) for large V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import RunConfig
from .secure_protocol import Quantisation
from .wire import WireSchema

DDP_STAGE = "ddp-train"  # the round config's stage of a distributed-DP train round
PAYLOAD_ARRAY = "ddp-payload"  # the one array a device masks: its trained coordinates
MODULUS_BITS = 30  # Q: the integer range of one device's payload (Flower quantises in int32)
Q = 2**MODULUS_BITS
# SecAgg+ sums at most MAX_SECURE_CLIENTS values below Q: 2**40 leaves room for 1023 of them.
# The payload is v - Q/2 for v in [0, Q): clipping_range Q/2 and Q levels make Flower's
# quantiser step exactly 1, so every integer maps to itself (no stochastic rounding happens).
DDP_QUANTISATION = Quantisation(float(Q // 2), Q, 2**40, 1.0)
NOISE_TAIL_SDS = 12.0  # noise headroom in standard deviations (see the module docstring)
ROUNDING_BETA = math.exp(-0.5)  # conditional rounding: redraw probability bound (as TFF)


@dataclass(frozen=True)
class DDPParams:
    """One round's distributed-DP parameters, the same on every device and the server.

    clip: L2 clip C of one unit's contribution; noise_multiplier: the released sum's noise
    std / C (before scaling); min_contributions: m, the fewest devices a round may release
    with; scale: gamma; dim: coordinates of the payload."""

    clip: float
    noise_multiplier: float
    min_contributions: int
    scale: float
    dim: int

    @property
    def central_variance(self) -> float:
        """mu: the per-coordinate variance of the released sum's Skellam noise (integers)."""
        return (self.noise_multiplier * self.clip * self.scale) ** 2

    @property
    def share_variance(self) -> float:
        return self.central_variance / self.min_contributions

    @property
    def l2_sensitivity(self) -> float:
        """Integer L2 sensitivity: one unit's conditionally rounded, scaled contribution."""
        return rounded_l2_bound(self.clip * self.scale, ROUNDING_BETA, self.dim)

    @property
    def l1_sensitivity(self) -> float:
        """For an integer vector, L1 <= min(sqrt(d) L2, L2^2)."""
        l2 = self.l2_sensitivity
        return l2 * min(math.sqrt(self.dim), l2)


def params_from_config(cfg: RunConfig, schema: list[tuple[str, tuple[int, ...], str]]
                       ) -> DDPParams:
    """The round's parameters from the run config and the model's wire schema (both sides)."""
    if not cfg.distributed_dp:
        raise ValueError(f"dp = {cfg.dp!r} is not a distributed-DP mode")
    # only the trained coordinates are sent and noised
    return params_for(cfg, len(trained_index(cfg, schema)))


def params_for(cfg: RunConfig, dim: int) -> DDPParams:
    """The round's parameters for a payload of `dim` coordinates (see params_from_config)."""
    if not cfg.distributed_dp:
        raise ValueError(f"dp = {cfg.dp!r} is not a distributed-DP mode")
    m = min_contributions(cfg)
    if cfg.dp == "ddp-event":
        clip, nm = cfg.max_grad_norm, cfg.noise_multiplier
        headroom = 4.0 * max(1.0, expected_units(cfg))
    else:
        clip, nm = cfg.user_clip, cfg.user_noise_multiplier
        headroom = float(cfg.clients_per_round)  # each device adds at most C per coordinate
    return DDPParams(clip=float(clip), noise_multiplier=float(nm), min_contributions=m,
                     scale=scale_for(clip, nm, headroom), dim=dim)


def accounting_sample_rate(cfg: RunConfig) -> float:
    """The sampling rate the accounting amplifies by: `ddp_sample_rate` (each segment's
    Poisson draw) at event level; 1 at user level, where the server picks the devices."""
    return cfg.ddp_sample_rate if cfg.dp == "ddp-event" else 1.0


def ddp_budget(cfg: RunConfig) -> float:
    """Each device's epsilon budget under distributed DP: the event-level one for ddp-event,
    the user-level one for ddp-user (the device's ledger and the server's sampling both)."""
    return cfg.device_epsilon if cfg.dp == "ddp-event" else cfg.user_epsilon


def min_contributions(cfg: RunConfig) -> int:
    """m: the fewest devices whose shares a round may release (the noise is sized for m)."""
    return max(1, math.ceil(cfg.ddp_min_fraction * cfg.clients_per_round - 1e-9))


def expected_units(cfg: RunConfig) -> float:
    """The round's expected number of contributions: examples at event level (devices x q x
    the public guess of segments per device), devices at user level."""
    if cfg.dp == "ddp-event":
        return cfg.clients_per_round * cfg.ddp_sample_rate * cfg.ddp_segments_per_device
    return float(cfg.clients_per_round)


def normaliser(cfg: RunConfig) -> float:
    """The fixed divisor of the decoded sum (never the number that actually contributed)."""
    return cfg.ddp_normaliser or max(1.0, expected_units(cfg))


def trained_names(cfg: RunConfig, schema: list[tuple[str, tuple[int, ...], str]]
                  ) -> list[str]:
    """The schema's arrays the run trains privately: names starting with one of the
    comma-separated `ddp_train_only` prefixes (every array when it is empty)."""
    prefixes = [p.strip() for p in cfg.ddp_train_only.split(",") if p.strip()]
    names = [name for name, _, _ in schema
             if not prefixes or any(name.startswith(p) for p in prefixes)]
    if not names:
        raise ValueError(f"ddp_train_only = {cfg.ddp_train_only!r} names no array of the model")
    return names


def trained_index(cfg: RunConfig, schema: list[tuple[str, tuple[int, ...], str]]
                  ) -> np.ndarray:
    """Positions of the trained coordinates in the model's flat vector (schema order): the
    payload of a distributed-DP round is exactly these coordinates, so only they are clipped,
    rounded, noised and uploaded; every other coordinate never leaves the device."""
    trained, parts, start = set(trained_names(cfg, schema)), [], 0
    for name, shape, _ in schema:
        n = int(np.prod(shape, dtype=np.int64))
        if name in trained:
            parts.append(np.arange(start, start + n))
        start += n
    return np.concatenate(parts)


def payload_schema(params: DDPParams) -> WireSchema:
    """What a device masks in a distributed-DP round: one flat vector of the trained
    coordinates (float64 integers, see `encode_payload`)."""
    return WireSchema.from_named_arrays([(PAYLOAD_ARRAY, np.zeros(params.dim, np.float64))])


def scale_for(clip: float, noise_multiplier: float, headroom: float) -> float:
    """gamma such that `headroom` clipped contributions on one coordinate use Q/8 and 12 noise
    standard deviations use 3Q/8 (see the module docstring)."""
    if clip <= 0 or headroom <= 0 or noise_multiplier < 0:
        raise ValueError("clip and headroom must be > 0 and noise_multiplier >= 0")
    signal = (Q / 8) / (headroom * clip)
    noise = (3 * Q / 8) / (NOISE_TAIL_SDS * noise_multiplier * clip) if noise_multiplier else signal
    return float(min(signal, noise))


def rounded_l2_bound(l2: float, beta: float, dim: int) -> float:
    """Kairouz, Liu, Steinke 2021, Thm. 5 / TFF: randomised rounding of x with ||x|| <= l2 gives
    ||round(x)||^2 <= l2^2 + d/4 + sqrt(2 ln(1/beta)) (l2 + sqrt(d)/2) with probability >=
    1 - beta; and always ||round(x)|| <= l2 + sqrt(d)."""
    bound = l2**2 + dim / 4.0
    if beta > 0:
        bound = min(bound + math.sqrt(2.0 * math.log(1.0 / beta)) * (l2 + math.sqrt(dim) / 2.0),
                    (l2 + math.sqrt(dim)) ** 2)
    return math.sqrt(bound)


def clip_l2(x: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(x))
    return x * (clip / norm) if norm > clip else x


def conditional_round(x: np.ndarray, bound: float, rng: np.random.Generator,
                      max_tries: int = 1000) -> np.ndarray:
    """Randomised rounding of x (floor(x) + Bernoulli(frac)) redrawn until ||result|| <= bound.
    For ||x|| <= the clip this succeeds with probability >= 1 - beta per draw."""
    floor = np.floor(x)
    frac = x - floor
    for _ in range(max_tries):
        y = (floor + (rng.random(x.shape) < frac)).astype(np.int64)
        if float(np.linalg.norm(y.astype(np.float64))) <= bound:
            return y
    raise RuntimeError(f"conditional rounding: no draw within the norm bound {bound:.6g} "
                       f"after {max_tries} tries (was the vector clipped?)")


def skellam(shape: tuple[int, ...] | int, variance: float,
            rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise of the given variance: Poisson(v/2) - Poisson(v/2)."""
    if variance <= 0:
        return np.zeros(shape, np.int64)
    lam = variance / 2.0
    return rng.poisson(lam, shape).astype(np.int64) - rng.poisson(lam, shape).astype(np.int64)


def integer_contribution(clipped: list[np.ndarray], params: DDPParams,
                         rng: np.random.Generator) -> np.ndarray:
    """Sum of the conditionally rounded, scaled unit contributions (each already clipped to
    params.clip) plus this device's Skellam share; int64, length params.dim."""
    bound = params.l2_sensitivity
    total = np.zeros(params.dim, np.int64)
    for x in clipped:
        if x.shape != (params.dim,):
            raise ValueError(f"contribution of shape {x.shape}, expected ({params.dim},)")
        if float(np.linalg.norm(x)) > params.clip * (1 + 1e-9):
            raise ValueError("contribution not clipped to the DDP clip norm")
        total += conditional_round(x.astype(np.float64) * params.scale, bound, rng)
    return total + skellam(params.dim, params.share_variance, rng)


def encode_payload(z: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The integers z mod Q, shifted to [-Q/2, Q/2) so Flower's quantiser (DDP_QUANTISATION)
    maps each to z mod Q exactly, laid out in the model's array shapes (float64)."""
    v = np.mod(z.astype(np.int64), Q) - Q // 2
    return unflatten(v.astype(np.float64), shapes)


def decode_sum(flower_mean: list[np.ndarray], n_contributors: int) -> np.ndarray:
    """The signed integer sum (mod Q, centred) from Flower's unmasked 'mean' of payloads.

    Flower returns (sum_i v_i - n Q/2) / n for payloads v_i - Q/2; n times it plus n Q/2 is
    sum_i v_i, an integer below 2**40 that float64 carries exactly (the rounding undoes the
    division's error, which is below 2**-12 here)."""
    flat = flatten(flower_mean)
    total = np.rint(flat * n_contributors).astype(np.int64) + n_contributors * (Q // 2)
    centred = np.mod(total, Q)
    return np.where(centred >= Q // 2, centred - Q, centred).astype(np.int64)


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]) if arrays \
        else np.zeros(0)


def unflatten(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    out, i = [], 0
    for s in shapes:
        n = int(np.prod(s, dtype=np.int64))
        out.append(flat[i:i + n].reshape(s))
        i += n
    if i != len(flat):
        raise ValueError(f"{len(flat)} values for shapes totalling {i}")
    return out
