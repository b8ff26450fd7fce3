"""Central DP-SGD reference (`train-central --dp-epsilon`): noise calibrated to the target
epsilon at the segment unit, spent epsilon recorded, and the DP model (HoistedGRU) trained."""

from __future__ import annotations

import json

import pytest
import torch
from fedinterest.simulations.cli import main

from .test_central import WORLD


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("epsilon", [2.0, 8.0])
def test_central_dp_spends_at_most_its_epsilon(tmp_path, tiny_bert_dir, capsys, epsilon):
    out = tmp_path / "dp"
    rc = main(["train-central", "--data", WORLD, "--model", "gru-text", "--out", str(out),
               "--encoder", str(tiny_bert_dir), "--hidden", "16", "--dp-epsilon", str(epsilon),
               "--dp-epochs", "2", "--dp-batch-size", "8", "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = json.loads((out / "metrics.json").read_text())
    assert printed["test"]["ndcg@10"] == m["test"]["ndcg@10"]
    assert epsilon * 0.97 <= m["epsilon"] <= epsilon  # calibrated, never above the target
    assert m["config"]["dp"] is True and m["dp"]["unit"].startswith("one disjoint segment")
    assert m["steps"] == round(2 / m["sample_rate"]) and m["noise_multiplier"] > 0
    assert m["history"] and 0 <= m["test"]["ndcg@10"] <= 1
