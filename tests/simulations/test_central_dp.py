"""Central DP-SGD reference (`train-central --dp-epsilon`): noise calibrated to the target
epsilon at the segment unit, spent epsilon recorded, and the DP model (HoistedGRU) trained."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
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


PRIOR = ["--text-prior", "5", "--segment-len", "10", "--dp-batch-size", "16", "--dp-epochs",
         "2", "--dp-train-only", "prior.recency,prior.pop,prior.log_scale"]


def test_central_dp_of_the_prior_trains_only_the_named_parameters_within_its_epsilon(
        tmp_path, tiny_bert_dir, capsys):
    out = tmp_path / "prior"
    rc = main(["train-central", "--data", WORLD, "--model", "gru-text", "--out", str(out),
               "--encoder", str(tiny_bert_dir), "--hidden", "16", "--dp-epsilon", "4",
               "--dp-count-noise", "2", *PRIOR, "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    # the count release and DP-SGD together, calibrated: never above the target
    assert 4 * 0.97 <= m["epsilon"] <= 4 and m["noise_multiplier"] > 0
    assert m["dp"]["count_noise"] == 2 and "count release" in m["dp"]["accountant"]
    assert m["trained_parameters"] == {"recency": 5, "pop": 11, "log_scale": 1}
    assert m["steps"] == round(2 / m["sample_rate"]) and 0 <= m["test"]["ndcg@10"] <= 1


def test_prior_dp_leaves_every_other_parameter_untouched(tmp_path, tiny_bert_dir):
    from fedinterest.shared.embedding_cache import EmbeddingCache
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations.central import build_for, load_inputs, model_config
    from fedinterest.simulations.central_dp import DPTrainConfig, train_prior_dp
    from fedinterest.simulations.data import load_dataset

    inputs = load_inputs(load_dataset(WORLD), "loo",
                         TextEncoder(str(tiny_bert_dir), cache=EmbeddingCache(tmp_path)))
    cfg = model_config("gru-text", inputs, hidden=16, text_prior=5, prior_rank=2,
                       segment_len=10, dp=True, loss="sampled")
    model = build_for(cfg, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_prior_dp(model, inputs, DPTrainConfig(epsilon=8, epochs=2, batch_size=16, lr=0.1,
                                                train_only="prior.pop,prior.adapter_up"))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"prior.pop", "prior.adapter_up"}


@pytest.mark.parametrize("train_only, problem", [
    ("gru.weight", "only prior.* parameters"), ("prior.nothing", "matches no prior parameter")])
def test_prior_dp_rejects_what_it_cannot_train(tmp_path, tiny_bert_dir, capsys, train_only,
                                               problem):
    rc = main(["train-central", "--data", WORLD, "--model", "gru-text", "--out", str(tmp_path),
               "--encoder", str(tiny_bert_dir), "--dp-epsilon", "8", "--text-prior", "5",
               "--dp-train-only", train_only, "--no-progress"])
    assert rc != 0 and f"--dp-train-only {train_only}: {problem}" in capsys.readouterr().err


def test_segment_counts_move_by_at_most_sqrt_segment_len_when_one_segment_goes():
    from fedinterest.simulations.central_dp import segment_counts

    items = torch.tensor([[1, 1, 2, 3], [2, 2, 2, 2], [0, 4, 5, 6]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    full = segment_counts(items, mask, 8)
    assert full.tolist() == [1, 1, 2, 1, 1, 1, 0, 0]  # a repeat counts once; padding never
    for drop in range(3):
        keep = [i for i in range(3) if i != drop]
        diff = full - segment_counts(items[keep], mask[keep], 8)
        assert np.linalg.norm(diff) <= np.sqrt(items.shape[1])


def test_count_noise_is_composed_into_the_calibrated_epsilon():
    from fedinterest.simulations.central_dp import DPTrainConfig, _epsilon, calibrate_sigma

    plain = calibrate_sigma(DPTrainConfig(epsilon=4), 0.1, 50)
    with_count = calibrate_sigma(DPTrainConfig(epsilon=4, count_noise=3.0), 0.1, 50)
    assert with_count > plain  # the count spends part of the budget
    assert 3.9 <= _epsilon(with_count, 0.1, 50, 1e-5, 3.0) <= 4.0
    assert _epsilon(plain, 0.1, 50, 1e-5, 3.0) > 4.0
    assert calibrate_sigma(DPTrainConfig(epsilon=float("inf")), 0.1, 50) == 0.0


def test_central_dp_runs_every_seed_of_seeds(tmp_path, tiny_bert_dir, capsys):
    rc = main(["train-central", "--data", WORLD, "--model", "gru-text", "--out", str(tmp_path),
               "--encoder", str(tiny_bert_dir), "--hidden", "16", "--dp-epsilon", "8",
               "--seeds", "0,1", *PRIOR, "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = [json.loads((tmp_path / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert [r["dp"]["seed"] for r in runs] == [0, 1] and printed["seeds"] == [0, 1]
    assert printed["test"]["ndcg@10"] == pytest.approx(
        sum(r["test"]["ndcg@10"] for r in runs) / 2)


def test_a_count_release_that_alone_exceeds_the_epsilon_is_refused():
    from fedinterest.shared.errors import ConfigError
    from fedinterest.simulations.central_dp import DPTrainConfig, calibrate_sigma

    with pytest.raises(ConfigError, match="count noise 1.0 alone spends more than epsilon 4"):
        calibrate_sigma(DPTrainConfig(epsilon=4, count_noise=1.0), 0.1, 50)


def test_a_fixed_noise_multiplier_is_kept_only_within_the_epsilon():
    from fedinterest.shared.errors import ConfigError
    from fedinterest.simulations.central_dp import DPTrainConfig, _epsilon, calibrate_sigma

    fixed = DPTrainConfig(epsilon=8, count_noise=1.0, noise_multiplier=2.0)
    assert calibrate_sigma(fixed, 0.05, 80) == 2.0
    assert _epsilon(2.0, 0.05, 80, 1e-5, 1.0) <= 8
    with pytest.raises(ConfigError, match="noise multiplier 0.3 over 80 steps"):
        calibrate_sigma(replace(fixed, noise_multiplier=0.3), 0.05, 80)


def test_the_parameter_average_is_applied_for_evaluation_and_the_iterate_restored():
    from fedinterest.shared.errors import ConfigError
    from fedinterest.simulations.central_dp import ParameterAverage

    w = torch.nn.Parameter(torch.zeros(3))
    avg = ParameterAverage({"w": w}, 0.5)
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            w.fill_(value)
        avg.update()
    # warm-up: decay min(0.5, (1 + t) / (10 + t)) = 2/11, 3/12, 4/13 at t = 1, 2, 3
    expect = 0.0
    for t, value in enumerate((1.0, 2.0, 3.0), start=1):
        d = min(0.5, (1 + t) / (10 + t))
        expect = d * expect + (1 - d) * value
    with avg.applied():
        assert torch.allclose(w, torch.full((3,), expect)) and expect < 3.0
    assert torch.equal(w.detach(), torch.full((3,), 3.0))  # the iterate is back
    last = ParameterAverage({"w": w}, 0.0)
    last.update()
    with last.applied():
        assert torch.equal(w.detach(), torch.full((3,), 3.0))  # decay 0: the last iterate
    with pytest.raises(ConfigError, match="--dp-ema 1.0"):
        ParameterAverage({"w": w}, 1.0)


def test_the_average_runs_on_the_prior_path_only(tmp_path, tiny_bert_dir, capsys):
    rc = main(["train-central", "--data", WORLD, "--model", "gru-text", "--out",
               str(tmp_path / "ema"), "--encoder", str(tiny_bert_dir), "--hidden", "16",
               "--dp-epsilon", "8", "--dp-ema", "0.9", *PRIOR, "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "ema" / "metrics.json").read_text())
    assert m["dp"]["ema"] == 0.9 and m["epsilon"] <= 8  # post-processing: the same epsilon
    rc = main(["train-central", "--data", WORLD, "--model", "gru-text", "--out",
               str(tmp_path / "all"), "--encoder", str(tiny_bert_dir), "--hidden", "16",
               "--dp-epsilon", "8", "--dp-ema", "0.9", "--no-progress"])
    assert rc != 0 and "--dp-ema needs --dp-train-only" in capsys.readouterr().err
