"""Noise calibration for the privacy-utility experiment and its per-device plan."""

from __future__ import annotations

from fedinterest.shared.config import RunConfig
from fedinterest.shared.privacy import EventLedger
from fedinterest.simulations.experiment import arms, calibrate_noise, device_plan
from fedinterest.simulations.synthetic import generate_world


def _eps(nm, q, steps, rounds, delta=1e-5):
    led = EventLedger(delta=delta)
    for r in range(rounds):
        led.record(r, nm, q, steps)
    return led.epsilon()


def test_calibrated_noise_meets_the_budget_and_is_close_to_minimal():
    for eps, q, steps, rounds in ((8.0, 1.0, 1, 2), (2.0, 0.5, 2, 3), (4.0, 0.25, 4, 1)):
        nm = calibrate_noise(eps, 1e-5, q, steps, rounds)
        assert _eps(nm, q, steps, rounds) <= eps
        assert _eps(nm / 1.03, q, steps, rounds) > eps  # a little less noise overspends


def test_plan_and_arms_follow_the_data():
    ds = generate_world(n_users=20, n_items=80, events_per_user=30, seed=1)
    cfg = RunConfig(rounds=4, clients_per_round=10, segment_len=10, batch_size=2)
    plan = device_plan(ds, cfg)
    assert plan["median_segments"] == 3  # 28 training events in segments of 10
    assert plan["expected_rounds_joined"] == 2 and plan["sample_rate"] == 2 / 3
    names = [(n, c.dp) for n, c in arms(cfg, [8.0, 2.0], ds)]
    assert [d for _, d in names] == ["off", "event", "event", "user", "both"]
    noises = [c.noise_multiplier for _, c in arms(cfg, [8.0, 2.0], ds) if c.dp == "event"]
    assert noises[1] > noises[0]  # a tighter budget needs more noise
