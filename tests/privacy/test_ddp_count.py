"""The popularity count of a distributed-DP run (issue 15): the devices add the noise before
SecAgg+ masks their vectors, so the cohort sum the server unmasks already carries it.

Through the real ClientApp (egress guard, hardened SecAgg+ mod, the count handler) and the
server's `federated_popularity` over an in-process grid: the unmasked cohort sum differs from
the exact sum by noise of the stated standard deviation (and the same check fails when the
devices add no share or a quarter of it), the server adds no noise, a device's policy floor
above the config's noise is the noise it adds, the ledger's charge is the Skellam formula,
and a cohort below m releases nothing.
"""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
from fedinterest.client import client_app as capp
from fedinterest.client import ddp_mod
from fedinterest.client.ddp_mod import count_integers, device_ledger
from fedinterest.client.device import Device
from fedinterest.client.policy import PrivacyPolicy
from fedinterest.server import popularity_round
from fedinterest.server.popularity_round import _noisy_sum_or_none, federated_popularity
from fedinterest.server.secure_round import MAX_SHARES, SecureOutcome
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import Q
from fedinterest.shared.distributed_dp_accounting import ORDERS, rdp_to_epsilon
from fedinterest.shared.distributed_dp_count import (
    MAX_COHORT,
    count_min_contributions,
    count_params,
    count_scale,
)
from fedinterest.shared.encoder import TextEncoder
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.simulations.data.synthetic import generate_world
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity
from fedinterest.simulations.simulate import prepare
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from tests.helpers.device_world import provision_policies
from tests.helpers.legacy_defaults import PRE_DDP_DEFAULTS

N_USERS, N_ITEMS = 10, 800  # 800 coordinates for the variance test


@pytest.fixture(scope="module", autouse=True)
def _env():
    torch.set_num_threads(1)
    with server_task_identity():
        yield


def _cfg(out_dir, **kw) -> RunConfig:
    # popularity_max_items above any device's distinct items: no subset is drawn, so the
    # exact sum is known from the dataset
    base = {"out_dir": str(out_dir), "rounds": 1, "clients_per_round": 6, "hidden": 8,
            "segment_len": 4, "n_negatives": 8, "min_clients": 2, "eval_clients": 1,
            "dp": "ddp-event", "noise_multiplier": 1.0, "device_epsilon": 8.0,
            "popularity": True, "popularity_noise": 2.0, "popularity_max_items": 32,
            "popularity_cohort": N_USERS, "ddp_min_fraction": 0.8}
    return RunConfig(**{**PRE_DDP_DEFAULTS, **base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("world")
    ds = generate_world(n_users=N_USERS, n_items=N_ITEMS, events_per_user=16, seed=5)
    info = prepare(_cfg(root), ds, encoder=TextEncoder(str(tiny_bert_dir), cache=None),
                   quiet=True)
    return root, info, ds


def _nodes() -> dict[int, dict]:
    return {7919 * (i + 1): {"partition-id": i} for i in range(N_USERS)}


def _count(world, dest, fault=None, **kw):
    """One federated count of the world's devices under run settings `kw`: (the release, the
    config, the catalog before, the grid, the cohort sums the server unmasked)."""
    root, info, _ = world
    cfg = _cfg(dest, **kw)
    shutil.copytree(root, dest)
    provision_policies(dest / "devices", cfg)
    cat = dest / "catalog" / f"catalog-{info['catalog_version']}.npz"
    catalog = PublishedCatalog.load(cat)
    grid = InProcessGrid(capp.app, _nodes(), fault)
    config = {**cfg.to_flower(), "catalog-path": str(cat), "catalog-version": catalog.version,
              "devices-dir": str(dest / "devices"), "server-round": 0}
    seen = []
    decode = popularity_round.decode_sum

    def spy(mean, n):  # what the server holds after unmasking: the cohort's integer sum
        total = decode(mean, n)
        seen.append(total.copy())
        return total

    popularity_round.decode_sum = spy
    try:
        released = federated_popularity(grid, sorted(_nodes()), cfg, cat, config, dest)
    finally:
        popularity_round.decode_sum = decode
    return released, cfg, catalog, grid, seen


def _exact_counts(ds, cfg: RunConfig) -> np.ndarray:
    true = np.zeros(len(ds.catalog))
    for _, sl in ds.user_slices():
        items = np.unique(ds.item[sl][: sl.stop - sl.start - cfg.holdout])
        assert len(items) <= cfg.popularity_max_items  # no random subset: exact
        true[items] += 1
    return true


def _noise_has_variance(noise: np.ndarray, variance: float) -> bool:
    """Mean 0 and variance `variance` within a 3.5-standard-error band over the coordinates
    (the variance's relative standard error is sqrt(2 / d), 0.05 at d = 800)."""
    d = noise.size
    ratio = float(noise.var()) / variance
    return abs(noise.mean()) < 5 * math.sqrt(variance / d) and \
        abs(ratio - 1) < 3.5 * math.sqrt(2 / d)


@pytest.fixture(scope="module")
def honest(world, tmp_path_factory):
    return _count(world, tmp_path_factory.mktemp("honest") / "run")


def test_the_unmasked_cohort_sum_carries_the_stated_noise(world, honest):
    released, cfg, _, _, seen = honest
    stmt = released["statement"]
    assert len(seen) == 1 and released["contributors"] == N_USERS
    gamma = count_scale(cfg)
    noise = seen[0] / gamma - _exact_counts(world[2], cfg)
    # stated: std popularity_noise sqrt(k) for the m shares the noise is sized for; n >= m
    # contributors add n/m of that variance
    m = count_min_contributions(cfg)
    assert stmt["noise_std"] == pytest.approx(2.0 * math.sqrt(32))
    assert _noise_has_variance(noise, stmt["noise_std"] ** 2 * N_USERS / m)


@pytest.mark.parametrize("share", [0.0, 0.25], ids=["no-share", "quarter-share"])
def test_the_noise_check_fails_when_devices_under_noise(world, tmp_path, monkeypatch, share):
    """The check above is not one that cannot fail: devices that add no share, or a share of
    a quarter of the variance, fail it."""
    real = ddp_mod.noisy_count

    def weak(vector, params, rng):
        return real(vector, dataclasses.replace(
            params, own_noise_multiplier=params.own_noise_multiplier * math.sqrt(share)), rng)

    monkeypatch.setattr(ddp_mod, "noisy_count", weak)
    released, cfg, _, _, seen = _count(world, tmp_path / "run")
    noise = seen[0] / count_scale(cfg) - _exact_counts(world[2], cfg)
    stated = released["statement"]["noise_std"] ** 2 * N_USERS / count_min_contributions(cfg)
    assert not _noise_has_variance(noise, stated)


def test_the_server_adds_no_noise_in_a_ddp_run(honest, monkeypatch):
    released, cfg, before, _, seen = honest
    published = PublishedCatalog.load(released["catalog_path"])
    assert released["catalog_version"] != before.version
    # the published counts are the unmasked sum, divided by gamma and clamped: nothing added
    np.testing.assert_array_equal(
        published.popularity,
        np.maximum(seen[0].astype(np.float64) / count_scale(cfg), 0).astype(np.float32))
    stmt = released["statement"]
    assert "the server adds no noise" in stmt["mechanism"]
    assert stmt["noise_added_by"].startswith("the devices")


def test_the_server_never_draws_count_noise_in_a_ddp_run(world, tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the server noised the count of a ddp run")

    monkeypatch.setattr(popularity_round, "release_counts", forbidden)
    released, *_ = _count(world, tmp_path / "run")
    assert released["statement"] is not None


def _open(dest, p: int, catalog=None) -> Device:
    return Device.open(dest / "devices" / f"device-{p}.db",
                       key_file=dest / "devices" / f"device-{p}.key", catalog=catalog,
                       create=False)


def test_a_device_whose_policy_floor_is_above_the_config_uses_its_floor(world, tmp_path):
    root, info, ds = world
    shutil.copytree(root, tmp_path / "w")
    catalog = PublishedCatalog.load(tmp_path / "w" / "catalog" /
                                    f"catalog-{info['catalog_version']}.npz")
    cfg = _cfg(tmp_path / "w", popularity_noise=2.0)
    gamma, m, k = count_scale(cfg), count_min_contributions(cfg), cfg.popularity_max_items
    exact = {}
    for p, (_, sl) in enumerate(ds.user_slices()):
        v = np.zeros(N_ITEMS)
        v[np.unique(ds.item[sl][: sl.stop - sl.start - cfg.holdout])] = 1
        exact[p] = v
    with _open(tmp_path / "w", 0, catalog) as dev:
        dev.set_policy(PrivacyPolicy.for_run(cfg, min_noise={"popularity-count": 6.0}))
        draws = [count_integers(dev, cfg, np.random.default_rng(i)) for i in range(4)]
        noise = np.concatenate([z - gamma * exact[0] for z in draws]) / gamma
        assert _noise_has_variance(noise, 6.0**2 * k / m)  # its floor, not the config's 2
        # and it answers the count (it does not decline) and charges what it can count on
        assert ddp_mod.charge_count(dev, cfg, 0) is None
        release = device_ledger(dev, cfg).releases[-1]
        assert release["own_noise_multiplier"] == 6.0
        assert release["mu"] == pytest.approx(gamma**2 * k * ((m - 1) * 2.0**2 + 6.0**2) / m)
    with _open(tmp_path / "w", 1, catalog) as dev:  # a floor below the config: the config's noise
        dev.set_policy(PrivacyPolicy.for_run(cfg, min_noise={"popularity-count": 1.0}))
        z = count_integers(dev, cfg, np.random.default_rng(0))
        assert _noise_has_variance((z - gamma * exact[1]) / gamma, 2.0**2 * k / m)


def _skellam_epsilon(l1: float, l2: float, mu: float, delta: float) -> float:
    """Agarwal, Kairouz, Liu 2021, Thm. 3.5, written out here, converted as Opacus does."""
    rdp = [a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2),
                                      3 * l1 / (2 * mu)) for a in ORDERS]
    return rdp_to_epsilon(np.asarray(rdp), delta)


def test_the_released_count_states_the_skellam_formula(honest):
    released, cfg, _, _, _ = honest
    gamma, k = count_scale(cfg), cfg.popularity_max_items
    # event unit: replace-one, L2 gamma sqrt(2k), L1 2 gamma k; mu = (sigma gamma)^2 k
    expected = _skellam_epsilon(2 * gamma * k, gamma * math.sqrt(2 * k),
                                (2.0 * gamma) ** 2 * k, cfg.delta)
    assert expected == pytest.approx(released["statement"]["run_unit_epsilon"])
    # user unit: add/remove one device, L2 gamma sqrt(k), L1 gamma k
    user = _skellam_epsilon(gamma * k, gamma * math.sqrt(k), (2.0 * gamma) ** 2 * k, cfg.delta)
    assert user == pytest.approx(released["statement"]["epsilon"])


def test_every_counted_device_charged_the_formula_before_the_count_left(world, honest):
    released, cfg, _, _, _ = honest
    gamma, k = count_scale(cfg), cfg.popularity_max_items
    expected = _skellam_epsilon(2 * gamma * k, gamma * math.sqrt(2 * k),
                                (2.0 * gamma) ** 2 * k, cfg.delta)
    dest = _run_dir(released)
    for p in range(N_USERS):
        with _open(dest, p) as dev:
            led = device_ledger(dev, cfg)
            assert [r["label"] for r in led.releases] == ["popularity-count"]
            assert led.epsilon() == pytest.approx(expected)


def _run_dir(released):
    from pathlib import Path

    return Path(released["catalog_path"]).parent.parent


def test_a_cohort_below_the_minimum_releases_nothing(world, tmp_path, caplog):
    # m = 10 of 10: one device gone before its upload leaves 9 < m; the other devices
    # refuse to unmask, and the server would drop the sum anyway
    gone = min(_nodes())

    def fault(msg):
        cfgs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        if (cfgs is not None and cfgs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
                and msg.metadata.dst_node_id == gone):
            return ConnectionError("device went offline")
        return None

    with caplog.at_level("ERROR", logger="flwr"):
        released, cfg, before, grid, seen = _count(world, tmp_path / "run", fault=fault,
                                                   ddp_min_fraction=1.0)
    assert count_min_contributions(cfg) == N_USERS
    assert released["statement"] is None and released["catalog_version"] == before.version
    assert seen == []  # nothing was unmasked
    # every remaining device refused at UNMASK (the reply's error is generic; the reason is in
    # the device's log)
    refusals = caplog.text.count("unmask a sum of 9 devices; the noise shares are sized for "
                                 "at least 10")
    assert refusals == N_USERS - 1
    assert sum(r.has_error() for r in grid.received) >= N_USERS - 1


def test_the_server_drops_a_cohort_sum_of_fewer_than_m(world):
    cfg = _cfg("/tmp/unused", ddp_min_fraction=1.0)
    gamma = count_scale(cfg)
    z = np.zeros(N_ITEMS)
    z[: cfg.popularity_max_items] = gamma  # each device counted the same k items, no noise
    mean = [z - Q // 2]  # Flower's unmasked mean of payloads z - Q/2
    assert _noisy_sum_or_none(SecureOutcome(mean=mean, contributors=list(range(N_USERS))),
                              cfg) is not None
    assert _noisy_sum_or_none(SecureOutcome(mean=mean, contributors=list(range(N_USERS - 1))),
                              cfg) is None


def test_the_count_sum_fits_the_modulus():
    """Wrap-around: MAX_COHORT contributions of gamma and 12 standard deviations of their
    shares stay inside Q/2 (shared/distributed_dp_count.py states the bound)."""
    assert MAX_COHORT == MAX_SHARES
    for noise, items, frac in [(2.0, 32, 0.8), (0.5, 8, 0.1), (50.0, 1000, 0.5)]:
        cfg = RunConfig(dp="ddp-event", popularity_noise=noise, popularity_max_items=items,
                        ddp_min_fraction=frac)
        p = count_params(cfg)
        signal = MAX_COHORT * p.scale
        tail = 12 * math.sqrt(MAX_COHORT * p.share_variance)
        assert signal + tail < Q // 2, (noise, items, frac)
        assert p.scale >= 1 and p.scale & (p.scale - 1) == 0


def test_the_audit_statement_says_the_devices_add_the_counts_noise(honest):
    """The audit's generated statement names the count's mechanism as run: the devices'
    Skellam shares, no server noise, the epsilon recomputed from the config."""
    from types import SimpleNamespace

    from fedinterest.server.ddp_aggregate import DistributedDPServer
    from fedinterest.shared.wire import WireSchema
    from fedinterest.simulations.audit.distributed_statement import (
        distributed_paragraph,
        distributed_popularity_paragraph,
    )

    released, cfg, _, _, _ = honest
    numbers: dict = {}
    _, text = distributed_popularity_paragraph(SimpleNamespace(config=cfg),
                                               released["statement"], numbers)
    assert "The server adds no noise" in text and "noised on the device" in text
    assert numbers["popularity"]["epsilon"] == pytest.approx(released["statement"]["epsilon"])
    assert numbers["popularity"]["run_unit_epsilon"] == pytest.approx(
        released["statement"]["run_unit_epsilon"])
    server = DistributedDPServer(cfg.replace(ddp_train_only=""), WireSchema.from_named_arrays(
        [("w", np.zeros(4, np.float32))]))
    run = SimpleNamespace(config=cfg, results={"privacy": {"distributed": {
        **server.statement(), "budget": cfg.device_epsilon, "rounds_joined": {"a": 1}}}})
    _, text = distributed_paragraph(run, {})
    assert "the server adds no noise, so this part holds against the server too" in text
    assert "added by the server" not in text


def test_a_ddp_run_refuses_to_publish_a_count_the_server_noised(tmp_path):
    """A release of another mode (copied with popularity_from) or of a ddp run before the fix
    carries server noise: a ddp run refuses it rather than publish it as its own."""
    import json

    from fedinterest.server.popularity_round import RECORD_NAME
    from fedinterest.shared.errors import ConfigError

    record = {"catalog_path": "c.npz", "catalog_version": "v", "statement": {
        "mechanism": "Gaussian, one release", "epsilon": 2.17}}
    (tmp_path / RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="server noised"):
        federated_popularity(None, [], _cfg(tmp_path), tmp_path / "c.npz", {}, tmp_path)
    # a non-ddp run reuses it as before; a ddp release is reused by a ddp run
    assert federated_popularity(None, [], _cfg(tmp_path, dp="event"), tmp_path / "c.npz", {},
                                tmp_path) == record
    record["statement"]["noise_added_by"] = "the devices"
    (tmp_path / RECORD_NAME).write_text(json.dumps(record))
    assert federated_popularity(None, [], _cfg(tmp_path), tmp_path / "c.npz", {},
                                tmp_path)["statement"]["noise_added_by"] == "the devices"
