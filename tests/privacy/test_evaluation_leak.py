"""Finding 3 of issue 19: evaluation replies leaked the held-out interactions.

The attack: the server sends a crafted model whose query ignores the user (constant) and whose
item tower ranks every item by similarity to a probe item, so the probe itself ranks first. A
device whose test item is the probe then reports MRR@10 = 1; one query per catalog item
recovered the test item of every device on main. Now the evaluate reply carries no metric; the
device's own report (which the simulation runner reads from the store) still has them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedinterest.client import client_app as capp
from fedinterest.client.store import DeviceStore
from fedinterest.shared.fed_model import federated_model_config
from fedinterest.shared.model import build_model, get_weights
from fedinterest.simulations.inprocess_grid import server_task_identity
from flwr.app import MessageType

from tests.helpers import wire_world as w

HISTORY = [3, 17, 25, 8, 31, 12, 5, 22]  # validation item 5, test item 22


@pytest.fixture(autouse=True)
def _env():
    torch.set_num_threads(1)
    with server_task_identity():
        yield


def crafted_model(cfg, cat, probe: int) -> list[np.ndarray]:
    """Constant query u; item embedding a * gelu(s <v_i, v_probe>) u + b v (v orthogonal to u),
    so after normalisation the score rises with the item's similarity to the probe."""
    model = build_model(federated_model_config(cfg, cat))
    h = cfg.hidden
    u, v = torch.zeros(h), torch.zeros(h)
    u[0], v[1] = 1.0, 1.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.query.bias.copy_(u)
        fc1, fc2 = model.item_tower.fc1, model.item_tower.fc2
        fc1.weight[:, :w.DIM] = 3.0 * torch.from_numpy(cat.vectors[probe])
        fc2.weight.copy_(torch.outer(u, torch.ones(fc2.in_features)) / fc2.in_features)
        fc2.bias.copy_(0.1 * v)
        model.scale.log_scale.fill_(1.0)
    return get_weights(model)


def _probe_all(tmp_path):
    """Evaluate the crafted model of every probe item on device 0; yields (probe, reply)."""
    cat, cat_path = w.catalog(tmp_path)
    devices = tmp_path / "devices"
    w.provision(devices, 0, cat, HISTORY)
    cfg = w.config(tmp_path)
    names, _ = w.initial(cfg, cat)
    for probe in range(w.N_ITEMS):
        msg = w.message(cfg, cat, cat_path, devices, names, crafted_model(cfg, cat, probe),
                        MessageType.EVALUATE, rnd=probe + 1)
        reply = capp.app(message=msg, context=w.context(0))
        assert not reply.has_error(), reply.error
        yield probe, reply, devices


def _recovered(probe: int, sums: dict) -> set:
    return {(split, probe) for split in ("val", "test")
            if sums.get(f"{split}-mrr@10-sum") == 1.0}


def test_a_crafted_model_recovers_no_held_out_item(tmp_path):
    leaked = set()
    for probe, reply, _ in _probe_all(tmp_path):
        sent = {k: v for rec in reply.content.metric_records.values() for k, v in rec.items()}
        leaked |= _recovered(probe, sent)
    assert leaked == set()  # main: {("val", 5), ("val", 8), ("test", 22)}


def test_the_probe_is_an_oracle_that_stays_on_the_device(tmp_path):
    """The attack works: the device's own report, read from its store, names both held-out
    items (a probe the device has seen ranks its nearest unseen neighbour first, so the
    probes that hit are a superset)."""
    from fedinterest.client.evaluation_report import read_report

    on_device = set()
    for probe, _, devices in _probe_all(tmp_path):
        with DeviceStore.open(devices / "device-0.db", key_file=devices / "device-0.key",
                              create=False) as st:
            report = read_report(st)
        assert report["round"] == probe + 1
        on_device |= _recovered(probe, report["sums"])
    assert {("val", 5), ("test", 22)} <= on_device


def test_evaluate_reply_is_an_empty_acknowledgement_and_the_runner_reads_the_report(tmp_path):
    from fedinterest.client.evaluation_report import sum_reports

    cat, cat_path = w.catalog(tmp_path)
    devices = tmp_path / "devices"
    w.provision(devices, 0, cat, HISTORY)
    w.provision(devices, 1, cat, [1, 2, 3, 4, 6, 7])
    cfg = w.config(tmp_path)
    names, weights = w.initial(cfg, cat)
    for p in (0, 1):
        msg = w.message(cfg, cat, cat_path, devices, names, weights, MessageType.EVALUATE,
                        rnd=4)
        reply = capp.app(message=msg, context=w.context(p))
        c = reply.content
        assert not (c.array_records or c.metric_records or c.config_records)
    sums = sum_reports(devices, 2, 4)
    assert sums["test-users"] == 2.0 and sums["val-users"] == 2.0
    assert 0.0 <= sums["test-ndcg@10-sum"] <= 2.0
    assert sum_reports(devices, 2, 3) == {}  # a report is of one round only
