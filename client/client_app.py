"""The Flower ClientApp (Message API) around the device SDK.

Simulation and deployment differ only in where a node's store is: in simulation node
`partition-id` p opens `<devices-dir>/device-<p>.db` (provisioned by the runner); in
deployment the SuperNode's node config names `store` and `key-file`. The catalog comes from
the path and version the server announces in the round config, and so does the round's
`RunConfig`: a request, which the device's own privacy policy reviews (client/policy.py); a
declined round answers with the global weights, `refused` and a numeric `decline-reason`.
The store's key: `key-file`, `passphrase-env` or `keyring-service` (client/crypto.py,
key_arguments). Mods, outermost first: the
egress guard, hardened SecAgg+ for messages of that protocol, the masked payload made an
update (see secure_payload.py), then Flower's client-side clipping when user-level DP asks
for it: clipping happens before masking. Under SecAgg+ requests and replies use Flower's
legacy "fitins"/"fitres" layout, which the train handler detects and answers in kind.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import DDP_STAGE
from fedinterest.shared.fed_model import wire_schema
from fedinterest.shared.optional import missing_extra
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.shared.secure_protocol import count_schema
from fedinterest.shared.wire import PACKED_KEY, encode_update

try:  # the ClientApp is the 'flower' extra; the device SDK (client/device.py) is the core
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.client.mod import fixedclipping_mod as legacy_fixedclipping_mod
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins, recorddict_to_fitres
except ModuleNotFoundError as e:
    raise missing_extra(e, "flower", "the Flower ClientApp") from None

from . import ddp_mod, egress, message_cache, popularity_count, secure_payload
from .crypto import key_arguments
from .device import Device
from .device_identity import DeviceIdentity, load_identity
from .evaluation_report import write_report
from .policy import DeclineReason, decline_reason
from .private_round import COUNT_STAGE, count_round, round_seed

log = logging.getLogger("fedinterest.client")


class RoundDeclined(RuntimeError):
    """The device declined a request it can only answer with an error (the popularity count
    under SecAgg+); the egress guard sends the class name only."""


@functools.lru_cache(maxsize=4)
def _catalog(path: str, version: str) -> PublishedCatalog:
    return PublishedCatalog.load(path, expected_version=version)


@functools.lru_cache(maxsize=4)
def _schema(cfg_items: tuple, path: str, version: str):
    return wire_schema(RunConfig.from_mapping(dict(cfg_items)), _catalog(path, version))


@functools.lru_cache(maxsize=4)
def _ddp_schema(cfg_items: tuple, path: str, version: str):
    """The distributed-DP payload's schema (trained coordinates only), once per run config:
    it builds the model to read its parameter names."""
    return ddp_mod.payload_schema_for(RunConfig.from_mapping(dict(cfg_items)),
                                      _catalog(path, version))


_KNOWN = frozenset(RunConfig().to_flower())


@functools.lru_cache(maxsize=8)
def _parsed_config(items: tuple) -> RunConfig:
    """The RunConfig of a round config's items, parsed once per distinct config (a message
    reads it several times, a worker gets the same one for every device of a round).
    Shared by the callers: RunConfig is only ever copied (`replace`), never modified."""
    return RunConfig.from_mapping({k: v for k, v in items if k in _KNOWN},
                                  source="round config")


def _run_config(msg: Message) -> tuple[RunConfig, dict]:
    raw = dict(secure_payload.round_config(msg))
    items = tuple(sorted(raw.items()))
    try:
        return _parsed_config(items), raw
    except TypeError:  # an unhashable value (a list): parse it uncached
        return _parsed_config.__wrapped__(items), raw


def _store_location(ctx: Context, raw: dict) -> tuple[Path, Path | None]:
    """The store and, when the node has one, its key file (see `_store_key`)."""
    nc = ctx.node_config
    if "store" in nc:
        return Path(str(nc["store"])), (Path(str(nc["key-file"])) if "key-file" in nc
                                        else None)
    if "partition-id" not in nc or "devices-dir" not in raw:
        raise RuntimeError("node config names no store (set store= and key-file=, "
                           "passphrase-env= or keyring-service=)")
    d = Path(str(raw["devices-dir"]))
    p = int(nc["partition-id"])
    return d / f"device-{p}.db", d / f"device-{p}.key"


def _store_key(ctx: Context, raw: dict) -> tuple[Path, dict]:
    """The store and DeviceStore.open's key argument: a simulated node's key file beside
    its store, a deployed node's key file, passphrase from the environment, or the OS keyring
    (client/crypto.py, key_arguments)."""
    store, key = _store_location(ctx, raw)
    if "store" in ctx.node_config:
        return store, key_arguments(dict(ctx.node_config), store)
    return store, {"key_file": key}


def _open_device(msg: Message, ctx: Context) -> tuple[Device, RunConfig, dict]:
    cfg, raw = _run_config(msg)
    store, key = _store_key(ctx, raw)
    catalog = _catalog(str(raw["catalog-path"]), str(raw["catalog-version"]))
    return Device.open(store, catalog=catalog, create=False, **key), cfg, raw


def _weights(msg: Message) -> tuple[list[str], list[np.ndarray]]:
    if secure_payload.is_legacy(msg):  # arrays in schema order, without names
        arrays = parameters_to_ndarrays(recorddict_to_fitins(msg.content, True).parameters)
        return [str(i) for i in range(len(arrays))], arrays
    arrays = message_cache.decoded(msg.content.array_records["arrays"])
    return list(arrays), list(arrays.values())


def _guard_inputs(msg: Message, ctx: Context):
    """Schema and raw texts for the egress guard (see client/egress.py)."""
    _, raw = _run_config(msg)
    if secure_payload.is_count_query(msg):
        schema = count_schema(len(_catalog(str(raw["catalog-path"]),
                                           str(raw["catalog-version"]))))
    elif ddp_mod.is_ddp_round(msg):  # only the trained coordinates are masked and sent
        cfg, _ = _run_config(msg)
        schema = _ddp_schema(tuple(sorted(cfg.to_flower().items())), str(raw["catalog-path"]),
                             str(raw["catalog-version"]))
    else:
        schema = _model_schema(msg, ctx)
    texts = message_cache.take_texts(msg, ctx)  # the handler's own read of the store
    if texts is None:
        store, key = _store_key(ctx, raw)
        from .store import DeviceStore

        with DeviceStore.open(store, create=False, verify=False, **key) as st:
            texts = _raw_texts([e.text for e in st.events() if e.text], st)
    return schema, texts


def _raw_texts(event_texts: list[str], store) -> list[str]:
    """The device's raw texts the guard looks for: its events' texts and its notes."""
    notes = store.get_blob("notes")
    return event_texts + (notes.decode().split("\x1e") if notes else [])


def _hand_texts(msg: Message, ctx: Context, device: Device) -> None:
    """Give the egress guard the texts the handler's round decrypted (nothing when it read
    no history): the guard then scans for them without opening the store again."""
    texts = device.raw_texts_read()
    if texts is not None:
        message_cache.hand_texts(msg, ctx, _raw_texts(texts, device.store))


def _model_schema(msg: Message, ctx: Context):
    cfg, raw = _run_config(msg)
    return _schema(tuple(sorted(cfg.to_flower().items())), str(raw["catalog-path"]),
                   str(raw["catalog-version"]))


egress.set_provider(_guard_inputs)


def _identity(msg: Message, ctx: Context) -> DeviceIdentity | None:
    """The device's SecAgg+ signing identity from its store (client/device_identity.py)."""
    _, raw = _run_config(msg)
    store, key = _store_key(ctx, raw)
    from .store import DeviceStore

    with DeviceStore.open(store, create=False, verify=False, **key) as st:
        return load_identity(st)


def _optional_fixedclipping(msg: Message, ctx: Context, call_next) -> Message:
    """Flower's fixedclipping_mod when the server asks for clipping (user-level DP), in the
    legacy variant for SecAgg+ instructions."""
    if "clipping_norm" not in secure_payload.round_config(msg):
        return call_next(msg, ctx)
    legacy = secure_payload.is_legacy(msg)
    reply = call_next(msg, ctx)
    if _unchanged(msg, reply, legacy):
        # A device that declined (budget spent, no data) returns the global weights.
        # Flower's clip divides by the update's norm, so a zero update raised
        # ZeroDivisionError and the decline reached the server as a device error.
        # Clipping a zero update is the identity anyway.
        return reply
    clip = legacy_fixedclipping_mod if legacy else fixedclipping_mod
    return clip(msg, ctx, lambda _m, _c: reply)


def _unchanged(msg: Message, reply: Message, legacy: bool) -> bool:
    """The reply carries exactly the weights the request sent."""
    if not reply.has_content() or reply.has_error():
        return False
    try:
        if legacy:
            sent = parameters_to_ndarrays(recorddict_to_fitins(msg.content, True).parameters)
            back = parameters_to_ndarrays(recorddict_to_fitres(reply.content, True).parameters)
        else:
            (sent_rec,), (back_rec,) = (msg.content.array_records.values(),
                                        reply.content.array_records.values())
            if list(sent_rec) != list(back_rec):
                return False
            sent, back = sent_rec.to_numpy_ndarrays(), back_rec.to_numpy_ndarrays()
    except (KeyError, ValueError):  # not a weights reply: Flower's mod reports it
        return False
    return len(sent) == len(back) and all(np.array_equal(a, b) for a, b in zip(sent, back))


# RunConfig.update_format -> shared.wire's encode_update format
_WIRE_FORMATS = {"fp32": "fp32", "fp16": "fp16-delta"}


def _pack_update_mod(msg: Message, ctx: Context, call_next) -> Message:
    """Packs a train reply's arrays as the run's `update_format` says (one `encode_update`
    blob under PACKED_KEY, bound to the model's schema; fp16 relative to the global weights
    sent). A mod outside Flower's clipping mod, so user-level DP clips the arrays first;
    SecAgg+ replies (legacy records, masked) and count queries pass unchanged."""
    train = (msg.metadata.message_type == "train" and msg.has_content()
             and "arrays" in msg.content.array_records and not secure_payload.is_legacy(msg)
             and not secure_payload.is_count_query(msg))
    sent = _weights(msg) if train else None
    reply = call_next(msg, ctx)
    if sent is None or reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    cfg, _ = _run_config(msg)
    if cfg.update_format == "arrays":
        return reply
    names, glob = sent
    rec = reply.content.array_records["arrays"]
    schema = _model_schema(msg, ctx)
    if names != schema.names or list(rec.keys()) != schema.names:
        raise ValueError("the update's arrays are not the model's wire schema")
    blob = encode_update([rec[n].numpy() for n in names], schema,
                         _WIRE_FORMATS[cfg.update_format], glob)
    reply.content["arrays"] = ArrayRecord({PACKED_KEY: Array(np.frombuffer(blob, np.uint8))})
    return reply


app = ClientApp(mods=[egress.egress_guard_mod, _pack_update_mod,
                      ddp_mod.min_contributions_guard, secure_payload.secagg_mod(_identity),
                      secure_payload.update_as_delta_mod(_model_schema),
                      _optional_fixedclipping])


@app.train()
def train(msg: Message, ctx: Context) -> Message:
    torch.set_num_threads(1)  # one core per simulated device (see docs/DESIGN.md)
    if secure_payload.is_count_query(msg):
        return _count(msg, ctx)
    if ddp_mod.is_ddp_round(msg):
        return _ddp_train(msg, ctx)
    names, weights = _weights(msg)
    device, cfg, raw = _open_device(msg, ctx)
    with device:
        rnd = int(raw.get("server-round", 0))
        # FedProx's pull only when the server runs FedProx (the config always carries the mu)
        mu = float(raw.get("proximal-mu", 0.0)) if cfg.strategy == "fedprox" else 0.0
        res = device.fit(weights, cfg, rnd, run_id=int(msg.metadata.run_id), proximal_mu=mu)
        _hand_texts(msg, ctx, device)
    if res.refused:
        log.info("declined round %s: %s", rnd, res.refused)  # the text stays on the device
    # Nothing but the update, whether the device declined and why (a closed set of codes): no
    # example count, steps, epsilon or loss, which are functions of the private data
    # (docs/PRIVACY.md, finding 4). Every device weighs 1 in the aggregate.
    metrics = {"refused": 1.0 if res.refused else 0.0,
               "decline-reason": float(decline_reason(res.refused))}
    if secure_payload.is_legacy(msg):
        return secure_payload.legacy_reply(msg, res.weights, metrics, 1.0)
    arrays = ArrayRecord({n: Array(np.ascontiguousarray(w)) for n, w in zip(names, res.weights)})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def _ddp_train(msg: Message, ctx: Context) -> Message:
    """A distributed-DP round: the device's integer payload (client/ddp_mod.py); the m its
    noise share is sized for is recorded for the UNMASK guard."""
    device, cfg, raw = _open_device(msg, ctx)
    with device:
        rnd = int(raw.get("server-round", 0))
        reply = ddp_mod.train_reply(msg, device, cfg, rnd, device.training_seed(cfg.seed, rnd))
        popularity_count.record_share(ctx, DDP_STAGE, rnd,
                                      ddp_mod.device_min_contributions(device, cfg))
        return reply


def _count(msg: Message, ctx: Context) -> Message:
    """The popularity count query, in every dp mode: the device's scaled 0/1 vector plus its
    own noise share, under SecAgg+ only (client/popularity_count.py), charged to its ledger
    first (client/private_round.py, count_round; and the ddp ledger in a ddp run)."""
    device, cfg, raw = _open_device(msg, ctx)
    rnd = int(raw.get("server-round", 0))
    with device:
        decline = count_round(device, cfg, rnd, int(msg.metadata.run_id))
        if decline is not None:
            log.info("declined the count of round %s: %s", rnd, decline)
            raise RoundDeclined(f"decline-reason {int(decline.reason)}")
        over = popularity_count.charge_ddp_ledger(device, cfg, rnd)
        if over is not None:
            log.info("declined the count of round %s: %s", rnd, over)
            raise RoundDeclined(f"decline-reason {int(DeclineReason.BUDGET_SPENT)}")
        rng = np.random.default_rng(round_seed(device.store, device.policy, cfg.seed, rnd,
                                               COUNT_STAGE))
        return popularity_count.count_reply(msg, ctx, device, cfg, rnd, rng)


@app.query()
def hello(msg: Message, ctx: Context) -> Message:
    """The device's pseudonym (see Device.pseudonym); nothing else."""
    device, _, _ = _open_device(msg, ctx)
    with device:
        pid = device.pseudonym
    return Message(RecordDict({"device": ConfigRecord({"pseudonym": pid})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, ctx: Context) -> Message:
    """Evaluate the sent model on the device's held-out events and keep the result on the
    device (client/evaluation_report.py); the reply is an empty acknowledgement: per-device
    metrics for a model the server chooses would name the held-out items."""
    torch.set_num_threads(1)
    _, weights = _weights(msg)
    device, cfg, raw = _open_device(msg, ctx)
    with device:
        sums = device.evaluate(weights, cfg)
        write_report(device.store, int(raw.get("server-round", 0)), sums)
        _hand_texts(msg, ctx, device)
    return Message(RecordDict({}), reply_to=msg)
