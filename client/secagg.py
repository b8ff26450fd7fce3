"""Device side of hardened SecAgg+: Flower's `secaggplus_mod` plus the checks a device owes itself.

Use it exactly where Flower's mod goes: ``ClientApp(client_fn, mods=[hardened_secaggplus_mod])``.
Over Flower's mod it adds:

- masks from `fedinterest.shared.secure_prg` (AES-256-CTR over the whole seed), put in force
  for the whole process by `install()` at import and again on every call;
- SETUP is refused unless the server announces the same mask generator (otherwise masks would
  not cancel and the aggregate would be silent garbage) and unless the reconstruction threshold
  is a strict majority of the shares (see `_check_setup`);
- UNMASK is refused when the request lists a node as both active and dropped.

A refusal is an error reply (no shares, no masked vector) and erases the device's SecAgg+ state
for the round (keys and held shares), so a server cannot retry for what it was refused.
"""

from __future__ import annotations

from logging import ERROR
from typing import cast

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.supercore import log

from ..shared.errors import FedinterestError
from ..shared.secure_prg import PRG_CONFIG_KEY, PRG_ID, install, mask_generator_is_hardened

__all__ = ["SecAggRefused", "hardened_secaggplus_mod", "mask_generator_is_hardened"]

install()


class SecAggRefused(FedinterestError, ValueError):
    """The device declined a SecAgg+ request that would weaken its privacy."""


def hardened_secaggplus_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` with our mask generator and the device-side checks above."""
    install()  # cheap when already in force; repairs a reloaded Flower module
    if msg.metadata.message_type != MessageType.TRAIN:  # Flower's mod passes these through too
        return call_next(msg, ctxt)
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None

    try:
        if stage == Stage.SETUP:
            _check_setup(cast(ConfigRecord, configs))
        elif stage == Stage.UNMASK:
            _check_unmask(cast(ConfigRecord, configs))
    except SecAggRefused as refusal:
        return _refuse(msg, ctxt, refusal)

    reply = secaggplus_mod(msg, ctxt, call_next)
    if stage == Stage.SETUP:
        reply.content.config_records[RECORD_KEY_CONFIGS][PRG_CONFIG_KEY] = PRG_ID
    return reply


def _check_setup(configs: ConfigRecord) -> None:
    """Refuse a round whose masks would not cancel or whose threshold allows a split view.

    Every holder keeps one share of a node's self-mask seed and one of its pairwise key, and
    releases at most one of the two per round (one UNMASK per round, never both for one node,
    see `_check_unmask`). With `share_num` shares a server thus collects at most `share_num`
    shares of a node's two secrets together; needing `threshold` of each, it can rebuild both
    (and unmask that node alone by telling some holders "active" and others "dropped") only
    if 2 * threshold <= share_num. A strict majority closes that.
    """
    announced = configs.get(PRG_CONFIG_KEY)
    if announced != PRG_ID:
        raise SecAggRefused(
            f"SecAgg+ setup: the server announces mask generator {announced!r} under "
            f"'{PRG_CONFIG_KEY}', this device uses {PRG_ID!r}; masks would not cancel. "
            "Run the server with fedinterest.server.secagg.HardenedSecAggPlusWorkflow."
        )
    share_num, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
    if not isinstance(share_num, int) or not isinstance(threshold, int):
        return  # Flower's own config check names the missing/mistyped key
    if 2 * threshold <= share_num:
        raise SecAggRefused(
            f"SecAgg+ setup: reconstruction threshold {threshold} is not a strict majority "
            f"of {share_num} shares; a server could then rebuild both secrets of one device. "
            f"Use a threshold of at least {share_num // 2 + 1}."
        )


def _check_unmask(configs: ConfigRecord) -> None:
    """Refuse to release shares for a node that is claimed both active and dropped.

    For an active node the device sends its share of that node's self-mask seed; for a dropped
    one, its share of that node's pairwise-mask key. Both for one node would let the server
    strip every mask off that node's individual update.
    """
    active = configs.get(Key.ACTIVE_NODE_ID_LIST)
    dead = configs.get(Key.DEAD_NODE_ID_LIST)
    if not isinstance(active, list) or not isinstance(dead, list):
        return  # Flower's own config check names the missing/mistyped key
    overlap = sorted(set(active) & set(dead))
    if overlap:
        raise SecAggRefused(
            f"SecAgg+ unmask: node id(s) {overlap} are listed both in '{Key.ACTIVE_NODE_ID_LIST}'"
            f" and '{Key.DEAD_NODE_ID_LIST}'; releasing both kinds of shares would expose those "
            "nodes' individual updates. Refused; this round's secrets are erased."
        )


def _refuse(msg: Message, ctxt: Context, refusal: SecAggRefused) -> Message:
    """Erase this round's secrets and answer with an error reply (nothing else leaves).

    A reply rather than a raise: Flower keeps the Context a ClientApp returns, but discards
    it when the ClientApp raises (simulation), so only a reply makes the erasure stick.
    """
    _erase_round_secrets(ctxt)
    log(ERROR, "%s", refusal)
    reason = f"{type(refusal)}:<'{refusal}'>"  # Flower's own format for ClientApp errors
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _erase_round_secrets(ctxt: Context) -> None:
    """Drop Flower's SecAgg+ state: keys and held shares go, the next stage must be SETUP.

    An empty record is exactly Flower's initial state (current stage UNMASK, nothing held).
    """
    ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord({})
