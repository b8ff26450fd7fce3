"""`fedinterest audit RUN_DIR`: evidence a privacy auditor can trust, from a run directory.

Writes <run>/audit.json and a self-contained <run>/audit.html: first a formal DP statement in
prose, generated from the devices' own ledgers (recomputed here, not as reported), the round
config the server actually sent and the popularity release; then every check with its
verdict (pass / fail / inconclusive / not applicable) and the reason; then versions and a hash
of the configuration. The checks live in checks.py and egress_check.py (record checks),
attacks.py and inference_attack.py (checks that train or attack models); see their docstrings.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from statistics import median

import dp_accounting as dpa
import numpy as np
from dp_accounting import rdp
from fedinterest.client.device import ROUND_SEEDS_BLOB, SEED_SECRET_BLOB
from fedinterest.shared.atomic_io import write_text
from fedinterest.shared.distributed_dp_count import count_params
from fedinterest.shared.privacy import (
    EVENT,
    EVENT_RELATION,
    EVENT_UNIT,
    USER_RELATION,
    USER_UNIT,
    DeviceLedger,
    dp_sgd_event,
    skellam_count_event,
)
from fedinterest.shared.provenance import versions
from fedinterest.simulations.audit import attacks as audit_attacks
from fedinterest.simulations.audit import checks as audit_checks
from fedinterest.simulations.audit import inference_attack
from fedinterest.simulations.audit.checks import (
    INCONCLUSIVE,
    NOT_APPLICABLE,
    CheckResult,
    epsilon_summary,
    popularity_statement,
    recompute_epsilon,
)
from fedinterest.simulations.audit.distributed_statement import (
    DDP_NOISE_SEEDING,
    distributed_paragraph,
    distributed_popularity_paragraph,
)
from fedinterest.simulations.audit.evidence import AuditRun

AUDIT_JSON, AUDIT_HTML = "audit.json", "audit.html"
CHECKS: dict[str, tuple[str, Callable[..., CheckResult]]] = {
    "egress": ("1", audit_checks.check_egress),
    "accounting": ("2", audit_checks.check_accounting),
    "mechanism": ("3", audit_attacks.check_mechanism),
    "canary": ("4", audit_attacks.check_canaries),
    "inference": ("5", inference_attack.check_inference),
    "secagg": ("6", audit_checks.check_secagg),
    "ledger": ("7", audit_checks.check_ledger),
}


def run_audit(run_dir: str | Path, checks: list[str] | None = None,
              canaries: list[str] | None = None, options: dict[str, dict] | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Run the checks (default: all) on a run directory; write audit.json and audit.html.

    `options` maps a check name to keyword arguments for it (e.g. {"canary": {"m": 200}}).
    Returns the audit as a dict (what audit.json holds)."""
    t0 = time.time()
    run = AuditRun(run_dir, canaries)
    names = list(CHECKS) if checks is None else list(checks)
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        from fedinterest.shared.errors import ConfigError

        raise ConfigError(f"unknown audit check(s) {', '.join(unknown)}; known: "
                          f"{', '.join(CHECKS)}")
    results: list[CheckResult] = []
    for name in names:
        if progress:
            progress(name)
        t = time.time()
        try:
            res = CHECKS[name][1](run, **(options or {}).get(name, {}))
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            res = CheckResult(name, name, INCONCLUSIVE,
                              f"the check could not run: {type(e).__name__}: {str(e)[:300]}")
        res.seconds = time.time() - t
        results.append(res)
    cfg = run.config
    config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    audit = {
        "run_dir": str(run.run_dir),
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "statement": privacy_statement(run, results),
        "checks": [{"number": CHECKS[r.key][0] if r.key in CHECKS else "", **r.__dict__}
                   for r in results],
        "verdicts": {r.key: r.verdict for r in results},
        "config": cfg.to_dict(),
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "config_source": "the round config in messages/messages.log (what the devices got)",
        "versions": versions(),
        "seconds": time.time() - t0,
    }
    write_text(run.run_dir / AUDIT_JSON, json.dumps(audit, indent=2, default=_json_default))
    write_text(run.run_dir / AUDIT_HTML, render_html(audit))
    return audit


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# -- the formal statement ------------------------------------------------------------------------
# How a device seeds its DP-SGD randomness, as Device.training_seed (client/device.py,
# client/private_round.py) does it: from the OS CSPRNG, or, only when the run provisioned its
# devices with reproducible_seeds, from a device secret; tests/simulations/audit/test_audit.py
# checks the seed the way the applicable sentence says.
NOISE_SEEDING_CSPRNG = (
    "each device draws the seed of its DP-SGD randomness (noise, Poisson sampling, negatives, "
    "dropout) for every round from the OS CSPRNG (secrets.randbits, Device.training_seed, "
    f"client/private_round.py) and keeps it only in its encrypted store (blob '{ROUND_SEEDS_BLOB}')")
NOISE_SEEDING = (
    "reproducible_seeds was set for this run, so each device seeds its DP-SGD randomness "
    "(noise, Poisson sampling, negatives, dropout) "
    "with HMAC-SHA256 keyed by a 32-byte secret drawn on the device and kept only in its "
    f"store (blob '{SEED_SECRET_BLOB}'), over 'run_seed:round' (Device.training_seed, "
    "client/device.py)")


def privacy_statement(run: AuditRun, checks: list[CheckResult] = ()) -> dict:
    """The DP statement as paragraphs of prose plus the numbers behind them (and, where a
    check found it, evidence that qualifies the statement)."""
    cfg = run.config
    paragraphs: list[tuple[str, str]] = []
    numbers: dict = {}
    ledgers = [(d, d.ledger) for d in run.devices if d.ledger is not None and d.ledger.history]
    eps = [recompute_epsilon(led.history, led.delta)["epsilon"] for _, led in ledgers]
    numbers["event_level"] = epsilon_summary(eps)
    pop = popularity_statement(run)
    paragraphs.append(_event_level_paragraph(run, ledgers, numbers["event_level"]))
    if cfg.distributed_dp:
        paragraphs.append(distributed_paragraph(run, numbers))
    if cfg.user_dp:
        paragraphs.append(_user_level_paragraph(run, numbers))
    if pop and "noise_added_by" in pop:  # the devices added the count's noise (every mode)
        heading, text = distributed_popularity_paragraph(run, pop, numbers)
        if cfg.event_dp:
            text += _count_with_dp_sgd(cfg, ledgers, numbers)
        paragraphs.append((heading, text))
    elif pop:  # a run from before the devices noised the count
        paragraphs.append(_popularity_paragraph(cfg, pop, ledgers, numbers))
    elif cfg.popularity:
        paragraphs.append(("Popularity release", ("Configured but nothing was released "
                                                  "(no popularity-release.json statement).")))
    reproduced = any(c.key == "inference" and c.details.get(
        "dp_update_reproduced_from_the_seed") for c in checks)
    numbers["not_covered"] = not_covered = _not_covered(cfg, bool(pop), reproduced)
    numbers["reproducible_seeds"] = cfg.reproducible_seeds  # the devices' seeding (see above)
    if not run.build_matches_run:
        paragraphs.append(("Audit build", (
            f"The run's model (wire-schema digest {run.logged_schema_digest} in the log) is "
            "not this build's: the statement above is computed from the run's own records, "
            "but the checks that rebuild the run's model say so where it matters; audit "
            "with the build that made the run for those.")))
    return {"paragraphs": [{"heading": h, "text": t} for h, t in paragraphs],
            "not_covered": not_covered, "numbers": numbers}


def _event_level_paragraph(run: AuditRun, ledgers: list, summary: dict) -> tuple[str, str]:
    """Event-level DP-SGD: mechanism, accountant and the epsilons recomputed from the
    ledgers (adds the observed sampling rates, steps and rounds to `summary`)."""
    cfg = run.config
    if not cfg.event_dp:
        return ("Event level (on-device DP-SGD)",
                (f"Not enabled (dp = '{cfg.dp}'): device updates carry no "
                 "event-level guarantee."))
    qs = sorted({h[1] for _, led in ledgers for h in led.history})
    steps = sorted({h[2] for _, led in ledgers for h in led.history})
    joined = sorted({sum(1 for r in led.rounds if r["steps"] > 0) for _, led in ledgers})
    summary.update(sample_rates=qs, steps_per_round=steps, rounds_joined=joined,
                   budget=cfg.device_epsilon)
    return ("Event level (on-device DP-SGD)", (
        f"Unit of privacy: {EVENT_UNIT}. Neighbouring relation: {EVENT_RELATION}. "
        f"Mechanism: DP-SGD through Opacus on each device; each round takes "
        f"{cfg.dp_steps} step(s), each Poisson-sampling the device's segments at the fixed "
        f"rate q = {cfg.dp_sample_rate:g} (neither depends on the device's history), clips "
        f"each segment's gradient to L2 norm C = {cfg.max_grad_norm:g}, adds Gaussian noise "
        f"of standard deviation sigma x C with noise multiplier sigma = "
        f"{cfg.noise_multiplier:g} and divides the noisy sum by the fixed B = "
        f"{cfg.batch_size}. Replies carry the update, whether the device declined and why; "
        f"no example count, loss, step count or epsilon. Accountant: Renyi DP of the "
        f"Poisson-subsampled Gaussian (on the device, in its ledger; recomputed "
        f"here from every device's ledger with dp-accounting and checked), converted to "
        f"(epsilon, delta) at delta = {cfg.delta:g}. Sampling assumption: each step samples "
        f"every segment independently with probability q, as the device implements it "
        f"(check 3). Observed on {summary['devices']} devices that trained: sampling rates "
        f"{_range(qs)}, {_range(steps)} steps per round, {_range(joined)} round(s) joined. "
        f"Epsilon per device, composed over every round it joined (recomputed from the "
        f"device ledgers, not as reported): max {summary['max']:.3f}, p95 "
        f"{summary['p95']:.3f}, median {summary['median']:.3f} (budget "
        f"{cfg.device_epsilon:g}); {len(run.devices) - len(ledgers)} of "
        f"{len(run.devices)} devices never took a DP-SGD step (epsilon 0)."))


def _user_level_paragraph(run: AuditRun, numbers: dict) -> tuple[str, str]:
    """User-level DP-FedAvg: per-device epsilon without amplification (server/user_accounting),
    as results.json records it, and who it holds against."""
    cfg = run.config
    stmt = ((run.results or {}).get("privacy", {}).get("user_level") or {})
    per_device = stmt.get("per_device_epsilon") or {}
    e_user = max(per_device.values()) if per_device else 0.0
    numbers["user_level"] = {"epsilon": e_user, "devices": len(per_device),
                             "rounds_joined": stmt.get("rounds_joined", {})}
    return ("User level (DP-FedAvg)", (
        f"Unit of privacy: {USER_UNIT}. Neighbouring relation: {USER_RELATION}. Each "
        f"update is clipped to L2 norm {cfg.user_clip:g} on the device and the server "
        f"adds Gaussian noise with multiplier {cfg.user_noise_multiplier:g} to the sum. "
        f"Accountant: per device, a Gaussian mechanism for every round it joined, with no "
        f"amplification by sampling (the server draws the sample), composed with the "
        f"popularity release when it was queried; delta = {cfg.delta:g}: largest per-device "
        f"epsilon {e_user:.3f} over {len(per_device)} devices. Threat model: readers of the "
        f"released models, not the server, which adds the noise after seeing the exact sum "
        f"(dp = ddp-user moves the noise onto the devices)."))


def _popularity_paragraph(cfg, pop: dict, ledgers: list, numbers: dict) -> tuple[str, str]:
    """The popularity release of a run from before the count's noise moved to the devices
    (the server added it): alone and composed with each device's DP-SGD, stated as holding
    against readers of the catalog only."""
    sens = math.sqrt(cfg.popularity_max_items)
    e_pop = float(pop.get("epsilon", float("nan")))
    combined = [_with_popularity(led.history, cfg.popularity_noise / math.sqrt(2),
                                 cfg.delta) for _, led in ledgers] or [
        _with_popularity([], cfg.popularity_noise / math.sqrt(2), cfg.delta)]
    numbers["popularity"] = {"epsilon": e_pop, "per_segment_total": epsilon_summary(combined)}
    return ("Popularity release", (
        f"Released once before round 1: each device's 0/1 vector over at most "
        f"{cfg.popularity_max_items} of its training items (L2 sensitivity "
        f"{sens:.3f}), summed under hardened SecAgg+ over "
        f"{pop.get('devices_summed')} devices, plus Gaussian noise of standard deviation "
        f"{cfg.popularity_noise:g} x {sens:.3f}, added by the server after it unmasked the "
        f"exact sum (a run from before the devices noised the count): the epsilon below "
        f"holds against readers of the catalog, not against the server. Unit: one user "
        f"(add/remove); epsilon = "
        f"{e_pop:.3f} at delta = {cfg.delta:g}. For the event-level unit, changing one "
        f"segment changes a user's vector by at most sqrt(2 x {cfg.popularity_max_items})"
        f", a Gaussian mechanism with multiplier {cfg.popularity_noise:g} / sqrt(2); "
        f"composed with each device's DP-SGD steps in one RDP accountant (dp-accounting) "
        f"the per-device total is max {max(combined):.3f}, median "
        f"{median(combined):.3f}."
        + (f" The noised counts were then scaled by "
           f"{pop['scaled_to_population']['factor']:.4g} to the federation's "
           f"{pop['scaled_to_population']['population']} devices (post-processing, no "
           "privacy cost; no amplification by the sampling of devices is claimed)."
           if pop.get("scaled_to_population") else "")))


def _not_covered(cfg, popularity: bool, reproduced: bool) -> list[str]:
    """What the statement does not protect, in plain words."""
    not_covered = [
        ("evaluation results: each device keeps its own in its store; a simulation's runner, "
         "which provisioned the stores, reads them there, so results.json's quality numbers "
         "are not covered by any epsilon (in a deployment they never leave the device)"),
        "hyperparameter tuning: any choice of configuration made by looking at results",
        "metadata sent in the clear: which devices took part in which round, message sizes "
        "and timing, refusals and their reason codes"
        + ("; under SecAgg+ also the public keys, the devices' certificates and key "
           "signatures, and share destinations" if cfg.secagg or popularity else ""),
        ("the pseudonym: a random id per device store, stable across rounds and restarts, "
         "which links all of one device's messages"),
    ]
    if cfg.event_dp:
        seeding = NOISE_SEEDING if cfg.reproducible_seeds else NOISE_SEEDING_CSPRNG
        not_covered.append(
            f"the secrecy of the noise: {seeding}. The server cannot predict or repeat the "
            "seed; every round is answered once (a record of answered rounds in the device's "
            "ledger); the guarantee assumes the store never leaves the device and that torch's "
            "generator seeded from it (a PRNG, not a CSPRNG) cannot be predicted from the "
            "noised update; Opacus secure_mode would draw every noise sample from a CSPRNG"
            + ("; check 5 read a device's secret from its store (the auditor of a simulation "
               "holds the device keys), re-ran its round from that seed and reproduced the "
               "update it sent bit for bit" if reproduced else ""))
    if cfg.distributed_dp:
        not_covered.append(DDP_NOISE_SEEDING)
    if not cfg.secagg and not cfg.distributed_dp:  # distributed DP always runs under SecAgg+
        not_covered.append("secure aggregation of model updates: secagg = false, so the "
                           "server saw every device's update in the clear (the guarantee "
                           "above is what protects it)")
    return not_covered


def _range(values: list) -> str:
    if not values:
        return "none"
    fmt = (lambda v: f"{v:.4g}") if isinstance(values[0], float) else str
    return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])} to {fmt(values[-1])}"


def _count_with_dp_sgd(cfg, ledgers: list, numbers: dict) -> str:
    """On-device DP-SGD runs: the devices' Skellam count at the event unit (replace-one: one
    segment can change the device's whole vector) composed in RDP with each device's DP-SGD
    steps (shared/privacy.py DeviceLedger, RdpCurveDpEvent)."""
    count = skellam_count_event(count_params(cfg, replace=True))
    totals = []
    for _, led in ledgers or [(None, None)]:
        device = DeviceLedger(delta=cfg.delta)
        for nm, q, steps in (led.history if led is not None else []):
            device.charge(EVENT, dp_sgd_event(nm, q, steps), "dp-sgd", 0)
        device.charge(EVENT, count, "popularity-count", 0)
        totals.append(device.epsilon(EVENT))
    numbers["popularity"]["per_segment_total"] = epsilon_summary(totals)
    return (f" For the event-level unit (replace-one for the count: one segment can change a "
            f"device's whole vector), the count composed with each device's DP-SGD steps in "
            f"RDP gives a per-device total of max {max(totals):.3f}, median "
            f"{median(totals):.3f}.")


def _with_popularity(history, pop_multiplier: float, delta: float) -> float:
    acc = rdp.RdpAccountant()
    with audit_checks.quiet_absl():
        for nm, q, steps in history:
            event = dpa.GaussianDpEvent(nm)
            if q < 1.0:
                event = dpa.PoissonSampledDpEvent(q, event)
            acc.compose(dpa.SelfComposedDpEvent(event, int(steps)))
        acc.compose(dpa.GaussianDpEvent(pop_multiplier))
        return float(acc.get_epsilon(delta))


# -- HTML: simulations/audit/page.py and templates/audit.html.j2 ---------------------------------
def render_html(audit: dict) -> str:
    from fedinterest.simulations.audit.page import render_html as render_page

    return render_page(audit, _json_default)


__all__ = ["AUDIT_HTML", "AUDIT_JSON", "CHECKS", "NOT_APPLICABLE", "privacy_statement",
           "render_html", "run_audit", "versions"]
