"""The distributed-DP ledger composes the popularity count (a distributed Skellam, its noise
added by the devices: shared/distributed_dp_count.py) with the training rounds (RDP),
the default run stays within its budget with both, and the accountant uses only the RDP
orders its bounds hold at (shared/distributed_dp_accounting.py)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import params_for
from fedinterest.shared.distributed_dp_accounting import (
    ORDERS,
    DDPLedger,
    calibrate_noise,
    count_epsilon,
    count_noise_multiplier,
    count_rdp,
    ddp_epsilon,
    gaussian_rdp,
    rdp_to_epsilon,
    round_rdp,
    run_epsilon,
    skellam_rdp,
)
from fedinterest.shared.distributed_dp_count import count_params
from fedinterest.shared.privacy import gaussian_epsilon
from fedinterest.simulations.privacy_table import cell_flags, trained_dim

DIM = 31  # the default run's trained coordinates (tests/privacy/test_default_run.py)


def test_the_default_run_composes_its_count_and_two_rounds_within_8():
    cfg = RunConfig()
    assert trained_dim(cfg) == DIM
    assert cfg.popularity and run_epsilon(cfg, DIM, 2) <= cfg.device_epsilon
    assert run_epsilon(cfg, DIM, 3) > cfg.device_epsilon  # so the server samples twice at most
    # the count is really in it: without it two rounds cost less, with it more
    assert run_epsilon(cfg, DIM, 2, counted=False) < run_epsilon(cfg, DIM, 2) - 0.5
    # and the training noise is the calibrated one: the old 1.0 no longer fits
    assert run_epsilon(dataclasses.replace(cfg, noise_multiplier=1.0), DIM, 2) > 8.0
    assert calibrate_noise(cfg, DIM, cfg.device_epsilon, 2) <= cfg.noise_multiplier


def test_the_count_is_a_skellam_at_the_units_relation():
    event = RunConfig(popularity_noise=2.0)
    user = dataclasses.replace(event, dp="ddp-user")
    # user unit, add/remove one device: the released count's own multiplier
    assert count_noise_multiplier(user) == 2.0
    assert count_params(user).effective_noise_multiplier == pytest.approx(2.0)
    # event unit: one segment can change the whole bounded vector (replace-one: sqrt 2 more)
    assert count_noise_multiplier(event) == pytest.approx(2.0 / math.sqrt(2.0))
    assert count_params(event).effective_noise_multiplier == pytest.approx(2.0 / math.sqrt(2.0))
    # alone, the Skellam count at gamma = 2**16 is the Gaussian release to 0.2%, never below
    led = DDPLedger(delta=1e-5, unit="user")
    led.record_release(0, "popularity-count", count_params(user))
    assert led.epsilon() == pytest.approx(gaussian_epsilon(2.0, 1e-5), rel=0.02)
    assert led.epsilon() == pytest.approx(count_epsilon(count_params(user), 1e-5))
    assert np.all(np.asarray(count_rdp(count_params(user))) >= np.asarray(gaussian_rdp(2.0)))


def test_a_ledger_kept_before_the_count_moved_to_the_devices_still_reads():
    # its count entry has no Skellam parameters: charged as the Gaussian it was
    old = DDPLedger(delta=1e-5, unit="event", releases=[
        {"round": 0, "label": "popularity-count", "noise_multiplier": 2.0 / math.sqrt(2.0)}])
    assert old.epsilon() == pytest.approx(rdp_to_epsilon(
        np.asarray(gaussian_rdp(2.0 / math.sqrt(2.0))), 1e-5))


def test_the_ledger_composes_rounds_and_count_in_rdp_and_refuses_past_the_budget():
    cfg = RunConfig()
    params = params_for(cfg, DIM)
    count = count_params(cfg)
    led = DDPLedger(delta=cfg.delta, unit="event")
    assert led.epsilon_after_release(count) == pytest.approx(run_epsilon(cfg, DIM, 0))
    led.record_release(0, "popularity-count", count)
    curve = 2 * np.asarray(round_rdp(params, 1.0)) + np.asarray(count_rdp(count))
    for rnd in (1, 2):
        led.record(rnd, params, 1.0)
    assert led.epsilon() == pytest.approx(rdp_to_epsilon(curve, cfg.delta))
    assert led.epsilon() == pytest.approx(ddp_epsilon(params, 1.0, 2, cfg.delta, count))
    assert led.epsilon() <= cfg.device_epsilon < led.epsilon_after(params, 1.0)
    again = DDPLedger.from_json(led.to_json())  # the store keeps the count
    assert again.releases == led.releases and again.epsilon() == pytest.approx(led.epsilon())


def test_the_server_samples_no_counted_device_past_its_budget():
    from tests.privacy.test_default_run import _server

    cfg = RunConfig()
    server = _server(cfg)
    one = {n: 1 for n in range(4)}
    # after one round, a counted device has room for a second; an uncounted one too
    assert server.within_budget(list(one), one.get, lambda n: n % 2 == 0) == [0, 1, 2, 3]
    # a budget that fits two rounds without the count but not with it
    tight = dataclasses.replace(cfg, device_epsilon=run_epsilon(cfg, DIM, 2, counted=False))
    server = _server(tight)
    assert server.within_budget(list(one), one.get, lambda n: n % 2 == 0) == [1, 3]


def test_skellam_orders_are_integers_from_2_and_the_conversion_does_not_warn():
    assert all(isinstance(a, int) and a >= 2 for a in ORDERS)
    for bad in (1.5, 1, 2.5):
        with pytest.raises(ValueError, match="integer orders"):
            skellam_rdp(bad, 10.0, 10.0, 100.0)
    params = params_for(RunConfig(), DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(ddp_epsilon(params, 1.0, 2, 1e-5, count_params(RunConfig())))


def test_the_table_cells_meet_their_epsilon():
    for eps in (1.0, 2.0, 4.0, 8.0):
        for mode in ("ddp-event", "ddp-user"):
            flags = cell_flags(mode, eps)
            value = dict(zip(flags[::2], flags[1::2]))
            key = "--noise-multiplier" if mode == "ddp-event" else "--user-noise-multiplier"
            noise_field = key[2:].replace("-", "_")
            cfg = dataclasses.replace(RunConfig(), dp=mode, **{
                noise_field: float(value[key]),
                "popularity_noise": float(value["--popularity-noise"])})
            assert run_epsilon(cfg, DIM, 2) <= eps
