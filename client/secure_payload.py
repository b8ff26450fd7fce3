"""Device side of rounds under hardened SecAgg+: what the device masks, and the checks it runs
itself because the server no longer can.

Flower's SecAgg+ runs in its legacy layout: the instruction arrives as "fitins.parameters" /
"fitins.config" and the inner reply must be "fitres.*". Mods, outermost first:

    egress guard -> secagg_mod(...) -> update_as_delta_mod(...) -> clipping -> handler

so user-level clipping happens on the full weights (Flower's mod), then the clipped update
(local - global) is checked against the wire schema, for NaN/Inf and against the update-norm
bound, and only then masked; the egress guard scans what finally leaves.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from fedinterest.shared.errors import FedinterestError
from fedinterest.shared.secure_protocol import (
    MAX_WEIGHT_KEY,
    POPULARITY_STAGE,
    STAGE_KEY,
    TRAIN_STAGE,
)
from fedinterest.shared.wire import SchemaMismatch, WireSchema
from flwr.app import ConfigRecord, Context, Message
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import (
    fitres_to_recorddict,
    recorddict_to_fitins,
    recorddict_to_fitres,
)

from .device_identity import DeviceIdentity
from .egress import secagg_stage
from .secagg import authenticated_secaggplus_mod

LEGACY_PARAMS = "fitins.parameters"
LEGACY_CONFIG = "fitins.config"


class ClearCountRefused(FedinterestError):
    """The server asked for the popularity vector outside secure aggregation."""


def is_legacy(msg: Message) -> bool:
    return msg.has_content() and LEGACY_PARAMS in msg.content.array_records


def round_config(msg: Message) -> ConfigRecord:
    """The round config in either layout ("config", or "fitins.config" under SecAgg+)."""
    recs = msg.content.config_records
    if "config" in recs:
        return recs["config"]
    if LEGACY_CONFIG in recs:
        return recs[LEGACY_CONFIG]
    raise SchemaMismatch("the message carries no round config")


def secagg_mod(identity_of: Callable[[Message, Context], DeviceIdentity | None]):
    """A mod that sends messages of the SecAgg+ protocol through the hardened mod with
    authenticated keys (client/secagg.py); others pass by. `identity_of(msg, ctx)`: the
    device's provisioned SecAgg+ identity (client/device_identity.py), None if it has none."""
    authenticated = authenticated_secaggplus_mod(identity_of, _config_or_empty)

    def mod(msg: Message, ctx: Context, call_next) -> Message:
        if secagg_stage(msg) is not None:
            return authenticated(msg, ctx, call_next)
        return call_next(msg, ctx)

    return mod


def _config_or_empty(msg: Message) -> dict:
    try:
        return dict(round_config(msg))
    except SchemaMismatch:
        return {}


def update_as_delta_mod(schema_of: Callable[[Message, Context], WireSchema]):
    """A mod that turns a legacy train reply's full weights into the update it masks, after
    checking what the server cannot check under SecAgg+: schema, finiteness, norm bound."""

    def mod(msg: Message, ctx: Context, call_next) -> Message:
        if not is_legacy(msg) or round_config(msg).get(STAGE_KEY) != TRAIN_STAGE:
            return call_next(msg, ctx)
        sent = parameters_to_ndarrays(recorddict_to_fitins(msg.content, True).parameters)
        max_norm = float(round_config(msg).get("max-update-norm", 0.0)) or None
        reply = call_next(msg, ctx)
        if reply.has_error():
            return reply
        fitres = recorddict_to_fitres(reply.content, keep_input=True)
        local = parameters_to_ndarrays(fitres.parameters)
        if len(local) != len(sent):
            raise SchemaMismatch(f"{len(local)} arrays for a model of {len(sent)}")
        update = [np.asarray(w - g) for w, g in zip(local, sent)]
        schema = schema_of(msg, ctx)
        schema.check(list(zip(schema.names, update)), max_norm=max_norm)
        # float64 on purpose: Flower's quantiser computes (x + clipping_range) in the input's
        # dtype, and in float32 that rounding (~4e-6 at 50) dwarfs its 1e-7 step (measured:
        # a 7e-5 bias in the mean; the masked upload is int64 whatever the dtype).
        fitres.parameters = ndarrays_to_parameters([u.astype(np.float64) for u in update])
        return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    return mod


def legacy_reply(msg: Message, arrays: list[np.ndarray], metrics: dict,
                 weight: float) -> Message:
    """A train reply in Flower's legacy "fitres" layout, the weight capped at the max weight
    the server announced (it bounds what SecAgg+ can sum without overflow)."""
    cap = float(round_config(msg).get(MAX_WEIGHT_KEY, weight))
    num_examples = max(1, min(round(weight), int(cap)))
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples,
                 {k: float(v) for k, v in metrics.items()})
    return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def is_count_query(msg: Message) -> bool:
    return is_legacy(msg) and round_config(msg).get(STAGE_KEY) == POPULARITY_STAGE
