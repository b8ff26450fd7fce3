"""The interaction-inference check on distributed-DP runs (simulations/audit/ddp_inference.py):
it attacks what the server learned from each round's decoded noisy sum, against the device's
exact contribution as the positive control, with baselines from rounds the device did not
join."""

from __future__ import annotations

import numpy as np
import pytest
from fedinterest.shared.distributed_dp import accounting_sample_rate, params_for
from fedinterest.shared.distributed_dp_accounting import ddp_epsilon, run_epsilon
from fedinterest.simulations.audit import ddp_inference
from fedinterest.simulations.audit import inference_attack as ia
from fedinterest.simulations.audit.evidence import AuditRun
from fedinterest.simulations.audit.verdict import FAIL, INCONCLUSIVE, PASS

from tests.simulations.audit import test_audit as audit_world

_env, world, _run = audit_world._env, audit_world.world, audit_world._run  # fixtures, helper

pytestmark = [pytest.mark.filterwarnings("ignore:Optimal order")]
DDP = {"dp": "ddp-event", "secagg": True, "rounds": 7, "clients_per_round": 3,
       "popularity": False, "noise_multiplier": 1.0, "min_clients": 2, "device_epsilon": 50.0}


def test_an_honest_ddp_run_passes_and_its_control_finds_the_devices_items(world, tmp_path):
    run = _run(world, tmp_path / "run", ddp_train_only="", **DDP)  # every weight trained
    res = ia.check_inference(AuditRun(run), max_devices=8)
    assert res.verdict == PASS, res.reason
    s = res.details["summary"]
    assert s["no_dp"]["mean_advantage"] > 0.04  # the exact contribution shows the items
    rows = res.details["devices"]
    assert len(rows) >= 4 and all(1 <= r["round"] <= 6 for r in rows)  # round 7 has no successor
    cfg = AuditRun(run).config
    dim = res.details["trained_coordinates"]
    one_round = ddp_epsilon(params_for(cfg, dim), accounting_sample_rate(cfg), 1, cfg.delta)
    assert one_round == pytest.approx(run_epsilon(cfg, dim, 1))  # no popularity in this run
    assert all(r["epsilon"] == pytest.approx(one_round) for r in rows)


def test_a_run_training_only_the_prior_weights_shows_nothing_without_dp(world, tmp_path):
    # the default trains a few recency and popularity weights: their change cannot encode
    # which items a user had, so the check says it could not show anything
    run = _run(world, tmp_path / "run", ddp_train_only="prior.recency,prior.pop",
               text_prior=4, **DDP)
    res = ia.check_inference(AuditRun(run), max_devices=8)
    assert res.verdict == INCONCLUSIVE, res.reason
    assert "no clear advantage" in res.reason


def _release(members):
    return ddp_inference._Release(0, [], set(members))


def test_the_dp_baseline_skips_rounds_the_device_joined_and_leakage_fails():
    # devices 0, 1 share round 1 and devices 2, 3 round 2; each round's release ranks its
    # members' items (3 each of 12) first. Device 1's view is round 1's release too: in
    # device 0's baseline it would cancel device 0's advantage, so the baseline is round 2
    items = [np.isin(np.arange(12), range(3 * d, 3 * d + 3)) for d in range(4)]
    release = {1: (items[0] | items[1]).astype(float), 2: (items[2] | items[3]).astype(float)}
    picks = [(0, 1), (1, 1), (2, 2), (3, 2)]
    views = [{"dp": release[r], "no_dp": items[d].astype(float)} for d, r in picks]
    rows = [{"device": d, "round": r, "_positive": items[d], "epsilon": 0.1} for d, r in picks]
    releases = {1: _release({0, 1}), 2: _release({2, 3})}
    ddp_inference._advantages(rows, views, picks, releases, 1e-5)
    # AUC with ties at half: own release 6/9 + 3/18; the other round's 3/18
    assert [r["baseline_auc_dp"] for r in rows] == pytest.approx([1 / 6] * 4)
    assert [r["auc_dp"] for r in rows] == pytest.approx([5 / 6] * 4)
    assert [r["advantage_no_dp"] for r in rows] == pytest.approx([2 / 3] * 4)
    summary = {t: ia.summarise(rows, t) for t in ddp_inference.ARMS}
    res = ia._inference_verdict("t", summary, rows, False, {})
    assert rows[0]["auc_bound"] < 0.6 and res.verdict == FAIL, res.reason
