"""Audit check 1, egress: nothing a device sent holds its raw text, and every reply has the
shape, size and metrics the wire schema allows (under SecAgg+, only masked vectors)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import DDP_STAGE, params_from_config, payload_schema
from fedinterest.shared.secure_identity import CERT_KEY, SIG_KEY
from fedinterest.shared.secure_prg import PRG_CONFIG_KEY
from fedinterest.shared.secure_protocol import (
    POPULARITY_STAGE,
    STAGE_KEY,
    count_schema,
    masked_shapes,
)
from fedinterest.shared.wire import (
    EVAL_METRICS,
    PACKED_KEY,
    TRAIN_METRICS,
    ArraySpec,
    SchemaMismatch,
    WireSchema,
    decode_packed,
)
from fedinterest.simulations.audit.evidence import AuditRun, Frame
from fedinterest.simulations.audit.verdict import (
    FAIL,
    INCONCLUSIVE,
    MAX_LISTED,
    PASS,
    CheckResult,
)
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.parameter import bytes_to_ndarray
from flwr.compat.common.recorddict_compat import recorddict_to_fitins

WINDOW = 12  # bytes, as the device's egress guard (client/egress.py): any 12-byte quote leaks
MIN_TEXT = 4  # shorter texts match model bytes by chance; the guard ignores them too
# bytes beyond the payload's element bytes a reply may carry: framing, names, metrics, and
# numpy's .npy header per array (Flower serialises arrays with np.save)
METADATA_ALLOWANCE = 2048
METADATA_PER_ARRAY = 256


# -- 1. egress ---------------------------------------------------------------------------------
class TextScanner:
    """Finds any 12-byte window of any of the given texts in a byte string.

    Vectorised because the log holds megabytes of model floats: the first 8 bytes of every
    offset are looked up at once with numpy, and only the rare prefix hits are compared in
    full. Texts of 4..11 bytes are searched whole, as the guard does."""

    def __init__(self, texts: dict[str, list[str]]):
        self.owner: dict[bytes, set[str]] = defaultdict(set)
        self.short: dict[bytes, set[str]] = defaultdict(set)
        for who, items in texts.items():
            for t in items:
                b = t.encode("utf-8")
                if len(b) < MIN_TEXT:
                    continue
                if len(b) < WINDOW:
                    self.short[b].add(who)
                    continue
                for i in range(len(b) - WINDOW + 1):
                    self.owner[b[i:i + WINDOW]].add(who)
        self.prefixes = np.unique(np.array(
            [int.from_bytes(w[:8], "little") for w in self.owner], dtype=np.uint64))

    @property
    def n_windows(self) -> int:
        return len(self.owner) + len(self.short)

    def find(self, blob: bytes) -> set[str]:
        """Whose text appears in blob (empty set: nobody's)."""
        found: set[str] = set()
        for b, who in self.short.items():
            if b in blob:
                found |= who
        if len(blob) >= WINDOW and len(self.prefixes):
            a = np.frombuffer(blob, np.uint8)
            views = np.lib.stride_tricks.sliding_window_view(a, 8)[: len(blob) - WINDOW + 1]
            keys = np.ascontiguousarray(views).view("<u8").ravel()
            for off in np.flatnonzero(np.isin(keys, self.prefixes)):
                found |= self.owner.get(blob[off:off + WINDOW], set())
        return found


# Keys each SecAgg+ stage's reply may carry in Flower's "secaggplus_configs" record.
SECAGG_REPLY_KEYS = {
    Stage.SETUP: {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, PRG_CONFIG_KEY, CERT_KEY, SIG_KEY},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS},
    Stage.UNMASK: {Key.NODE_ID_LIST, Key.SHARE_LIST},
}
CLEAR_UNDER_SECAGG = {
    Key.PUBLIC_KEY_1: "Diffie-Hellman public key 1 (per device, per SecAgg+ round)",
    Key.PUBLIC_KEY_2: "Diffie-Hellman public key 2 (per device, per SecAgg+ round)",
    PRG_CONFIG_KEY: "the mask generator's name",
    CERT_KEY: "the device's signing-key certificate (from the provisioning authority)",
    SIG_KEY: "the device's signature over its node id and SecAgg+ public keys",
    Key.DESTINATION_LIST: "node ids the device's encrypted key shares go to",
    Key.CIPHERTEXT_LIST: "encrypted key shares (opaque to the server)",
    Key.MASKED_PARAMETERS: "the masked vector (uniform modulo 2^k without the other masks)",
    Key.NODE_ID_LIST: "node ids whose shares the device releases at unmasking",
    Key.SHARE_LIST: "secret shares released at unmasking",
    "fitres.num_examples": "the device's weight (always 1)",
}


def check_egress(run: AuditRun) -> CheckResult:
    """Every reply in the message log: no device's raw text (nor a planted canary), only
    allow-listed arrays, shapes, dtypes and metrics, and no more bytes than the payload needs."""
    texts = {f"device {d.index}": d.texts for d in run.devices}
    if run.canaries:
        texts["planted canary"] = run.canaries
    scanner = TextScanner(texts)
    schemas: dict[int, WireSchema] = {}

    def schema_for(reply: Frame) -> WireSchema:
        """The model the instruction carried: a reply may hold exactly those arrays."""
        if reply.request is None:
            raise _Violation("it answers no instruction in the log")
        if reply.request.index not in schemas:
            schemas[reply.request.index] = sent_schema(reply.request)
        return schemas[reply.request.index]

    violations: list[str] = []
    leaks: list[dict] = []
    kinds: Counter = Counter()
    clear: dict[str, set[str]] = defaultdict(set)
    overhead_max = 0
    n_scanned = 0
    for f in run.replies():
        n_scanned += 1
        who = scanner.find(f.raw)
        if who:
            leaks.append({"message": f.index, "node": f.node, "type": f.kind,
                          "whose_text": sorted(who)})
        msg = f.message
        if msg.has_error():
            kinds["error reply"] += 1
            continue
        stage = f.secagg_stage
        kinds[f"{f.kind} reply" + (f" (SecAgg+ {stage})" if stage else "")] += 1
        try:
            payload = _check_reply_shape(run, f, stage, schema_for, clear)
        except _Violation as v:
            violations.append(f"message {f.index} ({f.kind} reply from node {f.node}): {v}")
            continue
        payload, n_arrays, inflated = payload
        # a packed update compresses what it carries: scan its values as sent and as decoded
        who = set().union(*(scanner.find(b) for b in inflated)) - who if inflated else set()
        if who:
            leaks.append({"message": f.index, "node": f.node, "type": f.kind,
                          "whose_text": sorted(who), "in": "the decoded packed update"})
        overhead = len(f.raw) - payload
        overhead_max = max(overhead_max, overhead)
        allowance = METADATA_ALLOWANCE + METADATA_PER_ARRAY * n_arrays
        if overhead > allowance:
            violations.append(f"message {f.index} ({f.kind} reply from node {f.node}): "
                              f"{overhead} bytes beyond its {payload}-byte payload (allowance "
                              f"{allowance})")
    details = {
        "replies_scanned": n_scanned, "by_kind": dict(kinds),
        "text_windows": scanner.n_windows, "devices_with_text": sum(bool(t) for t in
                                                                    texts.values()),
        "planted_canaries": len(run.canaries),
        "raw_text_hits": leaks[:MAX_LISTED], "violations": violations[:MAX_LISTED],
        "max_metadata_bytes": overhead_max,
        "schema_digest_in_log": run.logged_schema_digest,
        "this_build_has_the_same_model": run.build_matches_run,
        "sent_in_the_clear": {k: sorted(v) for k, v in sorted(clear.items())},
    }
    return _egress_verdict(scanner, len(texts), n_scanned, leaks, violations, details)


def _egress_verdict(scanner: TextScanner, n_sources: int, n_scanned: int, leaks: list[dict],
                    violations: list[str], details: dict) -> CheckResult:
    """Fail on any raw-text hit or allow-list break; inconclusive when there was no text to
    look for."""
    if leaks or violations:
        whose = sorted({w for x in leaks for w in x["whose_text"]})
        reason = "; ".join(filter(None, [
            f"{len(leaks)} replies contain raw text of {', '.join(whose)[:200]}" if leaks
            else "",
            f"{len(violations)} replies break the allow-list: {violations[0]}" if violations
            else ""]))
        return CheckResult("egress", "Egress: what left the devices", FAIL, reason, details)
    if scanner.n_windows == 0:
        return CheckResult("egress", "Egress: what left the devices", INCONCLUSIVE,
                           "no device holds private text and no canary was planted: the "
                           "raw-text scan had nothing to look for; the shape checks passed",
                           details)
    return CheckResult("egress", "Egress: what left the devices", PASS,
                       f"{n_scanned} replies scanned for {scanner.n_windows} text windows of "
                       f"{n_sources} sources: no raw text; every array, dtype, shape, metric "
                       "and size matches the allow-list", details)


class _Violation(Exception):
    pass


def _metrics_ok(values: dict, allowed: frozenset[str], where: str) -> None:
    for key, value in values.items():
        if key not in allowed:
            raise _Violation(f"{where}: metric '{key}' is not allow-listed")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise _Violation(f"{where}: metric '{key}' is not a finite number")


def sent_schema(request: Frame) -> WireSchema:
    """Names, shapes and dtypes of the model an instruction carried (plain or SecAgg+)."""
    content = request.message.content
    if "arrays" in content.array_records:
        rec = content.array_records["arrays"]
        return WireSchema(tuple(ArraySpec(n, tuple(rec[n].shape), str(rec[n].dtype))
                                for n in rec))
    if "fitins.parameters" in content.array_records:
        arrays = parameters_to_ndarrays(recorddict_to_fitins(content, True).parameters)
        return WireSchema(tuple(ArraySpec(str(i), tuple(a.shape), str(a.dtype))
                                for i, a in enumerate(arrays)))
    raise _Violation("its instruction carried no model")


def _check_reply_shape(run: AuditRun, f: Frame, stage: str | None, schema_for,
                       clear: dict) -> tuple[int, int, list[bytes]]:
    """Raise _Violation unless the reply has exactly an allowed shape; returns the payload's
    element bytes (array elements, SecAgg+ keys and shares), its number of arrays and, for a
    packed update, the inflated bytes to scan for text (the values as sent and decoded)."""
    c = f.message.content
    arrays, configs, metrics = (dict(c.array_records), dict(c.config_records),
                                dict(c.metric_records))
    if f.kind == "query":
        rec = dict(configs.get("device", {}))
        pid = rec.get("pseudonym")
        if arrays or metrics or list(configs) != ["device"] or list(rec) != ["pseudonym"] or \
                not (isinstance(pid, str) and len(pid) == 32 and all(
                    ch in "0123456789abcdef" for ch in pid)):
            raise _Violation("a hello reply carries only a 32-hex-digit pseudonym")
        clear["hello"].add("pseudonym")
        return 0, 0, []
    if f.kind == "evaluate":
        if arrays or configs or list(metrics) not in ([], ["metrics"]):
            raise _Violation("an evaluate reply carries only the 'metrics' record")
        vals = dict(metrics.get("metrics", {}))
        _metrics_ok(vals, EVAL_METRICS, "evaluate")
        clear["evaluate"] |= set(vals)
        return 0, 0, []
    if f.kind != "train":
        raise _Violation(f"unexpected message type '{f.kind}'")
    if stage is None:
        return _plain_train_shape(f, arrays, configs, metrics, schema_for, clear)
    return _secagg_shape(run, f, stage, arrays, configs, metrics, schema_for, clear)

def _plain_train_shape(f: Frame, arrays: dict, configs: dict, metrics: dict, schema_for,
                       clear: dict) -> tuple[int, int, list[bytes]]:
    """A plain train reply: exactly the arrays of the model sent (or one packed blob) and
    allow-listed metrics."""
    schema = schema_for(f)
    if configs or set(arrays) != {"arrays"} or set(metrics) - {"metrics"}:
        raise _Violation("a train reply carries the 'arrays' and 'metrics' records only")
    rec = arrays["arrays"]
    names = list(rec.keys())
    vals = dict(metrics.get("metrics", {}))
    if names == [PACKED_KEY]:
        inflated = _check_packed(f, rec[PACKED_KEY], schema)
        _metrics_ok(vals, TRAIN_METRICS, "train")
        clear["train (plain)"] |= {"the model update (one packed blob)"} | set(vals)
        return rec[PACKED_KEY].numpy().nbytes, 1, inflated
    if names != schema.names:
        raise _Violation("array names differ from the model it was sent")
    for spec in schema.arrays:
        arr = rec[spec.name]
        if tuple(arr.shape) != spec.shape or arr.dtype != spec.dtype:
            raise _Violation(f"array '{spec.name}': {arr.dtype}{tuple(arr.shape)}, "
                             f"expected {spec.dtype}{spec.shape}")
    payload = sum(rec[n].numpy().nbytes for n in names)
    if payload != schema.nbytes:
        raise _Violation(f"array payload of {payload} bytes, the schema needs "
                         f"{schema.nbytes}")
    _metrics_ok(vals, TRAIN_METRICS, "train")
    clear["train (plain)"] |= {"the model update (all arrays)"} | set(vals)
    return payload, len(names), []


def _secagg_shape(run: AuditRun, f: Frame, stage: str, arrays: dict, configs: dict,
                  metrics: dict, schema_for, clear: dict) -> tuple[int, int, list[bytes]]:
    """A SecAgg+ stage reply: only that stage's keys; at upload, integer masked vectors of the
    payload's shapes and the bare weight beside them."""
    record = dict(configs.get(RECORD_KEY_CONFIGS, {}))
    upload = stage == Stage.COLLECT_MASKED_VECTORS
    allowed_cfg = {RECORD_KEY_CONFIGS} | ({"fitres.metrics", "fitres.status"} if upload
                                          else set())
    if not record or set(configs) - allowed_cfg:
        raise _Violation(f"SecAgg+ {stage}: config records {sorted(configs)} not allowed")
    extra = set(record) - SECAGG_REPLY_KEYS.get(stage, set())
    if extra:
        raise _Violation(f"SecAgg+ {stage}: keys {sorted(extra)} not allowed")
    clear[f"SecAgg+ {stage}"] |= set(record)
    if not upload:
        if arrays or metrics:
            raise _Violation(f"SecAgg+ {stage}: carries arrays or metrics")
        return sum(len(v) if isinstance(v, bytes) else 8 for val in record.values()
                   for v in (val if isinstance(val, list) else [val])), 0, []
    if any(len(r) for r in arrays.values()) or set(arrays) - {"fitres.parameters"}:
        raise _Violation("SecAgg+ upload: arrays may leave only masked")
    if set(metrics) - {"fitres.num_examples"} or any(
            set(dict(v)) - {"num_examples"} for v in metrics.values()):
        raise _Violation("SecAgg+ upload: only the weight may sit beside the masked vector")
    vals = dict(configs.get("fitres.metrics", {}))
    _metrics_ok(vals, TRAIN_METRICS, "SecAgg+ upload")
    if dict(configs.get("fitres.status", {"code": 0, "message": ""})) != {"code": 0,
                                                                         "message": ""}:
        raise _Violation("SecAgg+ upload: the status must be a bare OK")
    clear[f"SecAgg+ {stage}"] |= {"fitres.num_examples"} | {f"metric {k}" for k in vals}
    req_cfg = f.config()
    if req_cfg.get(STAGE_KEY) == POPULARITY_STAGE:
        schema = count_schema(len(run.catalog(str(req_cfg.get("catalog-version")))))
    elif req_cfg.get(STAGE_KEY) == DDP_STAGE:  # the trained coordinates only
        schema = _ddp_payload_schema(run, req_cfg)
    else:
        schema = schema_for(f)
    blobs = record.get(Key.MASKED_PARAMETERS, [])
    try:
        masked = [bytes_to_ndarray(b) for b in blobs]
    except ValueError as e:
        raise _Violation(f"SecAgg+ upload: masked vector unreadable ({e})") from None
    if [tuple(a.shape) for a in masked] != masked_shapes(schema):
        raise _Violation("SecAgg+ upload: masked shapes do not match the payload's schema")
    if any(a.dtype.kind not in "iu" for a in masked):
        raise _Violation("SecAgg+ upload: masked values are not integers")
    return sum(a.nbytes for a in masked), len(masked), []


def _ddp_payload_schema(run: AuditRun, req_cfg: dict) -> WireSchema:
    """The schema of a distributed-DP payload, from the round config and its catalog."""
    from fedinterest.shared.fed_model import federated_model_config
    from fedinterest.shared.model import build_model, weight_schema

    known = set(RunConfig().to_flower())
    cfg = RunConfig.from_mapping({k: v for k, v in req_cfg.items() if k in known},
                                 source="logged round config")
    catalog = run.catalog(str(req_cfg.get("catalog-version")))
    model_schema = weight_schema(build_model(federated_model_config(cfg, catalog)))
    return payload_schema(params_from_config(cfg, model_schema))


def _check_packed(f: Frame, array, schema: WireSchema) -> list[bytes]:
    """A packed update (shared.wire.encode_update, RunConfig.update_format fp32/fp16) must
    decode, as the server decodes it, to the model it answers; returns its values as sent
    and as decoded, which the raw-text scan must see (the blob itself is deflated)."""
    try:
        decoded, values = decode_packed(array, schema, sent_weights(f.request))
    except SchemaMismatch as e:
        raise _Violation(f"packed update: {e}") from None
    return [values.tobytes(), b"".join(a.tobytes() for a in decoded)]


def sent_weights(request: Frame) -> list[np.ndarray]:
    """The global weights an instruction carried (plain or SecAgg+), in its order."""
    content = request.message.content
    if "arrays" in content.array_records:
        rec = content.array_records["arrays"]
        return [rec[n].numpy() for n in rec]
    return parameters_to_ndarrays(recorddict_to_fitins(content, True).parameters)


def logged_update(f: Frame) -> list[np.ndarray]:
    """The weights a plain train reply carried: its arrays, or its packed blob decoded
    against the model of the instruction it answers."""
    rec = f.message.content.array_records["arrays"]
    if list(rec) != [PACKED_KEY]:
        return [rec[n].numpy() for n in rec]
    return decode_packed(rec[PACKED_KEY], sent_schema(f.request), sent_weights(f.request))[0]
