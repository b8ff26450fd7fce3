"""What server and devices agree on when a round runs under (hardened) SecAgg+.

SecAgg+ sums integer vectors: each device scales its payload by its weight / `max_weight`,
clips every coordinate to +-`clipping_range`, quantises it to `quantization_range` levels
and masks it modulo `modulus_range`; the server learns only the weighted mean. So both sides
must agree on those four numbers and on what the payload is:

- model rounds send the *update* (local - global), not full weights, with a clipping range
  fitted to it (the user-level clip norm, or the update-norm bound) and 2**30 levels: far
  smaller error than Flower's defaults over full weights (docs/DESIGN.md, tuning history);
- the popularity count sends each device's bounded 0/1 item vector (`contribution`), which
  quantises exactly (0 and 1 are grid points), so the released sum is the true sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import RunConfig
from .wire import WireSchema

# Config keys and values of the round config ("fitins.config") under SecAgg+.
STAGE_KEY = "stage"
TRAIN_STAGE = "train"
POPULARITY_STAGE = "popularity-count"
MAX_WEIGHT_KEY = "secagg-max-weight"  # the weight factor SecAgg+ divides by (1)
COUNT_ARRAY = "item-counts"
# The fewest devices a SecAgg+ release may sum: a device refuses SETUP with a smaller sample
# and withholds its shares at UNMASK when fewer are active (client/secagg.py). The round
# config may ask for more under MIN_CONTRIBUTORS_KEY, never for fewer.
MIN_CONTRIBUTORS = 3
MIN_CONTRIBUTORS_KEY = "secagg-min-contributors"

# Every device weighs 1 (unweighted FedAvg): a per-device example count beside the masked
# vector would tell the server n in plaintext (docs/PRIVACY.md, finding 4).
TRAIN_MAX_WEIGHT = 1
# Per-round cap on devices: the masked sum of n values below quantization_range must stay
# below modulus_range, so n < modulus_range / quantization_range.
MAX_SECURE_CLIENTS = 1023
# Above this many devices SecAgg+ shares each secret with a ring neighbourhood of this size
# instead of with everyone (O(n log n) instead of O(n^2) key agreements); odd, as Flower
# 1.42 requires below the sample size. A distributed-DP cohort is one such neighbourhood.
MAX_SHARES = 31


@dataclass(frozen=True)
class Quantisation:
    """The SecAggPlusWorkflow parameters for one kind of payload."""

    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float

    def workflow_kwargs(self) -> dict:
        return {"clipping_range": self.clipping_range,
                "quantization_range": self.quantization_range,
                "modulus_range": self.modulus_range, "max_weight": self.max_weight}


def train_quantisation(cfg: RunConfig) -> Quantisation:
    """For model updates: no honest update is ever clipped by the quantiser.

    With user-level DP every update has L2 norm <= user_clip, so each coordinate does too;
    without it the device refuses to send an update above max_update_norm (the bound the
    server enforces on plain rounds), so each coordinate is within that. 2**30 levels keep
    the step small (int32 quantised values on the device), and a 2**40 modulus leaves room for MAX_SECURE_CLIENTS such values in the sum.
    """
    if cfg.user_dp:
        return Quantisation(float(cfg.user_clip), 2**30, 2**40, 1.0)
    return Quantisation(float(cfg.max_update_norm), 2**30, 2**40, float(TRAIN_MAX_WEIGHT))


# For 0/1 vectors (the tests' secure sums; the popularity count itself now sends the devices'
# scaled, noised integers, shared/distributed_dp_count.py): values map to the grid points 1 and
# 2 of a 2-level quantiser (exact), and
# n devices sum to at most 2n, far below the modulus.
COUNT_QUANTISATION = Quantisation(1.0, 2, 2**32, 1.0)


def contribution(item_indices: np.ndarray, n_items: int, max_items: int,
                 rng: np.random.Generator) -> np.ndarray:
    """A device's bounded 0/1 vector over the catalog (computed on the device): its distinct
    training items, a random subset of `max_items` if it has more, so one user moves the
    sum by at most sqrt(max_items) in L2."""
    items = np.unique(np.asarray(item_indices, np.int64))
    if len(items) > max_items:
        items = rng.choice(items, max_items, replace=False)
    v = np.zeros(n_items, np.float32)
    v[items] = 1.0
    return v


def count_schema(n_items: int) -> WireSchema:
    """The wire schema of a popularity contribution: one float32 vector over the catalog."""
    return WireSchema.from_named_arrays([(COUNT_ARRAY, np.zeros(n_items, np.float32))])


def masked_shapes(schema: WireSchema) -> list[tuple[int, ...]]:
    """Shapes of the masked vector a device uploads: Flower prepends the weight factor."""
    return [(1,)] + [tuple(a.shape) for a in schema.arrays]
