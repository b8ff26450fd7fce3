"""A small provisioned world for the device-side privacy tests (tests/privacy): a catalog, a
few encrypted device stores with a canary text, and real Flower train messages through the
ClientApp, so an attack is tried exactly as a server would send it."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
from fedinterest.client import client_app as capp
from fedinterest.client.device import Device
from fedinterest.shared.config import RunConfig
from fedinterest.shared.published_catalog import PublishedCatalog
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from tests.helpers.legacy_defaults import legacy_config

N_ITEMS, DIM = 40, 16
CANARY = "zebra-quartz-canary-7731 my secret diary line"


def make_world(tmp_path: Path, n_devices: int = 1, events: int = 14, policy=None):
    """(catalog, catalog path, devices dir, base RunConfig). `policy`: a callable(cfg) giving
    the PrivacyPolicy to provision, or None for what Device.open gives a new store."""
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cat = PublishedCatalog([str(i) for i in range(N_ITEMS)], vecs,
                           [(f"t{i % 4}",) for i in range(N_ITEMS)],
                           np.arange(N_ITEMS, dtype=np.float32), "test-encoder",
                           [f"Item {i}" for i in range(N_ITEMS)])
    cat_path = cat.save(tmp_path / "catalog")
    devices = tmp_path / "devices"
    devices.mkdir()
    cfg = legacy_config(hidden=8, segment_len=6, n_negatives=8, batch_size=2, clients_per_round=1,
                    noise_multiplier=1.0, device_epsilon=8.0, update_format="arrays",
                    out_dir=str(tmp_path / "run"))
    for p in range(n_devices):
        key = devices / f"device-{p}.key"
        key.write_bytes(secrets.token_bytes(32))
        with Device.open(devices / f"device-{p}.db", key_file=key, catalog=cat) as dev:
            dev.store.add_events([{"item": str(int(x)), "timestamp": 1_000 + 60 * j,
                                   "text": CANARY if j % 3 == 0 else None}
                                  for j, x in enumerate(rng.choice(N_ITEMS, events,
                                                                   replace=False))])
            if policy is not None:
                dev.set_policy(policy(cfg))
    return cat, cat_path, devices, cfg


def initial_weights(cfg: RunConfig, cat: PublishedCatalog):
    from fedinterest.server.server_app import initial_weights as init
    from fedinterest.shared.fed_model import wire_schema

    return wire_schema(cfg, cat).names, init(cfg, cat)


def train_message(cfg: RunConfig, cat, cat_path, devices, weights, names, rnd: int = 1,
                  run_id: int = 5) -> Message:
    conf = {**cfg.to_flower(), "catalog-path": str(cat_path), "catalog-version": cat.version,
            "devices-dir": str(devices), "server-round": rnd}
    content = RecordDict({
        "arrays": ArrayRecord({n: Array(np.ascontiguousarray(w)) for n, w in zip(names, weights)}),
        "config": ConfigRecord(conf)})
    msg = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the runtime sets on delivery
    msg.metadata.__dict__["_run_id"] = run_id
    return msg


def context(p: int = 0) -> Context:
    return Context(run_id=5, node_id=7, node_config={"partition-id": p, "num-partitions": 1},
                   state=RecordDict(), run_config={})


def train(cfg, world, weights, names, rnd: int = 1, p: int = 0, run_id: int = 5):
    """Send one train round through the ClientApp; returns (reply arrays, reply metrics)."""
    cat, cat_path, devices, _ = world
    reply = capp.app(train_message(cfg, cat, cat_path, devices, weights, names, rnd, run_id),
                     context(p))
    assert not reply.has_error(), reply.error.reason
    rec = reply.content.array_records["arrays"]
    return [rec[n].numpy() for n in names], dict(reply.content.metric_records["metrics"])


def provision_policies(devices: Path, cfg: RunConfig, **overrides) -> int:
    """Give every store in `devices` (with its key file beside it) the policy a researcher
    provisions for run `cfg` (PrivacyPolicy.for_run): what simulate.prepare does, for tests
    that run one provisioned world under several configs. Returns the number of devices."""
    from fedinterest.client.policy import PrivacyPolicy

    policy = PrivacyPolicy.for_run(cfg, **overrides)
    stores = sorted(devices.glob("device-*.db"))
    for db in stores:
        with Device.open(db, key_file=db.with_suffix(".key"), create=False) as dev:
            dev.set_policy(policy)
    return len(stores)
