"""The device's side of the popularity count, in every dp mode: the device scales its bounded
0/1 item vector and adds its own Skellam noise share before SecAgg+ masks it
(shared/distributed_dp_count.py), so the sum the server unmasks already carries the count's
noise and its epsilon holds against the server. The server adds nothing.

What the device decides, not the server: the noise of its share (its policy's
`min_noise["popularity-count"]` when the config asks for less) and the m it sizes the share for
(at most its policy's `max_assumed_honest`); it records that m in its node state so that at
UNMASK it refuses a sum of fewer devices (client/ddp_mod.py, `min_contributions_guard`).
Charging: client/private_round.py `count_round` charges the device ledger's user unit (the
Skellam's RDP curve, add/remove one device) in every mode; in a distributed-DP run
`charge_ddp_ledger` also charges the ddp ledger at the run's unit, which its budget is kept on.
"""

from __future__ import annotations

import numpy as np
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import ddp_budget, encode_payload
from fedinterest.shared.distributed_dp_count import CountParams, count_params, noisy_count
from fedinterest.shared.secure_protocol import POPULARITY_STAGE, contribution
from flwr.app import ConfigRecord, Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from . import secure_payload
from .ddp_training import os_generator
from .device import DDP_LEDGER_BLOB, Device
from .secure_payload import ClearCountRefused

# the node state's record of the noise share this device added in its current SecAgg+ round
SHARE_RECORD = "fedinterest.noise-share"


def device_count_params(device: Device, cfg: RunConfig,
                        replace: bool | None = None) -> CountParams:
    """The count's parameters as this device runs them: its policy's noise floor when that is
    above the config's, m capped at its policy's `max_assumed_honest` (the server can lower
    neither the noise nor the share's size). `replace`: the relation (count_params)."""
    policy = device.policy
    return count_params(cfg, floor=policy.min_noise["popularity-count"],
                        max_honest=policy.max_assumed_honest, replace=replace)


def record_share(ctx: Context, stage: str, server_round: int, m: int) -> None:
    """Remember that this device's share of (stage, round) is sized for m devices: the UNMASK
    guard checks the server's active list against it, not against a config the server could
    change between stages."""
    ctx.state.config_records[SHARE_RECORD] = ConfigRecord(
        {"stage": str(stage), "round": int(server_round), "m": int(m)})


def recorded_share(ctx: Context) -> tuple[str, int, int] | None:
    """(stage, round, m) of the share this device added last, or None."""
    rec = ctx.state.config_records.get(SHARE_RECORD)
    if rec is None:
        return None
    return str(rec["stage"]), int(rec["round"]), int(rec["m"])


def charge_ddp_ledger(device: Device, cfg: RunConfig, server_round: int) -> str | None:
    """In a distributed-DP run, charge the count to the ddp ledger (the run's unit: replace-one
    at ddp-event, add/remove at ddp-user), composed in RDP with the rounds, before the count
    leaves. Returns why the device declines (past its budget), or None. Outside distributed DP
    nothing happens here (the device ledger's user unit is charged by `count_round`)."""
    if not cfg.distributed_dp:
        return None
    from .ddp_mod import _checked_ledger

    ledger = _checked_ledger(device, cfg)
    count = device_count_params(device, cfg)
    eps = ledger.epsilon_after_release(count)
    if eps > ddp_budget(cfg):
        return f"the count would take the distributed-DP epsilon to {eps:.3f} > {ddp_budget(cfg):g}"
    ledger.record_release(server_round, "popularity-count", count)
    device.store.put_blob(DDP_LEDGER_BLOB, ledger.to_json().encode())
    return None


def count_integers(device: Device, cfg: RunConfig, rng: np.random.Generator) -> np.ndarray:
    """gamma x the device's bounded 0/1 vector over its training items (held-out events not
    counted) plus its Skellam share (int64, before mod Q). `rng` draws the subset of items;
    the noise comes from fresh OS entropy (client/ddp_training.os_generator)."""
    catalog = device.catalog
    index = {iid: i for i, iid in enumerate(catalog.item_ids)}
    items = [index[e.item] for e in device.store.events() if e.item in index]
    items = items[: max(0, len(items) - cfg.holdout)]
    vec = contribution(np.array(items, np.int64), len(catalog), cfg.popularity_max_items, rng)
    return noisy_count(vec, device_count_params(device, cfg), os_generator())


def count_reply(msg: Message, ctx: Context, device: Device, cfg: RunConfig,
                server_round: int, rng: np.random.Generator) -> Message:
    """The count answer: the noisy integer vector as a SecAgg+ payload (mod Q,
    `encode_payload`), never in the clear; the share's m recorded for the UNMASK guard."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        raise ClearCountRefused("the popularity count is answered only under secure "
                                "aggregation: a 0/1 vector in the clear names the user's items")
    z = count_integers(device, cfg, rng)
    record_share(ctx, POPULARITY_STAGE, server_round,
                 device_count_params(device, cfg).min_contributions)
    return secure_payload.legacy_reply(msg, encode_payload(z, [z.shape]), {}, 1.0)
