"""Distributed DP through the real ServerApp loop and ClientApp over an in-process grid: the
server sees only masked integer vectors, the round moves the model by the decoded noisy
mean, devices keep a distributed-DP ledger and refuse over budget, and a round that would
sum fewer than m devices releases nothing (devices refuse to unmask it)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from fedinterest.client import client_app as capp
from fedinterest.client.ddp_mod import device_ledger, min_contributions_guard
from fedinterest.client.device import Device
from fedinterest.server.server_app import initial_weights, run_server
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import DDP_STAGE
from fedinterest.shared.encoder import TextEncoder
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.shared.secure_protocol import POPULARITY_STAGE, STAGE_KEY
from fedinterest.simulations.data.synthetic import generate_world
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity
from fedinterest.simulations.simulate import prepare
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.parameter import bytes_to_ndarray

from tests.helpers.device_world import provision_policies
from tests.helpers.legacy_defaults import PRE_DDP_DEFAULTS

N_USERS = 8


@pytest.fixture(scope="module", autouse=True)
def _env():
    torch.set_num_threads(1)
    with server_task_identity():
        yield


def _cfg(out_dir, **kw) -> RunConfig:
    base = {"out_dir": str(out_dir), "rounds": 1, "clients_per_round": 6, "hidden": 8,
            "segment_len": 4, "n_negatives": 8, "min_clients": 2, "eval_clients": 1,
            "popularity": False, "popularity_noise": 0.0, "dp": "ddp-event",
            "noise_multiplier": 1.0, "device_epsilon": 100.0, "ddp_sample_rate": 0.5,
            "ddp_min_fraction": 0.5, "ddp_server_optimizer": "sgd", "ddp_server_lr": 0.1,
            "popularity_cohort": N_USERS}  # one count cohort of every device (m = 4)
    return RunConfig(**{**PRE_DDP_DEFAULTS, **base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("world")
    ds = generate_world(n_users=N_USERS, n_items=60, events_per_user=16, seed=3)
    info = prepare(_cfg(root), ds, encoder=TextEncoder(str(tiny_bert_dir), cache=None),
                   quiet=True)
    return root, info


def _run(world, dest, fault=None, provision: bool = False, **kw):
    """The prepared world under run settings `kw`; with `provision`, its devices' owners first
    set the policy of that run (else the devices keep the world's ddp-event policy)."""
    root, info = world
    shutil.copytree(root, dest)
    if provision:
        provision_policies(dest / "devices", _cfg(dest, **kw))
    cat = dest / "catalog" / f"catalog-{info['catalog_version']}.npz"
    grid = InProcessGrid(capp.app, {7919 * (i + 1): {"partition-id": i}
                                    for i in range(N_USERS)}, fault)
    fed = run_server(grid, _cfg(dest, **kw), cat, dest / "devices")
    return fed, grid, cat


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def test_ddp_round_moves_the_model_and_uploads_only_masked_integers(world, tmp_path):
    fed, grid, cat = _run(world, tmp_path / "run", rounds=2)
    w0 = _flat(initial_weights(fed.cfg, PublishedCatalog.load(cat)))
    assert [r["accepted"] for r in fed.state.history] == [6, 6]
    assert not np.allclose(_flat(fed.state.weights), w0)
    uploads = 0
    for reply in grid.received:
        if reply.has_error():
            continue
        for rec in reply.content.array_records.values():
            assert len(rec) == 0, "an array left a device unmasked"
        cfgs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfgs is not None and Key.MASKED_PARAMETERS in cfgs:
            masked = [bytes_to_ndarray(b) for b in cfgs[Key.MASKED_PARAMETERS]]
            assert all(a.dtype.kind in "iu" and a.min() >= 0 and a.max() < 2**40
                       for a in masked)  # integers below the SecAgg+ modulus
            uploads += 1
            metrics = dict(reply.content.config_records.get("fitres.metrics", {}))
            assert set(metrics) <= {"refused"}  # nothing n-dependent, no epsilon
    assert uploads == 12
    # every sampled device recorded two rounds in its own ledger; the server's bound agrees
    eps = fed.state.history[-1]["ddp_epsilon"]
    for p in range(N_USERS):
        with Device.open(tmp_path / "run" / "devices" / f"device-{p}.db",
                         key_file=tmp_path / "run" / "devices" / f"device-{p}.key",
                         create=False) as dev:
            ledger = device_ledger(dev, fed.cfg)
            assert len(ledger.rounds) <= 2 and ledger.epsilon() <= eps + 1e-9


def test_devices_over_budget_are_not_asked_and_nothing_is_released(world, tmp_path):
    # one round costs more than 0.5 at this noise: the server samples only devices with budget
    # for one more round, finds none, and stops before asking anyone
    fed, grid, cat = _run(world, tmp_path / "run", device_epsilon=0.5)
    assert fed.state.history == []
    assert not any(m.metadata.message_type == MessageType.TRAIN for m in grid.received)
    assert np.array_equal(_flat(fed.state.weights),
                          _flat(initial_weights(fed.cfg, PublishedCatalog.load(cat))))


@pytest.mark.parametrize("weaker", [{"noise_multiplier": 0.7}, {"device_epsilon": 1e6},
                                    {"max_grad_norm": 50.0}],
                         ids=["tiny-noise", "huge-budget", "large-clip"])
def test_a_server_cannot_weaken_distributed_dp_below_the_device_policy(world, tmp_path, weaker):
    # the devices were provisioned with the world's policy (noise 1.0, budget 100, clip 1):
    # a round config asking for less is declined (with a reason code), nothing is released
    fed, _, cat = _run(world, tmp_path / "run", rounds=1, **weaker)
    assert fed.state.history[0]["accepted"] == 0
    assert np.array_equal(_flat(fed.state.weights),
                          _flat(initial_weights(fed.cfg, PublishedCatalog.load(cat))))


def test_device_refuses_to_unmask_a_sum_of_fewer_than_m_devices():
    from fedinterest.client.popularity_count import record_share

    cfg = RunConfig(dp="ddp-event", clients_per_round=10, ddp_min_fraction=0.8,
                    popularity_cohort=10)
    config = ConfigRecord({**cfg.to_flower(), STAGE_KEY: DDP_STAGE, "server-round": 3})

    def unmask(active: list[int]) -> Message:
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
            {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
             Key.DEAD_NODE_ID_LIST: []}), "config": config})
        return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    passed = []
    # no share of this round recorded (the device sent none): nothing to unmask
    reply = min_contributions_guard(unmask(list(range(8))), ctx,
                                    lambda m, c: passed.append(m) or m)
    assert reply.has_error() and "no noise share" in reply.error.reason and not passed
    record_share(ctx, DDP_STAGE, 3, 8)  # what the train handler records: its share's m
    reply = min_contributions_guard(unmask(list(range(7))), ctx,
                                    lambda m, c: passed.append(m) or m)
    assert reply.has_error() and "sized for at least 8" in reply.error.reason and not passed
    min_contributions_guard(unmask(list(range(8))), ctx, lambda m, c: passed.append(m) or m)
    assert len(passed) == 1
    # the UNMASK message's config cannot lower m: the recorded share's m is the one checked
    config["ddp_min_fraction"] = 0.1
    reply = min_contributions_guard(unmask(list(range(7))), ctx,
                                    lambda m, c: passed.append(m) or m)
    assert reply.has_error() and "sized for at least 8" in reply.error.reason
    # the popularity count (every mode) carries the devices' noise shares too: held to the m
    # its share was sized for, ceil(ddp_min_fraction x popularity_cohort) = 8 of 10
    config[STAGE_KEY] = POPULARITY_STAGE
    config["server-round"] = 0
    record_share(ctx, POPULARITY_STAGE, 0, 8)
    reply = min_contributions_guard(unmask(list(range(7))), ctx,
                                    lambda m, c: passed.append(m) or m)
    assert reply.has_error() and "sized for at least 8" in reply.error.reason
    min_contributions_guard(unmask(list(range(8))), ctx, lambda m, c: passed.append(m) or m)
    assert len(passed) == 2


def test_a_distributed_dp_cohort_is_one_secagg_neighbourhood():
    from fedinterest.server.ddp_aggregate import DistributedDPServer
    from fedinterest.server.secure_round import MAX_SHARES
    from fedinterest.shared.errors import ConfigError
    from fedinterest.shared.wire import WireSchema

    schema = WireSchema.from_named_arrays([("w", np.zeros(4, np.float32))])
    DistributedDPServer(RunConfig(dp="ddp-event", clients_per_round=MAX_SHARES, ddp_train_only=""),
                        schema)
    with pytest.raises(ConfigError, match="clients_per_round"):
        DistributedDPServer(RunConfig(dp="ddp-event", clients_per_round=MAX_SHARES + 1,
                                      ddp_train_only=""), schema)


def test_user_level_round_clips_the_whole_update_and_accounts_without_amplification(
        world, tmp_path):
    fed, _, cat = _run(world, tmp_path / "run", provision=True, dp="ddp-user", user_noise_multiplier=1.0,
                       user_epsilon=100.0, local_epochs=2, batch_size=2)
    assert fed.state.history[0]["accepted"] == 6
    moved = _flat(fed.state.weights) - _flat(initial_weights(fed.cfg,
                                                             PublishedCatalog.load(cat)))
    assert np.linalg.norm(moved) > 0
    statement = fed.ddp.statement()
    assert statement["sample_rate"] is None and "no amplification" in statement["relation"]
    assert fed.state.history[0]["ddp_epsilon"] == pytest.approx(
        fed.ddp.epsilon_if_joined_every_round(1))


def test_a_device_without_training_data_sends_its_noise_share_and_does_not_decline(
        world, tmp_path):
    # holdout 20 > every history (16 events): no device has a training segment; declining
    # would tell the server so, so each contributes its noise share alone
    fed, grid, _ = _run(world, tmp_path / "run", holdout=20)
    assert fed.state.history[0]["accepted"] == 6
    for reply in grid.received:
        metrics = {} if reply.has_error() else dict(
            reply.content.config_records.get("fitres.metrics", {}))
        assert metrics.get("refused", 0.0) == 0.0


PRIOR_RUN = {"text_prior": 3, "prior_rank": 2,
             "ddp_train_only": "prior.recency,prior.pop,prior.log_scale,prior.adapter"}


def _spy_payloads(monkeypatch) -> list[tuple[np.ndarray, dict]]:
    """(integers mod Q, centred; metrics) of every distributed-DP payload a device hands to
    SecAgg+ for masking (what the mask hides from the server)."""
    from fedinterest.client import ddp_mod
    from fedinterest.shared.distributed_dp import Q

    seen, real = [], ddp_mod.secure_payload.legacy_reply

    def spy(msg, arrays, metrics, weight):
        v = np.mod(np.rint(_flat(arrays)).astype(np.int64) + Q // 2, Q)
        seen.append((np.where(v >= Q // 2, v - Q, v), dict(metrics)))
        return real(msg, arrays, metrics, weight)

    monkeypatch.setattr(ddp_mod.secure_payload, "legacy_reply", spy)
    return seen


def test_only_the_trained_coordinates_are_clipped_noised_and_sent(world, tmp_path, monkeypatch):
    from fedinterest.shared.distributed_dp import trained_index
    from fedinterest.shared.fed_model import wire_schema

    seen = _spy_payloads(monkeypatch)
    fed, _, cat = _run(world, tmp_path / "run", provision=True, rounds=2, **PRIOR_RUN)
    schema = wire_schema(fed.cfg, PublishedCatalog.load(cat))
    named = [(n, tuple(a.shape), str(a.dtype)) for n, a in zip(schema.names, schema.arrays)]
    trained = trained_index(fed.cfg, named)
    prior_size = sum(int(np.prod(a.shape)) for n, a in zip(schema.names, schema.arrays)
                     if n.startswith(("prior.recency", "prior.pop", "prior.log_scale",
                                      "prior.adapter")))
    assert len(trained) == prior_size == fed.ddp.params.dim < len(_flat(fed.state.weights))
    assert len(seen) == 12 and all(z.shape == (prior_size,) for z, _ in seen)
    # the integers carry the noise share on every sent coordinate (none is left exact zero
    # by chance at this share variance) and no other coordinate exists to carry anything
    assert all(np.count_nonzero(z) > 0.9 * prior_size for z, _ in seen)
    w0 = _flat(initial_weights(fed.cfg, PublishedCatalog.load(cat)))
    w = _flat(fed.state.weights)
    untouched = np.setdiff1d(np.arange(len(w0)), trained)
    # float32 weights round-trip through the server's float64 step: equal to 1e-6
    assert np.allclose(w[untouched], w0[untouched], rtol=1e-6, atol=1e-7)
    assert np.abs(w[trained] - w0[trained]).max() > 1e-3


def test_a_declining_device_still_adds_its_noise_share(world, tmp_path, monkeypatch):
    # the run asks for a budget above every device's policy: each declines, and its payload
    # is a noise share of the stated variance (not zeros): a server that kept decliners in the sum would still
    # release at least m shares of noise
    seen = _spy_payloads(monkeypatch)
    root, _ = world
    shutil.copytree(root, tmp_path / "run")  # the owners allow a budget of 0.5 only
    provision_policies(tmp_path / "run" / "devices", _cfg(tmp_path, device_epsilon=0.5))
    fed, _, _ = _run((tmp_path / "run", world[1]), tmp_path / "run2")
    assert fed.state.history[0]["accepted"] == 0
    assert len(seen) == 6 and all(m["refused"] == 1.0 for _, m in seen)
    noise = np.concatenate([z for z, _ in seen]).astype(np.float64)
    share = fed.ddp.params.share_variance
    assert abs(noise.mean()) < 5 * np.sqrt(share / len(noise))
    assert 0.8 * share < noise.var() < 1.25 * share


def test_a_server_claiming_a_larger_m_gets_shares_sized_for_the_devices_policy(
        world, tmp_path, monkeypatch):
    """Issue 15, m from the server: the round asks for m = 6 of 6 (each share 1/6 of the
    released variance); the owners rely on at most 2 honest devices, so each share carries at
    least half of it. Every device declines (budget), so each payload is its share alone.
    Fails if the device sizes its share for the round config's m."""
    seen = _spy_payloads(monkeypatch)
    root, _ = world
    shutil.copytree(root, tmp_path / "run")
    provision_policies(tmp_path / "run" / "devices", _cfg(tmp_path, device_epsilon=0.5),
                       max_assumed_honest=2)
    fed, _, _ = _run((tmp_path / "run", world[1]), tmp_path / "run2", ddp_min_fraction=1.0)
    assert fed.ddp.params.min_contributions == 6 and len(seen) == 6
    noise = np.concatenate([z for z, _ in seen]).astype(np.float64)
    policy_share = fed.ddp.params.central_variance / 2
    assert 0.8 * policy_share < noise.var() < 1.25 * policy_share


def test_the_popularity_count_is_charged_to_every_counted_devices_ddp_ledger(world, tmp_path):
    """The count is composed into the distributed-DP ledger the device checks and refuses on,
    and the server's per-device epsilon (results.json) composes the same releases. Fails if
    the count handler does not charge the ddp ledger (client/popularity_count.py,
    charge_ddp_ledger)."""
    from fedinterest.shared.distributed_dp_accounting import count_noise_multiplier

    fed, _, _ = _run(world, tmp_path / "run", provision=True, rounds=1, popularity=True,
                     popularity_noise=2.0)
    assert fed.popularity_release and fed.popularity_release["statement"] is not None
    sigma = count_noise_multiplier(fed.cfg)
    assert sigma == pytest.approx(2.0 / np.sqrt(2.0))  # event unit: replace-one bound
    by_pid = {}
    for p in range(N_USERS):
        with Device.open(tmp_path / "run" / "devices" / f"device-{p}.db",
                         key_file=tmp_path / "run" / "devices" / f"device-{p}.key",
                         create=False) as dev:
            ledger = device_ledger(dev, fed.cfg)
            by_pid[dev.pseudonym] = ledger
    assert all([r["label"] for r in led.releases] == ["popularity-count"]
               and led.releases[0]["noise_multiplier"] == pytest.approx(sigma)
               for led in by_pid.values())
    joined = fed.state.device_rounds
    assert joined and set(joined) <= set(by_pid)
    for pid, n in joined.items():
        ledger = by_pid[pid]
        assert len(ledger.rounds) == n
        # the device's own composed epsilon is what the server reports for it
        assert ledger.epsilon() == pytest.approx(fed.state.device_epsilon[pid])
        assert ledger.epsilon() == pytest.approx(fed.ddp.epsilon_if_joined_every_round(n, True))
        assert ledger.epsilon() > fed.ddp.epsilon_if_joined_every_round(n, False)
    # results.json states the composed total of the most exposed device
    from fedinterest.server.results import build_results

    stated = build_results(fed, fed.cfg, N_USERS)["privacy"]["distributed"]
    assert stated["epsilon_max"] == pytest.approx(max(by_pid[p].epsilon() for p in joined))
    assert stated["popularity_composed"] and stated["popularity_noise_multiplier"] == sigma
