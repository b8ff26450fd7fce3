"""What may cross the wire between a device and the server.

Both sides build the same `WireSchema` from the shared model: the ordered names, shapes and
dtypes of the arrays of an update, plus the scalar metric names a device may report. The device
checks every outgoing message against it (egress guard); the server checks every reply
against it (robust aggregation). Anything not described here never leaves a device.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass

import numpy as np

# Scalar metrics a device may send. Evaluation sends sums and counts, never ranked lists.
# No example count, loss, steps or epsilon: each is a function of the private data
# (docs/PRIVACY.md, finding 4); every device weighs 1 in the aggregate.
TRAIN_METRICS = frozenset({
    "refused",  # 1.0 when the device declined the round (budget spent / no data)
    "decline-reason",  # why, a client.policy.DeclineReason code (0 = trained); no free text
})
# An evaluate reply carries no metric: devices keep their evaluation in their own store
# (client/evaluation_report.py; docs/PRIVACY.md, finding 3).
EVAL_METRICS: frozenset[str] = frozenset()


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


# -- compact update encoding ----------------------------------------------------------------
# One blob per update instead of one array per tensor: Flower frames every array separately
# (a 128-byte .npy header and the name in the byte count; on the wire also an Array and an
# ArrayChunk object, each named by a 64-hex SHA-256, and an entry in the record's name map),
# about 500 bytes per tensor, 2% of the default model. Byte-shuffling (the k-th byte of every
# value together) lets zlib find the redundancy in the exponent bytes of trained weights.
# zlib is the standard library's DEFLATE; only the shuffle is written here (a numpy view).
CODEC_VERSION = 1
PACKED_KEY = "update"  # the one array of a packed update record
FORMATS = {"fp32": 1, "fp16-delta": 2}  # fp16-delta: float16(update - the global weights)
_HEADER = 2 + 8  # version, format, the first 8 bytes of the schema digest
# level 1: 11.8 ms and 0.857 of the raw bytes against level 6's 28.7 ms and 0.850 on an
# ml-latest-small update (docs/BENCHMARKS.md, client-round profile); any level decodes
_ZLIB_LEVEL = 1


def encode_update(arrays: list[np.ndarray], schema: WireSchema, fmt: str = "fp32",
                  reference: list[np.ndarray] | None = None) -> bytes:
    """The update as one compressed blob bound to `schema` (its digest is in the header).
    fmt "fp32": the arrays themselves, lossless. "fp16-delta": (arrays - reference) rounded
    to float16, `reference` being the global weights the device received."""
    if fmt not in FORMATS:
        raise ValueError(f"update format {fmt!r}: expected one of {sorted(FORMATS)}")
    schema.check(list(zip(schema.names, arrays)))
    if fmt == "fp16-delta":
        if reference is None:
            raise ValueError("an fp16-delta update needs the global weights it is relative to")
        flat = np.concatenate([(a.astype(np.float32) - r).ravel().astype(np.float16)
                               for a, r in zip(arrays, reference)])
    else:
        flat = np.concatenate([np.ascontiguousarray(a, np.float32).ravel() for a in arrays])
    shuffled = flat.view(np.uint8).reshape(-1, flat.itemsize).T.tobytes()
    header = bytes([CODEC_VERSION, FORMATS[fmt]]) + bytes.fromhex(schema.digest()[:16])
    return header + zlib.compress(shuffled, _ZLIB_LEVEL)


def decode_update(blob: bytes, schema: WireSchema,
                  reference: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """The arrays of an `encode_update` blob, checked: codec version, format, schema digest,
    exact decompressed size (a blob that would inflate beyond the model is refused before
    it is inflated), shapes and finiteness. Raises SchemaMismatch naming what is wrong."""
    fmt, flat = update_values(blob, schema)
    return _assemble(fmt, flat, schema, reference)


def _assemble(fmt: str, flat: np.ndarray, schema: WireSchema,
              reference: list[np.ndarray] | None) -> list[np.ndarray]:
    if fmt == "fp16-delta" and reference is None:
        raise SchemaMismatch("update blob: fp16-delta needs the global weights")
    out, start = [], 0
    for spec in schema.arrays:
        n = int(np.prod(spec.shape))
        out.append(flat[start:start + n].reshape(spec.shape).astype(np.float32))
        start += n
    if fmt == "fp16-delta":
        out = [(r.astype(np.float32) + d).astype(np.float32) for r, d in zip(reference, out)]
    schema.check(list(zip(schema.names, out)))
    return out


def update_values(blob: bytes, schema: WireSchema) -> tuple[str, np.ndarray]:
    """(format, the flat values as sent: float32, or the float16 delta) of a blob, after the
    checks `decode_update` lists. The egress guard scans these bytes for raw text: the
    compressed blob would hide it."""
    if any(a.dtype != "float32" for a in schema.arrays):
        raise SchemaMismatch("the update encoding carries float32 models only")
    if len(blob) < _HEADER:
        raise SchemaMismatch(f"update blob of {len(blob)} bytes is shorter than its header")
    version, code = blob[0], blob[1]
    if version != CODEC_VERSION:
        raise SchemaMismatch(f"update blob: codec version {version}, expected {CODEC_VERSION}")
    names = {v: k for k, v in FORMATS.items()}
    if code not in names:
        raise SchemaMismatch(f"update blob: unknown format {code}, expected one of "
                             f"{sorted(names)}")
    if blob[2:_HEADER] != bytes.fromhex(schema.digest()[:16]):
        raise SchemaMismatch("update blob: made for another wire schema (digest differs)")
    fmt = names[code]
    itemsize = 2 if fmt == "fp16-delta" else 4
    expected = sum(int(np.prod(a.shape)) for a in schema.arrays) * itemsize
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(blob[_HEADER:], expected + 1)
    except zlib.error as e:
        raise SchemaMismatch(f"update blob: not valid zlib data ({e})") from None
    if not inflater.eof:
        raise SchemaMismatch(f"update blob: truncated, or inflates beyond the {expected} bytes "
                             "of the model")
    if len(raw) != expected or inflater.unused_data:
        raise SchemaMismatch(f"update blob: inflates to {len(raw)} bytes (+"
                             f"{len(inflater.unused_data)} trailing), expected exactly {expected}")
    dtype = np.float16 if itemsize == 2 else np.float32
    return fmt, np.frombuffer(raw, np.uint8).reshape(itemsize, -1).T.copy().view(dtype).ravel()


def decode_packed(array, schema: WireSchema, reference: list[np.ndarray] | None = None
                  ) -> tuple[list[np.ndarray], np.ndarray]:
    """(decoded arrays, flat values as sent) of a packed record's one Flower Array: a 1-d
    uint8 array holding an `encode_update` blob. Inflates once; the egress guard and the
    audit scan both results for raw text (the blob itself is deflated), the server keeps the
    arrays. Raises SchemaMismatch for anything that is not such a blob."""
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise SchemaMismatch(f"a packed update is a 1-d uint8 array, got {array.dtype} "
                             f"{tuple(array.shape)}")
    try:
        blob = array.numpy().tobytes()
    except ValueError as e:  # not a readable .npy payload
        raise SchemaMismatch(f"a packed update that does not deserialise ({e})") from None
    fmt, flat = update_values(blob, schema)
    return _assemble(fmt, flat, schema, reference), flat
