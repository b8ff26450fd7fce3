"""The one-run canary audit of distributed DP (simulations/audit/ddp_canary.py): it passes the
mechanism as implemented, and fails when the devices' noise shares are a third of the size the
accounting assumes."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import params_for
from fedinterest.shared.distributed_dp_accounting import ddp_epsilon
from fedinterest.simulations.audit import attacks, ddp_canary
from fedinterest.simulations.audit.verdict import FAIL, PASS

DIM = 31


def _run(cfg: RunConfig):
    return SimpleNamespace(config=cfg, results={"privacy": {"distributed": {"dim": DIM}}})


def test_the_honest_mechanism_passes_and_the_control_leaks():
    cfg = RunConfig()
    result = attacks.check_canaries(_run(cfg))  # a ddp run: the decoded-sum audit
    assert result.key == "canary" and result.verdict == PASS, result.reason
    d = result.details
    claimed = ddp_epsilon(params_for(cfg, DIM), 1.0, 1, cfg.delta)
    assert d["claimed_epsilon_per_canary"] == pytest.approx(claimed)
    assert 0 < d["dp"]["epsilon_lower_bound"] <= claimed
    assert d["control"]["auc"] == 1.0 and d["control"]["epsilon_lower_bound"] > claimed
    assert d["canaries"] == ddp_canary.RELEASES * DIM


def test_under_sized_noise_shares_fail(monkeypatch):
    real = ddp_canary.integer_contribution

    def third_of_the_noise(clipped, params, rng):
        weak = dataclasses.replace(params, noise_multiplier=params.noise_multiplier / 3)
        return real(clipped, weak, rng)

    monkeypatch.setattr(ddp_canary, "integer_contribution", third_of_the_noise)
    result = ddp_canary.check_ddp_canaries(_run(RunConfig()))
    assert result.verdict == FAIL, result.reason
    assert result.details["dp"]["epsilon_lower_bound"] > result.details["dp"]["claimed_epsilon"]


def test_the_released_sum_is_the_decoded_clipped_sum_plus_noise():
    cfg = RunConfig()
    params = dataclasses.replace(params_for(cfg, DIM), noise_multiplier=0.0)
    rng = np.random.default_rng(1)
    vecs = [[np.full(DIM, 0.05)], [np.full(DIM, -0.02), np.full(DIM, 0.01)]]
    got = ddp_canary.released_sums(params, vecs, rng)
    # without noise, only the randomised rounding (at most 1 / scale per vector) remains
    assert np.abs(got - 0.04).max() <= 3.0 / params.scale
