"""Audit check 5: interaction inference from single updates, with and without DP, against
the other devices' updates as a baseline (the attack the event-level guarantee bounds)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from fedinterest.shared.fed_model import catalog_inputs, federated_model_config
from fedinterest.shared.model import build_model, set_weights
from fedinterest.shared.sequences import collate, inference_input
from fedinterest.simulations.audit.attacks import NO_BUDGET, _quiet, auc
from fedinterest.simulations.audit.checks import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    CheckResult,
    logged_update,
    recompute_epsilon,
)
from fedinterest.simulations.audit.evidence import (
    AuditRun,
    device_history,
    device_seed,
    open_device_copy,
    proximal_mu,
)


# -- 5. interaction inference from single updates ---------------------------------------------
def interaction_scores(mcfg, feats, topics, w_global: list[np.ndarray],
                       w_local: list[np.ndarray], n_probes: int = 256, seed: int = 0
                       ) -> np.ndarray:
    """The attacker's guess of which catalog items a device trained on, from its update alone.

    Probe users (one-event histories of random items) are encoded by the *global* model; each
    item is scored against them once with the global item tower and once with the device's,
    and the mean score change is the item's score: training pulls the embeddings of the
    device's items towards the queries its history produced."""
    def model(w):
        mdl = build_model(mcfg)
        set_weights(mdl, w)
        mdl.attach_catalog(item_feats=feats, topic_dist=topics)
        return mdl.eval()

    rng = np.random.default_rng(seed)
    n_items = len(feats)
    probes = rng.choice(n_items, min(n_probes, n_items), replace=False)
    batch = collate([inference_input([j], [0], context_len=mcfg.context_len,
                                     text_dim=mcfg.text_dim) for j in probes])
    g, loc = model(w_global), model(w_local)
    with torch.no_grad():
        states = g.user_state(batch)
        before = g.score(states, g.item_embeddings())
        after = g.score(states, loc.item_embeddings())
    return (after - before).mean(0).numpy().astype(np.float64)


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The largest AUC any test can reach between two (epsilon, delta)-indistinguishable
    distributions: the area under TPR <= min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta -
    FPR)) (Kairouz et al. 2015's privacy region), integrated numerically."""
    if not math.isfinite(epsilon) or epsilon > 700:  # e^eps overflows; the bound is 1
        return 1.0
    fpr = np.linspace(0.0, 1.0, 20001)
    tpr = np.minimum.reduce([np.ones_like(fpr), math.exp(epsilon) * fpr + delta,
                             1 - math.exp(-epsilon) * np.maximum(0.0, 1 - delta - fpr)])
    return float(np.trapezoid(tpr, fpr))


def check_inference(run: AuditRun, max_devices: int = 5, seed: int = 0) -> CheckResult:
    """How well one device's update tells which items the user interacted with.

    For up to `max_devices` devices with an update in the log: rank every catalog item by
    `interaction_scores` and report the AUC of the device's training items, with DP (the
    update it sent) and without (its round re-run on a copy of its store with DP off, same
    weights and seed). Item scores are correlated (items alike in text move together), so
    the AUC of *another* device's update on this device's items is the baseline; the
    attacker's advantage is the difference. Under SecAgg+ the server saw no single update; the
    check then attacks re-runs of what the device masked, to show what SecAgg+ hides.

    Verdict: inconclusive when the attack has no clear advantage without DP (it could not
    show anything); fail when the mean advantage with DP exceeds what the devices' claimed
    (epsilon, delta) allow (`dp_auc_bound` - 0.5) by more than two standard errors. That bound
    treats each item as one event and items as exchangeable a priori: an indicator, not a
    theorem.
    """
    title = "Interaction inference from single updates"
    cfg = run.config
    if not run.build_matches_run:
        return CheckResult("inference", title, INCONCLUSIVE,
                           f"the run's model (schema digest {run.logged_schema_digest}) is not "
                           "this build's: audit the run with the build that made it", {})
    if cfg.distributed_dp:  # the server sees each round's noisy sum only: attack that
        from fedinterest.simulations.audit.ddp_inference import check_ddp_inference  # (cycle)

        return check_ddp_inference(run, max_devices, seed)
    picks = _pick_updates(run, max_devices)
    if len(picks) < 2:
        return CheckResult("inference", title, INCONCLUSIVE,
                           f"the log holds updates of {len(picks)} device(s); the baseline "
                           "needs two", {})
    rows, updates = [], []
    noise_reproduced = None
    with _quiet():
        for f, dev, plain in picks:
            row, scores, again_equal = _score_device(run, f, dev, plain, seed,
                                                     check_noise=not rows)
            rows.append(row)
            updates.append(scores)
            if again_equal is not None:
                noise_reproduced = again_equal
    _advantages(rows, updates, cfg.delta)
    summary = {tag: summarise(rows, tag) for tag in ("dp", "no_dp")}
    details = {"devices": rows, "summary": summary, "secagg": cfg.secagg,
               "dp_update_reproduced_from_the_seed": noise_reproduced,
               "attack": "mean change of item scores under the global model's probe users "
                         "when the global item tower is replaced by the device's"}
    return _inference_verdict(title, summary, rows, cfg.secagg, details)


def summarise(rows: list[dict], tag: str) -> dict:
    """Mean advantage of an arm over the rows that have one, its standard error and mean AUC."""
    scored = [r for r in rows if f"advantage_{tag}" in r]
    v = [r[f"advantage_{tag}"] for r in scored]
    return {"mean_advantage": float(np.mean(v)) if v else None,
            "stderr": float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None,
            "mean_auc": float(np.mean([r[f"auc_{tag}"] for r in scored])) if v else None}


def _pick_updates(run: AuditRun, max_devices: int) -> list[tuple]:
    """(reply, device, sent in the clear) for the first model update of up to `max_devices`
    devices (plain updates, or the instructions of SecAgg+ rounds to re-run)."""
    picks = []
    seen_dev = set()
    for f in run.replies("train"):
        if len(picks) >= max_devices:
            break
        if f.message.has_error() or f.request is None:
            continue
        rc = f.config()
        stage = f.secagg_stage
        plain = stage is None and "arrays" in f.message.content.array_records
        masked = stage is not None and "fitins.parameters" in f.request.message.content \
            .array_records
        dev = run.device_of_node(f.node)
        if dev is None or dev.index in seen_dev or not (plain or masked) or \
                rc.get("stage") == "popularity-count":
            continue
        seen_dev.add(dev.index)
        picks.append((f, dev, plain))
    return picks


def _score_device(run: AuditRun, f, dev, plain: bool, seed: int,
                  check_noise: bool) -> tuple[dict, dict, bool | None]:
    """One device's update with and without DP (logged or re-run) scored over every item;
    returns (its row, scores per arm, whether a re-run reproduced its DP update bit for bit,
    checked only when `check_noise` and the update was sent in the clear)."""
    cfg = run.config
    rc = f.config()
    cat = run.catalog(str(rc.get("catalog-version")))
    mcfg = federated_model_config(cfg, cat)
    feats, topics, _ = catalog_inputs(cat)
    topics = topics if mcfg.n_topics else None
    w_g = _sent_weights(f)
    rnd = int(rc.get("server-round", 0))
    items, _, _ = device_history(dev, cat)
    positive = np.zeros(len(cat), bool)
    positive[np.unique(items[: max(0, len(items) - cfg.holdout)])] = True
    fits = {}
    for tag, dp_mode in (("dp", "event"), ("no_dp", "off")):
        if plain and (dp_mode == "event") == cfg.event_dp:
            fits[tag] = logged_update(f)  # packed replies decoded
        else:
            fits[tag] = _rerun(run, dev, cat, w_g, cfg.replace(dp=dp_mode), rnd, rc)
    reproduced = None
    if plain and cfg.event_dp and check_noise:  # is the DP noise predictable?
        again = _rerun(run, dev, cat, w_g, cfg, rnd, rc)
        reproduced = again is not None and all(
            np.array_equal(a, b) for a, b in zip(again, fits["dp"], strict=True))
    scores = {tag: interaction_scores(mcfg, feats, topics, w_g, w, seed=seed)
              for tag, w in fits.items() if w is not None}
    row = {"device": dev.index, "round": rnd, "positives": int(positive.sum()),
           "dp_update": "logged" if plain and cfg.event_dp else "re-run",
           "no_dp_update": "logged" if plain and not cfg.event_dp else "re-run",
           "epsilon": _device_epsilon(dev, rnd, cfg.delta), "_positive": positive}
    return row, scores, reproduced


def _advantages(rows: list[dict], updates: list[dict], delta: float) -> None:
    """Per device and arm: the AUC of its items under its own update, the baseline under the
    other devices' updates, and the difference (the attacker's advantage)."""
    for i, row in enumerate(rows):
        for tag in ("dp", "no_dp"):
            own = updates[i].get(tag)
            others = [u[tag] for j, u in enumerate(updates) if j != i and tag in u]
            if own is None or not others:
                continue
            row[f"auc_{tag}"] = auc(own, row["_positive"])
            row[f"baseline_auc_{tag}"] = float(np.mean([auc(o, row["_positive"])
                                                        for o in others]))
            row[f"advantage_{tag}"] = row[f"auc_{tag}"] - row[f"baseline_auc_{tag}"]
        row["auc_bound"] = dp_auc_bound(row["epsilon"], delta)
        del row["_positive"]


def _inference_verdict(title: str, summary: dict, rows: list[dict], secagg: bool,
                       details: dict) -> CheckResult:
    """Fail when the DP advantage exceeds what the claimed epsilon allows; inconclusive when
    the attack shows nothing even without DP."""
    no_dp, dp = summary["no_dp"], summary["dp"]
    if no_dp["mean_advantage"] is None or dp["mean_advantage"] is None:
        return CheckResult("inference", title, INCONCLUSIVE,
                           "could not score both a DP and a non-DP update", details)
    allowed = float(np.mean([r["auc_bound"] for r in rows])) - 0.5
    margin = 2 * (dp["stderr"] or 0.0)
    details["allowed_advantage"] = allowed
    if dp["mean_advantage"] - margin > allowed:
        return CheckResult("inference", title, FAIL,
                           f"with DP the attack's advantage is {dp['mean_advantage']:.3f} AUC "
                           f"(+-{margin:.3f}), more than the {allowed:.3f} the devices' claimed "
                           "epsilon allows", details)
    if no_dp["mean_advantage"] - 2 * (no_dp["stderr"] or 0.0) <= 0.02:
        return CheckResult("inference", title, INCONCLUSIVE,
                           f"without DP the attack has no clear advantage ("
                           f"{no_dp['mean_advantage']:.3f} AUC over the other-device "
                           "baseline), so it shows nothing about the DP updates", details)
    return CheckResult("inference", title, PASS,
                       f"AUC of the user's items: {no_dp['mean_auc']:.3f} without DP "
                       f"(advantage {no_dp['mean_advantage']:+.3f} over other devices' "
                       f"updates), {dp['mean_auc']:.3f} with DP (advantage "
                       f"{dp['mean_advantage']:+.3f}, within the {allowed:.3f} the claimed "
                       f"epsilon allows); {len(rows)} devices"
                       + ("; under SecAgg+ the server saw none of these updates" if secagg
                          else ""), details)


def _sent_weights(f) -> list[np.ndarray]:
    """The global weights the server sent with the instruction this reply answers."""
    content = f.request.message.content
    if "arrays" in content.array_records:
        rec = content.array_records["arrays"]
        return [rec[n].numpy() for n in rec]
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins

    return parameters_to_ndarrays(recorddict_to_fitins(content, True).parameters)


def _rerun(run: AuditRun, dev, cat, w_g, cfg, rnd: int, rc: dict) -> list[np.ndarray] | None:
    with tempfile.TemporaryDirectory(prefix="fedinterest-audit-") as tmp, \
            open_device_copy(dev, cat, Path(tmp)) as device:
        seed = device_seed(device, run.config, rnd)
        res = None if seed is None else device.rerun(
            w_g, cfg.replace(device_epsilon=NO_BUDGET), rnd, seed, proximal_mu(run.config, rc))
    return None if res is None or res.refused else [np.asarray(w) for w in res.weights]


def _device_epsilon(dev, rnd: int, delta: float) -> float:
    """The device's event-level epsilon after round `rnd`, recomputed from its ledger."""
    if dev.ledger is None:
        return float("inf")
    hist = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in dev.ledger.rounds
            if r["round"] <= rnd and r["steps"]]
    return recompute_epsilon(hist, delta)["epsilon"] if hist else float("inf")
