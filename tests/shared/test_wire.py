"""The compact update encoding: lossless fp32, fp16 deltas, and refusal of anything else."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from fedinterest.shared.wire import SchemaMismatch, WireSchema, decode_update, encode_update


def _model(seed: int = 0) -> tuple[WireSchema, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(0, 0.1, (7, 5)).astype(np.float32),
              rng.normal(0, 0.1, (5,)).astype(np.float32),
              rng.normal(0, 0.1, (3, 2, 4)).astype(np.float32)]
    return WireSchema.from_named_arrays(list(zip(["a.weight", "a.bias", "b"], arrays))), arrays


def test_fp32_round_trip_is_exact_and_smaller_than_the_values():
    schema, arrays = _model()
    blob = encode_update(arrays, schema)
    out = decode_update(blob, schema)
    assert [o.shape for o in out] == [a.shape for a in arrays]
    assert all(o.dtype == np.float32 and np.array_equal(o, a) for o, a in zip(out, arrays))
    big = WireSchema.from_named_arrays([("w", np.zeros(4096, np.float32))])
    weights = [np.random.default_rng(1).normal(0, 0.05, 4096).astype(np.float32)]
    assert len(encode_update(weights, big)) < big.nbytes  # shuffled exponents compress


def test_fp16_delta_is_relative_to_the_global_weights():
    schema, glob = _model(0)
    local = [g + np.float32(1e-3) * np.sign(g) for g in glob]
    blob = encode_update(local, schema, "fp16-delta", glob)
    out = decode_update(blob, schema, glob)
    for o, loc, g in zip(out, local, glob):
        expected = g + (loc - g).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(o, expected)
        assert np.abs(o - loc).max() < 1e-6
    with pytest.raises(SchemaMismatch, match="global weights"):
        decode_update(blob, schema)
    with pytest.raises(ValueError, match="global weights"):
        encode_update(local, schema, "fp16-delta")


def test_encoding_checks_the_arrays_against_the_schema():
    schema, arrays = _model()
    with pytest.raises(SchemaMismatch, match="shape"):
        encode_update([arrays[0].T, *arrays[1:]], schema)
    with pytest.raises(SchemaMismatch, match="dtype"):
        encode_update([arrays[0].astype(np.float64), *arrays[1:]], schema)
    with pytest.raises(ValueError, match="format"):
        encode_update(arrays, schema, "int8")


@pytest.mark.parametrize("tamper, message", [
    (lambda b: b[:6], "shorter than its header"),
    (lambda b: b[:-4], "truncated"),
    (lambda b: bytes([9]) + b[1:], "codec version"),
    (lambda b: b[:1] + bytes([7]) + b[2:], "unknown format"),
    (lambda b: b[:2] + bytes(8) + b[10:], "another wire schema"),
    (lambda b: b[:10] + b"not zlib data", "not valid zlib"),
    (lambda b: b + b"\x00\x01", "trailing"),
])
def test_decoding_refuses_tampered_blobs(tamper, message):
    schema, arrays = _model()
    with pytest.raises(SchemaMismatch, match=message):
        decode_update(tamper(encode_update(arrays, schema)), schema)


def test_decoding_refuses_a_blob_for_a_bigger_or_smaller_model_and_non_finite_values():
    schema, arrays = _model()
    header = encode_update(arrays, schema)[:10]
    n_bytes = schema.nbytes
    bomb = header + zlib.compress(bytes(n_bytes * 1000))  # would inflate to 1000x the model
    with pytest.raises(SchemaMismatch, match="truncated, or inflates beyond"):
        decode_update(bomb, schema)
    with pytest.raises(SchemaMismatch, match="inflates to"):
        decode_update(header + zlib.compress(bytes(n_bytes - 4)), schema)
    nan = np.full(n_bytes // 4, np.nan, np.float32).view(np.uint8).reshape(-1, 4).T.tobytes()
    with pytest.raises(SchemaMismatch, match="NaN"):
        decode_update(header + zlib.compress(nan), schema)
