"""The ClientApp's side of distributed DP: answer a distributed-DP train round, and refuse to
help unmask a sum that would carry less noise than the device's accounting assumes.

A distributed-DP round is a SecAgg+ round whose round config says stage DDP_STAGE. The
train handler answers it with `train_reply` (the integer payload of client/ddp_training.py
in Flower's legacy "fitres" layout, weight 1); `update_as_delta_mod` leaves it alone (it acts
only on stage "train"). `min_contributions_guard` sits outside the SecAgg+ mod: in the
UNMASK stage the server names the devices whose masked vectors it will sum; fewer than m
means fewer than m noise shares, so the device erases its round secrets and answers with an
error instead of its key shares; the same for the popularity count of every mode, whose noise
is in the devices' shares too (client/popularity_count.py). m is the one the device sized its
share for (the round's, capped at its policy's `max_assumed_honest`), recorded in its node
state when the share left, never the UNMASK message's config.
The device's DDPLedger (store blob DDP_LEDGER_BLOB) composes every round it joined and the
popularity count it answered (popularity_count.charge_ddp_ledger, called by the count handler
before the count leaves); a round or a count that would exceed its budget is declined first.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import (
    DDP_STAGE,
    DDPParams,
    accounting_sample_rate,
    ddp_budget,
    encode_payload,
    integer_contribution,
    min_contributions,
    params_from_config,
    payload_schema,
)
from fedinterest.shared.distributed_dp_accounting import DDPLedger
from fedinterest.shared.fed_model import catalog_inputs, federated_model_config, negative_probs
from fedinterest.shared.model import build_model, weight_schema
from fedinterest.shared.secure_protocol import POPULARITY_STAGE, STAGE_KEY
from fedinterest.shared.sequences import SegmentDataset
from fedinterest.shared.wire import WireSchema
from flwr.app import ConfigRecord, Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from . import secure_payload
from .ddp_training import event_contribution, os_generator, user_contribution
from .device import DDP_LEDGER_BLOB, Device
from .popularity_count import recorded_share
from .secagg import SecAggRefused, _refuse


def is_ddp_round(msg: Message) -> bool:
    return (secure_payload.is_legacy(msg)
            and secure_payload.round_config(msg).get(STAGE_KEY) == DDP_STAGE)


def device_ledger(device: Device, cfg: RunConfig) -> DDPLedger:
    blob = device.store.get_blob(DDP_LEDGER_BLOB)
    if blob:
        return DDPLedger.from_json(blob.decode())
    return DDPLedger(delta=cfg.delta, unit="event" if cfg.dp == "ddp-event" else "user")


def _checked_ledger(device: Device, cfg: RunConfig) -> DDPLedger:
    ledger = device_ledger(device, cfg)
    if ledger.delta != cfg.delta or ledger.unit != ("event" if cfg.dp == "ddp-event" else "user"):
        raise SecAggRefused(f"the device's distributed-DP ledger is kept at delta "
                            f"{ledger.delta}, unit {ledger.unit}; this round asks for "
                            f"delta {cfg.delta}, dp {cfg.dp}")
    return ledger


def device_min_contributions(device: Device, cfg: RunConfig) -> int:
    """The m this device sizes a train round's noise share for: the round's, capped at its
    policy's `max_assumed_honest`, so a server that claims a larger m gets a share sized for
    the policy's m (more noise, the same released variance, so the same accounting)."""
    return min(min_contributions(cfg), device.policy.max_assumed_honest)


def device_params(device: Device, cfg: RunConfig, schema) -> DDPParams:
    """The round's parameters as this device runs them (m: `device_min_contributions`)."""
    return dataclasses.replace(params_from_config(cfg, schema),
                               min_contributions=device_min_contributions(device, cfg))


def payload_schema_for(cfg: RunConfig, catalog) -> WireSchema:
    """The schema of this run's distributed-DP payload (its trained coordinates only)."""
    mcfg = federated_model_config(cfg, catalog)
    return payload_schema(params_from_config(cfg, weight_schema(build_model(mcfg))))


def train_reply(msg: Message, device: Device, cfg: RunConfig, server_round: int,
                seed: int) -> Message:
    """The device's masked-to-be payload for a distributed-DP round (see module doc)."""
    catalog = device.catalog
    mcfg = federated_model_config(cfg, catalog)
    schema = weight_schema(build_model(mcfg))
    params = device_params(device, cfg, schema)
    shapes = [(params.dim,)]  # the trained coordinates only (distributed_dp.payload_schema)
    ledger = _checked_ledger(device, cfg)
    # A device that declines still adds its noise share (no signal, so nothing about its
    # data): the server counts every masked vector towards m, so a decline must not leave
    # the released sum with less noise than the m shares the accounting assumes.
    decline = device.policy.review(cfg)  # the round config is a request (client/policy.py)
    if decline is not None:
        return secure_payload.legacy_reply(
            msg, encode_payload(integer_contribution([], params, os_generator()), shapes),
            {"refused": 1.0, "decline-reason": float(decline.reason)}, 1.0)
    q = accounting_sample_rate(cfg)
    eps_after = ledger.epsilon_after(params, q)
    if eps_after > ddp_budget(cfg):
        noise_only = encode_payload(integer_contribution([], params, os_generator()), shapes)
        return secure_payload.legacy_reply(msg, noise_only, {"refused": 1.0}, 1.0)
    data = _training_data(device, cfg, mcfg, seed)
    if data is None:  # no segments: noise share only, so having no data does not show
        integers = integer_contribution([], params, os_generator())
    else:
        integers = _contribution(msg, device, cfg, mcfg, data, params, server_round, seed)
    ledger.record(server_round, params, q)  # the server computes the same from rounds joined
    device.store.put_blob(DDP_LEDGER_BLOB, ledger.to_json().encode())
    return secure_payload.legacy_reply(msg, encode_payload(integers, shapes),
                                       {"refused": 0.0}, 1.0)


def _contribution(msg: Message, device: Device, cfg: RunConfig, mcfg, data: SegmentDataset,
                  params, server_round: int, seed: int) -> np.ndarray:
    weights = [np.asarray(w) for w in _global_weights(msg)]
    feats, topics, _ = catalog_inputs(device.catalog)
    topics = topics if mcfg.n_topics else None
    if cfg.dp == "ddp-event":
        return event_contribution(mcfg, weights, data, feats, topics, cfg, params).integers
    return user_contribution(mcfg, weights, data, feats, topics, cfg, server_round, seed,
                             params).integers


def _global_weights(msg: Message) -> list[np.ndarray]:
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins

    return parameters_to_ndarrays(recorddict_to_fitins(msg.content, True).parameters)


def _training_data(device: Device, cfg: RunConfig, mcfg, seed: int) -> SegmentDataset | None:
    """The device's training segments (all events but the last `holdout`), or None."""
    items, ts, tv, _, _ = device._history()
    train_n = max(0, len(items) - cfg.holdout)
    if train_n < 2:
        return None
    return SegmentDataset.from_events(
        items[:train_n], ts[:train_n], tv[:train_n], len(device.catalog), cfg.segment_len,
        cfg.n_negatives, mcfg.text_dim,
        neg_probs=negative_probs(device.catalog) if mcfg.neg_sampling == "pop" else None,
        seed=seed)


def min_contributions_guard(msg: Message, ctx: Context, call_next) -> Message:
    """Refuse the UNMASK stage of a distributed-DP train round, or of the popularity count (in
    every mode), that sums fewer devices than this device's share was sized for.

    Flower sends each node the active nodes among its SecAgg+ neighbours, a lower bound on
    the active devices of the round: fewer than m of them means the device cannot know that
    m noise shares are in the sum. m is the one recorded when the device's share left
    (client/popularity_count.record_share): the round's m capped at its policy's
    `max_assumed_honest`; a device with no record of a share for this stage and round
    refuses. A train cohort is one neighbourhood (server/ddp_aggregate.py checks
    clients_per_round <= MAX_SHARES), and so is a count cohort (at most MAX_COHORT), so the
    count is exact and an honest round is not refused."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    if configs is None or configs.get(Key.STAGE) != Stage.UNMASK:
        return call_next(msg, ctx)
    rec = msg.content.config_records.get("config")
    stage = rec.get(STAGE_KEY) if isinstance(rec, ConfigRecord) else None
    if stage not in (DDP_STAGE, POPULARITY_STAGE):
        return call_next(msg, ctx)
    active = configs.get(Key.ACTIVE_NODE_ID_LIST)
    share = recorded_share(ctx)
    rnd = int(rec.get("server-round", 0))  # as the handlers read it
    if share is None or share[:2] != (stage, rnd):
        return _refuse(msg, ctx, SecAggRefused(
            f"distributed DP: no noise share of {stage} round {rnd} was sent by this device; "
            "nothing to unmask. Refused; secrets erased."))
    m = share[2]
    if not isinstance(active, list) or len(active) < m:
        n = len(active) if isinstance(active, list) else 0
        return _refuse(msg, ctx, SecAggRefused(
            f"distributed DP: the server would unmask a sum of {n} devices; "
            f"the noise shares are sized for at least {m}. Refused; secrets erased."))
    return call_next(msg, ctx)
