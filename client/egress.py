"""The egress guard: the outermost ClientApp mod, so it sees every message as it leaves.

A reply may carry only (a) model arrays whose names, shapes and dtypes match the allow-listed
wire schema of the shared model, (b) allow-listed finite scalar metrics, (c) SecAgg+ protocol
records when secure aggregation runs. Before release the whole serialised reply is scanned for
any 12-byte window of the device's raw text. Exceptions become an error reply naming only the
exception class: a stack trace could quote the user's text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedinterest.shared.wire import EVAL_METRICS, TRAIN_METRICS, SchemaMismatch, check_metrics
from flwr.app import Context, Error, Message, MessageType

log = logging.getLogger("fedinterest.client")

WINDOW = 12  # bytes: long enough that model floats never match by chance, short enough to
# catch a partial quote
ERROR_BLOCKED = 601
ERROR_DEVICE = 602

# The guard needs the device's schema and raw texts; the ClientApp registers a provider per
# message (both depend on the node's store and the run's catalog).
_PROVIDER: Callable[[Message, Context], tuple] | None = None


def set_provider(fn: Callable[[Message, Context], tuple]) -> None:
    """fn(msg, ctx) -> (WireSchema | None, list[str] raw texts of this device)."""
    global _PROVIDER
    _PROVIDER = fn


def raw_text_windows(texts: list[str]) -> set[bytes]:
    out: set[bytes] = set()
    for t in texts:
        b = t.encode("utf-8")
        if len(b) <= WINDOW:
            if len(b) >= 4:
                out.add(b)
            continue
        out.update(b[i:i + WINDOW] for i in range(len(b) - WINDOW + 1))
    return out


def serialise(msg: Message) -> bytes:
    """Every byte a reply would carry: array payloads, record keys and scalar values."""
    parts: list[bytes] = []
    content = msg.content
    for name, rec in content.array_records.items():
        parts.append(name.encode())
        for key, arr in rec.items():
            parts.append(key.encode())
            parts.append(arr.data)
    for name, rec in list(content.metric_records.items()) + list(
            content.config_records.items()):
        parts.append(name.encode())
        for key, val in rec.items():
            parts.append(key.encode())
            parts.append(repr(val).encode() if not isinstance(val, bytes) else val)
            if isinstance(val, list):
                parts.extend(v if isinstance(v, bytes) else repr(v).encode() for v in val)
    return b"\x00".join(parts)


def check_reply(reply: Message, schema, texts: list[str], message_type: str) -> None:
    """Raise SchemaMismatch when the reply may not leave the device."""
    content = reply.content
    secagg = any(k.startswith("secaggplus") or k == "secagg" for k in content.config_records)
    if message_type == MessageType.TRAIN and not secagg:
        if len(content.array_records) != 1:
            raise SchemaMismatch("a train reply carries exactly one array record")
        rec = next(iter(content.array_records.values()))
        if schema is None:
            raise SchemaMismatch("no wire schema to check the update against")
        schema.check([(k, v.numpy()) for k, v in rec.items()])
    elif content.array_records and not secagg:
        raise SchemaMismatch(f"{message_type} replies carry no arrays")
    allowed = TRAIN_METRICS if message_type == MessageType.TRAIN else EVAL_METRICS
    for rec in content.metric_records.values():
        check_metrics(dict(rec), allowed)
    if content.config_records and not secagg:
        raise SchemaMismatch("replies carry no config records outside secure aggregation")
    blob = serialise(reply)
    for window in raw_text_windows(texts):
        if window in blob:
            raise SchemaMismatch("the reply contains the device's raw text")


def egress_guard_mod(msg: Message, ctx: Context, call_next) -> Message:
    try:
        reply = call_next(msg, ctx)
    except Exception as e:  # noqa: BLE001 - any failure must leave as a sanitised error
        log.warning("device error (%s); replying with the exception class only",
                    type(e).__name__)
        return Message(Error(ERROR_DEVICE, f"device error: {type(e).__name__}"), reply_to=msg)
    if reply.has_error():
        return Message(Error(reply.error.code, "device error"), reply_to=msg)
    try:
        schema, texts = _PROVIDER(msg, ctx) if _PROVIDER else (None, [])
        check_reply(reply, schema, texts, msg.metadata.message_type)
    except SchemaMismatch as e:
        log.error("egress guard blocked a %s reply: %s", msg.metadata.message_type, e)
        return Message(Error(ERROR_BLOCKED, f"egress guard blocked the reply: {e}"),
                       reply_to=msg)
    return reply
