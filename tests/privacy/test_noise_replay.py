"""Issue 19, finding 2: noise could be replayed. The DP-SGD seed was HMAC(secret, run seed :
round), both chosen by the server: the same round sent twice, with weights W and W + 1e-3,
gave two updates that differed by 0.00064, so the noise cancelled in their difference. Now a
round is answered once (a record of answered rounds in the ledger), and the noise comes from
the OS CSPRNG unless the device's policy says `reproducible_seeds`."""

from __future__ import annotations

import numpy as np

from tests.helpers.device_world import initial_weights, train


def _delta(back, sent):
    return np.concatenate([(np.asarray(b, np.float64) - s).ravel() for b, s in zip(back, sent)])


def test_the_same_round_sent_twice_is_declined(world):
    cfg = world[3]
    names, w = initial_weights(cfg, world[0])
    w2 = [a + np.asarray(1e-3, a.dtype) if a.dtype.kind == "f" else a for a in w]
    _, m1 = train(cfg, world, w, names, rnd=3)
    second, m2 = train(cfg, world, w2, names, rnd=3)
    assert m1["refused"] == 0.0
    assert m2["refused"] == 1.0 and m2["decline-reason"] == 7  # ROUND_REPLAYED
    assert all(np.array_equal(a, b) for a, b in zip(second, w2)), "the replay was trained"


def test_fresh_noise_does_not_cancel_between_runs(world):
    """Even where a round may legitimately be answered again (another run id: a new
    federation), the two updates carry independent noise: their difference is of the order
    of the noise, not of the 1e-3 the server moved the weights by."""
    cfg = world[3]
    names, w = initial_weights(cfg, world[0])
    w2 = [a + np.asarray(1e-3, a.dtype) if a.dtype.kind == "f" else a for a in w]
    a, ma = train(cfg, world, w, names, rnd=1, run_id=11)
    b, mb = train(cfg, world, w2, names, rnd=1, run_id=12)
    assert ma["refused"] == mb["refused"] == 0.0
    gap = np.abs(_delta(a, w) - _delta(b, w2)).max()
    assert gap > 0.01, f"the two updates differ by {gap:.5f}: the noise cancelled"


def test_seeds_come_from_the_csprng_unless_the_policy_says_reproducible(world):
    from fedinterest.client.device import Device
    from fedinterest.client.policy import PrivacyPolicy

    _, _, devices, cfg = world
    with Device.open(devices / "device-0.db", key_file=devices / "device-0.key",
                     create=False) as dev:
        draws = {dev.training_seed(cfg.seed, 1) for _ in range(4)}
        assert len(draws) == 4 and not dev.privacy()["reproducible_seeds"]
        dev.set_policy(PrivacyPolicy(reproducible_seeds=True))
        assert dev.training_seed(cfg.seed, 1) == dev.training_seed(cfg.seed, 1)
        assert dev.privacy()["reproducible_seeds"] is True


def test_the_very_same_request_again_gets_the_same_answer_and_no_new_charge(world):
    """A server that died mid-round and resumed sends the round again with the same global
    weights: the device returns the update it already sent (nothing new to learn, no fresh
    noise to compare) and charges nothing more."""
    from fedinterest.client.device import Device

    cfg = world[3]
    names, w = initial_weights(cfg, world[0])
    first, m1 = train(cfg, world, w, names, rnd=2)
    devices = world[2]
    with Device.open(devices / "device-0.db", key_file=devices / "device-0.key",
                     create=False) as dev:
        spent = dev.privacy()["epsilon"]
    again, m2 = train(cfg, world, w, names, rnd=2)
    assert m1["refused"] == m2["refused"] == 0.0
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    with Device.open(devices / "device-0.db", key_file=devices / "device-0.key",
                     create=False) as dev:
        assert dev.privacy()["epsilon"] == spent > 0
