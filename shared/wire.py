"""What may cross the wire between a device and the server.

Both sides build the same `WireSchema` from the shared model: the ordered names, shapes and
dtypes of the arrays of an update, plus the scalar metric names a device may report. The device
checks every outgoing message against it (egress guard); the server checks every reply
against it (robust aggregation). Anything not described here never leaves a device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

# Scalar metrics a device may send. Evaluation sends sums and counts, never ranked lists.
TRAIN_METRICS = frozenset({
    "num-examples",  # Flower's weighting key: number of training segments used this round
    "train-loss",
    "epsilon",  # the device's event-level epsilon after this round (its own ledger)
    "dp-steps",
    "refused",  # 1.0 when the device declined the round (budget spent / no data)
})
EVAL_METRICS = frozenset({"num-examples"} | {
    f"{split}-{what}" for split in ("val", "test")
    for what in ("users", "hits@10", "ndcg@10-sum", "mrr@10-sum")})


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


class SchemaMismatch(ValueError):
    """An update that does not match the allow-listed schema; the message says what differs."""


@dataclass(frozen=True)
class WireSchema:
    arrays: tuple[ArraySpec, ...]

    @classmethod
    def from_named_arrays(cls, named: list[tuple[str, np.ndarray]]) -> WireSchema:
        return cls(tuple(ArraySpec(n, tuple(a.shape), str(a.dtype)) for n, a in named))

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.arrays]

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.arrays)

    def digest(self) -> str:
        """Short hash both sides compare, so a device never trains against another schema."""
        blob = json.dumps([(a.name, a.shape, a.dtype) for a in self.arrays]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check(self, named: list[tuple[str, np.ndarray]], *, finite: bool = True,
              max_norm: float | None = None, reference: list[np.ndarray] | None = None) -> None:
        """Raise SchemaMismatch unless `named` matches name for name, shape and dtype.

        finite: reject NaN/Inf. max_norm: reject when the L2 norm of (arrays - reference), or
        of the arrays themselves without a reference, exceeds it.
        """
        if [n for n, _ in named] != self.names:
            extra = sorted({n for n, _ in named} - set(self.names))
            missing = sorted(set(self.names) - {n for n, _ in named})
            raise SchemaMismatch(
                f"array names differ from the schema (unexpected {extra[:5]}, missing "
                f"{missing[:5]}, or out of order)")
        for spec, (name, arr) in zip(self.arrays, named):
            if tuple(arr.shape) != spec.shape:
                raise SchemaMismatch(f"array '{name}': shape {tuple(arr.shape)}, expected "
                                     f"{spec.shape}")
            if str(arr.dtype) != spec.dtype:
                raise SchemaMismatch(f"array '{name}': dtype {arr.dtype}, expected {spec.dtype}")
            if finite and not np.all(np.isfinite(arr)):
                raise SchemaMismatch(f"array '{name}': contains NaN or Inf")
        if max_norm is not None:
            norm = update_norm([a for _, a in named], reference)
            if norm > max_norm:
                raise SchemaMismatch(f"update L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}")


def update_norm(arrays: list[np.ndarray], reference: list[np.ndarray] | None = None) -> float:
    """Global L2 norm of arrays, or of their difference to `reference`."""
    total = 0.0
    for i, a in enumerate(arrays):
        d = a.astype(np.float64) - (reference[i] if reference is not None else 0.0)
        total += float(np.sum(d * d))
    return float(np.sqrt(total))


def check_metrics(metrics: dict, allowed: frozenset[str]) -> None:
    """Raise SchemaMismatch unless every metric is an allow-listed, finite scalar number."""
    for key, value in metrics.items():
        if key not in allowed:
            raise SchemaMismatch(f"metric '{key}' is not allow-listed")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaMismatch(f"metric '{key}' is not a scalar number ({type(value).__name__})")
        if not np.isfinite(value):
            raise SchemaMismatch(f"metric '{key}' is not finite")
