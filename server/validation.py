"""Robust aggregation's first line: reject replies that cannot be honest updates.

A packed reply (one `shared.wire.encode_update` blob, RunConfig.update_format fp32/fp16) is
decoded first; a blob that does not decode is rejected like any malformed reply. Every train
reply is then checked against the shared wire schema (names, shapes, dtypes), for NaN/Inf,
for an update norm above the configured bound, and for replay (an update identical to one
seen in an earlier round). Each rejection is logged with the node and the reason and
kept for the run's results.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
from fedinterest.shared.wire import (
    PACKED_KEY,
    TRAIN_METRICS,
    SchemaMismatch,
    WireSchema,
    check_metrics,
    decode_packed,
)
from flwr.app import Array, ArrayRecord, Message

log = logging.getLogger("fedinterest.server")


@dataclass
class Rejection:
    round: int
    node_id: int
    reason: str


@dataclass
class ReplyValidator:
    schema: WireSchema
    max_update_norm: float
    seen_digests: set[str] = field(default_factory=set)
    rejections: list[Rejection] = field(default_factory=list)

    def filter(self, server_round: int, replies: list[Message], reference: list[np.ndarray],
               sent: list[Message] | None = None) -> tuple[list[Message], list[Message]]:
        """(accepted, failed): failed holds error replies and rejected ones and, given the
        `sent` instructions, those no reply came back for (device lost, or slower than the
        Grid's timeout), each recorded as a rejection too. `reference`: the global weights
        sent, which an fp16 delta is relative to. Accepted packed replies come back with
        their record replaced by the decoded arrays, so strategies aggregate arrays."""
        accepted, failed, digests = [], [], []
        # The SuperLink answers for a device it lost (Flower's NODE_UNAVAILABLE, an expired
        # TTL) under its own node id: name the device the instruction was addressed to.
        addressee = {m.metadata.message_id: m.metadata.dst_node_id for m in sent or ()}
        answered = {msg.metadata.reply_to_message_id for msg in replies}
        for msg in replies:
            node = addressee.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                self._reject(server_round, node, f"device error: {msg.error.reason}")
                failed.append(msg)
                continue
            try:
                named, metrics, packed = _unpack(msg, self.schema, reference)
                if metrics.get("refused", 0.0) >= 1.0:
                    failed.append(msg)  # a device declining (budget spent) is not an attack
                    continue
                self.schema.check(named, max_norm=self.max_update_norm, reference=reference)
                check_metrics(metrics, TRAIN_METRICS)
                digest = _digest(named)
                if digest in self.seen_digests:
                    raise SchemaMismatch("replayed update (identical to one already received)")
            except SchemaMismatch as e:
                self._reject(server_round, node, str(e))
                failed.append(msg)
                continue
            digests.append(digest)
            if packed is not None:
                msg.content[packed] = ArrayRecord(
                    {n: Array(np.ascontiguousarray(a)) for n, a in named})
            accepted.append(msg)
        for msg in sent or ():
            if msg.metadata.message_id not in answered:
                self._reject(server_round, msg.metadata.dst_node_id,
                             "no reply before the timeout (device lost or too slow)")
                failed.append(msg)
        self.seen_digests.update(digests)
        return accepted, failed

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        log.warning("round %d: rejected reply from node %d: %s", server_round, node, reason)
        self.rejections.append(Rejection(server_round, node, reason))


def _unpack(msg: Message, schema: WireSchema, reference: list[np.ndarray]
            ) -> tuple[list[tuple[str, np.ndarray]], dict, str | None]:
    """(named arrays, metrics, the record's name when it was packed, else None)."""
    content = msg.content
    if len(content.array_records) != 1:
        raise SchemaMismatch(f"expected one array record, got {len(content.array_records)}")
    name, record = next(iter(content.array_records.items()))
    metrics: dict = {}
    for mr in content.metric_records.values():
        metrics.update(dict(mr))
    if list(record) != [PACKED_KEY]:
        return [(k, v.numpy()) for k, v in record.items()], metrics, None
    arrays, _ = decode_packed(record[PACKED_KEY], schema, reference)
    return list(zip(schema.names, arrays)), metrics, name


def _digest(named: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for name, arr in named:
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
