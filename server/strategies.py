"""Flower strategies chosen by configuration, wrapped for user-level DP when asked.

Only Flower's own strategies are used; what we add is (1) deterministic client sampling from a
seeded RNG over the sorted node ids, so a run is reproducible and `--resume` can replay it, and
(2) noise for DP-FedAvg drawn from an OS-entropy-seeded generator instead of Flower's global
numpy RNG, whose state is predictable.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
from fedinterest.shared.config import RunConfig
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)


def sample_round(node_ids: Iterable, k: int, seed: int, server_round: int,
                 purpose: str = "train") -> list:
    """k ids drawn without replacement, a pure function of (seed, round, purpose, id set)."""
    nodes = sorted(node_ids)
    rng = random.Random(f"{seed}:{purpose}:{server_round}")
    return sorted(rng.sample(nodes, min(k, len(nodes))))


def make_messages(record: RecordDict, node_ids: list[int], message_type: str) -> list[Message]:
    return [Message(content=record, message_type=message_type, dst_node_id=n) for n in node_ids]


def build_strategy(cfg: RunConfig) -> Strategy:
    """The aggregation rule; sampling is done by the federation loop (see `sample_round`)."""
    common = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": 1,
                  "min_evaluate_nodes": 1, "min_available_nodes": 1}
    if cfg.strategy == "fedavg":
        strategy: Strategy = FedAvg(**common)
    elif cfg.strategy == "fedprox":
        strategy = FedProx(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.strategy == "fedadam":
        strategy = FedAdam(eta=cfg.server_lr, eta_l=cfg.lr, **common)
    elif cfg.strategy == "fedmedian":
        strategy = FedMedian(**common)
    elif cfg.strategy == "fedtrimmedavg":
        strategy = FedTrimmedAvg(beta=cfg.trim_beta, **common)
    elif cfg.strategy == "krum":
        strategy = Krum(num_malicious_nodes=max(1, cfg.clients_per_round // 10), **common)
    else:  # RunConfig.validate already rejects this
        raise ValueError(cfg.strategy)
    if cfg.user_dp:
        strategy = SecureNoiseClientSideFixedClipping(
            strategy, cfg.user_noise_multiplier, cfg.user_clip, cfg.clients_per_round)
    return strategy


class SecureNoiseClientSideFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's DP-FedAvg wrapper (client-side clipping) with noise from OS entropy, scaled to
    the replies actually averaged: Flower divides by the number *sampled*, which under-noises
    the mean when some devices drop out."""

    _n_averaged: int = 0

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self._n_averaged = sum(1 for m in replies if not m.has_error())
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        rng = np.random.default_rng(np.random.SeedSequence())  # fresh OS entropy per release
        n = max(1, min(self._n_averaged or self.num_sampled_clients, self.num_sampled_clients))
        std = self.noise_multiplier * self.clipping_norm / n
        noised = {}
        for name, arr in aggregated_arrays.items():
            a = arr.numpy()
            noised[name] = (a + rng.normal(0.0, std, a.shape)).astype(a.dtype)
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in noised.items()})
