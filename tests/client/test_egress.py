"""The egress guard on packed updates (shared.wire.encode_update): a blob leaves only when it
decodes to the allow-listed schema, and text hidden in it is found after inflating."""

from __future__ import annotations

import numpy as np
import pytest
from fedinterest.client import egress
from fedinterest.client.egress import check_reply, egress_guard_mod
from fedinterest.shared.wire import PACKED_KEY, SchemaMismatch, WireSchema, encode_update
from fedinterest.simulations.inprocess_grid import server_task_identity
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

CANARY = "zebra-quartz-canary-7731 my secret diary line"


@pytest.fixture(autouse=True)
def _task_identity():
    with server_task_identity():
        yield


def _model(seed: int = 0) -> tuple[WireSchema, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(0, 0.1, (16, 8)).astype(np.float32),
              rng.normal(0, 0.1, (8,)).astype(np.float32)]
    return WireSchema.from_named_arrays(list(zip(["fc.weight", "fc.bias"], arrays))), arrays


def _request(schema, weights) -> Message:
    rec = ArrayRecord({n: Array(w) for n, w in zip(schema.names, weights)})
    msg = Message(RecordDict({"arrays": rec}), dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the runtime sets on delivery
    return msg


def _packed_reply(req: Message, blob: bytes, dtype=np.uint8) -> Message:
    arrays = ArrayRecord({PACKED_KEY: Array(np.frombuffer(blob, np.uint8).astype(dtype))})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"refused": 0.0})}),
                   reply_to=req)


def test_packed_updates_leave_only_when_they_decode_to_the_schema():
    schema, glob = _model()
    local = [w + np.float32(0.01) for w in glob]
    req = _request(schema, glob)
    for fmt in ("fp32", "fp16-delta"):
        reply = _packed_reply(req, encode_update(local, schema, fmt, glob))
        check_reply(reply, schema, [CANARY], MessageType.TRAIN, reference=glob)
    with pytest.raises(SchemaMismatch, match="global weights"):  # fp16 needs the reference
        check_reply(_packed_reply(req, encode_update(local, schema, "fp16-delta", glob)),
                    schema, [], MessageType.TRAIN)
    other, other_w = _model(1)
    other = WireSchema.from_named_arrays([("secret.weight", other_w[0]), ("fc.bias", other_w[1])])
    with pytest.raises(SchemaMismatch, match="another wire schema"):
        check_reply(_packed_reply(req, encode_update(other_w, other)), schema, [],
                    MessageType.TRAIN)
    with pytest.raises(SchemaMismatch, match="1-d uint8"):
        check_reply(_packed_reply(req, encode_update(local, schema), np.int16), schema, [],
                    MessageType.TRAIN)


def test_text_hidden_in_a_compressed_update_is_found():
    schema, glob = _model()
    smuggled = [w.copy() for w in glob]
    raw = np.frombuffer(CANARY.encode()[:24], dtype=np.float32)
    smuggled[0].reshape(-1)[:len(raw)] = raw
    blob = encode_update(smuggled, schema)
    assert CANARY.encode()[:12] not in blob  # the compressed bytes hide it ...
    with pytest.raises(SchemaMismatch, match="raw text"):  # ... the inflated values do not
        check_reply(_packed_reply(_request(schema, glob), blob), schema, [CANARY],
                    MessageType.TRAIN)


def test_the_guard_mod_checks_fp16_deltas_against_the_request_weights(monkeypatch):
    schema, glob = _model()
    local = [w - np.float32(0.02) for w in glob]
    monkeypatch.setattr(egress, "_PROVIDER", lambda msg, ctx: (schema, [CANARY]))
    req = _request(schema, glob)

    def train(blob):
        return egress_guard_mod(req, None, lambda msg, ctx: _packed_reply(msg, blob))

    assert not train(encode_update(local, schema, "fp16-delta", glob)).has_error()
    truncated = encode_update(local, schema, "fp16-delta", glob)[:-8]
    reply = train(truncated)
    assert reply.has_error() and reply.error.code == egress.ERROR_BLOCKED
    assert "truncated" in reply.error.reason


def test_short_texts_that_are_protocol_words_or_chance_bytes_do_not_block_a_reply():
    """A tag equal to a record key ("update") or a 4-byte tag found by chance among a
    megabyte of weight bytes blocked every (or some) reply of its user; a text of 8 bytes or
    more is still matched whole, and hidden in the weights it is still found."""
    schema, glob = _model()
    req = _request(schema, glob)
    reply = _packed_reply(req, encode_update([w + np.float32(0.01) for w in glob], schema))
    blob = reply.content.array_records["arrays"][PACKED_KEY].numpy().tobytes()
    chance = next(blob[i:i + 4].decode() for i in range(len(blob) - 3)
                  if all(32 <= c < 127 for c in blob[i:i + 4]))
    check_reply(reply, schema, [PACKED_KEY, "loss", chance], MessageType.TRAIN)
    eight = "Aardman!"
    smuggled = [w.copy() for w in glob]
    smuggled[0].reshape(-1)[:2] = np.frombuffer(eight.encode(), np.float32)
    with pytest.raises(SchemaMismatch, match="raw text"):
        check_reply(_packed_reply(req, encode_update(smuggled, schema)), schema, [eight],
                    MessageType.TRAIN)
