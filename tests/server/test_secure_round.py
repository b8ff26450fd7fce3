"""Hardened SecAgg+ inside our round loop, and the federated DP popularity count.

Everything runs through the real ServerApp loop and the real ClientApp (egress guard, hardened
SecAgg+ mod, update mod, clipping, DP-SGD) over an in-process grid, no Ray: the train round
under SecAgg+ equals plain FedAvg within the quantisation bound; the server never holds an
individual update; the popularity count is the exact sum (plus exactly the drawn noise) and
survives dropouts up to the threshold; devices refuse the count in the clear.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fedinterest.client import client_app as capp
from fedinterest.client.egress import check_reply, serialise
from fedinterest.server import strategies
from fedinterest.server.popularity_round import RECORD_NAME, ddp_cohorts, federated_popularity
from fedinterest.server.secure_round import (
    check_secure_config,
    secure_mean,
    share_parameters,
)
from fedinterest.server.server_app import initial_weights, run_server
from fedinterest.shared.config import RunConfig
from fedinterest.shared.encoder import TextEncoder
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.shared.secure_prg import PRG_CONFIG_KEY
from fedinterest.shared.secure_protocol import (
    COUNT_QUANTISATION,
    POPULARITY_STAGE,
    count_schema,
    train_quantisation,
)
from fedinterest.shared.wire import SchemaMismatch
from fedinterest.simulations.data.synthetic import generate_world
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity
from fedinterest.simulations.simulate import prepare
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.parameter import bytes_to_ndarray
from flwr.compat.common.recorddict_compat import fitins_to_recorddict

from tests.helpers.device_world import provision_policies
from tests.helpers.legacy_defaults import PRE_DDP_DEFAULTS

N_USERS = 8
CANARY = "zebra-quartz-canary-7731"


@pytest.fixture(scope="module", autouse=True)
def _env():
    """Messages need the task identity Flower's runtime sets (module scope: the runs below
    are module fixtures)."""
    torch.set_num_threads(1)
    with server_task_identity():
        yield


def _cfg(out_dir, **kw) -> RunConfig:
    base = {"out_dir": str(out_dir), "rounds": 1, "clients_per_round": 6, "hidden": 8,
            "segment_len": 6, "n_negatives": 8, "batch_size": 2, "noise_multiplier": 1.0,
            "device_epsilon": 100.0, "min_clients": 2, "eval_clients": 1, "popularity": False,
            "popularity_noise": 0.0,
            "reproducible_seeds": True}  # secure and plain runs are compared update for update
    return RunConfig(**{**PRE_DDP_DEFAULTS, **base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("world")
    ds = generate_world(n_users=N_USERS, n_items=60, events_per_user=16, seed=3)
    info = prepare(_cfg(root), ds, encoder=TextEncoder(str(tiny_bert_dir), cache=None),
                   quiet=True)
    return root, info, ds


def _copy(world, dest, cfg: RunConfig | None = None):
    """A copy of the world; with `cfg`, its devices provisioned for that run's privacy
    settings (a device follows its own policy, client/policy.py, not the round config)."""
    root, info, _ = world
    shutil.copytree(root, dest)
    if cfg is not None:
        provision_policies(dest / "devices", cfg)
    return dest / "catalog" / f"catalog-{info['catalog_version']}.npz", dest / "devices"


def _nodes() -> dict[int, dict]:
    return {7919 * (i + 1): {"partition-id": i} for i in range(N_USERS)}


def _run(world, dest, app=capp.app, fault=None, **kw):
    cat, devices = _copy(world, dest, _cfg(dest, **kw))
    grid = InProcessGrid(app, _nodes(), fault)
    fed = run_server(grid, _cfg(dest, **kw), cat, devices)
    return fed, grid, cat


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def _bound(cfg: RunConfig, n: int, total_weight: float) -> float:
    """Per coordinate: each device's stochastic rounding is off by < one step 2C/Q on its
    weighted value, so the weighted mean is off by < n * step * max_weight / total weight."""
    q = train_quantisation(cfg)
    step = 2 * q.clipping_range / q.quantization_range
    return n * step * q.max_weight / total_weight


@pytest.fixture(scope="module")
def event_runs(world, tmp_path_factory):
    """One train round with event-level DP, plain and under SecAgg+, from identical devices."""
    base = tmp_path_factory.mktemp("event")
    plain = _run(world, base / "plain")
    secure = _run(world, base / "secure", secagg=True)
    return plain, secure


def test_secure_round_equals_plain_fedavg_within_the_quantisation_bound(event_runs, world):
    (plain, _, cat), (secure, _, _) = event_runs
    cfg = secure.cfg
    (p_rec,), (s_rec,) = plain.state.history, secure.state.history
    assert s_rec["accepted"] == p_rec["accepted"] == cfg.clients_per_round
    start = _flat(initial_weights(cfg, PublishedCatalog.load(cat)))
    p, s = _flat(plain.state.weights), _flat(secure.state.weights)
    assert np.linalg.norm(p - start) > 0.01  # the round moved the model
    float32_rounding = 4 * np.finfo(np.float32).eps * np.abs(p).max()
    bound = _bound(cfg, cfg.clients_per_round, float(cfg.clients_per_round)) + float32_rounding
    assert np.abs(s - p).max() <= bound, (np.abs(s - p).max(), bound)
    # relative to the update itself the error is tiny: this is what sending updates buys
    assert np.linalg.norm(s - p) / np.linalg.norm(p - start) < 1e-3
    # the loop's bookkeeping is the same as on plain rounds
    assert s_rec["train_loss"] == pytest.approx(p_rec["train_loss"])
    assert secure.state.device_epsilon == plain.state.device_epsilon
    assert s_rec["bytes_up_per_client"] > 0


def test_server_never_holds_an_individual_update(event_runs):
    (_, p_grid, cat), (secure, s_grid, _) = event_runs
    weights0 = _flat(initial_weights(secure.cfg, PublishedCatalog.load(cat)))
    # individual updates, as the plain run's server received them (same devices, same seeds)
    updates = {}
    for m in p_grid.received:
        if m.metadata.message_type == MessageType.TRAIN and not m.has_error():
            rec = m.content.array_records["arrays"]
            updates[m.metadata.src_node_id] = _flat([rec[k].numpy() for k in rec]) - weights0
    assert len(updates) == secure.cfg.clients_per_round

    uploads, everything = [], b""
    for reply in s_grid.received:  # every reply of the run: hello, SecAgg+ stages, evaluate
        if reply.has_error():
            continue
        everything += serialise(reply)
        for rec in reply.content.array_records.values():
            assert len(rec) == 0, "an array left a device unmasked"
        cfgs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfgs is not None and Key.MASKED_PARAMETERS in cfgs:
            masked = [bytes_to_ndarray(b) for b in cfgs[Key.MASKED_PARAMETERS]]
            uploads.append((reply.metadata.src_node_id, _flat(masked[1:])))
    assert len(uploads) == secure.cfg.clients_per_round
    for node, seen in uploads:
        for other, update in updates.items():
            r = np.corrcoef(seen, update)[0, 1]
            assert abs(r) < 0.15, (node, other, r)  # ~6 sd of |r| for this many values
        # control: the same update merely quantised (no masks) is perfectly correlated
        assert np.corrcoef(np.round(updates[node] * 2**20), updates[node])[0, 1] > 0.99
    # and no 16-byte run of any individual float32 update appears anywhere it received
    for update in updates.values():
        raw = update.astype(np.float32).tobytes()
        big = np.argsort(-np.abs(update))[:20]
        for i in big:
            assert raw[4 * i:4 * i + 16] not in everything


def test_user_level_clipping_runs_inside_secagg(world, tmp_path, monkeypatch):
    """With user-level DP the devices clip before masking: with the server noise switched
    off in both runs, SecAgg+ and plain agree within the (finer) bound and the strategy
    noises with n = contributors."""
    seen_n: list[int] = []

    def no_noise(self, arrays):
        seen_n.append(self._n_averaged)
        return arrays

    monkeypatch.setattr(strategies.SecureNoiseClientSideFixedClipping,
                        "_add_noise_to_aggregated_arrays", no_noise)
    kw = {"dp": "user", "user_clip": 0.05, "user_epsilon": 1e6}
    plain, _, cat = _run(world, tmp_path / "plain", **kw)
    secure, _, _ = _run(world, tmp_path / "secure", secagg=True, **kw)
    cfg = secure.cfg
    assert seen_n == [cfg.clients_per_round] * 2
    start = _flat(initial_weights(cfg, PublishedCatalog.load(cat)))
    p, s = _flat(plain.state.weights), _flat(secure.state.weights)
    assert np.linalg.norm(p - start) <= cfg.user_clip * (1 + 1e-4)  # mean of clipped updates
    float32_rounding = 4 * np.finfo(np.float32).eps * np.abs(p).max()
    assert np.abs(s - p).max() <= _bound(cfg, 6, 6.0) + float32_rounding


def test_unhonest_or_declined_uploads_stay_out_of_the_sum(world, tmp_path):
    """A masked vector of the wrong shape, and the upload of a device that declined the round
    (budget spent), never enter the sum: SecAgg+ treats both as dropouts, only the first is a
    rejection, and the others' updates are still aggregated."""
    tamper, decline = sorted(_nodes())[:2]

    def app(message, context):
        reply = capp.app(message=message, context=context)
        cfgs = reply.content.config_records.get(RECORD_KEY_CONFIGS) if reply.has_content() \
            else None
        if cfgs is not None and Key.MASKED_PARAMETERS in cfgs:
            if context.node_id == tamper:
                cfgs[Key.MASKED_PARAMETERS] = cfgs[Key.MASKED_PARAMETERS][:-1]
            if context.node_id == decline:
                reply.content.config_records["fitres.metrics"]["refused"] = 1.0
        return reply

    fed, _, _ = _run(world, tmp_path / "run", app=app, secagg=True, clients_per_round=N_USERS,
                     dp="off")
    (rec,) = fed.state.history
    assert rec["accepted"] == N_USERS - 2 and rec["failed"] == 2
    assert [r.node_id for r in fed.validator.rejections] == [tamper]
    assert "arrays" in fed.validator.rejections[0].reason


# ----------------------------------------------------------------------------- popularity


def _true_counts(ds, cfg: RunConfig, partitions) -> np.ndarray:
    true = np.zeros(len(ds.catalog))
    for u, sl in ds.user_slices():
        if u in partitions:
            true[np.unique(ds.item[sl][: sl.stop - sl.start - cfg.holdout])] += 1
    return true


def _count(world, dest, fault=None, **kw):
    # one count cohort of every device, m = 4: noise 0, so the devices' shares are zero and
    # the published counts are the exact sum (the device-noised count: tests/privacy)
    cfg = _cfg(dest, **{"popularity": True, "popularity_cohort": N_USERS,
                        "ddp_min_fraction": 0.5, **kw})
    cat, devices = _copy(world, dest, cfg)
    catalog = PublishedCatalog.load(cat)
    grid = InProcessGrid(capp.app, _nodes(), fault)
    config = {**cfg.to_flower(), "catalog-path": str(cat), "catalog-version": catalog.version,
              "devices-dir": str(devices), "server-round": 0}
    released = federated_popularity(grid, sorted(_nodes()), cfg, cat, config, dest)
    return released, cfg, catalog


def _stage_fault(drops: dict[str, set[int]]):
    def fault(msg):
        cfgs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        stage = cfgs.get(Key.STAGE) if cfgs is not None else None
        if msg.metadata.dst_node_id in drops.get(stage, set()):
            return ConnectionError("device went offline")
        return None

    return fault


def test_popularity_count_is_the_exact_sum_and_publishes_a_new_version(world, tmp_path,
                                                                        caplog):
    with caplog.at_level("INFO", logger="flwr"):
        released, cfg, before = _count(world, tmp_path / "run")
    # Flower's workflow names the devices it sampled from (it said "out of 0" before the
    # round registered them with the workflow's client manager)
    assert f"strategy sampled {N_USERS} clients (out of {N_USERS})" in caplog.text
    true = _true_counts(world[2], cfg, set(range(N_USERS)))
    published = PublishedCatalog.load(released["catalog_path"],
                                       expected_version=released["catalog_version"])
    assert released["catalog_version"] != before.version
    np.testing.assert_array_equal(published.popularity, true)  # noise 0: exact
    assert released["contributors"] == N_USERS and released["statement"]["noise_std"] == 0
    assert released["statement"]["aggregation"].startswith("hardened SecAgg+")
    # released once: asking again (a resumed run) returns the record, nothing is recounted
    assert json.loads((tmp_path / "run" / RECORD_NAME).read_text()) == json.loads(
        json.dumps(released, default=float))
    again = federated_popularity(None, [], cfg, tmp_path / "nowhere", {}, tmp_path / "run")
    assert again["catalog_version"] == released["catalog_version"]


def test_popularity_count_survives_dropouts_up_to_the_threshold(world, tmp_path):
    k, t = share_parameters(N_USERS)
    nodes = sorted(_nodes())
    part = {n: c["partition-id"] for n, c in _nodes().items()}
    # k - t devices gone: one before sharing keys, one before uploading, one at unmask (its
    # vector is in the sum: only its key shares are missing)
    assert k - t == 3
    drops = {Stage.SHARE_KEYS: {nodes[0]}, Stage.COLLECT_MASKED_VECTORS: {nodes[1]},
             Stage.UNMASK: {nodes[2]}}
    released, cfg, _ = _count(world, tmp_path / "ok", fault=_stage_fault(drops))
    summed = {part[n] for n in nodes[2:]}
    true = _true_counts(world[2], cfg, summed)
    assert released["contributors"] == N_USERS - 2
    np.testing.assert_array_equal(PublishedCatalog.load(released["catalog_path"]).popularity,
                                  true)
    # one more dropout than the threshold allows: nothing is released, the catalog stays
    drops = {Stage.COLLECT_MASKED_VECTORS: set(nodes[:4])}
    released, _, before = _count(world, tmp_path / "gone", fault=_stage_fault(drops))
    assert released["statement"] is None and released["catalog_version"] == before.version


def test_device_refuses_the_count_outside_secure_aggregation(world, tmp_path):
    cfg = _cfg(tmp_path / "run", popularity=True)
    cat, devices = _copy(world, tmp_path / "run", cfg)
    catalog = PublishedCatalog.load(cat)
    config = {**cfg.to_flower(), "catalog-path": str(cat), "catalog-version": catalog.version,
              "devices-dir": str(devices), "stage": POPULARITY_STAGE}
    content = fitins_to_recorddict(
        FitIns(ndarrays_to_parameters([np.zeros(1, np.float32)]), config), True)
    grid = InProcessGrid(capp.app, _nodes())
    replies = grid.send_and_receive(
        [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in _nodes()])
    assert len(replies) == N_USERS and all(r.has_error() for r in replies)
    assert all("ClearCountRefused" in r.error.reason for r in replies)


def test_guard_admits_protocol_records_only_for_protocol_requests_and_scans_them(world):
    req = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=7,
                  message_type=MessageType.TRAIN)
    ok = {Key.PUBLIC_KEY_1: b"\x01" * 97, Key.PUBLIC_KEY_2: b"\x02" * 97, PRG_CONFIG_KEY: "v1"}

    def reply(record):
        return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(record))}),
                       reply_to=req)

    check_reply(reply(ok), None, [CANARY], MessageType.TRAIN, Stage.SETUP)
    with pytest.raises(SchemaMismatch, match="raw text"):  # text inside a protocol field
        check_reply(reply({**ok, Key.PUBLIC_KEY_1: CANARY.encode()}), None, [CANARY],
                    MessageType.TRAIN, Stage.SETUP)
    with pytest.raises(SchemaMismatch, match="not allowed"):  # a key of another stage
        check_reply(reply({**ok, Key.SHARE_LIST: [b"x"]}), None, [], MessageType.TRAIN,
                    Stage.SETUP)
    with pytest.raises(SchemaMismatch):  # protocol records in reply to a plain request
        check_reply(reply(ok), None, [], MessageType.TRAIN, None)


def test_settings_secagg_cannot_run_fail_early(tmp_path):
    with pytest.raises(ConfigError, match="individual update"):
        check_secure_config(_cfg(tmp_path, secagg=True, strategy="fedmedian"))
    with pytest.raises(ConfigError, match="3 to"):
        check_secure_config(_cfg(tmp_path, secagg=True, clients_per_round=2))
    check_secure_config(_cfg(tmp_path, secagg=True, strategy="fedadam"))
    # two devices: the sum would reveal each to the other; nothing is sent, nothing released
    ins = FitIns(ndarrays_to_parameters([np.zeros(1, np.float32)]), {})
    out = secure_mean(None, {1: ins, 2: ins}, 1, COUNT_QUANTISATION, count_schema(3),
                      frozenset())
    assert out.mean is None and out.failed == [1, 2]


def test_popularity_count_in_cohorts_sums_every_cohort_exactly(world, tmp_path):
    released, cfg, _ = _count(world, tmp_path / "run", popularity_cohort=3)
    true = _true_counts(world[2], cfg, set(range(N_USERS)))
    np.testing.assert_array_equal(PublishedCatalog.load(released["catalog_path"]).popularity,
                                  true)
    stmt = released["statement"]
    # 8 devices in cohorts of at most 3 would leave one of 2: three SecAgg+ rounds of 3, 3, 2
    # are not allowed (Flower needs 3), so two rounds of 4
    assert [c["devices"] for c in stmt["cohorts"]] == [4, 4]
    assert stmt["devices_summed"] == N_USERS and "2 SecAgg+ cohorts" in stmt["aggregation"]
    cfg4 = cfg.replace(popularity_cohort=4)
    assert [len(c) for c in ddp_cohorts(list(range(10)), cfg4)] == [5, 5]
    assert [len(c) for c in ddp_cohorts(list(range(2)), cfg4)] == [2]
    assert [len(c) for c in ddp_cohorts(list(range(10)), cfg.replace(popularity_cohort=2))] \
        == [4, 3, 3]  # never below Flower's SecAgg+ minimum of 3
