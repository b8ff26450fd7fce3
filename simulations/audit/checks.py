"""The audit's record checks: what left the devices, the epsilon accounting, secure aggregation
and the integrity of the server's ledger. (The checks that train models are in attacks.py and
inference_attack.py; the egress check is in egress_check.py.)

Each check returns a `CheckResult` with a verdict an auditor can act on:
  pass            the evidence supports the claim;
  fail            the evidence contradicts it (the reason names where);
  inconclusive    the check ran but cannot decide (e.g. its positive control found nothing);
  not applicable  the run did not use the mechanism (the reason says why).
Nothing here repeats a user's text: a raw-text hit is reported by device and message number.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import warnings
from collections import Counter, defaultdict
from statistics import median

import dp_accounting as dpa
import numpy as np
from dp_accounting import rdp
from fedinterest.server.checkpoint import GENESIS
from fedinterest.shared.distributed_dp import DDP_STAGE
from fedinterest.shared.privacy import gaussian_epsilon, user_level_epsilon
from fedinterest.shared.secure_prg import PRG_CONFIG_KEY, PRG_ID, mask_generator_is_hardened
from fedinterest.shared.secure_protocol import (
    POPULARITY_STAGE,
    STAGE_KEY,
    contribution,
)
from fedinterest.simulations.audit.egress_check import (  # noqa: F401  (re-exported)
    TextScanner,
    check_egress,
    logged_update,
    sent_schema,
    sent_weights,
)
from fedinterest.simulations.audit.evidence import AuditRun, Frame, device_history
from fedinterest.simulations.audit.verdict import (
    FAIL,
    INCONCLUSIVE,
    MAX_LISTED,
    NOT_APPLICABLE,
    PASS,
    CheckResult,
)
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.parameter import bytes_to_ndarray
from flwr.compat.common.recorddict_compat import recorddict_to_fitins
from scipy import stats

EPS_RTOL = 1e-3  # a claim may round; below its recomputation by more than this is a failure
REFERENCE_CASE = {"sample_rate": 0.04, "noise_multiplier": 1.5, "steps": 2250, "delta": 1e-5,
                  "epsilon": 7.329}  # the textbook DP-SGD example (Abadi et al. 2016 setting)


# -- an independent accountant ---------------------------------------------------------------
def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of DP-SGD steps [(noise_multiplier, sample_rate, steps), ...] with dp-accounting's
    RDP accountant over Poisson-subsampled Gaussian events: a second implementation beside
    Opacus' accountant, which the devices use."""
    return _rdp_epsilon(tuple((float(nm), float(q), int(t)) for nm, q, t in history
                              if int(t) > 0), float(delta))


@functools.lru_cache(maxsize=4096)  # devices share histories; large q is slow to compute
def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float,
                 orders: tuple | None = None) -> float:
    if not history:
        return 0.0
    acc = rdp.RdpAccountant(list(orders)) if orders else rdp.RdpAccountant()
    # at large q some fractional orders do not converge and are skipped, with a log line
    # each (the bound stays valid, only slightly looser)
    with quiet_absl():
        for nm, q, steps in history:
            event = dpa.GaussianDpEvent(nm)
            if q < 1.0:
                event = dpa.PoissonSampledDpEvent(q, event)
            acc.compose(dpa.SelfComposedDpEvent(event, steps))
        return float(acc.get_epsilon(delta))


@contextlib.contextmanager
def quiet_absl():
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


INTEGER_ORDERS = tuple(range(2, 64))


def recompute_epsilon(history: list[tuple[float, float, int]], delta: float) -> dict:
    """A device's epsilon recomputed from its ledger, with the evidence behind it.

    Two implementations of the same RDP analysis: dp-accounting (independent of the devices)
    and Opacus (what the devices run). At the integer orders both are closed-form and must
    agree to 1e-9. At fractional orders dp-accounting's series gives up for large sampling
    rates (it then skips the order, a valid but looser bound), so Opacus' fractional RDP is
    checked against a third computation, numerical integration of the subsampled-Gaussian
    Renyi divergence (Mironov et al. 2019). The epsilon used is Opacus' when both checks
    hold, else dp-accounting's."""
    key = tuple((float(nm), float(q), int(t)) for nm, q, t in history if int(t) > 0)
    return dict(_recompute(key, float(delta)))


@functools.lru_cache(maxsize=4096)
def _recompute(history: tuple, delta: float) -> tuple:
    from opacus.accountants import RDPAccountant

    if not history:
        return tuple({"epsilon": 0.0, "dp_accounting": 0.0, "opacus": 0.0,
                      "integer_orders_agree": True, "fractional_orders_verified": True}.items())
    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order")
        eps_opacus = float(acc.get_epsilon(delta))
        int_opacus = float(acc.get_epsilon(delta, alphas=list(INTEGER_ORDERS)))
    eps_dpa = _rdp_epsilon(history, delta)
    int_dpa = _rdp_epsilon(history, delta, INTEGER_ORDERS)
    agree = _close(int_opacus, int_dpa, 1e-9)
    verified = agree and all(_fractional_rdp_ok(q, nm, acc.DEFAULT_ALPHAS)
                             for nm, q, _ in set(history) if q < 1.0)
    return tuple({"epsilon": eps_opacus if verified else eps_dpa, "dp_accounting": eps_dpa,
                  "opacus": eps_opacus, "integer_orders_agree": agree,
                  "fractional_orders_verified": verified}.items())


def _fractional_rdp_ok(q: float, sigma: float, orders) -> bool:
    from opacus.accountants.analysis.rdp import compute_rdp
    from scipy import integrate

    for alpha in orders:
        if float(alpha).is_integer():
            continue
        opacus_rdp = float(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0])

        def f(z, a=alpha):  # mu0(z) * (mu(z) / mu0(z))^alpha, mu = (1 - q) mu0 + q mu1
            return math.exp(-z * z / (2 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi)) \
                * ((1 - q) + q * math.exp((2 * z - 1) / (2 * sigma * sigma))) ** a
        try:
            lo, hi = -12 * sigma - 1, alpha + 12 * sigma + 1
            val = integrate.quad(f, lo, hi, limit=500, points=[0.0, 0.5, 1.0, alpha])[0]
            true_rdp = math.log(val) / (alpha - 1)
        except (OverflowError, ValueError):
            return False
        if not _close(opacus_rdp, true_rdp, 1e-5):
            return False
    return True


def _close(a: float, b: float, rtol: float = EPS_RTOL) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-6


def epsilon_summary(values: list[float]) -> dict:
    if not values:
        return {"devices": 0, "max": 0.0, "p95": 0.0, "median": 0.0}
    # p95 without interpolation (the value of a device, never between two; and no inf - inf)
    return {"devices": len(values), "max": float(max(values)),
            "p95": float(np.percentile(values, 95, method="higher")),
            "median": float(median(values))}


# -- 2. accounting -----------------------------------------------------------------------------
def _reported(run: AuditRun) -> dict[int, list[tuple[int, dict]]]:
    """Device index -> [(round, train metrics it reported)], from the message log."""
    out: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for f in run.replies("train"):
        msg = f.message
        if msg.has_error():
            continue
        stage = f.secagg_stage
        if stage is None:
            vals = dict(msg.content.metric_records.get("metrics", {}))
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            vals = dict(msg.content.config_records.get("fitres.metrics", {}))
        else:
            continue
        cfg = f.config()
        if cfg.get(STAGE_KEY) == POPULARITY_STAGE or "dp-steps" not in vals:
            continue
        dev = run.device_of_node(f.node)
        if dev is not None:
            out[dev.index].append((int(cfg.get("server-round", 0)), vals))
    return out


def n_training_segments(run: AuditRun, dev) -> int:
    """Training examples the device had: its history minus the held-out events, cut into
    disjoint segments (shared/sequences.py), recomputed from its own store."""
    items, _, _ = device_history(dev, run.catalog())
    train_n = max(0, len(items) - run.config.holdout)
    return -(-train_n // run.config.segment_len) if train_n >= 2 else 0


def check_accounting(run: AuditRun) -> CheckResult:
    """Recompute every epsilon from the evidence: each device's ledger with a second
    accountant (dp-accounting RDP) against Opacus', each ledger entry against the run config
    and the device's own data, the log's per-round reports against the ledger, and the claims
    in results.json (per-device, user-level, popularity) against the recomputation."""
    title = "Accounting cross-check"
    problems: list[str] = []
    ref = rdp_epsilon([(REFERENCE_CASE["noise_multiplier"], REFERENCE_CASE["sample_rate"],
                        REFERENCE_CASE["steps"])], REFERENCE_CASE["delta"])
    details: dict = {"reference_case": {**REFERENCE_CASE, "recomputed": ref}}
    if abs(ref - REFERENCE_CASE["epsilon"]) > 1e-3:
        return CheckResult("accounting", title, INCONCLUSIVE,
                           f"the independent accountant gives {ref:.4f} on the reference case "
                           f"(expected {REFERENCE_CASE['epsilon']}); it cannot be trusted",
                           details)
    reported = _reported(run)
    claimed = ((run.results or {}).get("privacy", {}).get("event_level") or {}).get(
        "per_device_epsilon") or {}
    per_device = [row for dev in run.devices
                  if (row := _device_ledger(run, dev, reported, claimed, problems)) is not None]
    eps_values = [r["epsilon"] for r in per_device]
    details["event_level"] = {"summary": epsilon_summary(eps_values),
                              "devices_without_dp_steps": len(run.devices) - len(per_device),
                              "per_device": per_device}
    hist = ((run.results or {}).get("rounds") or [])
    claimed_max = hist[-1].get("device_epsilon_max") if hist else None
    if claimed_max is not None and eps_values and claimed_max < max(
            e for e in eps_values) * (1 - EPS_RTOL) - 1e-6:
        problems.append(f"results.json claims a device maximum of {claimed_max:.4f}, the "
                        f"ledgers give {max(eps_values):.4f}")
    details["user_level"] = _user_level(run, problems)
    details["popularity"] = _popularity(run, problems)
    details["problems"] = problems[:MAX_LISTED]
    if problems:
        return CheckResult("accounting", title, FAIL,
                           f"{len(problems)} discrepancies; first: {problems[0]}", details)
    unverified = sum(not r["fractional_orders_verified"] for r in per_device)
    return CheckResult("accounting", title, PASS,
                       f"{len(per_device)} device ledgers recomputed: dp-accounting and Opacus "
                       "agree exactly at integer RDP orders"
                       + (f" ({unverified} ledgers fall back to dp-accounting's looser value)"
                          if unverified else ", Opacus' fractional orders match numerical "
                          "integration")
                       + "; every entry matches the configured noise and the sampling rate "
                       "and steps of the device's own data, every round it reported in the "
                       "log is in its ledger, and no claim is below its recomputation", details)


def _device_ledger(run: AuditRun, dev, reported: dict, claimed: dict,
                   problems: list[str]) -> dict | None:
    """One device's ledger recomputed and checked against the run config, its own data, what
    it reported in the log and what results.json claims (problems appended); None without a
    ledger."""
    cfg = run.config
    led = dev.ledger
    if led is None or not led.history:
        if reported.get(dev.index) and any(v.get("dp-steps", 0) > 0
                                           for _, v in reported[dev.index]):
            problems.append(f"device {dev.index} reported DP-SGD steps but holds no ledger")
        return None
    rec = recompute_epsilon(led.history, led.delta)
    eps = rec["epsilon"]
    row = {"device": dev.index, "epsilon": eps, "epsilon_dp_accounting":
           rec["dp_accounting"], "epsilon_opacus": rec["opacus"],
           "fractional_orders_verified": rec["fractional_orders_verified"],
           "rounds": [r["round"] for r in led.rounds if r["steps"] > 0],
           "steps": sum(int(h[2]) for h in led.history)}
    if not rec["integer_orders_agree"]:
        problems.append(f"device {dev.index}: Opacus and dp-accounting disagree at the "
                        "integer RDP orders, where both are exact")
    if led.delta != cfg.delta:
        problems.append(f"device {dev.index}: ledger delta {led.delta} != run delta "
                        f"{cfg.delta}")
    n = n_training_segments(run, dev)
    # the config fixes q and the step count, whatever the device's n (finding 4)
    want_q = cfg.dp_sample_rate if n else None
    want_steps = cfg.dp_steps if n else None
    for nm, q, steps in led.history:
        if not math.isclose(nm, cfg.noise_multiplier, rel_tol=1e-12):
            problems.append(f"device {dev.index}: ledger noise multiplier {nm} but the run "
                            f"configured {cfg.noise_multiplier}")
        if want_q is None or not math.isclose(q, want_q, rel_tol=1e-12) or \
                steps != want_steps:
            problems.append(f"device {dev.index}: ledger entry (q={q:.6g}, steps={steps}) "
                            f"but the run fixes (q={want_q}, steps={want_steps}) for its {n} "
                            "training segments")
    log_steps = sum(int(v.get("dp-steps", 0)) for _, v in reported.get(dev.index, []))
    if log_steps > row["steps"]:
        problems.append(f"device {dev.index}: reported {log_steps} DP-SGD steps in the log, "
                        f"its ledger accounts only {row['steps']}")
    for rnd, vals in reported.get(dev.index, []):
        if vals.get("dp-steps", 0) > 0 and rnd not in row["rounds"]:
            problems.append(f"device {dev.index} reported DP-SGD steps in round {rnd}, "
                            "which its ledger does not record")
        prefix = [(r["noise_multiplier"], r["sample_rate"], r["steps"])
                  for r in led.rounds if r["round"] <= rnd and r["steps"]]
        want = recompute_epsilon(prefix, led.delta)["epsilon"]
        got = float(vals.get("epsilon", 0.0))
        if "epsilon" in vals and got < want * (1 - EPS_RTOL) - 1e-6:
            problems.append(f"device {dev.index}: reported epsilon {got:.4f} after round "
                            f"{rnd}, its ledger gives {want:.4f}")
    pid_claim = claimed.get(dev.pseudonym or "")
    if pid_claim is not None and float(pid_claim) < eps * (1 - EPS_RTOL) - 1e-6:
        problems.append(f"device {dev.index}: results.json claims epsilon "
                        f"{float(pid_claim):.4f}, its ledger gives {eps:.4f}")
    return row


def rounds_completed(run: AuditRun) -> int:
    metas = sorted(run.checkpoints_dir.glob("round-*.json"))
    return int(json.loads(metas[-1].read_text())["round"]) if metas else 0


def _user_level(run: AuditRun, problems: list[str]) -> dict | None:
    cfg = run.config
    if not cfg.user_dp:
        return None
    n = len(run.node_pseudonyms)
    rounds = rounds_completed(run)
    eps = user_level_epsilon(n, min(cfg.clients_per_round, n), cfg.user_noise_multiplier,
                             rounds, cfg.delta)
    claimed = ((run.results or {}).get("privacy", {}).get("user_level") or {}).get("epsilon")
    if claimed is not None and float(claimed) < eps * (1 - EPS_RTOL) - 1e-6:
        problems.append(f"results.json claims user-level epsilon {float(claimed):.4f}, "
                        f"{rounds} rounds of {min(cfg.clients_per_round, n)} of {n} devices "
                        f"at noise {cfg.user_noise_multiplier} give {eps:.4f}")
    return {"epsilon": eps, "claimed": claimed, "devices": n, "rounds": rounds,
            "per_round": min(cfg.clients_per_round, n),
            "noise_multiplier": cfg.user_noise_multiplier, "clip": cfg.user_clip}


def popularity_statement(run: AuditRun) -> dict | None:
    path = run.run_dir / "popularity-release.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("statement")


def _popularity(run: AuditRun, problems: list[str]) -> dict | None:
    st = popularity_statement(run)
    if st is None:
        return None
    cfg = run.config
    device_noised = "noise_added_by" in st  # else an older run's: the server added the noise
    if device_noised:  # the devices' distributed Skellam, add/remove one device
        from fedinterest.shared.distributed_dp_accounting import count_epsilon
        from fedinterest.shared.distributed_dp_count import count_params

        eps = count_epsilon(count_params(cfg, replace=False), cfg.delta)
    else:
        eps = gaussian_epsilon(cfg.popularity_noise, cfg.delta)
    if not math.isclose(float(st.get("noise_multiplier", -1)), cfg.popularity_noise):
        problems.append(f"popularity release states noise multiplier "
                        f"{st.get('noise_multiplier')}, the run configured {cfg.popularity_noise}")
    if not math.isclose(float(st.get("l2_sensitivity", -1)),
                        math.sqrt(cfg.popularity_max_items)):
        problems.append(f"popularity release states sensitivity {st.get('l2_sensitivity')}, "
                        f"a {cfg.popularity_max_items}-item bound gives "
                        f"{math.sqrt(cfg.popularity_max_items):.4f}")
    if float(st.get("epsilon", 0.0)) < eps * (1 - EPS_RTOL) - 1e-6:
        problems.append(f"popularity release claims epsilon {st.get('epsilon')}, recomputed "
                        f"{eps:.4f}")
    return {"epsilon": eps, "claimed": st.get("epsilon"),
            "noise_multiplier": cfg.popularity_noise, "max_items": cfg.popularity_max_items,
            "devices_summed": st.get("devices_summed"),
            "noise_added_by": "the devices (distributed Skellam)" if device_noised else
            "the server, after unmasking the exact sum (a run from before the devices noised "
            "the count): not a guarantee against the server"}


# -- 6. secure aggregation ---------------------------------------------------------------------
def check_secagg(run: AuditRun, max_model_uploads: int = 3, alpha: float = 0.01) -> CheckResult:
    """What the server saw under SecAgg+ is uncorrelated with what each device contributed.

    Per masked upload in the log, the device's true contribution is recomputed from its own
    store (the popularity vector exactly as the device drew it; a model update by re-running
    the device's round on a copy of its store) and correlated with the masked vector. Masks
    uniform modulo 2^k make the correlation ~N(0, 1/d); an upload sent unmasked correlates
    ~1. Also: this build's mask generator is the hardened one, and every SETUP announced and
    echoed it."""
    title = "Secure aggregation"
    uploads = [f for f in run.replies("train")
               if f.secagg_stage == Stage.COLLECT_MASKED_VECTORS and not f.message.has_error()]
    if not uploads:
        why = ("the run config has secagg = false and popularity = false: no SecAgg+ round ran"
               if not run.config.secagg and not run.config.popularity else
               "the log holds no masked upload")
        return CheckResult("secagg", title, NOT_APPLICABLE, why,
                           {"secagg": run.config.secagg, "popularity": run.config.popularity})
    from fedinterest.client import secagg as _client_secagg  # noqa: F401 - installs ours
    from fedinterest.server import secagg as _server_secagg  # noqa: F401 - installs ours

    problems: list[str] = []
    hardened = mask_generator_is_hardened()
    if not hardened:
        problems.append("mask_generator_is_hardened() is False: Flower's MT19937 generator "
                        "is still bound somewhere in this build")
    setups = [f for f in run.frames if f.secagg_stage == Stage.SETUP]
    for f in setups:
        rec = {} if f.message.has_error() else dict(
            f.message.content.config_records.get(RECORD_KEY_CONFIGS, {}))
        if not f.message.has_error() and rec.get(PRG_CONFIG_KEY) != PRG_ID:
            problems.append(f"message {f.index}: SETUP {'reply' if f.received else 'request'} "
                            f"does not name the hardened generator")
    rows = _correlations(run, uploads, max_model_uploads)
    if not rows:
        problems_or = "; ".join(problems) or "no device's contribution could be recomputed"
        return CheckResult("secagg", title, FAIL if problems else INCONCLUSIVE, problems_or,
                           {"uploads": len(uploads), "hardened": hardened})
    z = stats.norm.isf(alpha / (2 * len(rows)))  # Bonferroni over every upload tested
    for row in rows:
        row["threshold"] = float(z / math.sqrt(row["dimension"]))
        if abs(row["correlation"]) > row["threshold"]:
            problems.append(f"message {row['message']} (device {row['device']}, "
                            f"{row['what']}): masked vector correlates {row['correlation']:.3f}"
                            f" with the true contribution (threshold {row['threshold']:.3f})")
    details = {"hardened_generator": hardened, "generator": PRG_ID,
               "setup_messages": len(setups), "uploads_in_log": len(uploads),
               "uploads_tested": len(rows), "max_abs_correlation": max(abs(r["correlation"])
                                                                       for r in rows),
               "alpha": alpha, "rows": rows[:MAX_LISTED], "problems": problems[:MAX_LISTED],
               "model_rounds_under_secagg": run.config.secagg,
               "model_uploads_recomputed": run.build_matches_run or "no: this build's model "
                                           "differs from the run's (schema digest)"}
    if problems:
        return CheckResult("secagg", title, FAIL, f"{len(problems)} problems; first: "
                           f"{problems[0]}", details)
    return CheckResult("secagg", title, PASS,
                       f"{len(rows)} masked uploads are uncorrelated with the recomputed true "
                       f"contributions (max |r| {details['max_abs_correlation']:.3f}, each below "
                       f"its Bonferroni threshold at alpha {alpha}); the hardened mask "
                       "generator is in force and every SETUP announced and echoed it", details)


def _correlations(run: AuditRun, uploads: list[Frame], max_model_uploads: int) -> list[dict]:
    """Per masked upload whose true contribution can be recomputed (every popularity vector,
    at most `max_model_uploads` model updates), its correlation with the masked vector."""
    rows = []
    model_done = 0
    for f in uploads:
        dev = run.device_of_node(f.node)
        if dev is None:
            continue
        req = f.config()
        popularity = req.get(STAGE_KEY) == POPULARITY_STAGE
        if not popularity and (model_done >= max_model_uploads or not run.build_matches_run):
            continue
        if req.get(STAGE_KEY) == DDP_STAGE:  # a noisy integer gradient: not re-runnable here
            continue
        truth = (_true_count(run, dev, req) if popularity else _true_update(run, dev, f))
        if truth is None or np.std(truth) == 0:
            continue
        model_done += not popularity
        blobs = f.message.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        masked = np.concatenate([bytes_to_ndarray(b).astype(np.float64).ravel()
                                 for b in blobs[1:]])
        r = float(np.corrcoef(masked, truth)[0, 1]) if np.std(masked) else 1.0
        rows.append({"message": f.index, "device": dev.index, "what": "popularity vector"
                     if popularity else f"model update, round {req.get('server-round')}",
                     "dimension": len(truth), "correlation": r})
    return rows


def _true_count(run: AuditRun, dev, req: dict) -> np.ndarray:
    """The popularity vector exactly as the device drew it (client/client_app.py: _count),
    before the device scaled it and added its noise share (client/popularity_count.py)."""
    cfg = run.config
    cat = run.catalog(str(req.get("catalog-version")))
    items, _, _ = device_history(dev, cat)
    items = items[: max(0, len(items) - cfg.holdout)]
    rng = np.random.default_rng([cfg.seed, dev.index])
    vec = contribution(items, len(cat), cfg.popularity_max_items, rng).astype(np.float64)
    return vec


def _true_update(run: AuditRun, dev, f: Frame) -> np.ndarray | None:
    """The device's model update of that round, re-run on a copy of its store with the same
    weights, catalog, config and seed the ClientApp used."""
    import tempfile
    from pathlib import Path

    from fedinterest.simulations.audit.evidence import device_seed, open_device_copy, proximal_mu

    req_msg = f.request.message if f.request else None
    if req_msg is None or "fitins.parameters" not in req_msg.content.array_records:
        return None
    sent = parameters_to_ndarrays(recorddict_to_fitins(req_msg.content, True).parameters)
    raw = f.config()
    cfg = run.config.replace(device_epsilon=1e12)  # a re-run must not be refused for budget
    rnd = int(raw.get("server-round", 0))
    catalog = run.catalog(str(raw.get("catalog-version")))
    with tempfile.TemporaryDirectory(prefix="fedinterest-audit-") as tmp, \
            open_device_copy(dev, catalog, Path(tmp)) as device:
        seed = device_seed(device, run.config, rnd)
        res = None if seed is None else device.rerun(sent, cfg, rnd, seed,
                                                     proximal_mu(run.config, raw))
    if res is None or res.refused:
        return None
    return np.concatenate([(np.asarray(w, np.float64) - g).ravel()
                           for w, g in zip(res.weights, sent, strict=True)])


# -- 7. ledger integrity -------------------------------------------------------------------------
def check_ledger(run: AuditRun) -> CheckResult:
    """The server's per-round records verify as a hash chain (server/checkpoint.py), each
    round's history extends the previous one, the last agrees with results.json, and the
    number of devices each round says it sampled matches the instructions in the log."""
    title = "Ledger integrity"
    metas = sorted(run.checkpoints_dir.glob("round-*.json"))
    if not metas:
        return CheckResult("ledger", title, INCONCLUSIVE,
                           f"{run.checkpoints_dir}: no checkpoint records to verify", {})
    problems: list[str] = []
    prev_bytes: bytes | None = None
    prev_history: list | None = None
    rows = []
    for i, path in enumerate(metas, start=1):
        data = path.read_bytes()
        try:
            meta = json.loads(data)
        except ValueError:
            problems.append(f"{path.name}: not JSON")
            break
        chain = meta.get("chain") or {}
        want_prev = GENESIS if i == 1 else hashlib.sha256(prev_bytes).hexdigest()
        if meta.get("round") != i or path.name != f"round-{i:04d}.json":
            problems.append(f"{path.name}: expected round {i} (records must be contiguous)")
        if not chain:
            problems.append(f"{path.name}: carries no hash chain")
        elif chain.get("prev_sha256") != want_prev:
            problems.append(f"{path.name}: prev_sha256 does not match "
                            f"{'the genesis value' if i == 1 else metas[i - 2].name}")
        npz = path.with_suffix(".npz")
        if chain and (not npz.is_file() or hashlib.sha256(npz.read_bytes()).hexdigest()
                      != chain.get("weights_sha256")):
            problems.append(f"{npz.name}: weights do not match the record's weights_sha256")
        history = meta.get("history", [])
        if prev_history is not None and history[:len(prev_history)] != prev_history:
            problems.append(f"{path.name}: history does not extend round {i - 1}'s")
        rows.append({"record": path.name, "sha256": hashlib.sha256(data).hexdigest()})
        prev_bytes, prev_history = data, history
    final_history = prev_history or []
    results_rounds = (run.results or {}).get("rounds")
    if results_rounds is not None and json.loads(json.dumps(results_rounds, default=float)) != \
            json.loads(json.dumps(final_history, default=float)):
        problems.append("results.json's rounds differ from the last checkpoint's history")
    claimed_cfg = (run.results or {}).get("config")
    if claimed_cfg is not None:  # keys both know (either side may be from another build)
        logged = {k.replace("-", "_") for k in run.raw_config}
        differ = sorted(k for k, v in run.config.to_dict().items()
                        if k in logged and k in claimed_cfg and claimed_cfg[k] != v)
        if differ:
            problems.append(f"results.json's config differs from the round config the devices "
                            f"got in: {', '.join(differ)}")
    sampled = Counter()
    for f in run.frames:
        if not f.received and f.kind == "train" and f.secagg_stage in (None, Stage.SETUP):
            cfg = f.config()
            if cfg.get(STAGE_KEY) not in (POPULARITY_STAGE,) and "server-round" in cfg:
                sampled[int(cfg["server-round"])] += 1
    for rec in final_history:
        if sampled.get(int(rec["round"]), 0) != int(rec.get("sampled", -1)):
            problems.append(f"round {rec['round']}: the ledger says {rec.get('sampled')} "
                            f"devices were sampled, the log holds "
                            f"{sampled.get(int(rec['round']), 0)} train instructions")
    details = {"records": rows, "head_sha256": rows[-1]["sha256"] if rows else None,
               "problems": problems[:MAX_LISTED],
               "note": "the head hash anchors the chain: publish it to make the last record "
                       "tamper-evident too"}
    if problems:
        return CheckResult("ledger", title, FAIL, f"{len(problems)} problems; first: "
                           f"{problems[0]}", details)
    return CheckResult("ledger", title, PASS,
                       f"{len(rows)} round records verify as a hash chain (genesis to head "
                       f"{rows[-1]['sha256'][:16]}...); each history extends the previous one "
                       + ("and agrees with results.json " if results_rounds is not None else "")
                       + "and with the train instructions in the log", details)
