"""The server's round loop with the real ClientApp over an in-process grid: rounds complete,
a resumed run reproduces an uninterrupted one exactly, and failing devices are tolerated."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from fedinterest.client import client_app as capp
from fedinterest.server.federation import event_epsilon
from fedinterest.server.message_log import decode, read_log
from fedinterest.server.server_app import initial_weights
from fedinterest.server.server_app import run_server as _run_server
from fedinterest.shared.config import RunConfig
from fedinterest.shared.encoder import TextEncoder
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.shared.wire import PACKED_KEY
from fedinterest.simulations.data.synthetic import generate_world
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity
from fedinterest.simulations.simulate import evaluation_reader, prepare
from flwr.app import Array, ArrayRecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from tests.helpers.device_world import provision_policies
from tests.helpers.legacy_defaults import PRE_DDP_DEFAULTS

N_USERS = 8


@pytest.fixture(autouse=True)
def _env():
    torch.set_num_threads(1)
    with server_task_identity():
        yield


def _cfg(out_dir, **kw) -> RunConfig:
    base = {"out_dir": str(out_dir), "rounds": 3, "clients_per_round": 4, "hidden": 8,
            "segment_len": 6, "n_negatives": 8, "batch_size": 2, "noise_multiplier": 1.0,
            "device_epsilon": 100.0, "min_clients": 2}
    return RunConfig(**{**PRE_DDP_DEFAULTS, **base, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("prepared")
    ds = generate_world(n_users=N_USERS, n_items=60, events_per_user=16, seed=3)
    info = prepare(_cfg(root), ds, encoder=TextEncoder(str(tiny_bert_dir), cache=None),
                   quiet=True)
    return root, info


def run_server(grid, cfg, cat, devices, **kw):
    """The ServerApp loop as the simulation runner drives it: evaluation metrics come from
    the devices' own reports (the replies carry none)."""
    return _run_server(grid, cfg, cat, devices,
                       evaluation_reader=evaluation_reader(devices, N_USERS), **kw)


def _copy(prepared, dest, cfg: RunConfig | None = None):
    """A copy of the prepared world; with `cfg`, its devices provisioned for that run's
    privacy settings (client/policy.py: a device follows its own policy, not the server)."""
    root, info = prepared
    shutil.copytree(root, dest)
    cat = dest / "catalog" / f"catalog-{info['catalog_version']}.npz"
    if cfg is not None:
        provision_policies(dest / "devices", cfg)
    return cat, dest / "devices"


def _grid(node_offset: int, fault=None) -> InProcessGrid:
    nodes = {node_offset + 7919 * (i + 1): {"partition-id": i} for i in range(N_USERS)}
    return InProcessGrid(capp.app, nodes, fault)


def test_rounds_train_evaluate_and_checkpoint(prepared, tmp_path):
    cat, devices = _copy(prepared, tmp_path / "run")
    cfg = _cfg(tmp_path / "run", popularity_devices=5)
    fed = run_server(_grid(0), cfg, cat, devices)
    # the DP popularity count ran under SecAgg+ on a sample of 5 devices, scaled to all 8
    stmt = fed.popularity_release["statement"]
    assert stmt["devices_queried"] == 5 and stmt["devices_summed"] == 5
    assert stmt["scaled_to_population"]["factor"] == N_USERS / 5
    hist = fed.state.history
    assert [r["round"] for r in hist] == [1, 2, 3]
    assert all(r["accepted"] == 4 for r in hist)
    assert all(0 <= r["metrics"]["test-ndcg@10"] <= 1 and r["metrics"]["test-users"] == N_USERS
               for r in hist)
    start = initial_weights(cfg, PublishedCatalog.load(cat))
    assert all(np.isfinite(w).all() for w in fed.state.weights)
    assert any(not np.array_equal(a, b) for a, b in zip(start, fed.state.weights))
    assert len(fed.state.device_epsilon) >= 4 and all(
        0 < e <= cfg.device_epsilon for e in fed.state.device_epsilon.values())
    meta = json.loads((tmp_path / "run/checkpoints/round-0003.json").read_text())
    assert meta["round"] == 3 and len(meta["history"]) == 3
    # every message is in the audit log, decodable as Flower wire messages
    frames = list(read_log(tmp_path / "run/messages/messages.log"))
    train_replies = [h for h, _ in frames if h["direction"] == "received" and h["type"] == "train"]
    sent = [h for h, _ in frames if h["direction"] == "sent"]
    assert len(train_replies) >= 3 * 4 and len(frames) == 2 * len(sent)
    updates = [decode(b).content.array_records for h, b in frames
               if h["direction"] == "received" and h["type"] == "train"]
    updates = [r["arrays"] for r in updates if "arrays" in r]
    # the default update_format fp32: one packed blob per update, as the device sent it
    assert len(updates) == 3 * 4 and all(list(u.keys()) == [PACKED_KEY] for u in updates)


def test_resume_reproduces_an_uninterrupted_run(prepared, tmp_path):
    # The popularity release draws its DP noise from OS entropy once per run (a resumed run
    # reuses its own release), so two separate runs differ there by design: compare without it.
    # reproducible_seeds: the devices seed from their secret and (seed, round), not the CSPRNG
    repro = {"popularity": False, "reproducible_seeds": True}
    cat_a, dev_a = _copy(prepared, tmp_path / "a", _cfg(tmp_path / "a", **repro))
    full = run_server(_grid(0), _cfg(tmp_path / "a", **repro), cat_a, dev_a).state.weights

    cat_b, dev_b = _copy(prepared, tmp_path / "b", _cfg(tmp_path / "b", **repro))
    run_server(_grid(0), _cfg(tmp_path / "b", rounds=2, **repro), cat_b,
               dev_b)  # "killed" after round 2
    # a restarted simulation draws new node ids; devices are found again by their pseudonyms
    resumed = run_server(_grid(12345), _cfg(tmp_path / "b", **repro), cat_b, dev_b,
                         resume=True)
    assert resumed.state.round == 3 and len(resumed.state.history) == 3
    for a, b in zip(full, resumed.state.weights):
        np.testing.assert_array_equal(a, b)


def test_round_completes_when_some_devices_fail(prepared, tmp_path):
    cat, devices = _copy(prepared, tmp_path / "run")
    failing = set()

    def fault(msg):
        # 30% of the nodes crash on every train message
        if msg.metadata.message_type == "train" and msg.metadata.dst_node_id % 10 < 3:
            failing.add(msg.metadata.dst_node_id)
            return RuntimeError("device crashed")
        return None

    grid = _grid(0, fault)
    fed = run_server(grid, _cfg(tmp_path / "run", clients_per_round=6), cat, devices)
    hist = fed.state.history
    assert failing, "the fault hook never fired"
    assert all(r["accepted"] + r["failed"] == r["sampled"] for r in hist)
    assert sum(r["failed"] for r in hist) > 0
    assert all(r["accepted"] >= 2 for r in hist)
    assert any("device error" in r.reason for r in fed.validator.rejections)


def test_evaluation_takes_a_fixed_sample_each_round_and_every_device_last(prepared, tmp_path):
    """eval_clients=3: the same three devices (a seeded sample) in rounds 1 and 2, every
    device in the last round; each mean comes with its standard error over the devices."""
    cat, devices = _copy(prepared, tmp_path / "run")
    evaluated: dict[int, list[int]] = {}

    def record(msg) -> None:  # the grid's fault hook, which never fails a device here
        if msg.metadata.message_type == "evaluate":
            rnd = int(msg.content.config_records["config"]["server-round"])
            evaluated.setdefault(rnd, []).append(msg.metadata.dst_node_id)

    cfg = _cfg(tmp_path / "run", rounds=3, clients_per_round=2, popularity=False,
               eval_clients=3, eval_every=1)
    hist = run_server(_grid(0, record), cfg, cat, devices).state.history
    assert len(evaluated[1]) == 3 and sorted(evaluated[1]) == sorted(evaluated[2])
    assert sorted(evaluated[3]) == sorted(_grid(0).get_node_ids())
    users = [r["metrics"]["test-users"] for r in hist]
    assert users == [3, 3, N_USERS]
    # the last round's standard errors, from the devices' own reports
    from fedinterest.client.evaluation_report import read_report
    from fedinterest.client.store import DeviceStore

    values = []
    for i in range(N_USERS):
        with DeviceStore.open(devices / f"device-{i}.db", key_file=devices / f"device-{i}.key",
                              create=False) as st:
            values.append(read_report(st)["sums"])
    for name, key in (("hr@10", "hits@10"), ("ndcg@10", "ndcg@10-sum")):
        x = np.array([v[f"test-{key}"] for v in values])
        assert hist[-1]["metrics"][f"test-{name}"] == pytest.approx(x.mean())
        assert hist[-1]["metrics"][f"test-{name}-se"] == pytest.approx(
            x.std(ddof=1) / np.sqrt(len(x)))


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum"])
def test_every_configured_strategy_runs_rounds(prepared, tmp_path, strategy):
    cat, devices = _copy(prepared, tmp_path / "run")
    cfg = _cfg(tmp_path / "run", strategy=strategy, rounds=1, clients_per_round=5,
               popularity=False, eval_clients=2)
    fed = run_server(_grid(0), cfg, cat, devices)
    assert [r["accepted"] for r in fed.state.history] == [5]
    start = initial_weights(cfg, PublishedCatalog.load(cat))
    assert all(np.isfinite(w).all() for w in fed.state.weights)
    assert any(not np.array_equal(a, b) for a, b in zip(start, fed.state.weights))
    inner = getattr(fed.strategy, "strategy", fed.strategy)
    assert type(inner).__name__.lower() == strategy


def test_packed_updates_aggregate_as_arrays_do(prepared, tmp_path):
    """update_format fp32 (one lossless blob per reply) gives the weights of one array per
    tensor bit for bit in fewer bytes up; an fp16 delta runs, stays close, and is smaller."""
    runs = {}
    for fmt in ("arrays", "fp32", "fp16"):
        cfg = _cfg(tmp_path / fmt, rounds=2, popularity=False, update_format=fmt,
                   reproducible_seeds=True)  # the same training in each format
        cat, devices = _copy(prepared, tmp_path / fmt, cfg)
        runs[fmt] = run_server(_grid(0), cfg, cat, devices)
    for a, b in zip(runs["arrays"].state.weights, runs["fp32"].state.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    start = initial_weights(cfg, PublishedCatalog.load(cat))
    moved = np.sqrt(sum(np.sum((a - s) ** 2) for a, s in zip(runs["arrays"].state.weights,
                                                            start)))
    off = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(runs["arrays"].state.weights,
                                                           runs["fp16"].state.weights)))
    assert 0 < off < 0.05 * moved  # float16 rounding of the update, not a different model
    up = {fmt: [r["bytes_up_per_client"] for r in fed.state.history]
          for fmt, fed in runs.items()}
    assert all(r["accepted"] == 4 for fed in runs.values() for r in fed.state.history)
    assert all(f16 < f32 < arr for arr, f32, f16 in zip(up["arrays"], up["fp32"], up["fp16"]))
    assert not any(fed.validator.rejections for fed in runs.values())


def test_a_corrupted_packed_update_is_rejected_and_the_round_completes(prepared, tmp_path):
    """A blob altered after the device's egress guard (on the wire, or by a malicious
    device) fails decode_update on the server: a recorded rejection, never a crash."""
    cat, devices = _copy(prepared, tmp_path / "run")
    corrupted = []

    def tampering_app(message, context):
        reply = capp.app(message=message, context=context)
        if message.metadata.message_type == "train" and not reply.has_error() \
                and context.node_config["partition-id"] == 0:
            blob = bytearray(reply.content["arrays"][PACKED_KEY].numpy().tobytes())
            blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the deflate stream
            reply.content["arrays"] = ArrayRecord(
                {PACKED_KEY: Array(np.frombuffer(bytes(blob), np.uint8))})
            corrupted.append(message.metadata.dst_node_id)
        return reply

    nodes = {7919 * (i + 1): {"partition-id": i} for i in range(N_USERS)}
    cfg = _cfg(tmp_path / "run", popularity=False, clients_per_round=N_USERS)
    fed = run_server(InProcessGrid(tampering_app, nodes), cfg, cat, devices)
    hist = fed.state.history
    assert corrupted and [r["round"] for r in hist] == [1, 2, 3]
    assert all(r["accepted"] == N_USERS - 1 and r["failed"] == 1 for r in hist)
    assert {r.node_id for r in fed.validator.rejections} == set(corrupted)
    assert all("update blob" in r.reason for r in fed.validator.rejections)
    assert all(np.isfinite(w).all() for w in fed.state.weights)


def test_update_format_does_not_apply_under_secagg(prepared, tmp_path, caplog):
    """SecAgg+ masks float64 deltas (the secure path is unchanged): a packed update_format is
    ignored there, with a logged note."""
    from fedinterest.server.federation import Federation
    from fedinterest.shared.fed_model import wire_schema

    cat, _ = _copy(prepared, tmp_path / "run")
    cfg = _cfg(tmp_path / "run", secagg=True, update_format="fp16", clients_per_round=N_USERS)
    catalog = PublishedCatalog.load(cat)
    with caplog.at_level("INFO", logger="fedinterest.server"):
        Federation(cfg, wire_schema(cfg, catalog), initial_weights(cfg, catalog), {}, tmp_path)
    assert "update_format=fp16 does not apply under secagg" in caplog.text


def test_update_format_is_validated():
    from fedinterest.shared.errors import ConfigError

    assert RunConfig().update_format == "fp32"
    with pytest.raises(ConfigError, match="update_format.*one of arrays, fp32, fp16.*fp8"):
        RunConfig(update_format="fp8")
    with pytest.raises(ConfigError, match="key 'update-format' expects one of arrays, fp32"):
        RunConfig.from_mapping({"update-format": "fp16-delta"}, source="run config")


def test_a_run_can_publish_an_earlier_runs_popularity_release(prepared, tmp_path):
    from fedinterest.shared.errors import ConfigError
    from fedinterest.simulations.simulate import reuse_popularity

    cat_a, dev_a = _copy(prepared, tmp_path / "a")
    first = run_server(_grid(0), _cfg(tmp_path / "a", rounds=1, popularity_devices=5), cat_a,
                       dev_a).popularity_release
    cat_b, dev_b = _copy(prepared, tmp_path / "b")
    reuse_popularity(tmp_path / "a", tmp_path / "b")
    records: set[str] = set()
    grid = _grid(0, fault=lambda msg: records.update(msg.content.config_records) or None)
    second = run_server(grid, _cfg(tmp_path / "b", rounds=1, popularity_devices=5), cat_b,
                        dev_b).popularity_release
    # the same counts and catalog version, from a copy inside run b; no device was asked again
    assert second["catalog_version"] == first["catalog_version"]
    assert second["statement"] == first["statement"] and second["reused_from"] == str(
        tmp_path / "a")
    assert str(tmp_path / "b") in second["catalog_path"]
    np.testing.assert_array_equal(PublishedCatalog.load(second["catalog_path"]).popularity,
                                  PublishedCatalog.load(first["catalog_path"]).popularity)
    assert records and RECORD_KEY_CONFIGS not in records  # no SecAgg+ count ran in run b
    other = tmp_path / "other"
    other.mkdir()
    (other / "prepared.json").write_text(json.dumps({"catalog_version": "another"}))
    with pytest.raises(ConfigError, match="another dataset or encoder"):
        reuse_popularity(tmp_path / "a", other)
    _copy(prepared, tmp_path / "c")
    with pytest.raises(ConfigError, match="made no popularity release"):
        reuse_popularity(other, tmp_path / "c")
    with pytest.raises(ConfigError, match="not a run directory"):
        reuse_popularity(tmp_path / "nowhere", tmp_path / "c")


def test_message_log_off_keeps_no_record_and_the_audit_says_why(prepared, tmp_path):
    from fedinterest.shared.errors import FedinterestError
    from fedinterest.simulations.audit.evidence import AuditRun

    cat, devices = _copy(prepared, tmp_path / "run")
    fed = run_server(_grid(0), _cfg(tmp_path / "run", rounds=1, popularity=False,
                                    message_log=False), cat, devices)
    assert [r["round"] for r in fed.state.history] == [1]
    assert not (tmp_path / "run" / "messages").exists()
    with pytest.raises(FedinterestError, match="message_log = false"):
        AuditRun(tmp_path / "run")


def test_simulate_in_process_writes_results_and_report(tmp_path, tiny_bert_dir):
    from fedinterest.shared.errors import ConfigError
    from fedinterest.simulations.simulate import run as simulate

    ds = generate_world(n_users=N_USERS, n_items=60, events_per_user=16, seed=3)
    cfg = _cfg(tmp_path / "run", rounds=2, popularity_devices=5)
    with pytest.raises(ConfigError, match="engine 'warp'"):  # before any work is done
        simulate(cfg, ds, engine="warp")
    with pytest.raises(ConfigError, match="not a run directory"):
        simulate(cfg, ds, engine="inprocess", popularity_from=tmp_path / "nowhere")
    assert not (tmp_path / "run").exists()
    res = simulate(cfg, ds, encoder=TextEncoder(str(tiny_bert_dir), cache=None), quiet=True,
                   engine="inprocess")
    assert res["engine"] == "inprocess" and [r["round"] for r in res["rounds"]] == [1, 2]
    assert res["privacy"]["popularity_release"]["devices_summed"] == 5
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["engine"] == "inprocess" and (tmp_path / "run" / "report.html").is_file()
    assert written["timings"]["popularity_count_seconds"] > 0
    # a second run publishing the first one's release spends and times no count of its own
    again = simulate(_cfg(tmp_path / "again", rounds=1, popularity_devices=5), ds,
                     encoder=TextEncoder(str(tiny_bert_dir), cache=None), quiet=True,
                     engine="inprocess", popularity_from=tmp_path / "run")
    assert again["timings"]["popularity_count_seconds"] is None
    assert again["privacy"]["popularity_release"]["reused_from"] == str(tmp_path / "run")


def test_declines_under_user_level_dp_are_declines_not_device_errors(prepared, tmp_path):
    # dp=both: a device whose event-level budget is spent returns the global weights. Flower's
    # clipping mod divided by that zero update's norm, so each decline came back as a
    # ZeroDivisionError "device error" (211 of them in a 20-round ml-latest-small run).
    cfg = _cfg(tmp_path / "run", rounds=4, popularity=False, dp="both",
               user_noise_multiplier=0.1, user_epsilon=1e6, eval_every=0)
    # a budget for one round of DP-SGD but not two
    cfg = cfg.replace(device_epsilon=(event_epsilon(cfg, 1) + event_epsilon(cfg, 2)) / 2)
    cat, devices = _copy(prepared, tmp_path / "run", cfg)
    fed = run_server(_grid(0), cfg, cat, devices)
    hist = fed.state.history
    assert sum(r["sampled"] - r["accepted"] for r in hist) > 0  # some devices declined
    assert sum(r["accepted"] for r in hist) > 0  # and some trained
    assert fed.validator.rejections == []


def test_clipping_mod_passes_unchanged_weights_and_clips_the_rest_in_both_layouts():
    from fedinterest.client import secure_payload
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres

    glob = [np.ones((3, 4), np.float32), np.zeros(2, np.float32)]
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    legacy = Message(fitins_to_recorddict(FitIns(ndarrays_to_parameters(glob),
                                                 {"clipping_norm": 0.5}), keep_input=True),
                     dst_node_id=1, message_type=MessageType.TRAIN)
    plain = Message(RecordDict({"arrays": ArrayRecord({"w": Array(glob[0]), "b": Array(glob[1])}),
                                "config": ConfigRecord({"clipping_norm": 0.5})}),
                    dst_node_id=1, message_type=MessageType.TRAIN)

    def legacy_weights(reply):
        return parameters_to_ndarrays(recorddict_to_fitres(reply.content, True).parameters)

    def plain_weights(reply):
        return reply.content.array_records["arrays"].to_numpy_ndarrays()

    for msg, make, weights in (
            (legacy, lambda m, w: secure_payload.legacy_reply(m, w, {}, 1.0), legacy_weights),
            (plain, lambda m, w: Message(RecordDict({"arrays": ArrayRecord(
                {"w": Array(w[0]), "b": Array(w[1])})}), reply_to=m), plain_weights)):
        same = capp._optional_fixedclipping(msg, ctx, lambda m, c, make=make: make(m, glob))
        assert all(np.array_equal(a, b) for a, b in zip(weights(same), glob))  # a decline
        moved = [glob[0] + 1.0, glob[1] + 1.0]  # update norm sqrt(14) > 0.5
        clipped = capp._optional_fixedclipping(
            msg, ctx, lambda m, c, make=make, moved=moved: make(m, moved))
        update = np.concatenate([(a - b).ravel() for a, b in zip(weights(clipped), glob)])
        assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-5)


def test_round_lr_falls_on_a_cosine_from_lr_to_the_final_fraction():
    from fedinterest.shared.errors import ConfigError

    cfg = RunConfig(rounds=5, lr=0.2, lr_final_fraction=0.1)
    lrs = [cfg.round_lr(r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.2) and lrs[-1] == pytest.approx(0.02)
    assert lrs[2] == pytest.approx(0.11)  # halfway: the mean of the two ends
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert {RunConfig(rounds=5, lr=0.2).round_lr(r) for r in range(1, 6)} == {0.2}
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="lr_final_fraction"):
            RunConfig(lr_final_fraction=bad)


def test_devices_train_with_the_rounds_scheduled_lr(prepared, tmp_path):
    cat, devices = _copy(prepared, tmp_path / "run")
    cfg = _cfg(tmp_path / "run", popularity=False, dp="off", lr=0.2, lr_final_fraction=0.25)
    run_server(_grid(0), cfg, cat, devices)
    sent = [decode(b) for h, b in read_log(tmp_path / "run/messages/messages.log")
            if h["direction"] == "sent" and h["type"] == "train"]
    by_round = {}
    for m in sent:
        conf = m.content.config_records["config"]
        by_round.setdefault(int(conf["server-round"]), set()).add(round(float(conf["lr"]), 9))
    assert by_round == {1: {0.2}, 2: {0.125}, 3: {0.05}}


def test_queries_to_every_device_go_through_the_push_window(prepared, tmp_path, monkeypatch):
    """The run loop bounds the messages in flight (server/windowed_grid.py): the hello and
    the evaluation of all devices reach every device, in pushes of at most the window."""
    from fedinterest.server import windowed_grid

    monkeypatch.setattr(windowed_grid, "PUSH_WINDOW", 3)
    cat, devices = _copy(prepared, tmp_path / "run")
    grid = _grid(0)
    pushes = []
    push = grid.push_messages
    grid.push_messages = lambda msgs: (pushes.append(len(msgs := list(msgs))), push(msgs))[1]
    fed = run_server(grid, _cfg(tmp_path / "run", rounds=1, popularity=False), cat, devices)
    assert fed.state.history[0]["metrics"]["test-users"] == N_USERS
    assert len(fed.pseudonyms) == N_USERS and max(pushes) == 3
