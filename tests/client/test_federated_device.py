"""The device SDK and the ClientApp driven in-process with real Flower Messages: what leaves a
device, federated evaluation sums, and the server's reply validation."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch
from fedinterest.client import client_app as capp
from fedinterest.client.device import Device, NotReadyError
from fedinterest.client.egress import check_reply, serialise
from fedinterest.client.policy import PrivacyPolicy
from fedinterest.client.store import EventValidationError
from fedinterest.server.validation import ReplyValidator
from fedinterest.shared.fed_model import wire_schema
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.shared.wire import PACKED_KEY, SchemaMismatch, decode_update, update_values
from fedinterest.simulations.inprocess_grid import server_task_identity
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from tests.helpers.legacy_defaults import legacy_config

CANARY = "zebra-quartz-canary-7731 my secret diary line"
N_ITEMS, DIM = 40, 16


@pytest.fixture(autouse=True)
def _one_thread_and_task_identity():
    """Messages need the task identity the Flower runtime sets; set it as a SuperLink would."""
    torch.set_num_threads(1)
    with server_task_identity():
        yield


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    topics = [(f"t{i % 4}",) for i in range(N_ITEMS)]
    cat = PublishedCatalog([str(i) for i in range(N_ITEMS)], vecs, topics,
                           np.arange(N_ITEMS, dtype=np.float32), "test-encoder",
                           [f"Item {i}" for i in range(N_ITEMS)])
    cat_path = cat.save(tmp_path / "catalog")
    devices = tmp_path / "devices"
    devices.mkdir()
    cfg = legacy_config(hidden=8, segment_len=6, n_negatives=8, batch_size=2, clients_per_round=2,
                    noise_multiplier=1.0, device_epsilon=50.0, out_dir=str(tmp_path / "run"))
    for p in range(2):
        key = devices / f"device-{p}.key"
        key.write_bytes(secrets.token_bytes(32))
        with Device.open(devices / f"device-{p}.db", key_file=key, catalog=cat) as dev:
            events = [{"item": str(int(x)), "timestamp": 1_000 + 60 * j,
                       "text": CANARY if j % 3 == 0 else None}
                      for j, x in enumerate(rng.choice(N_ITEMS, 12, replace=False))]
            ids = dev.store.add_events(events)
            dev.store.set_text_vectors({i: rng.normal(size=DIM).astype(np.float32)
                                        for i, e in zip(ids, events) if e["text"]})
            dev.set_policy(PrivacyPolicy.for_run(cfg))  # provisioned by its owner
    return cat, cat_path, devices, cfg


def _message(cfg, cat, cat_path, devices, weights, names, mtype, rnd=1):
    conf = {**cfg.to_flower(), "catalog-path": str(cat_path), "catalog-version": cat.version,
            "devices-dir": str(devices), "server-round": rnd}
    content = RecordDict({
        "arrays": ArrayRecord({n: Array(np.ascontiguousarray(w)) for n, w in zip(names, weights)}),
        "config": ConfigRecord(conf)})
    msg = Message(content=content, dst_node_id=7, message_type=mtype)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the runtime sets on delivery
    return msg


def _context(p):
    return Context(run_id=1, node_id=7, node_config={"partition-id": p, "num-partitions": 2},
                   state=RecordDict(), run_config={})


def _initial(cfg, cat):
    from fedinterest.server.server_app import initial_weights

    schema = wire_schema(cfg, cat)
    return schema, schema.names, initial_weights(cfg, cat)


@pytest.mark.parametrize("update_format", ["arrays", "fp32", "fp16"])
def test_canary_never_leaves_across_train_and_evaluate_rounds(world, update_format):
    cat, cat_path, devices, cfg = world
    cfg = cfg.replace(update_format=update_format)
    schema, names, weights = _initial(cfg, cat)
    canary_bytes = CANARY.encode()
    for rnd in (1, 2):
        for p in (0, 1):
            for mtype in (MessageType.TRAIN, MessageType.EVALUATE):
                reply = capp.app(_message(cfg, cat, cat_path, devices, weights, names, mtype,
                                          rnd), _context(p))
                assert not reply.has_error(), reply.error.reason
                blobs = [serialise(reply)]
                if mtype == MessageType.TRAIN:
                    rec = reply.content.array_records["arrays"]
                    if update_format == "arrays":
                        schema.check([(k, v.numpy()) for k, v in rec.items()])
                    else:  # one blob: its inflated values are scanned too
                        assert list(rec) == [PACKED_KEY]
                        packed = rec[PACKED_KEY].numpy().tobytes()
                        decoded = decode_update(packed, schema, weights)
                        blobs += [update_values(packed, schema)[1].tobytes(),
                                  b"".join(a.tobytes() for a in decoded)]
                for blob in blobs:
                    for w in range(8, len(canary_bytes) + 1, 4):
                        for i in range(len(canary_bytes) - w + 1):
                            assert canary_bytes[i:i + w] not in blob
                if mtype == MessageType.TRAIN:  # trained: the update and "refused" only
                    assert dict(reply.content.metric_records["metrics"]) == {"refused": 0.0,
                                                                              "decline-reason": 0.0}


def test_guard_blocks_text_unknown_metrics_and_foreign_arrays(world):
    cat, cat_path, devices, cfg = world
    schema, names, weights = _initial(cfg, cat)
    req = _message(cfg, cat, cat_path, devices, weights, names, MessageType.EVALUATE)
    leaky = Message(RecordDict({"metrics": ConfigRecord({"note": CANARY})}), reply_to=req)
    with pytest.raises(SchemaMismatch):
        check_reply(leaky, schema, [CANARY], MessageType.EVALUATE)
    bad_metric = Message(RecordDict({"metrics": _mr({"top-items": 3.0})}), reply_to=req)
    with pytest.raises(SchemaMismatch, match="allow-listed"):
        check_reply(bad_metric, schema, [], MessageType.EVALUATE)
    treq = _message(cfg, cat, cat_path, devices, weights, names, MessageType.TRAIN)
    extra = ArrayRecord({n: Array(w) for n, w in zip(names, weights)})
    extra["embedding-of-my-text"] = Array(np.zeros(DIM, np.float32))
    with pytest.raises(SchemaMismatch):
        check_reply(Message(RecordDict({"arrays": extra}), reply_to=treq), schema, [],
                    MessageType.TRAIN)
    # text hidden inside float bytes is found too
    smuggled = [w.copy() for w in weights]
    raw = np.frombuffer(CANARY.encode()[:24], dtype=np.float32)
    smuggled[0].reshape(-1)[:len(raw)] = raw
    rec = ArrayRecord({n: Array(w) for n, w in zip(names, smuggled)})
    with pytest.raises(SchemaMismatch, match="raw text"):
        check_reply(Message(RecordDict({"arrays": rec}), reply_to=treq), schema, [CANARY],
                    MessageType.TRAIN)


def _mr(d):
    from flwr.app import MetricRecord

    return MetricRecord(d)


def test_device_error_leaves_as_exception_class_only(world):
    cat, cat_path, devices, cfg = world
    _schema, names, weights = _initial(cfg, cat)
    msg = _message(cfg, cat, cat_path, devices, weights[:-1], names[:-1], MessageType.TRAIN)
    reply = capp.app(msg, _context(0))
    assert reply.has_error()
    assert CANARY not in reply.error.reason and "Traceback" not in reply.error.reason


def test_sdk_record_recommend_explain_forget(world, tmp_path):
    cat, _, _, cfg = world
    _schema, _names, weights = _initial(cfg, cat)
    key = tmp_path / "k"
    key.write_bytes(secrets.token_bytes(32))
    with Device.open(tmp_path / "d.db", key_file=key, catalog=cat) as dev:
        with pytest.raises(NotReadyError):
            dev.recommend()
        dev.record("3", text="loved it", timestamp=100)
        dev.record("5", timestamp=200)
        with pytest.raises(EventValidationError, match="not in the published catalog"):
            dev.record("nope", timestamp=300)
        with pytest.raises(EventValidationError, match="before the last"):
            dev.record("6", timestamp=150)
        with pytest.raises(EventValidationError, match="future"):
            dev.record("6", timestamp=4_000_000_000)
        dev.load_global_model(weights, cfg)
        recs = dev.recommend(5)
        assert len(recs) == 5 and not {"3", "5"} & {r.item for r in recs}
        exp = dev.explain(recs[0].item)
        assert recs[0].item in exp.reason or "Item" in exp.reason
        tl = dev.interests()
        assert len(tl["timeline"]) == 2 and tl["predicted_next"] is not None
        dev.store.put_blob("privacy-ledger", b'{"delta": 1e-05, "history": [[1.0, 0.5, 4]]}')
        assert dev.forget() == 2
        assert dev.export()["events"] == []
        assert dev.privacy()["epsilon"] > 0  # privacy already spent is not forgotten
        with pytest.raises(NotReadyError):
            dev.recommend()


def test_server_rejects_nan_wrong_shape_large_and_replayed_updates(world):
    cat, cat_path, devices, cfg = world
    schema, names, weights = _initial(cfg, cat)
    v = ReplyValidator(schema, max_update_norm=10.0)

    def reply(arrays, node):
        req = _message(cfg, cat, cat_path, devices, weights, names, MessageType.TRAIN)
        rec = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in zip(names, arrays)})
        m = Message(RecordDict({"arrays": rec, "metrics": _mr({"refused": 0.0})}),
                    reply_to=req)
        m.metadata.__dict__["_src_node_id"] = node
        return m

    good = [w + 0.01 for w in weights]
    nan = [w.copy() for w in weights]
    nan[0].reshape(-1)[0] = np.nan
    big = [w * 1e6 for w in weights]
    shape = [w.copy() for w in weights]
    shape[1] = np.zeros((3, 3), np.float32)
    acc, failed = v.filter(1, [reply(good, 1), reply(nan, 2), reply(big, 3), reply(shape, 4)],
                           weights)
    assert len(acc) == 1 and len(failed) == 3
    acc2, _failed2 = v.filter(2, [reply(good, 5)], weights)  # replay of round 1's update
    assert not acc2 and "replayed" in v.rejections[-1].reason
    reasons = " | ".join(r.reason for r in v.rejections)
    assert "NaN" in reasons and "norm" in reasons and "shape" in reasons


def test_training_randomness_comes_from_a_device_secret(world, tmp_path):
    """The server knows the run seed and the round; the DP noise seed must not follow from
    them: by default a fresh CSPRNG draw per round, recorded for the key holder; a policy with
    reproducible_seeds (experiments) derives it from a device secret, so a resume repeats."""
    cat, _, devices, cfg = world
    seeds = []
    for p in (0, 1):
        with Device.open(devices / f"device-{p}.db", key_file=devices / f"device-{p}.key",
                         catalog=cat, create=False) as dev:
            seeds.append(dev.training_seed(0, 1))
            assert dev.used_seed(0, 1) == seeds[-1]  # the key holder can re-run the round
            assert dev.training_seed(0, 1) != seeds[-1]  # never the same draw twice
            dev.set_policy(PrivacyPolicy.for_run(cfg, reproducible_seeds=True))
            repro = dev.training_seed(0, 1)
            assert dev.training_seed(0, 2) != repro
        with Device.open(devices / f"device-{p}.db", key_file=devices / f"device-{p}.key",
                         catalog=cat, create=False) as dev:
            assert dev.training_seed(0, 1) == repro  # reproducible: a resume repeats training
            assert dev.privacy()["reproducible_seeds"] is True
    assert seeds[0] != seeds[1]
    assert all(s != hash((0, 1, p)) % (2 ** 31) for p, s in enumerate(seeds))
