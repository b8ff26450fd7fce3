"""The privacy-utility table's driver (simulations/privacy_table.py): every finite cell's
flags keep a device that joins two rounds, with its popularity count, within the cell's
epsilon; infinity is the same recipe without DP; the tabulation reads the runs."""

from __future__ import annotations

import dataclasses
import json

from fedinterest.shared.config import RunConfig
from fedinterest.simulations import privacy_table as pt


def _cfg(flags: list[str]) -> RunConfig:
    value = dict(zip(flags[::2], flags[1::2]))
    fields = {"--dp": ("dp", str), "--noise-multiplier": ("noise_multiplier", float),
              "--device-epsilon": ("device_epsilon", float),
              "--popularity-noise": ("popularity_noise", float),
              "--user-noise-multiplier": ("user_noise_multiplier", float),
              "--user-epsilon": ("user_epsilon", float), "--text-prior": ("text_prior", int)}
    return dataclasses.replace(RunConfig(), **{fields[k][0]: fields[k][1](v)
                                              for k, v in value.items()})


def test_local_dp_sgd_cells_compose_training_and_count_within_epsilon():
    for eps in (1.0, 2.0, 4.0, 8.0):
        cfg = _cfg(pt.cell_flags("event", eps))
        training, total = pt.event_total(cfg)
        assert training <= cfg.device_epsilon <= training * 1.001  # no third round fits
        assert total <= eps and cfg.popularity_noise == pt.popularity_noise(eps)


def test_infinity_is_the_same_recipe_without_dp():
    assert _cfg(pt.cell_flags("event", float("inf"))).dp == "off"
    ddp = _cfg(pt.cell_flags("ddp-event", float("inf")))
    assert ddp.dp == "ddp-event" and ddp.noise_multiplier == pt.NO_DP_NOISE
    assert ddp.device_epsilon == pt.NO_DP_BUDGET
    assert pt.cell_flags("central", float("inf")) == ["--data", "synthetic", "--model",
                                                      "gru-text", "--dp-epsilon", "1e+06"]


def test_the_table_reads_each_cells_run(tmp_path):
    run = tmp_path / "ddp-event-8"
    run.mkdir()
    metrics = {"test-ndcg@10": 0.07, "val-ndcg@10": 0.05, "test-hr@10": 0.16}
    early = {"test-ndcg@10": 0.06, "val-ndcg@10": 0.055, "test-hr@10": 0.15}
    (run / "results.json").write_text(json.dumps({
        "final": metrics, "timings": {"total_seconds": 250.0}, "initial": metrics | {
            "val-ndcg@10": 0.01},
        "rounds": [{"accepted": 10, "sampled": 10, "round": 12, "metrics": early}]
        + [{"accepted": 10, "sampled": 10, "round": 24, "metrics": metrics}] * 23,
        "privacy": {"distributed": {"per_device_epsilon": {"a": 7.9, "b": 5.9}}}}))
    text = pt.table(tmp_path)
    # chosen on validation: round 12 (val 0.055 > 0.05 at round 24 and 0.01 untrained)
    assert "| ddp-event | not run | not run | not run | 0.0600 / 0.0700 | not run |" in text
    assert ("| ddp-event | 8 | 0.0700 | 0.0500 | 0.0600 (12) | 0.160 | 7.900 | 240/240 | 250 |"
            in text)
