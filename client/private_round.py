"""One federated training round as the device decides it (Device.fit): the device's policy
reviews the server's request, the ledger must be intact, a round is answered once, and the
randomness is the device's own.

Order: policy (client/policy.py) -> ledger readable and not rolled back (client/store.py,
versioned blobs) -> not answered before (run id, round, stage) -> user-level budget -> train
(DP-SGD charges the ledger's event unit; a user-level release charges its user unit) -> the
ledger, with the round marked answered, is saved before the update leaves. A declined round
returns the global weights unchanged and a `Decline` carrying its `DeclineReason`. A round
answered before is declined, unless it is the very same request again (same run, round and
global weights: a server that died mid-round and resumed), which gets the kept answer back:
the server learns nothing new, and no new noise exists to compare.

Randomness: by default each round's seed is `secrets.randbits(63)` from the OS CSPRNG, so the
server can neither predict the DP noise nor make the device repeat it by replaying a round
(with the seed a function of inputs the server chooses, two updates for the same round and
nearly the same weights differed by 0.00064: the noise cancelled). It seeds torch's and
numpy's generators (Mersenne Twister / PCG64), which are not cryptographic: their outputs are
never released on their own, only summed into clipped gradients. Opacus' `secure_mode` would
draw every noise sample from torchcsprng, which has no build for this torch (docs/BENCHMARKS.md).
Only a policy with `reproducible_seeds` (experiments) derives the seed from a device secret and
(run seed, round). Either way the seed is kept in the encrypted store, so whoever holds the
device's key (an auditor of a simulation) can re-run a round exactly (`Device.rerun`).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import secrets
from typing import TYPE_CHECKING

import numpy as np
from fedinterest.shared.config import RunConfig

from .policy import POLICY_BLOB, Decline, DeclineReason, PrivacyPolicy
from .store import DeviceStore, RollbackError, TamperedError
from .store_schema import VERSIONED_BLOBS

if TYPE_CHECKING:  # the accountants are imported where used: they take seconds to import
    from fedinterest.shared.privacy import DeviceLedger

    from .device import Device
    from .dp_training import TrainResult

LEDGER_BLOB = "privacy-ledger"
SEED_SECRET_BLOB = "seed-secret"
ROUND_SEEDS_BLOB = "round-seeds"
LAST_ANSWER_BLOB = "last-answer"  # the last round's update, for a server that asks again
TRAIN_STAGE, COUNT_STAGE = "train", "count"
assert LEDGER_BLOB in VERSIONED_BLOBS  # its rollback and deletion are detected by the store


def load_policy(store: DeviceStore) -> PrivacyPolicy:
    """The store's policy; a store without one gets the strict default, saved."""
    blob = store.get_blob(POLICY_BLOB)
    if blob is None:
        policy = PrivacyPolicy()
        store.put_blob(POLICY_BLOB, policy.to_json().encode())
        return policy
    return PrivacyPolicy.from_json(blob, where=f"{store.path}: blob '{POLICY_BLOB}'")


def load_ledger(store: DeviceStore, delta: float) -> DeviceLedger:
    """The device's ledger (an older EventLedger carried over); `delta` only for a new one.
    Raises RollbackError / TamperedError when it cannot be trusted."""
    from fedinterest.shared.privacy import DeviceLedger

    blob = store.get_blob(LEDGER_BLOB)
    return DeviceLedger.from_json(blob.decode()) if blob else DeviceLedger(delta=delta)


def save_ledger(store: DeviceStore, ledger: DeviceLedger) -> None:
    store.put_blob(LEDGER_BLOB, ledger.to_json().encode())


def round_seed(store: DeviceStore, policy: PrivacyPolicy, run_seed: int, server_round: int,
               purpose: str = TRAIN_STAGE) -> int:
    """A fresh CSPRNG seed (or, with `policy.reproducible_seeds`, HMAC(device secret,
    'run_seed:round')), recorded under (run_seed, round, purpose). Non-negative, 63 bits."""
    if policy.reproducible_seeds:
        secret = store.get_blob(SEED_SECRET_BLOB)
        if secret is None:
            secret = secrets.token_bytes(32)
            store.put_blob(SEED_SECRET_BLOB, secret)
        label = f"{run_seed}:{server_round}" + ("" if purpose == TRAIN_STAGE else f":{purpose}")
        mac = hmac.new(secret, label.encode(), hashlib.sha256)
        seed = int.from_bytes(mac.digest()[:8], "little") >> 1
    else:
        seed = secrets.randbits(63)
    seeds = used_seeds(store)
    seeds[f"{run_seed}:{server_round}:{purpose}"] = seed
    store.put_blob(ROUND_SEEDS_BLOB, json.dumps(seeds).encode())
    return seed


def used_seeds(store: DeviceStore) -> dict[str, int]:
    blob = store.get_blob(ROUND_SEEDS_BLOB)
    return json.loads(blob) if blob else {}


def _declined(weights: list[np.ndarray], reason: DeclineReason, text: str,
              epsilon: float = 0.0) -> TrainResult:
    from .dp_training import TrainResult

    return TrainResult([np.array(w, copy=True) for w in weights], 0, 0, float("nan"), epsilon,
                       Decline(reason, text))


def _user_budget(ledger: DeviceLedger, policy: PrivacyPolicy, event,
                 delta: float) -> Decline | None:
    """Declined when `event` would take the user unit past the policy's maximum (at the
    ledger's delta and at a smaller requested one). No amplification by sampling: the server
    chooses who joins."""
    from fedinterest.shared.privacy import USER

    eps = max(ledger.epsilon_after(USER, event, d) for d in {ledger.delta, min(delta,
                                                                              ledger.delta)})
    if eps > policy.max_epsilon[USER]:
        return Decline(DeclineReason.BUDGET_SPENT, f"user-level epsilon would reach {eps:.3f} "
                       f"> {policy.max_epsilon[USER]:g}")
    return None


def count_round(device: Device, cfg: RunConfig, server_round: int, run_id: int) -> Decline | None:
    """The popularity count's checks and charge (client_app._count), in every dp mode: the
    delta, a trusted ledger, once per (run, round), the user budget; charged before the count
    leaves. None when the device answers. The device adds the count's noise itself
    (client/popularity_count.py): a config below its policy's noise floor is not declined
    (it adds its share at its floor), and the charge is the distributed Skellam's RDP curve as
    this device runs it, add/remove one device (`skellam_count_event`)."""
    from fedinterest.shared.privacy import USER, skellam_count_event

    from .popularity_count import device_count_params

    policy = device.policy
    decline = policy.review_count(cfg)
    if decline is not None:
        return decline
    try:
        ledger = load_ledger(device.store, policy.delta)
    except (RollbackError, TamperedError) as e:
        return Decline(DeclineReason.LEDGER_UNTRUSTED, str(e))
    if ledger.answered_before(run_id, server_round, COUNT_STAGE):
        return Decline(DeclineReason.ROUND_REPLAYED, f"count of run {run_id} round "
                       f"{server_round} was answered before")
    event = skellam_count_event(device_count_params(device, cfg, replace=False))
    decline = _user_budget(ledger, policy, event, cfg.delta)
    if decline is not None:
        return decline
    ledger.charge(USER, event, "popularity-count", server_round)
    ledger.mark_answered(run_id, server_round, COUNT_STAGE)
    save_ledger(device.store, ledger)
    return None


def train_round(device: Device, weights: list[np.ndarray], cfg: RunConfig, server_round: int,
                run_id: int, seed: int | None, proximal_mu: float) -> TrainResult:
    """Device.fit's round (see the module docstring)."""
    from fedinterest.shared.privacy import USER, gaussian_event

    policy = device.policy
    decline = policy.review(cfg)
    if decline is not None:
        return _declined(weights, decline.reason, decline)
    try:
        ledger = load_ledger(device.store, policy.delta)
    except (RollbackError, TamperedError) as e:
        return _declined(weights, DeclineReason.LEDGER_UNTRUSTED, str(e))  # epsilon unknown
    if ledger.answered_before(run_id, server_round, TRAIN_STAGE):
        again = _last_answer(device.store, run_id, server_round, weights)
        if again is not None:  # a restarted server asks again: the same answer, nothing new
            return again
        return _declined(weights, DeclineReason.ROUND_REPLAYED, f"run {run_id} round "
                         f"{server_round} was answered before", ledger.epsilon("event"))
    user_event = gaussian_event(cfg.user_noise_multiplier / 2.0) if cfg.user_dp else None
    if user_event is not None:  # replace-one: a C-clipped update moves the sum by 2C
        decline = _user_budget(ledger, policy, user_event, cfg.delta)
        if decline is not None:
            return _declined(weights, decline.reason, decline, ledger.epsilon("event"))
    if seed is None:
        seed = round_seed(device.store, policy, cfg.seed, server_round)
    view = ledger.event_view((cfg.delta,)) if cfg.event_dp else None
    result = local_training(device, weights, cfg.replace(delta=ledger.delta), server_round,
                            seed, proximal_mu, view)
    if result.refused:
        reason = (DeclineReason.NO_DATA if result.num_examples == 0
                  else DeclineReason.BUDGET_SPENT)
        result.refused = Decline(reason, result.refused)
        return result
    if user_event is not None:
        ledger.charge(USER, user_event, "dp-fedavg update (noise added by the server)",
                      server_round)
    ledger.mark_answered(run_id, server_round, TRAIN_STAGE)
    save_ledger(device.store, ledger)
    _keep_answer(device.store, run_id, server_round, weights, result)
    return result


def _digest(weights: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for w in weights:
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def _keep_answer(store: DeviceStore, run_id: int, server_round: int,
                 weights: list[np.ndarray], result: TrainResult) -> None:
    """The last round's answer, so the same request (a server that died mid-round and
    resumed) gets the same update back: no new training, no new noise, nothing to subtract."""
    buf = io.BytesIO()
    np.savez(buf, *result.weights)
    head = {"run": int(run_id), "round": int(server_round), "request": _digest(weights),
            "num_examples": result.num_examples, "steps": result.steps,
            "loss": result.loss, "epsilon": result.epsilon}
    store.put_blob(LAST_ANSWER_BLOB, json.dumps(head).encode() + b"\n" + buf.getvalue())


def _last_answer(store: DeviceStore, run_id: int, server_round: int,
                 weights: list[np.ndarray]) -> TrainResult | None:
    """The kept answer when this is the same request (same run, round and weights)."""
    from .dp_training import TrainResult

    blob = store.get_blob(LAST_ANSWER_BLOB)
    if blob is None:
        return None
    raw, _, body = blob.partition(b"\n")
    head = json.loads(raw)
    if (head["run"], head["round"], head["request"]) != (int(run_id), int(server_round),
                                                         _digest(weights)):
        return None
    with np.load(io.BytesIO(body)) as z:
        arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    return TrainResult(arrays, head["num_examples"], head["steps"], head["loss"],
                       head["epsilon"], None)


def privacy_report(ledger: DeviceLedger, policy: PrivacyPolicy, budget: float | None) -> dict:
    """{"epsilon" (event level), "delta", "unit", "user_epsilon", "user_unit", "accountant",
    "rounds_joined", "budget", "budget_left", "reproducible_seeds", "policy"}."""
    from fedinterest.shared.privacy import DEVICE_USER_UNIT, EVENT, EVENT_UNIT, USER

    eps = ledger.epsilon(EVENT)
    return {"epsilon": eps, "delta": ledger.delta, "unit": EVENT_UNIT,
            "user_epsilon": ledger.epsilon(USER), "user_unit": DEVICE_USER_UNIT,
            "accountant": "RDP, composed over every release this device took part in",
            # rounds it trained in (a ledger from before the record of answered rounds: its
            # DP-SGD charges)
            "rounds_joined": max(sum(1 for a in ledger.answered if a[2] == TRAIN_STAGE),
                                 sum(1 for c in ledger.charges[EVENT] if c["label"] == "dp-sgd")),
            "budget": budget, "budget_left": None if budget is None else max(0.0, budget - eps),
            "reproducible_seeds": policy.reproducible_seeds,
            "policy": json.loads(policy.to_json())}


def local_training(device: Device, weights: list[np.ndarray], cfg: RunConfig, server_round: int,
                   seed: int, proximal_mu: float, ledger) -> TrainResult:
    """Train on the history but its last `cfg.holdout` events (Device.train)."""
    from fedinterest.shared.fed_model import federated_model_config, negative_probs
    from fedinterest.shared.sequences import SegmentDataset

    from .dp_training import TrainResult, train_local

    cat = device._require_catalog()
    items, ts, tv, _, _ = device._history()
    train_n = max(0, len(items) - cfg.holdout)
    mcfg = federated_model_config(cfg, cat)
    if train_n < 2:
        eps = ledger.epsilon() if ledger is not None else 0.0
        return TrainResult(weights, 0, 0, 0.0, eps, "not enough events to train on")
    data = SegmentDataset.from_events(
        items[:train_n], ts[:train_n], tv[:train_n], len(cat), cfg.segment_len,
        cfg.n_negatives, mcfg.text_dim,
        neg_probs=negative_probs(cat) if mcfg.neg_sampling == "pop" else None, seed=seed)
    return train_local(mcfg, weights, data, device._feats,
                       device._topics if mcfg.n_topics else None, cfg, ledger, server_round,
                       seed, proximal_mu=proximal_mu)
