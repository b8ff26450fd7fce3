"""The egress guard: the outermost ClientApp mod, so it sees every message as it leaves.

A reply may carry only (a) model arrays whose names, shapes and dtypes match the allow-listed
wire schema of the shared model, or one `shared.wire.encode_update` blob of them (decoded and
checked against the same schema; its inflated values are scanned for text too), (b)
allow-listed finite scalar metrics (`refused` 0 or 1, `decline-reason` a DeclineReason code),
(c) SecAgg+ protocol records when secure aggregation runs, (d) for the hello query, the
device's random pseudonym. Before release the serialised reply, the raw bytes of every metric
value and every decoded payload are scanned for the device's raw text in UTF-8, UTF-16 and
Latin-1 (client/text_scan.py: 12-byte windows, short texts whole). Exceptions become an error
reply naming only the exception class: a stack trace could quote the user's text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedinterest.shared.secure_identity import CERT_KEY, SIG_KEY
from fedinterest.shared.secure_prg import PRG_CONFIG_KEY
from fedinterest.shared.secure_protocol import masked_shapes
from fedinterest.shared.wire import (
    EVAL_METRICS,
    PACKED_KEY,
    TRAIN_METRICS,
    SchemaMismatch,
    check_metrics,
    decode_packed,
)
from flwr.app import Context, Error, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.parameter import bytes_to_ndarray

from . import message_cache
from .policy import DeclineReason
from .text_scan import MIN_WHOLE, WINDOW, TextPatterns, metric_bytes  # noqa: F401

log = logging.getLogger("fedinterest.client")

ERROR_BLOCKED = 601
ERROR_DEVICE = 602

# The guard needs the device's schema and raw texts; the ClientApp registers a provider per
# message (both depend on the node's store and the run's catalog).
_PROVIDER: Callable[[Message, Context], tuple] | None = None


def set_provider(fn: Callable[[Message, Context], tuple]) -> None:
    """fn(msg, ctx) -> (WireSchema | None, list[str] raw texts of this device)."""
    global _PROVIDER
    _PROVIDER = fn


def raw_text_windows(texts: list[str]) -> TextPatterns:
    """The byte patterns of the device's texts (client/text_scan.py)."""
    return TextPatterns(texts)


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


def check_reply(reply: Message, schema, texts: list[str], message_type: str,
                secagg_stage: str | None = None, reference: list | None = None) -> None:
    """Raise SchemaMismatch when the reply may not leave the device. `secagg_stage` is the
    SecAgg+ stage of the request (None outside SecAgg+): only then may SecAgg+ records leave.
    `reference`: the global weights of the request, which an fp16-delta blob is relative to."""
    content = reply.content
    secagg = secagg_stage is not None
    inflated: list[bytes] = []  # decoded payloads, scanned for text beside the serialisation
    if secagg:
        _check_secagg_reply(content, secagg_stage, schema)
    elif message_type == MessageType.TRAIN:
        if len(content.array_records) != 1:
            raise SchemaMismatch("a train reply carries exactly one array record")
        rec = next(iter(content.array_records.values()))
        if schema is None:
            raise SchemaMismatch("no wire schema to check the update against")
        if list(rec) == [PACKED_KEY]:
            inflated = _check_packed(rec[PACKED_KEY], schema, reference)
        else:
            schema.check([(k, v.numpy()) for k, v in rec.items()])
    elif content.array_records and not secagg:
        raise SchemaMismatch(f"{message_type} replies carry no arrays")
    allowed = TRAIN_METRICS if message_type == MessageType.TRAIN else EVAL_METRICS
    for rec in content.metric_records.values() if not secagg else ():
        check_metrics(dict(rec), allowed)
        _check_values(dict(rec))
    if message_type == MessageType.QUERY:
        _check_pseudonym_reply(content)
    elif content.config_records and not secagg:
        raise SchemaMismatch("replies carry no config records outside secure aggregation")
    patterns = raw_text_windows(texts)
    if not patterns:
        return
    metrics = [*content.metric_records.values(), *(
        rec for name, rec in content.config_records.items() if name == "fitres.metrics")]
    payload = [*(a.data for rec in content.array_records.values() for a in rec.values()),
               *inflated, *metric_bytes(metrics)]
    # record keys are allow-listed: short texts are looked for in the payload only
    if patterns.found_in(serialise(reply), tokens=False) or any(
            patterns.found_in(blob) for blob in payload):
        raise SchemaMismatch("the reply contains the device's raw text")


# The values each closed-domain metric may take (no room for anything else in them).
_METRIC_VALUES = {"refused": {0.0, 1.0},
                  "decline-reason": {float(r) for r in DeclineReason}}


def _check_values(metrics: dict) -> None:
    for key, allowed in _METRIC_VALUES.items():
        if key in metrics and float(metrics[key]) not in allowed:
            raise SchemaMismatch(f"metric '{key}' may only be one of {sorted(allowed)}")


def _check_packed(array, schema, reference: list | None) -> list[bytes]:
    """A packed update must decode to the schema. Returns the bytes to scan: the values as
    sent and as decoded."""
    decoded, values = decode_packed(array, schema, reference)
    return [values.tobytes(), b"".join(a.tobytes() for a in decoded)]


def _check_pseudonym_reply(content) -> None:
    """A query reply is exactly {"device": {"pseudonym": 32 hex chars}}."""
    recs = dict(content.config_records)
    if content.array_records or content.metric_records or list(recs) != ["device"]:
        raise SchemaMismatch("a query reply carries only the device pseudonym")
    rec = dict(recs["device"])
    pid = rec.get("pseudonym")
    if list(rec) != ["pseudonym"] or not isinstance(pid, str) or len(pid) != 32 or any(
            c not in "0123456789abcdef" for c in pid):
        raise SchemaMismatch("a query reply carries only a 32-hex-digit pseudonym")


# What each SecAgg+ stage's reply may carry in Flower's "secaggplus" record.
_SECAGG_KEYS = {
    Stage.SETUP: {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, PRG_CONFIG_KEY, CERT_KEY, SIG_KEY},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS},
    Stage.UNMASK: {Key.NODE_ID_LIST, Key.SHARE_LIST},
}


def _check_secagg_reply(content, stage: str, schema) -> None:
    """A SecAgg+ reply carries the protocol record of its stage (keys, encrypted shares,
    the masked vector, or key shares) and, at upload, Flower's emptied legacy result: an
    empty payload record, the weight and allow-listed metrics. The masked vector must have
    the shapes of the allow-listed payload (plus Flower's weight factor)."""
    upload = stage == Stage.COLLECT_MASKED_VECTORS
    allowed_cfg = {RECORD_KEY_CONFIGS} | ({"fitres.metrics", "fitres.status"} if upload else set())
    names = set(content.config_records)
    if names - allowed_cfg or RECORD_KEY_CONFIGS not in names:
        raise SchemaMismatch(f"SecAgg+ {stage} reply: config records "
                             f"{sorted(content.config_records)} are not allowed")
    record = content.config_records[RECORD_KEY_CONFIGS]
    extra = set(record) - _SECAGG_KEYS.get(stage, set())
    if extra:
        raise SchemaMismatch(f"SecAgg+ {stage} reply: keys {sorted(extra)} are not allowed")
    for key, val in record.items():
        items = val if isinstance(val, list) else [val]
        if not all(isinstance(v, (bytes, int)) and not isinstance(v, bool) for v in items) and \
                key != PRG_CONFIG_KEY:
            raise SchemaMismatch(f"SecAgg+ {stage} reply: '{key}' is not bytes or node ids")
    if not upload:
        if content.array_records or content.metric_records:
            raise SchemaMismatch(f"SecAgg+ {stage} reply carries arrays or metrics")
        return
    if set(content.array_records) - {"fitres.parameters"} or any(
            len(rec) for rec in content.array_records.values()):
        raise SchemaMismatch("SecAgg+ upload: arrays may leave only masked")
    weight = {k: dict(v) for k, v in content.metric_records.items()}
    if set(weight) - {"fitres.num_examples"} or any(set(v) - {"num_examples"}
                                                    for v in weight.values()):
        raise SchemaMismatch("SecAgg+ upload: only the weight may sit beside the vector")
    check_metrics(dict(content.config_records.get("fitres.metrics", {})), TRAIN_METRICS)
    _check_values(dict(content.config_records.get("fitres.metrics", {})))
    status = dict(content.config_records.get("fitres.status", {"code": 0, "message": ""}))
    if status != {"code": 0, "message": ""}:
        raise SchemaMismatch("SecAgg+ upload: the status must be a bare OK")
    if schema is None:
        raise SchemaMismatch("no wire schema to check the masked vector against")
    shapes = [bytes_to_ndarray(b).shape for b in record.get(Key.MASKED_PARAMETERS, [])]
    if shapes != masked_shapes(schema):
        raise SchemaMismatch(f"SecAgg+ upload: masked vector shapes {shapes[:4]}... do not "
                             "match the wire schema")


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage of a request (read before Flower's mod pops it), else None."""
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return None
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = record.get(Key.STAGE) if record is not None else None
    return stage if isinstance(stage, str) else None


def egress_guard_mod(msg: Message, ctx: Context, call_next) -> Message:
    stage = secagg_stage(msg)
    sent = msg.content.array_records.get("arrays") if msg.has_content() else None
    try:
        reply = call_next(msg, ctx)
    except Exception as e:  # noqa: BLE001 - any failure must leave as a sanitised error
        message_cache.forget_texts()
        log.warning("device error (%s); replying with the exception class only",
                    type(e).__name__)
        return Message(Error(ERROR_DEVICE, f"device error: {type(e).__name__}"), reply_to=msg)
    if reply.has_error():
        message_cache.forget_texts()
        return Message(Error(reply.error.code, "device error"), reply_to=msg)
    try:
        schema, texts = _PROVIDER(msg, ctx) if _PROVIDER else (None, [])
        reference = _reference(sent, schema) if _is_packed(reply) else None
        check_reply(reply, schema, texts, msg.metadata.message_type, stage, reference)
    except SchemaMismatch as e:
        log.error("egress guard blocked a %s reply: %s", msg.metadata.message_type, e)
        return Message(Error(ERROR_BLOCKED, f"egress guard blocked the reply: {e}"),
                       reply_to=msg)
    return reply


def _reference(sent, schema) -> list | None:
    """The request's global weights in schema order, when it carried all of them."""
    if sent is None or schema is None or list(sent) != schema.names:
        return None
    arrays = message_cache.decoded(sent)
    return [arrays[name] for name in schema.names]


def _is_packed(reply: Message) -> bool:
    return reply.has_content() and any(
        list(rec) == [PACKED_KEY] for rec in reply.content.array_records.values())
