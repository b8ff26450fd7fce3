"""Noise calibration for the privacy-utility experiment and its per-device plan."""

from __future__ import annotations

from fedinterest.shared.privacy import EventLedger, user_level_epsilon
from fedinterest.simulations.data.synthetic import generate_world
from fedinterest.simulations.experiment import (
    arms,
    calibrate_noise,
    calibrate_user_noise,
    device_plan,
)

from tests.helpers.legacy_defaults import legacy_config


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
    cfg = legacy_config(rounds=4, clients_per_round=10, segment_len=10, batch_size=2)
    plan = device_plan(ds, cfg)
    assert plan["median_segments"] == 3  # 28 training events in segments of 10
    assert plan["expected_rounds_joined"] == 2 and plan["sample_rate"] == 2 / 3
    names = [(n, c.dp) for n, c in arms(cfg, [8.0, 2.0], ds)]
    assert [d for _, d in names] == ["off", "event", "event", "user", "both"]
    noises = [c.noise_multiplier for _, c in arms(cfg, [8.0, 2.0], ds) if c.dp == "event"]
    assert noises[1] > noises[0]  # a tighter budget needs more noise


def test_user_noise_is_calibrated_to_the_budget_over_every_round():
    for eps, n, k, rounds in ((8.0, 610, 100, 5), (2.0, 50, 10, 3)):
        nm = calibrate_user_noise(eps, 1e-5, n, k, rounds)
        assert user_level_epsilon(n, k, nm, rounds, 1e-5) <= eps
        assert user_level_epsilon(n, k, nm / 1.03, rounds, 1e-5) > eps


def test_user_arms_run_every_round_within_the_user_budget():
    ds = generate_world(n_users=20, n_items=80, events_per_user=30, seed=1)
    cfg = legacy_config(rounds=6, clients_per_round=10, segment_len=10, batch_size=2, user_epsilon=4)
    user = [c for _, c in arms(cfg, [8.0], ds) if c.user_dp]
    assert [c.dp for c in user] == ["user", "both"]
    for c in user:
        assert user_level_epsilon(20, 10, c.user_noise_multiplier, 6, c.delta) <= 4


def test_federated_arms_share_the_first_arms_popularity_release(tmp_path, tiny_bert_dir):
    import json

    import torch
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations.experiment import privacy_utility

    torch.set_num_threads(1)
    ds = generate_world(n_users=8, n_items=60, events_per_user=16, seed=3)
    base = legacy_config(rounds=1, clients_per_round=4, hidden=8, segment_len=6, n_negatives=8,
                     batch_size=2, min_clients=2, popularity_devices=5, message_log=False)
    res = privacy_utility(ds, base, tmp_path, [8.0], central_epochs=0, quiet=True,
                          engine="inprocess", encoder=TextEncoder(str(tiny_bert_dir), cache=None))
    runs = [r["run_dir"] for r in res["rows"]]
    assert len(runs) == 4  # no DP, event eps 8, user, both
    stmts = [json.loads((tmp_path / r / "results.json").read_text())["privacy"]
             ["popularity_release"] for r in runs]
    assert "reused_from" not in stmts[0] and stmts[0]["devices_summed"] == 5
    assert all(s["reused_from"] == runs[0] for s in stmts[1:])  # counted once, reused thrice
    assert all({k: v for k, v in s.items() if k != "reused_from"} == stmts[0] for s in stmts)
    assert (tmp_path / "privacy_utility.md").is_file()
