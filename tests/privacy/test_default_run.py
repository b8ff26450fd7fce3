"""The default `fedinterest simulate` is private learning: distributed DP at event level, a
small privately trained head over the public text prior, and a budget no device runs out of."""

from __future__ import annotations

import numpy as np
from fedinterest.client.policy import PrivacyPolicy
from fedinterest.server.ddp_aggregate import DistributedDPServer
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import trained_names
from fedinterest.shared.model import ModelConfig, build_model, weight_schema
from fedinterest.shared.wire import WireSchema
from fedinterest.simulations.data import load_dataset


def _schema(cfg: RunConfig) -> list[tuple[str, tuple[int, ...], str]]:
    mcfg = ModelConfig(n_items=20, item_feat_dim=32 + 11, text_dim=32, hidden=cfg.hidden,
                       text_prior=cfg.text_prior, prior_rank=cfg.prior_rank,
                       segment_len=cfg.segment_len, context_len=cfg.segment_len, n_topics=4)
    return weight_schema(build_model(mcfg))


def _server(cfg: RunConfig) -> DistributedDPServer:
    schema = _schema(cfg)
    return DistributedDPServer(cfg, WireSchema.from_named_arrays(
        [(n, np.zeros(s, np.float32)) for n, s, _ in schema]))


def test_the_default_is_event_level_distributed_dp_at_epsilon_8_and_delta_1e_5():
    cfg = RunConfig()
    assert cfg.dp == "ddp-event" and cfg.distributed_dp and not cfg.event_dp
    assert cfg.device_epsilon <= 8.0 and cfg.delta == 1e-5
    assert PrivacyPolicy.for_run(cfg).review(cfg) is None  # the provisioned devices accept it


def test_the_default_trains_and_sends_only_the_text_priors_head():
    cfg = RunConfig()
    schema = _schema(cfg)
    names = trained_names(cfg, schema)
    assert names and all(n.startswith("prior.") for n in names) and "prior.gate" not in names
    server = _server(cfg)
    total = sum(int(np.prod(s)) for _, s, _ in schema)
    assert server.params.dim == sum(int(np.prod(s)) for n, s, _ in schema if n in names)
    assert server.params.dim < 0.01 * total  # the payload and its noise: under 1% of the model


def test_no_device_of_the_default_world_needs_to_decline_for_budget():
    cfg = RunConfig()
    server = _server(cfg)
    n_devices = load_dataset(cfg.dataset).n_users
    joins = 0  # the most rounds one device may join within its budget
    while server.epsilon_if_joined_every_round(joins + 1) <= cfg.device_epsilon:
        joins += 1
    assert joins >= 1
    # the server samples only devices with a round left (within_budget), and the world has
    # room for every round's cohort with a margin: nobody is ever asked past its budget
    assert n_devices * joins >= 1.2 * cfg.rounds * cfg.clients_per_round
    joined = {n: (joins if n % 2 else 0) for n in range(n_devices)}
    eligible = server.within_budget(list(joined), joined.get)
    assert eligible == [n for n in joined if n % 2 == 0]


def test_the_audit_statement_of_the_default_run_recomputes_each_devices_epsilon():
    from types import SimpleNamespace

    import pytest
    from fedinterest.simulations.audit.distributed_statement import distributed_paragraph

    cfg = RunConfig()
    server = _server(cfg)
    joined = {"a": 1, "b": 2, "c": 2}
    run = SimpleNamespace(config=cfg, results={"privacy": {"distributed": {
        **server.statement(), "budget": cfg.device_epsilon, "rounds_joined": joined}}})
    numbers: dict = {}
    _, text = distributed_paragraph(run, numbers)
    assert numbers["distributed"]["epsilon_max"] == pytest.approx(
        server.epsilon_if_joined_every_round(2)) and numbers["distributed"]["epsilon_max"] <= 8
    assert f"the {server.params.dim} privately trained coordinates" in text
    assert "no amplification by sampling is claimed" in text and "noise share" in text
