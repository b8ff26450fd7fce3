"""`fedinterest bench ddp-cost` at a tiny size: both arms run the real server loop and release
every round, the no-DP arm sends the same payload without noise or ledger, and the result
records both arms' CPU per round and their ratio (never a timing assert)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedinterest.client import ddp_mod
from fedinterest.client.device import DDP_LEDGER_BLOB, Device
from fedinterest.shared.config import RunConfig
from fedinterest.shared.encoder import TextEncoder
from fedinterest.simulations.bench import ddp_cost
from fedinterest.simulations.data.synthetic import generate_world
from fedinterest.simulations.inprocess_grid import server_task_identity
from fedinterest.simulations.simulate import prepare


@pytest.fixture(autouse=True)
def _env():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    with server_task_identity():
        yield
    torch.set_num_threads(saved)


def _cfg(out_dir) -> RunConfig:
    return RunConfig(out_dir=str(out_dir), rounds=3, clients_per_round=6, hidden=8,
                     segment_len=4, n_negatives=8, min_clients=2, eval_clients=1,
                     popularity=False, ddp_min_fraction=0.5, device_epsilon=100.0,
                     eval_initial=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("ddp-cost")
    ds = generate_world(n_users=8, n_items=60, events_per_user=16, seed=3)
    prepare(_cfg(root / "prepared"), ds, encoder=TextEncoder(str(tiny_bert_dir), cache=None),
            quiet=True)
    return root


def test_both_arms_release_every_round_and_the_ratio_is_recorded(prepared):
    cfg = _cfg(prepared).replace(rounds=4)
    result = ddp_cost.run(cfg, reps=1, command="fedinterest bench ddp-cost")
    d = result.data
    assert set(d["cpu_seconds_per_round"]) == {"ddp", "secagg, no DP"}
    assert all(len(v) == 2 and min(v) > 0 for v in d["cpu_seconds_per_round"].values())
    assert d["ddp_over_plain"] == pytest.approx(d["median"]["ddp"] / d["median"]["plain"])
    assert result.to_dict()["ratio"] == result.ratio  # the verdict, not overwritten
    assert "<= 1.5" in result.ratio and result.name == "ddp-round-cost"
    assert ddp_mod.train_reply is not ddp_cost.plain_train_reply  # restored after the arm


def test_the_no_dp_arm_charges_no_ledger_and_adds_no_noise(prepared):
    """The plain arm's devices keep no distributed-DP ledger; the DP arm's devices do."""
    cpu = ddp_cost._round_cpu(_cfg(prepared), plain=True)
    assert len(cpu) == 1
    devices = prepared / "run" / "devices"
    for p in range(8):
        with Device.open(devices / f"device-{p}.db", key_file=devices / f"device-{p}.key",
                         create=False) as dev:
            assert not dev.store.get_blob(DDP_LEDGER_BLOB)
    ddp_cost._round_cpu(_cfg(prepared), plain=False)
    charged = 0
    for p in range(8):
        with Device.open(devices / f"device-{p}.db", key_file=devices / f"device-{p}.key",
                         create=False) as dev:
            charged += bool(dev.store.get_blob(DDP_LEDGER_BLOB))
    assert charged >= 6  # every device of a round is charged (6 per round of 8)
    assert np.isfinite(cpu).all()
