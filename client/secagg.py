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

`authenticated_secaggplus_mod(identity_of)` adds, for devices with a provisioned identity
(client/device_identity.py): the SETUP reply carries the device's certificate and its
signature over (node id, public keys); SHARE_KEYS is refused unless every relayed neighbour
key is signed by a distinct device certified by the provisioning authority (an active server
that substitutes keys is caught before any share or masked input leaves); and a release needs
at least `min_contributors` devices (SETUP's sample and UNMASK's active set): the device
floor MIN_CONTRIBUTORS, raised, never lowered, by the round config's
`secagg-min-contributors`.
"""

from __future__ import annotations

from collections.abc import Callable
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
from ..shared.secure_identity import (
    AUTH_PREFIX,
    CERT_KEY,
    SIG_KEY,
    IdentityError,
    sign_keys,
    verify_keys,
)
from ..shared.secure_prg import PRG_CONFIG_KEY, PRG_ID, install, mask_generator_is_hardened
from ..shared.secure_protocol import MIN_CONTRIBUTORS, MIN_CONTRIBUTORS_KEY
from .device_identity import DeviceIdentity

__all__ = ["SecAggRefused", "authenticated_secaggplus_mod", "hardened_secaggplus_mod",
           "mask_generator_is_hardened"]

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


def authenticated_secaggplus_mod(
        identity_of: Callable[[Message, Context], DeviceIdentity | None],
        round_config: Callable[[Message], dict]) -> ClientAppCallable:
    """`hardened_secaggplus_mod` with signed keys and a minimum number of contributors (see
    the module docstring). `identity_of(msg, ctxt)`: the device's identity (None: not
    provisioned, and the device refuses SecAgg+); `round_config(msg)`: the round config the
    message carries ({} if none), read for `secagg-min-contributors` only."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if stage not in (Stage.SETUP, Stage.SHARE_KEYS, Stage.UNMASK):
            return hardened_secaggplus_mod(msg, ctxt, call_next)
        try:
            identity = identity_of(msg, ctxt)
            if identity is None:
                raise SecAggRefused("SecAgg+: this device has no provisioned identity (signing "
                                    "key and certificate), so it cannot authenticate keys")
            floor = _min_contributors(round_config(msg))
            if stage == Stage.SETUP:
                _check_count(configs.get(Key.SAMPLE_NUMBER), floor, "sampled devices")
            elif stage == Stage.SHARE_KEYS:
                _verify_neighbour_keys(cast(ConfigRecord, configs), identity)
            else:
                active = configs.get(Key.ACTIVE_NODE_ID_LIST)
                _check_count(len(set(active)) if isinstance(active, list) else None, floor,
                             "contributors in this release")
        except SecAggRefused as refusal:
            return _refuse(msg, ctxt, refusal)
        reply = hardened_secaggplus_mod(msg, ctxt, call_next)
        if stage == Stage.SETUP and not reply.has_error():
            rec = reply.content.config_records[RECORD_KEY_CONFIGS]
            pk1, pk2 = rec[Key.PUBLIC_KEY_1], rec[Key.PUBLIC_KEY_2]
            rec[CERT_KEY] = identity.certificate
            rec[SIG_KEY] = sign_keys(identity.signing_key, msg.metadata.dst_node_id,
                                     cast(bytes, pk1), cast(bytes, pk2))
        return reply

    return mod


def _min_contributors(round_config: dict) -> int:
    asked = round_config.get(MIN_CONTRIBUTORS_KEY, 0)
    asked = asked if isinstance(asked, int) and not isinstance(asked, bool) else 0
    return max(MIN_CONTRIBUTORS, asked)


def _check_count(n, floor: int, what: str) -> None:
    if not isinstance(n, int) or n < floor:
        raise SecAggRefused(f"SecAgg+: {n} {what}, this device releases nothing summed over "
                            f"fewer than {floor}")


def _verify_neighbour_keys(configs: ConfigRecord, identity: DeviceIdentity) -> None:
    """Every relayed key pair must be signed, for its node id, by a distinct certified
    device. Removes the signature entries (Flower's mod expects key pairs only)."""
    auth = {k[len(AUTH_PREFIX):]: configs.pop(k) for k in list(configs)
            if k.startswith(AUTH_PREFIX)}
    seen: set[bytes] = set()
    for key, value in configs.items():
        if key == Key.STAGE:
            continue
        proof = auth.get(key)
        if not (isinstance(value, list) and len(value) == 2 and isinstance(proof, list)
                and len(proof) == 2 and all(isinstance(b, bytes) for b in [*value, *proof])):
            raise SecAggRefused(f"SecAgg+ share keys: node {key}'s keys arrive without a "
                                "certificate and signature; refused, nothing shared")
        try:
            device = verify_keys(identity.authority_public, proof[0], proof[1], int(key),
                                 value[0], value[1])
        except (IdentityError, ValueError) as e:
            raise SecAggRefused(f"SecAgg+ share keys: {e}; refused, nothing shared") from None
        if device in seen:
            raise SecAggRefused("SecAgg+ share keys: one certified device appears under two "
                                "node ids; refused, nothing shared")
        seen.add(device)


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
