"""The ServerApp's round line under `flwr run .` (server/server_app.py, log_round): who
took part and every epsilon with its unit and delta, at INFO on our logger."""

from __future__ import annotations

from fedinterest.server.federation import RoundRecord
from fedinterest.server.server_app import EVENT_UNIT, USER_UNIT, log_round
from fedinterest.shared.config import RunConfig


def _record(**kw) -> RoundRecord:
    base = {"round": 1, "sampled": 5, "accepted": 4, "failed": 1, "train_loss": None,
            "metrics": {}, "user_epsilon": None, "device_epsilon_max": None,
            "bytes_down_per_client": 0, "bytes_up_per_client": 0.0, "seconds": 0.0,
            "population": 20}
    return RoundRecord(**{**base, **kw})


def test_round_line_says_who_took_part_and_each_epsilon_with_its_unit(caplog):
    cfg = RunConfig(rounds=3, dp="both", delta=1e-6)
    with caplog.at_level("INFO", logger="fedinterest.server"):
        log_round(_record(device_epsilon_max=2.5, user_epsilon=0.75,
                          metrics={"val-ndcg@10": 0.0123, "note": "skipped"}), cfg)
    (line,) = caplog.messages
    assert line.startswith("round 1/3: sampled 5 of 20 devices, 4 accepted, 1 failed; ")
    assert f"epsilon 2.5 at delta 1e-06, {EVENT_UNIT}" in line
    assert f"epsilon 0.75 at delta 1e-06, {USER_UNIT}" in line
    assert "val-ndcg@10 0.0123" in line and "skipped" not in line
    assert caplog.records[0].levelname == "INFO"


def test_round_line_without_dp_names_no_epsilon(caplog):
    with caplog.at_level("INFO", logger="fedinterest.server"):
        log_round(_record(), RunConfig(dp="off"))
    assert "epsilon" not in caplog.messages[0]
