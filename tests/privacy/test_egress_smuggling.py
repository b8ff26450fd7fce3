"""Issue 19, finding 7 (egress): the guard let text through as float64 metric values, as
UTF-16 inside arrays, and whole texts under 8 bytes. Now the raw bytes of every metric value
and every array are scanned for the device's texts in UTF-8, UTF-16 (LE, BE) and Latin-1,
short texts whole as a token (client/text_scan.py), and the closed-domain metrics take only
their values. Each attack below builds the reply a compromised or buggy device would send."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from fedinterest.client.egress import check_reply
from fedinterest.shared.wire import SchemaMismatch, WireSchema
from fedinterest.simulations.inprocess_grid import server_task_identity
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

DIARY = "zebra-quartz-canary-7731 my secret diary line"
SHORT = "Zorgo"  # 5 bytes: a nickname, a place, a tag


@pytest.fixture(autouse=True)
def _task_identity():
    with server_task_identity():
        yield


def _model(seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(0, 0.1, (64, 32)).astype(np.float32),
              rng.normal(0, 0.1, (32,)).astype(np.float32)]
    return WireSchema.from_named_arrays(list(zip(["fc.weight", "fc.bias"], arrays))), arrays


def _reply(schema, arrays, metrics=None) -> Message:
    req = Message(RecordDict({"arrays": ArrayRecord({n: Array(w) for n, w in
                                                     zip(schema.names, arrays)})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    req.metadata.__dict__["_message_id"] = req.object_id
    content = {"arrays": ArrayRecord({n: Array(np.ascontiguousarray(w))
                                      for n, w in zip(schema.names, arrays)})}
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return Message(RecordDict(content), reply_to=req)


def _hide(arrays, payload: bytes, at: int = 400):
    """The model's arrays with `payload` written into the first one's bytes at `at`."""
    raw = bytearray(arrays[0].tobytes())
    raw[at:at + len(payload)] = payload
    return [np.frombuffer(bytes(raw), np.float32).reshape(arrays[0].shape), arrays[1]]


def test_text_as_float64_metric_values_is_blocked():
    schema, arrays = _model()
    (value,) = struct.unpack("<d", DIARY.encode()[:8])  # 8 bytes of the diary, as a float
    assert np.isfinite(value)
    with pytest.raises(SchemaMismatch):
        check_reply(_reply(schema, arrays, {"refused": value}), schema, [DIARY[:8]],
                    MessageType.TRAIN)
    # and the scan itself (any metric key): 16 bytes over two consecutive values, big-endian
    from fedinterest.client.text_scan import TextPatterns, metric_bytes

    a, b = struct.unpack(">2d", DIARY.encode()[:16])
    assert TextPatterns([DIARY]).found_in(metric_bytes([{"x": a, "y": b}])[1])


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "latin-1"])
def test_text_in_another_encoding_inside_an_array_is_blocked(encoding):
    schema, arrays = _model()
    text = "Café Zürich, mon journal intime" if encoding == "latin-1" else DIARY
    hidden = _hide(arrays, text.encode(encoding))
    with pytest.raises(SchemaMismatch, match="raw text"):
        check_reply(_reply(schema, hidden), schema, [text], MessageType.TRAIN)


def test_a_five_byte_text_is_matched_whole():
    schema, arrays = _model()
    hidden = _hide(arrays, b"\x00" + SHORT.encode() + b"\x00")
    with pytest.raises(SchemaMismatch, match="raw text"):
        check_reply(_reply(schema, hidden), schema, [SHORT], MessageType.TRAIN)


def test_honest_updates_with_short_texts_leave():
    """No false alarm: a trained-looking update leaves although the device holds short texts
    that, as tokens, do not occur in it (and one that occurs only inside a longer word)."""
    schema, arrays = _model(3)
    texts = ["funny", "dark", "meh", "Zorgo", "twist ending", DIARY]
    check_reply(_reply(schema, arrays, {"refused": 0.0}), schema, texts, MessageType.TRAIN)
    inside = _hide(arrays, b"Zorgonaut")  # "Zorgo" inside a longer word: not the token
    check_reply(_reply(schema, inside), schema, ["Zorgo"], MessageType.TRAIN)


def test_closed_domain_metrics_take_only_their_values():
    schema, arrays = _model()
    with pytest.raises(SchemaMismatch, match="refused"):
        check_reply(_reply(schema, arrays, {"refused": 0.25}), schema, [], MessageType.TRAIN)
