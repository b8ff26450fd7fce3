"""Issue 19, finding 1: the server set the device's privacy. A round config with dp=off, a
tiny noise multiplier or a huge budget was adopted: the device trained (without noise, or
with almost none) and the update left. Now the round config is a request that the device's
own policy (client/policy.py) reviews: weaker requests are declined, with a numeric reason,
and nothing is trained; stronger ones are followed."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.device_world import initial_weights, train

DECLINE_REASON = {"dp-off": 1, "tiny-noise": 2, "huge-budget": 4}  # client.policy.DeclineReason




@pytest.mark.parametrize("attack", ["dp-off", "tiny-noise", "huge-budget"])
def test_a_weaker_round_config_is_declined_and_trains_nothing(world, attack):
    cfg = world[3]
    names, weights = initial_weights(cfg, world[0])
    asked = {"dp-off": cfg.replace(dp="off"),
             "tiny-noise": cfg.replace(noise_multiplier=0.01),
             "huge-budget": cfg.replace(device_epsilon=1e9)}[attack]
    back, metrics = train(asked, world, weights, names)
    assert all(np.array_equal(a, b) for a, b in zip(back, weights)), "the device trained"
    assert metrics["refused"] == 1.0
    assert metrics["decline-reason"] == DECLINE_REASON[attack]


def test_a_stronger_request_is_followed(world):
    cfg = world[3]
    names, weights = initial_weights(cfg, world[0])
    back, metrics = train(cfg.replace(noise_multiplier=2.0, device_epsilon=4.0), world,
                          weights, names)
    assert metrics["refused"] == 0.0 and metrics["decline-reason"] == 0.0
    assert any(not np.array_equal(a, b) for a, b in zip(back, weights))


def test_the_policy_is_the_devices_and_stays_its_own(world):
    """After rounds asking for less, the stored policy is unchanged; it is sealed in the
    store (its JSON is nowhere in the file's bytes)."""
    from fedinterest.client.device import Device
    from fedinterest.client.policy import PrivacyPolicy

    cat, _, devices, cfg = world
    names, weights = initial_weights(cfg, cat)
    train(cfg.replace(dp="off"), world, weights, names, rnd=1)
    train(cfg.replace(delta=1e-2), world, weights, names, rnd=2)
    with Device.open(devices / "device-0.db", key_file=devices / "device-0.key",
                     create=False) as dev:
        assert dev.policy == PrivacyPolicy()
    raw = (devices / "device-0.db").read_bytes()
    assert b"allowed_modes" not in raw and b"min_noise" not in raw


def test_policy_errors_name_the_field():
    from fedinterest.client.policy import PrivacyPolicy
    from fedinterest.shared.errors import ConfigError

    for kw, field in [({"allowed_modes": ("off",)}, "allow_off"),
                      ({"allowed_modes": ("sometimes",)}, "allowed_modes"),
                      ({"min_noise": {"dp-sgd": -1}}, "min_noise"),
                      ({"max_epsilon": {"event": 0}}, "max_epsilon"),
                      ({"delta": 2.0}, "delta"),
                      ({"min_secagg_contributors": 1}, "min_secagg_contributors")]:
        with pytest.raises(ConfigError, match=field):
            PrivacyPolicy(**kw)
    with pytest.raises(ConfigError, match="unknown fields"):
        PrivacyPolicy.from_json('{"trust_the_server": true}')
    p = PrivacyPolicy(allowed_modes=("off", "event"), allow_off=True)
    assert PrivacyPolicy.from_json(p.to_json()) == p
