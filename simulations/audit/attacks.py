"""The audit checks that train or attack models: the DP-SGD mechanism on the run's real model
(check 3), a one-run canary membership audit (check 4) and interaction inference from single
device updates (check 5). Verdicts as in audit_checks.py.

Every training here goes through the devices' own `train_local` (client/dp_training.py), so
the mechanism audited is the one the devices ran; a `trainer` argument exists so the tests can
substitute a deliberately broken mechanism and show that each check can fail.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fedinterest.client.dp_training import (
    SegmentTuples,
    build_local_model,
    dp_steps,
    sample_rate,
    train_local,
)
from fedinterest.server.server_app import initial_weights
from fedinterest.shared.fed_model import catalog_inputs, model_config, negative_probs
from fedinterest.shared.model import build_model, get_weights, set_weights
from fedinterest.shared.privacy import EventLedger
from fedinterest.shared.sequences import SegmentDataset, collate, inference_input, segment_bounds
from fedinterest.simulations.audit.checks import (
    FAIL,
    INCONCLUSIVE,
    NOT_APPLICABLE,
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
from fedinterest.simulations.audit.one_run import guess_and_bound
from scipy import stats

Trainer = Callable[..., object]  # train_local's signature
NO_BUDGET = 1e12  # audit re-runs are experiments, never refused for a device's budget


@contextlib.contextmanager
def _quiet():
    """Silence the Opacus notices that are expected here (see client/dp_training.py)."""
    with warnings.catch_warnings():
        for msg in ("Secure RNG turned off", "Full backward hook is firing", "Optimal order"):
            warnings.filterwarnings("ignore", message=msg)
        yield


# -- data ----------------------------------------------------------------------------------
def training_sequences(run: AuditRun, catalog, max_devices: int | None = None
                       ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each device's training events (its history without the held-out ones), read from its
    own store: (catalog indices, timestamps, text vectors)."""
    out = []
    for dev in run.devices[:max_devices]:
        items, ts, tv = device_history(dev, catalog)
        n = max(0, len(items) - run.config.holdout)
        if n >= 2:
            out.append((items[:n], ts[:n], tv[:n]))
    return out


def sequences_dataset(seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], segment_len: int,
                      n_items: int, n_negatives: int, text_dim: int, seed: int,
                      max_segments: int | None = None,
                      neg_probs: np.ndarray | None = None) -> SegmentDataset:
    """Disjoint segments of every sequence (each cut as a device cuts its history), pooled
    into one dataset; the first `max_segments` segments when capped. `neg_probs`: negatives
    sampled as a device samples them (shared/fed_model.negative_probs)."""
    items, ts, tv, bounds, pos = [], [], [], [], 0
    for it, t, v in seqs:
        items.append(it)
        ts.append(t)
        tv.append(v)
        bounds.append(segment_bounds(len(it), segment_len) + pos)
        pos += len(it)
    tv_all = np.concatenate(tv) if tv else np.zeros((0, text_dim), np.float32)
    has = np.abs(tv_all).sum(1) > 0
    bnd = np.concatenate(bounds) if bounds else np.zeros((0, 2), np.int64)
    return SegmentDataset(np.concatenate(items) if items else np.zeros(0, np.int64),
                          np.concatenate(ts) if ts else np.zeros(0, np.int64),
                          np.where(has, np.cumsum(has) - 1, -1), tv_all[has],
                          bnd[:max_segments], segment_len, n_items, n_negatives,
                          neg_probs=neg_probs, seed=seed)


def _neg_probs(mcfg, cat) -> np.ndarray | None:
    return negative_probs(cat) if mcfg.neg_sampling == "pop" else None


def _model_inputs(run: AuditRun):
    """Config, catalog, model config, item inputs and the weights to start from: the run's
    final global model, or this build's initial one when the run's does not fit it."""
    cfg = run.config
    cat = run.catalog()
    mcfg = model_config(cfg, cat)
    feats, topics, _ = catalog_inputs(cat)
    weights = run.final_weights() if run.build_matches_run else None
    return cfg, cat, mcfg, feats, (topics if mcfg.n_topics else None), (
        weights or initial_weights(cfg, cat))


# -- 3. the mechanism on the real model --------------------------------------------------------
class PackedBatch(torch.nn.Module):
    """Opacus' per-sample-gradient checker feeds one tensor; unpack it into the model's batch."""

    def __init__(self, model, keys, shapes, dtypes):
        super().__init__()
        self.model, self.keys, self.shapes, self.dtypes = model, keys, shapes, dtypes

    def forward(self, x):
        parts = x.split([int(np.prod(s)) for s in self.shapes], dim=1)
        batch = {k: p.reshape(len(x), *s).to(d)
                 for k, p, s, d in zip(self.keys, parts, self.shapes, self.dtypes, strict=True)}
        return self.model.example_losses(batch)[0]


def check_mechanism(run: AuditRun, trainer: Trainer = train_local, max_segments: int = 32,
                    seed: int = 0) -> CheckResult:
    """On the run's model and real device data: Opacus' per-sample gradients equal gradients
    computed one example at a time; every clipped per-sample gradient is within the clip and
    their sum is what the optimizer used; the added noise has mean 0 and std
    noise_multiplier x clip, at the configured sampling rate."""
    title = "Mechanism on the real model"
    cfg, cat, mcfg, feats, topics, weights = _model_inputs(run)
    if not cfg.event_dp:
        return CheckResult("mechanism", title, NOT_APPLICABLE,
                           f"the run used dp = '{cfg.dp}': no on-device DP-SGD to check", {})
    data = sequences_dataset(training_sequences(run, cat), cfg.segment_len, len(cat),
                             cfg.n_negatives, mcfg.text_dim, seed, max_segments,
                             _neg_probs(mcfg, cat))
    if len(data) < 2:
        return CheckResult("mechanism", title, INCONCLUSIVE,
                           "fewer than two training segments on all devices together", {})
    problems: list[str] = []
    details: dict = {"segments": len(data),
                     "weights": "the run's final global model" if run.build_matches_run
                     else "this build's initial model (the run's model does not fit it)",
                     "model": {"kind": mcfg.kind, "hidden": mcfg.hidden,
                                                       "segment_len": mcfg.segment_len,
                                                       "n_negatives": mcfg.n_negatives}}
    with _quiet():
        details["per_sample_gradients_correct"] = _per_sample_gradients_ok(
            mcfg, weights, feats, topics, data)
        if not details["per_sample_gradients_correct"]:
            problems.append("Opacus' per-sample gradients differ from example-by-example "
                            "gradients on the real model")
        nm, clip = cfg.noise_multiplier, cfg.max_grad_norm
        q = cfg.dp_sample_rate  # fixed by the config (finding 4), as is the divisor batch_size
        seen = {"steps": 0, "max_clipped_norm": 0.0, "max_raw_norm": 0.0, "sum_mismatch": 0.0,
                "expected_batch": set()}
        noise: list[torch.Tensor] = []

        def inspect(opt) -> None:
            seen["steps"] += 1
            seen["expected_batch"].add(float(opt.expected_batch_size))
            if opt.grad_samples and len(opt.grad_samples[0]):
                flat = torch.cat([g.reshape(len(g), -1) for g in opt.grad_samples], dim=1)
                norms = flat.norm(dim=1)
                factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' flat clipping
                clipped = flat * factor[:, None]
                summed = torch.cat([p.summed_grad.reshape(-1) for p in opt.params])
                seen["sum_mismatch"] = max(seen["sum_mismatch"],
                                           float((clipped.sum(0) - summed).abs().max()))
                seen["max_clipped_norm"] = max(seen["max_clipped_norm"],
                                               float(clipped.norm(dim=1).max()))
                seen["max_raw_norm"] = max(seen["max_raw_norm"], float(norms.max()))
            for p in opt.params:  # p.grad = (clipped sum + noise) / expected batch
                noise.append((p.grad * opt.expected_batch_size - p.summed_grad).reshape(-1)
                             .detach())

        res = trainer(mcfg, weights, data, feats, topics,
                      cfg.replace(local_epochs=1, device_epsilon=NO_BUDGET),
                      EventLedger(delta=cfg.delta), 1, seed=seed, step_callback=inspect)
    z = torch.cat(noise).double() if noise else torch.zeros(0, dtype=torch.float64)
    n = len(z)
    std, mean = (float(z.std()), float(z.mean())) if n > 1 else (float("nan"), float("nan"))
    want_std = nm * clip
    tol = max(0.02, 5.0 / math.sqrt(2 * max(n, 1)))  # 5 sigma of the std estimate, >= 2%
    details.update({"claimed_noise_multiplier": nm, "claimed_clip": clip,
                    "sample_rate": q, "steps": seen["steps"], "noise_coordinates": n,
                    "noise_std": std, "expected_noise_std": want_std, "noise_mean": mean,
                    "max_clipped_norm": seen["max_clipped_norm"],
                    "max_raw_norm": seen["max_raw_norm"],
                    "clipped_sum_max_abs_error": seen["sum_mismatch"],
                    "expected_batch_sizes": sorted(seen["expected_batch"]),
                    "trainer_refused": getattr(res, "refused", None)})
    if n < 1000:
        return CheckResult("mechanism", title, INCONCLUSIVE,
                           f"only {n} noise coordinates observed ({seen['steps']} steps)",
                           details)
    if seen["max_clipped_norm"] > clip * (1 + 1e-4):
        problems.append(f"a clipped per-sample gradient has norm "
                        f"{seen['max_clipped_norm']:.6g} > clip {clip}")
    if seen["sum_mismatch"] > 1e-4 * max(1.0, clip):
        problems.append(f"the optimizer's summed gradient differs from the sum of clipped "
                        f"per-sample gradients by {seen['sum_mismatch']:.3g}")
    if abs(std / want_std - 1) > tol:
        problems.append(f"noise std {std:.5g}, the configured noise multiplier {nm} x clip "
                        f"{clip} gives {want_std:.5g} (tolerance {tol:.1%})")
    if abs(mean) > 5 * want_std / math.sqrt(n):
        problems.append(f"noise mean {mean:.3g} is not 0")
    if seen["expected_batch"] != {float(cfg.batch_size)}:
        problems.append(f"expected batch sizes {sorted(seen['expected_batch'])}, the run fixes "
                        f"the divisor at batch_size {cfg.batch_size}")
    details["problems"] = problems
    if problems:
        return CheckResult("mechanism", title, FAIL, "; ".join(problems), details)
    return CheckResult("mechanism", title, PASS,
                       f"per-sample gradients are exact; clipped norms <= {clip} (max "
                       f"{seen['max_clipped_norm']:.4f}, raw max {seen['max_raw_norm']:.3g}); "
                       f"noise std {std:.4f} vs configured {want_std:.4f} over {n} "
                       f"coordinates in {seen['steps']} steps at q = {q:.3g}", details)


def _per_sample_gradients_ok(mcfg, weights, feats, topics, data: SegmentDataset,
                             batch: int = 4) -> bool:
    model = build_local_model(replace(mcfg, dropout=0.0), weights, feats, topics, None, dp=True)
    tuples = SegmentTuples(data)
    rows = [tuples[i] for i in range(min(batch, len(tuples)))]
    cols = [torch.stack([r[j] for r in rows]) for j in range(len(tuples.keys))]
    x = torch.cat([c.reshape(len(rows), -1).float() for c in cols], 1)
    packed = PackedBatch(model, tuples.keys, [c.shape[1:] for c in cols], [c.dtype for c in cols])
    from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

    return bool(check_per_sample_gradients_are_correct(x, packed))


# -- 4. one-run canary membership audit ----------------------------------------------------------
def check_canaries(run: AuditRun, trainer: Trainer = train_local, m: int = 100,
                   epochs: int = 100, batch_size: int = 32, lr: float = 0.03,
                   segment_len: int = 10, canary_len: int = 3, n_negatives: int = 32,
                   hidden: int | None = None, clip: float | None = None,
                   max_real_segments: int = 64, seed: int = 0,
                   confidence: float = 0.95) -> CheckResult:
    """Steinke, Nasr & Jagielski (2023), one training run (see one_run_audit.py).

    What is trained: one DP-SGD run on a single "device" with the run's mechanism (noise
    multiplier, clip, Poisson sampling, the devices' `train_local`), which is exactly what the
    event-level guarantee is about; the data are real training segments of the run's devices
    plus m canary segments, each included with probability 1/2. A canary is `canary_len`
    random catalog items whose events all carry the same random unit "private text" vector,
    so only memorising that canary lowers its loss. The model has the run's architecture
    (hidden width at least 32, so that it can memorise), with shorter segments and fewer
    negatives for speed (stated in the report);
    batch, epochs and learning rate are the audit's, chosen so that memorisation is visible
    (they change the claimed epsilon, which the audit recomputes, not the mechanism).
    The clip is the audit's too (default 100 x the run's): epsilon depends only on the noise
    multiplier, sampling rate and steps, and with a clip that rarely binds the noise is the
    only defence, so a missing or undersized noise shows (at the run's clip, clipping alone
    already hides these canaries, whatever the noise).
    Score: a canary's loss before minus after training. Guesses: the k highest in, the k
    lowest out, for k in (m/20, m/10, m/4), Bonferroni-corrected.
    The same run without DP is the positive control: it must find leakage, or the audit says
    nothing (inconclusive). With DP, a lower bound above the claimed epsilon is a bug (fail).
    """
    title = "Canary membership audit (one training run)"
    cfg, cat, mcfg0, feats, topics, _ = _model_inputs(run)
    if not cfg.event_dp:
        return CheckResult("canary", title, NOT_APPLICABLE,
                           f"the run used dp = '{cfg.dp}': no event-level claim to audit", {})
    t0 = time.time()
    mcfg = replace(mcfg0, segment_len=segment_len, context_len=segment_len,
                   n_negatives=n_negatives, hidden=hidden or max(mcfg0.hidden, 32))
    rng = np.random.default_rng(seed)
    dim = mcfg.text_dim
    real = training_sequences(run, cat)
    included = rng.random(m) < 0.5
    canaries = []
    for _ in range(m):
        v = rng.normal(size=dim)
        v = (v / np.linalg.norm(v)).astype(np.float32)
        canaries.append((rng.integers(0, len(cat), canary_len),
                         np.sort(rng.integers(0, 10 ** 8, canary_len)),
                         np.repeat(v[None], canary_len, 0)))
    neg = _neg_probs(mcfg, cat)
    real_data = sequences_dataset(real, segment_len, len(cat), n_negatives, dim, seed,
                                  max_real_segments, neg)
    real_seqs = [(real_data.items[s:e], real_data.timestamps[s:e], _text_rows(real_data, s, e))
                 for s, e in real_data.bounds]
    train = sequences_dataset(real_seqs + [c for c, inc in zip(canaries, included,
                                                                 strict=True) if inc],
                              segment_len, len(cat), n_negatives, dim, seed, neg_probs=neg)
    probe = sequences_dataset(canaries, segment_len, len(cat), n_negatives, dim, seed + 1,
                              neg_probs=neg)
    probe_batch = collate([probe[i] for i in range(len(probe))])  # fixed negatives
    torch.manual_seed(seed)
    w0 = get_weights(build_model(mcfg))
    loss0 = _losses(mcfg, w0, feats, topics, probe_batch)
    # this audit's own DP-SGD schedule: `epochs` passes at q = B / n (a device's round fixes
    # q and steps in the run config instead; here n is the audit's, not a device's, to know)
    base = cfg.replace(local_epochs=epochs, batch_size=batch_size, lr=lr,
                       max_grad_norm=clip or 100 * cfg.max_grad_norm, device_epsilon=NO_BUDGET,
                       dp_sample_rate=sample_rate(len(train), batch_size),
                       dp_steps=dp_steps(epochs, len(train), batch_size))
    runs: dict = {}
    scores: dict = {"included": included.tolist()}
    with _quiet():
        for name, c, ledger in (("dp", base.replace(dp="event"), EventLedger(delta=cfg.delta)),
                                ("control", base.replace(dp="off"), None)):
            res = trainer(mcfg, w0, train, feats, topics, c, ledger, 1, seed=seed)
            score = loss0 - _losses(mcfg, res.weights, feats, topics, probe_batch)
            scores[name] = score.tolist()
            runs[name] = _bounds(score, included, cfg.delta, confidence)
            runs[name]["steps"] = int(res.steps)
            if ledger is not None:
                rec = recompute_epsilon(ledger.history, cfg.delta)
                runs[name]["claimed_epsilon"] = rec["epsilon"]
                runs[name]["claimed_epsilon_dp_accounting"] = rec["dp_accounting"]
                runs[name]["ledger"] = [list(h) for h in ledger.history]
    dp, control = runs["dp"], runs["control"]
    details = {"canaries": m, "included": int(included.sum()), "real_segments": len(real_data),
               "training_segments": len(train), "epochs": epochs, "batch_size": batch_size,
               "sample_rate": sample_rate(len(train), batch_size), "lr": lr,
               "noise_multiplier": cfg.noise_multiplier, "clip": base.max_grad_norm,
               "model": {"kind": mcfg.kind, "hidden": mcfg.hidden, "text_dim": dim,
                         "segment_len": segment_len, "canary_len": canary_len,
                         "n_negatives": n_negatives},
               "dp": dp, "control": control, "scores": scores, "seconds": time.time() - t0,
               "paper": "Steinke, Nasr, Jagielski: Privacy Auditing with One (1) Training "
                        "Run, NeurIPS 2023, arXiv:2305.08846"}
    claimed = dp["claimed_epsilon"]
    if dp["epsilon_lower_bound"] > claimed + 1e-9:
        return CheckResult("canary", title, FAIL,
                           f"with DP the audit proves epsilon >= {dp['epsilon_lower_bound']:.3f}"
                           f" at {confidence:.0%} confidence, above the claimed {claimed:.3f}: "
                           "the mechanism leaks more than its accounting says", details)
    if control["epsilon_lower_bound"] < 0.5:
        return CheckResult("canary", title, INCONCLUSIVE,
                           f"the positive control without DP reached only epsilon >= "
                           f"{control['epsilon_lower_bound']:.3f} (AUC {control['auc']:.3f}): "
                           "the attack is too weak here to say anything about the DP run",
                           details)
    return CheckResult("canary", title, PASS,
                       f"without DP the canaries leak (epsilon >= "
                       f"{control['epsilon_lower_bound']:.2f}, AUC {control['auc']:.2f}); "
                       f"with DP the lower bound is {dp['epsilon_lower_bound']:.2f} (AUC "
                       f"{dp['auc']:.2f}) <= the claimed {claimed:.2f} for this audit run "
                       f"({m} canaries, {confidence:.0%} confidence)", details)


def _text_rows(data: SegmentDataset, s: int, e: int) -> np.ndarray:
    out = np.zeros((e - s, data.text_table.shape[1]), np.float32)
    idx = data.text_idx[s:e]
    out[idx >= 0] = data.text_table[idx[idx >= 0]]
    return out


def _losses(mcfg, weights, feats, topics, batch) -> np.ndarray:
    model = build_local_model(mcfg, weights, feats, topics, None, dp=False).eval()
    with torch.no_grad():
        return model.example_losses(batch)[0].numpy().astype(np.float64)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n1 n0)), ties counted half."""
    positive = np.asarray(positive, bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return float("nan")
    r = stats.rankdata(scores)
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _bounds(score: np.ndarray, included: np.ndarray, delta: float, confidence: float) -> dict:
    m = len(score)
    ks = sorted({max(1, m // 20), max(1, m // 10), max(1, m // 4)})
    per_test = 1 - (1 - confidence) / len(ks)  # Bonferroni over the guess counts tried
    tries = [guess_and_bound(score, included, k, k, delta, per_test) for k in ks]
    best = max(tries, key=lambda t: t["epsilon_lower_bound"])
    return {"epsilon_lower_bound": best["epsilon_lower_bound"], "auc": auc(score, included),
            "guesses": [{k: t[k] for k in ("k_pos", "k_neg", "guesses", "correct",
                                           "epsilon_lower_bound")} for t in tries],
            "confidence_per_guess_count": per_test}


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
        q = F.normalize(g.query(g.user_state(batch)), dim=-1)
        before = g.scale(q @ g.item_embeddings().T)
        after = g.scale(q @ loc.item_embeddings().T)
    return (after - before).mean(0).numpy().astype(np.float64)


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The largest AUC any test can reach between two (epsilon, delta)-indistinguishable
    distributions: the area under TPR <= min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta -
    FPR)) (Kairouz et al. 2015's privacy region), integrated numerically."""
    if not math.isfinite(epsilon):
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
    if len(picks) < 2:
        return CheckResult("inference", title, INCONCLUSIVE,
                           f"the log holds updates of {len(picks)} device(s); the baseline "
                           "needs two", {})
    rows, updates = [], []
    noise_reproduced = None
    with _quiet():
        for f, dev, plain in picks:
            rc = f.config()
            cat = run.catalog(str(rc.get("catalog-version")))
            mcfg = model_config(cfg, cat)
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
            if plain and cfg.event_dp and not rows:  # is the DP noise predictable?
                again = _rerun(run, dev, cat, w_g, cfg, rnd, rc)
                noise_reproduced = again is not None and all(
                    np.array_equal(a, b) for a, b in zip(again, fits["dp"], strict=True))
            scores = {tag: interaction_scores(mcfg, feats, topics, w_g, w, seed=seed)
                      for tag, w in fits.items() if w is not None}
            updates.append(scores)
            rows.append({"device": dev.index, "round": rnd, "positives": int(positive.sum()),
                         "dp_update": "logged" if plain and cfg.event_dp else "re-run",
                         "no_dp_update": "logged" if plain and not cfg.event_dp else "re-run",
                         "epsilon": _device_epsilon(dev, rnd, cfg.delta),
                         "_positive": positive})
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
        row["auc_bound"] = dp_auc_bound(row["epsilon"], cfg.delta)
        del row["_positive"]
    adv = {tag: [r[f"advantage_{tag}"] for r in rows if f"advantage_{tag}" in r]
           for tag in ("dp", "no_dp")}
    summary = {tag: {"mean_advantage": float(np.mean(v)) if v else None,
                     "stderr": float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1
                     else None,
                     "mean_auc": float(np.mean([r[f"auc_{tag}"] for r in rows
                                                if f"auc_{tag}" in r])) if v else None}
               for tag, v in adv.items()}
    details = {"devices": rows, "summary": summary, "secagg": cfg.secagg,
               "dp_update_reproduced_from_the_seed": noise_reproduced,
               "attack": "mean change of item scores under the global model's probe users "
                         "when the global item tower is replaced by the device's"}
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
                       + ("; under SecAgg+ the server saw none of these updates" if cfg.secagg
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
        res = device.fit(w_g, cfg.replace(device_epsilon=NO_BUDGET), rnd,
                         seed=device_seed(device, run.config, rnd),
                         proximal_mu=proximal_mu(run.config, rc))
    return None if res.refused else [np.asarray(w) for w in res.weights]


def _device_epsilon(dev, rnd: int, delta: float) -> float:
    """The device's event-level epsilon after round `rnd`, recomputed from its ledger."""
    if dev.ledger is None:
        return float("inf")
    hist = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in dev.ledger.rounds
            if r["round"] <= rnd and r["steps"]]
    return recompute_epsilon(hist, delta)["epsilon"] if hist else float("inf")
