"""A tiny federation world for the wire/protocol privacy tests (tests/privacy): a 40-item
catalog, devices with chosen histories, and Flower messages as the server would send them."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
from fedinterest.client.device import Device
from fedinterest.shared.config import RunConfig
from fedinterest.shared.fed_model import wire_schema
from fedinterest.shared.published_catalog import PublishedCatalog
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from tests.helpers.legacy_defaults import PRE_DDP_DEFAULTS

N_ITEMS, DIM = 40, 16


def catalog(tmp: Path) -> tuple[PublishedCatalog, Path]:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cat = PublishedCatalog([str(i) for i in range(N_ITEMS)], vecs,
                           [(f"t{i % 4}",) for i in range(N_ITEMS)],
                           np.arange(N_ITEMS, dtype=np.float32), "test-encoder",
                           [f"Item {i}" for i in range(N_ITEMS)])
    return cat, cat.save(tmp / "catalog")


def authority():
    """A provisioning authority for SecAgg+ identities; None where the code has none (the
    attack tests then run against a code base without authenticated keys, and fail)."""
    try:
        from fedinterest.shared.secure_identity import Authority
    except ImportError:
        return None
    return Authority.generate()


def provision(devices: Path, p: int, cat: PublishedCatalog, items: list[int],
              authority=None) -> None:
    """Device `p` (simulation layout) with one event per item, a minute apart, and a SecAgg+
    identity certified by `authority` when given."""
    devices.mkdir(parents=True, exist_ok=True)
    key = devices / f"device-{p}.key"
    key.write_bytes(secrets.token_bytes(32))
    with Device.open(devices / f"device-{p}.db", key_file=key, catalog=cat) as dev:
        dev.store.add_events([{"item": str(i), "timestamp": 1_000 + 60 * j}
                              for j, i in enumerate(items)])
        dev.ensure_identity()
        if authority is not None:
            from fedinterest.client.device_identity import provision_identity

            provision_identity(dev.store, authority)


def config(tmp: Path, **kw) -> RunConfig:
    base = {"hidden": 8, "segment_len": 10, "n_negatives": 8, "batch_size": 2,
            "clients_per_round": 3, "noise_multiplier": 1.0, "device_epsilon": 1e6,
            "out_dir": str(tmp / "run"), "popularity": False}
    return RunConfig(**{**PRE_DDP_DEFAULTS, **base, **kw})


def initial(cfg: RunConfig, cat: PublishedCatalog) -> tuple[list[str], list[np.ndarray]]:
    from fedinterest.server.server_app import initial_weights

    return wire_schema(cfg, cat).names, initial_weights(cfg, cat)


def message(cfg: RunConfig, cat: PublishedCatalog, cat_path: Path, devices: Path,
            names: list[str], weights: list[np.ndarray], mtype: str, rnd: int = 1) -> Message:
    conf = {**cfg.to_flower(), "catalog-path": str(cat_path), "catalog-version": cat.version,
            "devices-dir": str(devices), "server-round": rnd}
    content = RecordDict({
        "arrays": ArrayRecord({n: Array(np.ascontiguousarray(w)) for n, w in zip(names, weights)}),
        "config": ConfigRecord(conf)})
    msg = Message(content=content, dst_node_id=7, message_type=mtype)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the runtime sets on delivery
    return msg


def context(p: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": p},
                   state=RecordDict(), run_config={})
