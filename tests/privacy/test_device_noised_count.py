"""The popularity count in every dp mode (issue 15): the devices add the noise before SecAgg+
masks their vectors, so the cohort sum the server unmasks already carries it, and the count's
epsilon holds against the server. One mechanism: the server adds no noise in any mode.

Through the real ClientApp (egress guard, hardened SecAgg+ mod, the count handler) and the
server's `federated_popularity` over an in-process grid, for each mode: the unmasked cohort
sum differs from the exact sum by noise of the stated standard deviation (and the same check
fails when the devices add no share or a quarter of it), the server adds no noise, the
ledgers' charge is the Skellam formula, a kept release the server noised is refused. And the
device, not the server, decides its share: a policy noise floor above the config's, and m
capped at the policy's `max_assumed_honest` (a server claiming a larger m gets shares sized for
the policy's m); a ledger that charged the count as a Gaussian still loads.
"""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
from fedinterest.client import client_app as capp
from fedinterest.client import popularity_count
from fedinterest.client.ddp_mod import device_ledger
from fedinterest.client.device import Device
from fedinterest.client.policy import DEFAULT_MAX_ASSUMED_HONEST, PrivacyPolicy
from fedinterest.client.popularity_count import count_integers
from fedinterest.client.private_round import count_round
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
from fedinterest.shared.privacy import USER, DeviceLedger, gaussian_event, skellam_count_event
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.simulations.data.synthetic import generate_world
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity
from fedinterest.simulations.simulate import prepare
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from tests.helpers.device_world import provision_policies
from tests.helpers.legacy_defaults import PRE_DDP_DEFAULTS

N_USERS, N_ITEMS = 10, 800  # 800 coordinates for the variance test
MODES = ("ddp-event", "ddp-user", "event", "user", "both", "off")


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
            "user_noise_multiplier": 1.0, "user_epsilon": 8.0,
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


def _count(world, dest, fault=None, policy: dict | None = None, **kw):
    """One federated count of the world's devices under run settings `kw`: (the release, the
    config, the catalog before, the grid, the cohort sums the server unmasked)."""
    root, info, _ = world
    cfg = _cfg(dest, **kw)
    shutil.copytree(root, dest)
    provision_policies(dest / "devices", cfg, **(policy or {}))
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


@pytest.fixture(scope="module", params=MODES)
def honest(request, world, tmp_path_factory):
    return _count(world, tmp_path_factory.mktemp("honest") / "run", dp=request.param)


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("share", [0.0, 0.25], ids=["no-share", "quarter-share"])
def test_the_noise_check_fails_when_devices_under_noise(world, tmp_path, monkeypatch, share,
                                                        mode):
    """The check above is not one that cannot fail: devices that add no share, or a share of
    a quarter of the variance, fail it."""
    real = popularity_count.noisy_count

    def weak(vector, params, rng):
        return real(vector, dataclasses.replace(
            params, own_noise_multiplier=params.own_noise_multiplier * math.sqrt(share)), rng)

    monkeypatch.setattr(popularity_count, "noisy_count", weak)
    released, cfg, _, _, seen = _count(world, tmp_path / "run", dp=mode)
    noise = seen[0] / count_scale(cfg) - _exact_counts(world[2], cfg)
    stated = released["statement"]["noise_std"] ** 2 * N_USERS / count_min_contributions(cfg)
    assert not _noise_has_variance(noise, stated)


def test_the_server_adds_no_noise(honest):
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


def _open(dest, p: int, catalog=None) -> Device:
    return Device.open(dest / "devices" / f"device-{p}.db",
                       key_file=dest / "devices" / f"device-{p}.key", catalog=catalog,
                       create=False)


def _exact_vectors(ds, cfg) -> dict[int, np.ndarray]:
    exact = {}
    for p, (_, sl) in enumerate(ds.user_slices()):
        v = np.zeros(N_ITEMS)
        v[np.unique(ds.item[sl][: sl.stop - sl.start - cfg.holdout])] = 1
        exact[p] = v
    return exact


@pytest.mark.parametrize("mode", ["ddp-event", "event"])
def test_a_device_whose_policy_floor_is_above_the_config_uses_its_floor(world, tmp_path, mode):
    root, info, ds = world
    shutil.copytree(root, tmp_path / "w")
    catalog = PublishedCatalog.load(tmp_path / "w" / "catalog" /
                                    f"catalog-{info['catalog_version']}.npz")
    cfg = _cfg(tmp_path / "w", popularity_noise=2.0, dp=mode)
    gamma, m, k = count_scale(cfg), count_min_contributions(cfg), cfg.popularity_max_items
    exact = _exact_vectors(ds, cfg)
    with _open(tmp_path / "w", 0, catalog) as dev:
        dev.set_policy(PrivacyPolicy.for_run(cfg, min_noise={"popularity-count": 6.0}))
        draws = [count_integers(dev, cfg, np.random.default_rng(i)) for i in range(4)]
        noise = np.concatenate([z - gamma * exact[0] for z in draws]) / gamma
        assert _noise_has_variance(noise, 6.0**2 * k / m)  # its floor, not the config's 2
        # and it answers the count (it does not decline) and charges what it can count on
        mu = gamma**2 * k * ((m - 1) * 2.0**2 + 6.0**2) / m
        assert count_round(dev, cfg, 0, run_id=1) is None
        charge = dev.ledger().charges[USER][-1]["event"]["rdp_curve"]["parameters"]
        assert charge["own_noise_multiplier"] == 6.0 and charge["mu"] == pytest.approx(mu)
        if cfg.distributed_dp:
            assert popularity_count.charge_ddp_ledger(dev, cfg, 0) is None
            release = device_ledger(dev, cfg).releases[-1]
            assert release["own_noise_multiplier"] == 6.0
            assert release["mu"] == pytest.approx(mu)
    with _open(tmp_path / "w", 1, catalog) as dev:  # a floor below the config: the config's noise
        dev.set_policy(PrivacyPolicy.for_run(cfg, min_noise={"popularity-count": 1.0}))
        z = count_integers(dev, cfg, np.random.default_rng(0))
        assert _noise_has_variance((z - gamma * exact[1]) / gamma, 2.0**2 * k / m)


def _skellam_epsilon(l1: float, l2: float, mu: float, delta: float) -> float:
    """Agarwal, Kairouz, Liu 2021, Thm. 3.5, written out here, converted as Opacus does."""
    rdp = [a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2),
                                      3 * l1 / (2 * mu)) for a in ORDERS]
    return rdp_to_epsilon(np.asarray(rdp), delta)


def _replace_one(cfg) -> float:
    """The count's epsilon, replace-one (the event unit of ddp-event): L2 gamma sqrt(2k),
    L1 2 gamma k; mu = (sigma gamma)^2 k."""
    gamma, k = count_scale(cfg), cfg.popularity_max_items
    return _skellam_epsilon(2 * gamma * k, gamma * math.sqrt(2 * k),
                            (cfg.popularity_noise * gamma) ** 2 * k, cfg.delta)


def _add_remove(cfg) -> float:
    """The count's epsilon, add/remove one device: L2 gamma sqrt(k), L1 gamma k."""
    gamma, k = count_scale(cfg), cfg.popularity_max_items
    return _skellam_epsilon(gamma * k, gamma * math.sqrt(k),
                            (cfg.popularity_noise * gamma) ** 2 * k, cfg.delta)


def test_the_released_count_states_the_skellam_formula_and_who_noised_it(honest):
    released, cfg, _, _, _ = honest
    stmt = released["statement"]
    unit = _replace_one(cfg) if cfg.dp == "ddp-event" else _add_remove(cfg)
    assert unit == pytest.approx(stmt["run_unit_epsilon"])
    assert _add_remove(cfg) == pytest.approx(stmt["epsilon"])
    assert stmt["noise_added_by"].startswith("the devices")
    assert "the server adds no noise" in stmt["mechanism"]


def test_every_counted_device_charged_the_formula_before_the_count_left(world, honest):
    """The device ledger's user unit holds the count as an RDP curve event (add/remove one
    device) in every mode; a ddp run's ledger (its budget) holds it at the run's unit."""
    released, cfg, _, _, _ = honest
    dest = _run_dir(released)
    for p in range(N_USERS):
        with _open(dest, p) as dev:
            ledger = dev.ledger()
            counts = [c for c in ledger.charges[USER] if c["label"] == "popularity-count"]
            assert len(counts) == 1 and "rdp_curve" in counts[0]["event"]
            assert ledger.epsilon(USER) == pytest.approx(_add_remove(cfg), rel=1e-6)
            if cfg.distributed_dp:
                led = device_ledger(dev, cfg)
                assert [r["label"] for r in led.releases] == ["popularity-count"]
                unit = _replace_one(cfg) if cfg.dp == "ddp-event" else _add_remove(cfg)
                assert led.epsilon() == pytest.approx(unit)


def _run_dir(released):
    from pathlib import Path

    return Path(released["catalog_path"]).parent.parent


@pytest.mark.parametrize("mode", ["ddp-event", "event"])
def test_a_cohort_below_the_minimum_releases_nothing(world, tmp_path, caplog, mode):
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
                                                   ddp_min_fraction=1.0, dp=mode)
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
    if not cfg.distributed_dp:
        assert "charged to each counted device's ledger at the user unit" in text
        return
    server = DistributedDPServer(cfg.replace(ddp_train_only=""), WireSchema.from_named_arrays(
        [("w", np.zeros(4, np.float32))]))
    run = SimpleNamespace(config=cfg, results={"privacy": {"distributed": {
        **server.statement(), "budget": cfg.device_epsilon, "rounds_joined": {"a": 1}}}})
    _, text = distributed_paragraph(run, {})
    assert "the server adds no noise, so this part holds against the server too" in text
    assert "added by the server" not in text


@pytest.mark.parametrize("mode", MODES)
def test_a_run_refuses_to_publish_a_count_the_server_noised(tmp_path, mode):
    """A release from before the count's noise moved to the devices carries server noise
    (copied with popularity_from, or a resumed run's own): refused in every mode rather than
    published as device-noised; a device-noised release is reused."""
    import json

    from fedinterest.server.popularity_round import RECORD_NAME
    from fedinterest.shared.errors import ConfigError

    record = {"catalog_path": "c.npz", "catalog_version": "v", "statement": {
        "mechanism": "Gaussian, one release", "epsilon": 2.17}}
    (tmp_path / RECORD_NAME).write_text(json.dumps(record))
    cfg = _cfg(tmp_path, dp=mode)
    with pytest.raises(ConfigError, match="server noised"):
        federated_popularity(None, [], cfg, tmp_path / "c.npz", {}, tmp_path)
    record["statement"]["noise_added_by"] = "the devices"
    (tmp_path / RECORD_NAME).write_text(json.dumps(record))
    assert federated_popularity(None, [], cfg, tmp_path / "c.npz", {},
                                tmp_path)["statement"]["noise_added_by"] == "the devices"


# --------------------------------------------- m is the device's: the policy's max_assumed_honest


@pytest.mark.parametrize("mode", ["ddp-event", "event"])
def test_a_server_claiming_a_larger_m_gets_count_shares_sized_for_the_policys_m(
        world, tmp_path, mode):
    """The attack: the server asks for m = 10 of a cohort of 10 (each share 1/10 of the
    released variance); the owners rely on at most 4 honest devices. The unmasked sum of the
    10 shares must carry at least 10/4 of the stated variance, and each device must have
    recorded m = 4 for its UNMASK check. Fails if a device sizes its share for the config's
    m (variance 10/10 of it)."""
    ds = world[2]
    released, cfg, _, _, seen = _count(world, tmp_path / "run", dp=mode, ddp_min_fraction=1.0,
                                       policy={"max_assumed_honest": 4})
    assert count_min_contributions(cfg) == N_USERS and released["contributors"] == N_USERS
    noise = seen[0] / count_scale(cfg) - _exact_counts(ds, cfg)
    sigma2_k = cfg.popularity_noise**2 * cfg.popularity_max_items
    assert _noise_has_variance(noise, sigma2_k * N_USERS / 4)


def test_a_huge_m_in_the_config_never_shrinks_a_share_below_the_policys(world, tmp_path):
    """A server claiming m in the millions (the train round's clients_per_round; the count's
    cohort): the device's share variance stays at the released variance / its policy's
    max_assumed_honest, for the count and for a distributed-DP train round."""
    from fedinterest.client.ddp_mod import device_params
    from fedinterest.shared.distributed_dp import integer_contribution, params_from_config

    root, info, ds = world
    shutil.copytree(root, tmp_path / "w")
    catalog = PublishedCatalog.load(tmp_path / "w" / "catalog" /
                                    f"catalog-{info['catalog_version']}.npz")
    cfg = _cfg(tmp_path / "w", popularity_cohort=MAX_COHORT, ddp_min_fraction=1.0,
               clients_per_round=10**6)
    gamma, k = count_scale(cfg), cfg.popularity_max_items
    exact = _exact_vectors(ds, cfg)
    schema = [("w", (2000,), "float32")]
    with _open(tmp_path / "w", 0, catalog) as dev:
        dev.set_policy(PrivacyPolicy.for_run(_cfg(tmp_path / "w"), max_assumed_honest=5))
        draws = [count_integers(dev, cfg, np.random.default_rng(i)) for i in range(4)]
        noise = np.concatenate([z - gamma * exact[0] for z in draws]) / gamma
        assert _noise_has_variance(noise, cfg.popularity_noise**2 * k / 5)  # not / 31
        params = device_params(dev, cfg, schema)
    asked = params_from_config(cfg, schema)
    assert asked.min_contributions == 10**6 and params.min_contributions == 5
    assert params.central_variance == asked.central_variance  # the same accounting
    share = integer_contribution([], params, np.random.default_rng(0)).astype(np.float64)
    assert _noise_has_variance(share, asked.central_variance / 5)


def test_the_policy_default_is_todays_default_m():
    """Keeps the default run's numbers: the default cap is the default count's m (25 of 31)
    and at least the default train round's m (8 of 10)."""
    from fedinterest.shared.distributed_dp import min_contributions

    default = RunConfig()
    assert PrivacyPolicy().max_assumed_honest == DEFAULT_MAX_ASSUMED_HONEST
    assert DEFAULT_MAX_ASSUMED_HONEST == count_min_contributions(default) == 25
    assert min_contributions(default) <= DEFAULT_MAX_ASSUMED_HONEST
    assert PrivacyPolicy.for_run(default).max_assumed_honest == 25


def test_max_assumed_honest_is_validated_and_old_policies_load():
    import json

    from fedinterest.shared.errors import ConfigError

    for bad in (0, -3, 2.5, True, "25"):
        with pytest.raises(ConfigError, match="max_assumed_honest"):
            PrivacyPolicy(max_assumed_honest=bad)
    old = json.loads(PrivacyPolicy().to_json())
    del old["max_assumed_honest"]  # a policy stored before the field existed
    assert PrivacyPolicy.from_json(json.dumps(old)).max_assumed_honest == 25


# ------------------------------------------------------------------------ the device ledger


def test_a_ledger_that_charged_the_count_as_a_gaussian_still_loads():
    """Ledgers kept before the count's noise moved to the devices charged it as
    GaussianDpEvent(popularity_noise): they load with the same epsilon, and the Skellam
    curve event composes with them in RDP (and survives a save and load)."""
    import json

    old = DeviceLedger(delta=1e-5)
    old.charge(USER, gaussian_event(2.0), "popularity-count", 0)
    before = old.epsilon(USER)
    text = old.to_json()
    assert "rdp_curve" not in text
    loaded = DeviceLedger.from_json(text)
    assert loaded.epsilon(USER) == pytest.approx(before)
    count = count_params(RunConfig(dp="event", popularity_noise=2.0), replace=False)
    loaded.charge(USER, skellam_count_event(count), "popularity-count", 1)
    again = DeviceLedger.from_json(loaded.to_json())
    both = again.epsilon(USER)
    assert both == pytest.approx(loaded.epsilon(USER)) and both > before
    # the composition is the sum of the two RDP curves (at integer orders >= 2 the
    # Skellam curve is its bound; below 2 its order-2 value, RDP grows with the order)
    assert json.loads(again.to_json())["charges"][USER][1]["event"]["rdp_curve"]["mechanism"] \
        .startswith("distributed Skellam")
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    gauss = compute_rdp(q=1.0, noise_multiplier=2.0, steps=1, orders=orders)
    skellam = [_skellam_epsilon_curve(count, max(2, math.ceil(a - 1e-9))) for a in orders]
    expected, _ = get_privacy_spent(orders=orders, rdp=np.asarray(gauss) + skellam, delta=1e-5)
    assert both == pytest.approx(expected)


def _skellam_epsilon_curve(count, a: int) -> float:
    l1, l2, mu = count.l1_sensitivity, count.l2_sensitivity, count.central_variance
    return a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2),
                                      3 * l1 / (2 * mu))


def test_a_tampered_curve_is_refused_with_its_mechanism_named():
    import json

    led = DeviceLedger()
    led.charge(USER, skellam_count_event(count_params(RunConfig(dp="event"), replace=False)),
               "popularity-count", 0)
    d = json.loads(led.to_json())
    d["charges"][USER][0]["event"]["rdp_curve"]["rdp"].pop()
    with pytest.raises(ValueError, match="distributed Skellam"):
        DeviceLedger.from_json(json.dumps(d)).epsilon(USER)
