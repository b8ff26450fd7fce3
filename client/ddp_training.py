"""The device's contribution to a distributed-DP round (shared/distributed_dp.py).

Event level (DP-FedSGD): the device keeps each of its training segments with probability
q (`ddp_sample_rate`), drawn from the OS CSPRNG, computes each kept segment's gradient at the
global weights, clips it to `max_grad_norm`, rounds it to integers and sums; one noise share
is added to the sum. Nothing n-dependent leaves: the payload has the model's shape whatever
the device holds, and the only metrics are its epsilon and whether it refused.
User level (DP-FedAvg): plain local training (`local_epochs` passes, several steps), the
whole update clipped to `user_clip`, rounded, one noise share added.
Noise shares and conditional rounding use a Philox generator keyed from 128 bits of
os.urandom per round: nothing the server knows (run seed, round) can reproduce them.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import (
    DDPParams,
    clip_l2,
    flatten,
    integer_contribution,
    params_from_config,
    trained_index,
    trained_names,
)
from fedinterest.shared.model import ModelConfig, weight_schema
from fedinterest.shared.sequences import SegmentDataset, collate

from .dp_training import build_local_model, train_local


@dataclass
class Contribution:
    """What the device masks: integers (signal + noise share), and for the device's own
    record how many units it contributed and their mean loss."""

    integers: np.ndarray
    units: int
    loss: float


def os_generator() -> np.random.Generator:
    """A fresh generator keyed by the OS CSPRNG (never by anything the server chose)."""
    return np.random.Generator(np.random.Philox(key=int.from_bytes(os.urandom(16), "little")))


def poisson_sample(n: int, rate: float) -> list[int]:
    """Indices kept independently with probability `rate`, drawn from the OS CSPRNG."""
    sysrand = secrets.SystemRandom()
    return [i for i in range(n) if sysrand.random() < rate]


def event_contribution(model_cfg: ModelConfig, global_weights: list[np.ndarray],
                       data: SegmentDataset, item_feats: np.ndarray,
                       topic_dist: np.ndarray | None, cfg: RunConfig,
                       params: DDPParams | None = None,
                       rng: np.random.Generator | None = None) -> Contribution:
    """DP-FedSGD: the sum of the Poisson-sampled segments' clipped, rounded gradients plus
    this device's Skellam share."""
    model = build_local_model(model_cfg, global_weights, item_feats, topic_dist,
                              data.neg_probs, dp=False).train()
    schema = weight_schema(model)
    params = params or params_from_config(cfg, schema)
    trained = set(trained_names(cfg, schema))
    named = dict(model.named_parameters())
    for name, p in named.items():  # backward computes only what is sent
        p.requires_grad_(name in trained)
    clipped, loss_sum = [], 0.0
    for i in poisson_sample(len(data), cfg.ddp_sample_rate):
        model.zero_grad(set_to_none=True)
        loss, _ = model.example_losses(collate([data[i]]))
        loss.sum().backward()
        grads = [_grad(named.get(name), shape) for name, shape, _ in schema if name in trained]
        clipped.append(clip_l2(flatten(grads), cfg.max_grad_norm))
        loss_sum += float(loss.detach().sum())
    z = integer_contribution(clipped, params, rng or os_generator())
    return Contribution(z, len(clipped), loss_sum / len(clipped) if clipped else float("nan"))


def user_contribution(model_cfg: ModelConfig, global_weights: list[np.ndarray],
                      data: SegmentDataset, item_feats: np.ndarray,
                      topic_dist: np.ndarray | None, cfg: RunConfig, server_round: int,
                      seed: int, params: DDPParams | None = None,
                      rng: np.random.Generator | None = None) -> Contribution:
    """DP-FedAvg: plain local training, the update clipped to user_clip, rounded, plus this
    device's Skellam share."""
    res = train_local(model_cfg, global_weights, data, item_feats, topic_dist, cfg, None,
                      server_round, seed)
    schema = _schema_of(model_cfg)
    params = params or params_from_config(cfg, schema)
    idx = trained_index(cfg, schema)
    update = clip_l2(flatten(res.weights)[idx] - flatten(global_weights)[idx], cfg.user_clip)
    z = integer_contribution([update], params, rng or os_generator())
    return Contribution(z, 1, res.loss)


def _schema_of(model_cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str]]:
    from fedinterest.shared.model import build_model

    return weight_schema(build_model(model_cfg))


def _grad(param: torch.nn.Parameter | None, shape: tuple[int, ...]) -> np.ndarray:
    if param is None or param.grad is None:
        return np.zeros(shape)
    return param.grad.detach().double().numpy()
