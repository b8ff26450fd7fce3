"""Audit check 5 for distributed DP: interaction inference from what the server learns.

Under distributed DP the server never sees one device's update: it decodes each round's noisy
sum under SecAgg+ and steps the global model with it. So the attacked view of round r is the
global model before and after it (the weights the log shows the server sending in rounds r
and r + 1): everything the server learned from that round's release. The positive control is
the view the mechanism exists to hide: the device's own exact contribution (its clipped
gradient sum at event level, its clipped update at user level; recomputed from a copy of its
store with the noise share off) applied to the global weights alone, as a server without
SecAgg+ or noise would see it, scaled to the round's step size.

Both views are scored by `interaction_scores` (the same attack as for local DP). Baselines:
the device's items under the other devices' exact contributions (control), and under the
releases of rounds the device did not join (the DP arm; a round the device joined would carry
its own signal into its baseline). The verdict is the local-DP check's: inconclusive when the
control shows no clear advantage (e.g. a run that trains only a few prior weights, whose
change cannot encode which items a user had), fail when the DP arm's advantage exceeds what
the devices' one-round epsilon (composed with the popularity count they were charged) allows.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from fedinterest.client.ddp_training import event_contribution, user_contribution
from fedinterest.shared.distributed_dp import (
    DDP_STAGE,
    flatten,
    params_from_config,
    trained_index,
    unflatten,
)
from fedinterest.shared.distributed_dp_accounting import run_epsilon
from fedinterest.shared.fed_model import catalog_inputs, federated_model_config, negative_probs
from fedinterest.shared.model import build_model, weight_schema
from fedinterest.shared.secure_protocol import STAGE_KEY
from fedinterest.shared.sequences import SegmentDataset
from fedinterest.simulations.audit.attacks import _quiet, auc
from fedinterest.simulations.audit.checks import INCONCLUSIVE, PASS, CheckResult
from fedinterest.simulations.audit.evidence import AuditRun, device_history
from fedinterest.simulations.audit.inference_attack import (
    _inference_verdict,
    _sent_weights,
    dp_auc_bound,
    interaction_scores,
    summarise,
)

TITLE = "Interaction inference from the distributed-DP releases"
ARMS = ("dp", "no_dp")


@dataclasses.dataclass
class _Release:
    """One distributed-DP train round as the log shows it."""

    round: int
    weights: list[np.ndarray]  # the global weights the server sent for the round
    members: set[int]  # device indices whose masked payload entered the round


@dataclasses.dataclass
class _Inputs:
    """What every device's re-run shares: the catalog's model inputs and the noise-free
    distributed-DP parameters."""

    catalog: object
    mcfg: object
    feats: np.ndarray
    topics: np.ndarray | None
    params: object
    neg_probs: np.ndarray | None


def check_ddp_inference(run: AuditRun, max_devices: int = 5, seed: int = 0) -> CheckResult:
    """The attack on the rounds' releases against the devices' exact contributions (module
    doc); up to `max_devices` devices, each at the first round it joined that has a
    successor in the log."""
    cfg = run.config
    releases = _releases(run)
    rounds = sorted(releases)
    later = {r: releases[n] for r, n in itertools.pairwise(rounds)}
    picks, seen = [], set()
    for r in rounds:
        for index in sorted(releases[r].members):
            if r in later and index not in seen and len(picks) < max_devices:
                seen.add(index)
                picks.append((index, r))
    if len(picks) < 2:
        return CheckResult("inference", TITLE, INCONCLUSIVE,
                           f"{len(picks)} device(s) joined a round whose release the log shows "
                           "(a round with a later one); the baseline needs two", {})
    cat = run.catalog()
    mcfg = federated_model_config(cfg, cat)
    feats, topics, _ = catalog_inputs(cat)
    schema = weight_schema(build_model(mcfg))
    idx = trained_index(cfg, schema)
    inputs = _Inputs(cat, mcfg, feats, topics if mcfg.n_topics else None,
                     dataclasses.replace(params_from_config(cfg, schema), noise_multiplier=0.0),
                     negative_probs(cat) if mcfg.neg_sampling == "pop" else None)
    epsilon = run_epsilon(cfg, len(idx), 1)  # one round's release and the count charged
    devices = {d.index: d for d in run.devices}
    rows, views = [], []
    with _quiet():
        for index, r in picks:
            before, after = releases[r].weights, later[r].weights
            history = device_history(devices[index], cat)  # one store read per device
            own = _exact_contribution(cfg, inputs, history, before, r, seed)
            exact = _applied(before, own, idx, _step_norm(before, after, idx))
            views.append({tag: interaction_scores(mcfg, feats, inputs.topics, before, w,
                                                  seed=seed)
                          for tag, w in (("dp", after), ("no_dp", exact)) if w is not None})
            rows.append({"device": index, "round": r, "epsilon": epsilon,
                         "_positive": _positives(history[0], len(cat), cfg.holdout)})
    _advantages(rows, views, picks, releases, cfg.delta)
    summary = {tag: summarise(rows, tag) for tag in ARMS}
    details = {"devices": rows, "summary": summary, "secagg": True,
               "trained_coordinates": len(idx),
               "attack": "mean change of item scores under the global model's probe users: "
                         "dp = the global model after the device's round (what the server "
                         "learned from the noisy sum), no_dp = the device's exact clipped "
                         "contribution applied alone"}
    verdict = _inference_verdict(TITLE, summary, rows, False, details)
    if verdict.verdict == INCONCLUSIVE:
        verdict.reason += (f" (the run trains {len(idx)} coordinates, "
                           f"{cfg.ddp_train_only or 'every weight'})")
    elif verdict.verdict == PASS:
        verdict.reason += ("; the DP arm attacks the global model after each round (what the "
                           "server learned from the decoded noisy sum)")
    return verdict


def _releases(run: AuditRun) -> dict[int, _Release]:
    """Round -> its release, from the masked-vector stage of each distributed-DP round."""
    out: dict[int, _Release] = {}
    for f in run.replies("train"):
        if f.request is None or f.message.has_error() or f.secagg_stage != \
                "collect_masked_vectors" or f.config().get(STAGE_KEY) != DDP_STAGE:
            continue
        rnd = int(f.config().get("server-round", 0))
        dev = run.device_of_node(f.node)
        if rnd not in out:
            out[rnd] = _Release(rnd, [np.asarray(w) for w in _sent_weights(f)], set())
        if dev is not None:
            out[rnd].members.add(dev.index)
    return out


def _exact_contribution(cfg, inputs: _Inputs, history: tuple, weights: list[np.ndarray],
                        rnd: int, seed: int) -> np.ndarray | None:
    """What the device masked in round `rnd`, without its noise share and (event level) with
    every segment kept: the clipped sum the noise exists to hide, in the trained coordinates."""
    items, ts, tv = history
    train_n = max(0, len(items) - cfg.holdout)
    if train_n < 2:
        return None
    mcfg, params = inputs.mcfg, inputs.params
    data = SegmentDataset.from_events(
        items[:train_n], ts[:train_n], tv[:train_n], len(inputs.catalog), cfg.segment_len,
        cfg.n_negatives, mcfg.text_dim, neg_probs=inputs.neg_probs, seed=seed)
    if cfg.dp == "ddp-event":
        c = event_contribution(mcfg, weights, data, inputs.feats, inputs.topics,
                               cfg.replace(ddp_sample_rate=1.0), params)
        return -c.integers / params.scale  # a gradient: the model steps against it
    c = user_contribution(mcfg, weights, data, inputs.feats, inputs.topics, cfg, rnd, seed,
                          params)
    return c.integers / params.scale


def _step_norm(before: list[np.ndarray], after: list[np.ndarray], idx: np.ndarray) -> float:
    return float(np.linalg.norm(flatten(after)[idx] - flatten(before)[idx]))


def _applied(before: list[np.ndarray], direction: np.ndarray | None, idx: np.ndarray,
             norm: float) -> list[np.ndarray] | None:
    """`before` moved along `direction` (trained coordinates) by a step of L2 norm `norm`."""
    if direction is None or not np.any(direction):
        return None
    flat = flatten(before).astype(np.float64)
    flat[idx] += direction * (norm / float(np.linalg.norm(direction)))
    return [w.astype(b.dtype) for w, b in zip(unflatten(flat, [b.shape for b in before]), before,
                                               strict=True)]


def _positives(items: np.ndarray, n_items: int, holdout: int) -> np.ndarray:
    positive = np.zeros(n_items, bool)
    positive[np.unique(items[: max(0, len(items) - holdout)])] = True
    return positive


def _advantages(rows: list[dict], views: list[dict], picks: list[tuple[int, int]],
                releases: dict[int, _Release], delta: float) -> None:
    """Per device: AUC of its items under its own view, the baseline, and the difference;
    the DP arm's baseline only counts releases of rounds the device did not join."""
    for i, row in enumerate(rows):
        positive = row.pop("_positive")
        for tag in ARMS:
            own = views[i].get(tag)
            others = [v[tag] for j, v in enumerate(views) if j != i and v.get(tag) is not None
                      and (tag == "no_dp" or row["device"] not in releases[picks[j][1]].members)]
            if own is None or not others or not positive.any():
                continue
            row[f"auc_{tag}"] = auc(own, positive)
            row[f"baseline_auc_{tag}"] = float(np.mean([auc(o, positive) for o in others]))
            row[f"advantage_{tag}"] = row[f"auc_{tag}"] - row[f"baseline_auc_{tag}"]
        row["auc_bound"] = dp_auc_bound(row["epsilon"], delta)
