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
import time
import warnings
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from fedinterest.client.dp_training import (
    SegmentTuples,
    build_local_model,
    dp_steps,
    sample_rate,
    train_local,
)
from fedinterest.server.server_app import initial_weights
from fedinterest.shared.fed_model import catalog_inputs, federated_model_config, negative_probs
from fedinterest.shared.model import build_model, get_weights
from fedinterest.shared.privacy import EventLedger
from fedinterest.shared.sequences import SegmentDataset, collate, segment_bounds
from fedinterest.simulations.audit.checks import (
    FAIL,
    INCONCLUSIVE,
    NOT_APPLICABLE,
    PASS,
    CheckResult,
    recompute_epsilon,
)
from fedinterest.simulations.audit.ddp_canary import check_ddp_canaries
from fedinterest.simulations.audit.evidence import (
    AuditRun,
    device_history,
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
    mcfg = federated_model_config(cfg, cat)
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


def _step_inspector(clip: float) -> tuple[Callable, dict, list[torch.Tensor]]:
    """A step callback for train_local that records, per DP-SGD step, the clipped and raw
    per-sample gradient norms, how far the optimizer's sum is from the clipped sum, the
    expected batch and the noise added; returns (callback, that record, the noise)."""
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

    return inspect, seen, noise


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
        inspect, seen, noise = _step_inspector(clip)
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
    if run.config.distributed_dp:  # the server sees decoded sums only: audit those
        return check_ddp_canaries(run, seed=seed, confidence=confidence)
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
    canaries = _make_canaries(rng, m, len(cat), dim, canary_len)
    real_data, train, probe_batch = _canary_datasets(real, canaries, included, mcfg, cat,
                                                     max_real_segments, seed)
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
    return _canary_verdict(title, dp, control, m, confidence, details)


def _canary_datasets(real: list, canaries: list, included: np.ndarray, mcfg, cat,
                     max_real_segments: int, seed: int) -> tuple:
    """(real segments, training set = real + included canaries, one fixed batch of every
    canary to score)."""
    neg = _neg_probs(mcfg, cat)
    shape = (mcfg.segment_len, len(cat), mcfg.n_negatives, mcfg.text_dim)
    real_data = sequences_dataset(real, *shape, seed, max_real_segments, neg)
    real_seqs = [(real_data.items[s:e], real_data.timestamps[s:e], _text_rows(real_data, s, e))
                 for s, e in real_data.bounds]
    inside = [c for c, inc in zip(canaries, included, strict=True) if inc]
    train = sequences_dataset(real_seqs + inside, *shape, seed, neg_probs=neg)
    probe = sequences_dataset(canaries, *shape, seed + 1, neg_probs=neg)
    probe_batch = collate([probe[i] for i in range(len(probe))])  # fixed negatives
    return real_data, train, probe_batch


def _make_canaries(rng: np.random.Generator, m: int, n_items: int, dim: int,
                   canary_len: int) -> list[tuple]:
    """m canary sequences: `canary_len` random items whose events all carry the same random
    unit text vector, so only memorising the canary lowers its loss."""
    canaries = []
    for _ in range(m):
        v = rng.normal(size=dim)
        v = (v / np.linalg.norm(v)).astype(np.float32)
        canaries.append((rng.integers(0, n_items, canary_len),
                         np.sort(rng.integers(0, 10 ** 8, canary_len)),
                         np.repeat(v[None], canary_len, 0)))
    return canaries


def _canary_verdict(title: str, dp: dict, control: dict, m: int, confidence: float,
                    details: dict) -> CheckResult:
    """Fail when the DP run's lower bound exceeds its claim; inconclusive when the control
    without DP shows no leakage."""
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
