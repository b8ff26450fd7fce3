"""Finding 6 of issue 19: the user-level epsilon must hold against the server.

On main the server claimed amplification by sampling (SampledWithoutReplacement over the
population), though it draws the sample itself from a seeded generator it knows, and did not
compose the popularity release with training: the most-sampled device's real spend was above
what results.json reported, and above the budget. Now each device is charged the Gaussian
mechanism in full for every round it contributed to, plus the popularity release it was
queried for, and a device whose next round would cross the budget is not sampled."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from fedinterest.client import client_app as capp
from fedinterest.server.results import build_results
from fedinterest.server.server_app import run_server
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp_accounting import ORDERS, rdp_to_epsilon
from fedinterest.shared.distributed_dp_count import count_scale
from fedinterest.shared.encoder import TextEncoder
from fedinterest.shared.privacy import user_level_epsilon
from fedinterest.simulations.data.synthetic import generate_world
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity
from fedinterest.simulations.simulate import prepare

from tests.helpers.legacy_defaults import PRE_DDP_DEFAULTS

N_USERS = 8
SIGMA, POP_NOISE, DELTA = 4.0, 2.0, 1e-5


@pytest.fixture(autouse=True)
def _env():
    torch.set_num_threads(1)
    with server_task_identity():
        yield


def _cfg(out_dir, **kw) -> RunConfig:
    base = {"out_dir": str(out_dir), "rounds": 4, "clients_per_round": 2, "hidden": 8,
            "segment_len": 6, "n_negatives": 8, "batch_size": 2, "min_clients": 2,
            "dp": "user", "user_noise_multiplier": SIGMA, "user_clip": 1.0,
            "user_epsilon": 1e6, "popularity_noise": POP_NOISE, "popularity_devices": 100,
            "delta": DELTA, "eval_every": 0,
            "popularity_cohort": N_USERS, "ddp_min_fraction": 0.5}  # one count cohort, m = 4
    return RunConfig(**{**PRE_DDP_DEFAULTS, **base, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("prepared")
    ds = generate_world(n_users=N_USERS, n_items=60, events_per_user=16, seed=3)
    info = prepare(_cfg(root), ds, encoder=TextEncoder(str(tiny_bert_dir), cache=None),
                   quiet=True)
    return root, info


def _run(prepared, dest, **kw):
    root, info = prepared
    shutil.copytree(root, dest)
    cat = dest / "catalog" / f"catalog-{info['catalog_version']}.npz"
    grid = InProcessGrid(capp.app, {7919 * (i + 1): {"partition-id": i}
                                    for i in range(N_USERS)})
    cfg = _cfg(dest, **kw)
    return run_server(grid, cfg, cat, dest / "devices"), grid, cfg


def _contributions(grid) -> Counter:
    """Per node, the train replies that carried an update (not an error, not a decline)."""
    out: Counter = Counter()
    for m in grid.received:
        if m.metadata.message_type != "train" or m.has_error() or \
                "metrics" not in m.content.metric_records:
            continue
        if m.content.metric_records["metrics"].get("refused", 0.0) < 1.0:
            out[m.metadata.src_node_id] += 1
    return out


def _no_amplification(rounds: int) -> float:
    """Replace-one: Gaussian(sigma / 2) for each round joined (sensitivity 2 clip), composed
    with the popularity count the devices noised: the Skellam RDP bound (Agarwal, Kairouz,
    Liu 2021, Thm. 3.5) at the replace-one sensitivities L2 gamma sqrt(2k), L1 2 gamma k and
    variance (popularity_noise gamma)^2 k, written out here."""
    cfg = _cfg("/unused")
    gamma, k = count_scale(cfg), cfg.popularity_max_items
    l2, l1, mu = gamma * np.sqrt(2 * k), 2 * gamma * k, (POP_NOISE * gamma) ** 2 * k
    curve = [rounds * a / (2 * (SIGMA / 2) ** 2) + a * l2**2 / (2 * mu)
             + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
             for a in ORDERS]
    return rdp_to_epsilon(np.asarray(curve), DELTA)


def test_the_reported_user_epsilon_is_the_most_exposed_devices_spend(prepared, tmp_path):
    fed, grid, cfg = _run(prepared, tmp_path / "run")
    joined = _contributions(grid)
    assert max(joined.values()) >= 2  # some device joined more than one round
    honest = _no_amplification(max(joined.values()))
    # what main reported: amplification by sampling, 4 rounds of 2 of 8 devices, without the
    # popularity release; below what the most exposed device spent
    amplified = user_level_epsilon(N_USERS, 2, SIGMA, 4, DELTA)
    assert amplified < honest
    assert fed.state.history[-1]["user_epsilon"] == pytest.approx(honest, rel=1e-9)
    user = build_results(fed, cfg, N_USERS)["privacy"]["user_level"]
    assert user["epsilon"] == pytest.approx(honest, rel=1e-9)
    assert max(user["per_device_epsilon"].values()) == pytest.approx(honest, rel=1e-9)
    assert "no amplification" in user["sampling"]


def test_no_device_is_sampled_past_its_budget(prepared, tmp_path):
    """A budget for the popularity release and one round but not two: every device joins
    at most once (4 rounds of 2 of the 8 devices: each joins exactly once)."""
    budget = (_no_amplification(1) + _no_amplification(2)) / 2
    fed, grid, _ = _run(prepared, tmp_path / "run", user_epsilon=budget)
    joined = _contributions(grid)
    assert joined and max(joined.values()) == 1  # main: devices joined 2 or more rounds
    assert len(fed.state.history) == 4 and len(joined) == N_USERS
    assert fed.state.history[-1]["user_epsilon"] <= budget
