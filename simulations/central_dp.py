"""Central DP-SGD reference: a trusted curator trains on every user's segments with Opacus at a
target epsilon. The same unit (one disjoint segment, add/remove one) and delta as the event-level
federated modes, so it is the upper bound any federated scheme reaches at that epsilon.

Poisson sampling at q = B / n over all training segments, `epochs / q` steps, noise multiplier
calibrated by Opacus' RDP accountant to `epsilon` at `delta` (get_noise_multiplier), per-segment
clipping to `clip`, Adam (post-processing of the noisy gradients). Validation NDCG@10 picks the
reported epoch, as every central row does; that choice reads held-out events and is outside the
epsilon (as is customary, and said in metrics.json).

The text prior alone (`train_only`, shared/text_prior.py): per-segment gradients of the
prior's own loss by torch.func, clipped and noised by Opacus' DPOptimizer. Its popularity
features read a count of the training segments released with Gaussian noise (each segment
adds 1 to each of its distinct items, so L2 sensitivity sqrt(segment_len)); that release is
composed with the DP-SGD steps in one RDP accountant, so `epsilon` covers both. The old path
(every parameter, Opacus hooks) reads exact counts in the item features: a leak outside the
epsilon, said in metrics.json ("popularity_features").
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.item_features import item_feature_matrix
from fedinterest.shared.model import n_parameters
from fedinterest.shared.sequences import SegmentDataset, collate

from .central import (
    CentralInputs,
    NeuralScorer,
    _json_default,
    build_for,
    evaluate,
    load_inputs,
    model_config,
    seed_everything,
)


@dataclass
class DPTrainConfig:
    epsilon: float = 8.0
    delta: float = 1e-5
    epochs: int = 15
    batch_size: int = 512  # expected batch (Poisson)
    lr: float = 2e-3
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 1  # validation every this many epochs
    # comma-separated parameter names (prefixes) to train privately, all under "prior.";
    # "" = every parameter (Opacus hooks). See train_prior_dp.
    train_only: str = ""
    # Gaussian noise multiplier of the popularity count release the model's popularity
    # features read (sensitivity sqrt(segment_len)); composed into `epsilon`; 0 = features
    # from exact counts (a leak outside the epsilon: only for models that ignore them)
    count_noise: float = 0.0
    # > 0: this DP-SGD noise multiplier instead of the one calibrated to `epsilon` (the
    # federation's noise at its batch and step count, for the gap analysis); the epsilon it
    # spends must still be at most `epsilon`, and metrics.json records the spent one
    noise_multiplier: float = 0.0
    # > 0: validate and keep an exponential moving average of the trained parameters (decay
    # per step, warmed up as min(ema, (1 + t) / (10 + t))) instead of the last iterate:
    # post-processing of the noisy steps, so free in epsilon (De et al. 2022)
    ema: float = 0.0


def train_dp(model, inputs: CentralInputs, tcfg: DPTrainConfig) -> dict:
    if tcfg.train_only:
        return train_prior_dp(model, inputs, tcfg)
    return _train_dp_opacus(model, inputs, tcfg)


def _train_dp_opacus(model, inputs: CentralInputs, tcfg: DPTrainConfig) -> dict:
    """DP-SGD over all training segments; leaves the best-validation weights in `model`."""
    from fedinterest.client.dp_training import SegmentTuples
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.data_loader import DPDataLoader

    cfg = model.cfg
    data = SegmentDataset.from_dataset(
        inputs.ds, inputs.split.train, cfg.segment_len, cfg.n_negatives, inputs.text_idx,
        inputs.text_table, inputs.counts + 1.0 if cfg.neg_sampling == "pop" else None,
        seed=tcfg.seed, text_dim=cfg.text_dim)
    if not len(data):
        raise ConfigError("no training events in this split")
    q = min(1.0, tcfg.batch_size / len(data))
    steps = max(1, round(tcfg.epochs / q))
    sigma = get_noise_multiplier(target_epsilon=tcfg.epsilon, target_delta=tcfg.delta,
                                 sample_rate=q, steps=steps, accountant="rdp")
    tuples = SegmentTuples(data)
    loader = DPDataLoader(tuples, sample_rate=q,
                          generator=torch.Generator().manual_seed(tcfg.seed))
    engine = PrivacyEngine(accountant="rdp")
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    module, dp_opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=tcfg.clip, poisson_sampling=False, loss_reduction="mean")
    dp_opt.expected_batch_size = q * len(data)
    per_epoch = max(1, round(1 / q))
    best, best_state, hist, t0 = -1.0, None, [], time.perf_counter()
    it = iter(loader)
    for step in range(1, steps + 1):
        try:
            sample = next(it)
        except StopIteration:
            it = iter(loader)
            sample = next(it)
        model.train()
        dp_opt.zero_grad(set_to_none=True)
        losses, _ = model.example_losses(tuples.as_batch(sample))
        losses.mean().backward()
        dp_opt.step()
        if step % (per_epoch * tcfg.eval_every) == 0 or step == steps:
            res = evaluate(NeuralScorer(model, inputs), inputs, inputs.split.valid)
            hist.append({"step": step, "valid_ndcg@10": res["ndcg@10"]})
            if res["ndcg@10"] > best:
                best, best_state = res["ndcg@10"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    del module
    return {"history": hist, "noise_multiplier": sigma, "sample_rate": q, "steps": steps,
            "epsilon": _epsilon(sigma, q, steps, tcfg.delta),
            "train_seconds": time.perf_counter() - t0, "train_examples": len(data)}


def _epsilon(sigma: float, q: float, steps: int, delta: float,
             count_noise: float = 0.0) -> float:
    """The spent epsilon, recomputed with Opacus' RDP analysis: `steps` Poisson-sampled
    Gaussian steps, composed with one unsampled Gaussian count release when count_noise > 0."""
    from opacus.accountants import RDPAccountant

    if sigma == 0:
        return math.inf
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)] + ([(count_noise, 1.0, 1)] if count_noise else [])
    return float(acc.get_epsilon(delta))


def calibrate_sigma(tcfg: DPTrainConfig, q: float, steps: int) -> float:
    """The smallest DP-SGD noise multiplier (to 1e-3) whose composition with the count
    release spends at most tcfg.epsilon; 0 for epsilon = inf (the non-private screen).
    A fixed tcfg.noise_multiplier is returned as is if it spends at most tcfg.epsilon."""
    if tcfg.noise_multiplier:
        spent = _epsilon(tcfg.noise_multiplier, q, steps, tcfg.delta, tcfg.count_noise)
        if spent > tcfg.epsilon:
            raise ConfigError(f"noise multiplier {tcfg.noise_multiplier} over {steps} steps "
                              f"at q {q:.4f} spends epsilon {spent:.2f}, more than "
                              f"{tcfg.epsilon}: raise --dp-noise-multiplier or --dp-epsilon")
        return tcfg.noise_multiplier
    if math.isinf(tcfg.epsilon):
        return 0.0
    if tcfg.count_noise and _epsilon(1e6, q, steps, tcfg.delta, tcfg.count_noise) > tcfg.epsilon:
        raise ConfigError(f"count noise {tcfg.count_noise} alone spends more than epsilon "
                          f"{tcfg.epsilon}: raise --dp-count-noise")
    lo, hi = 0.05, 100.0
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if _epsilon(mid, q, steps, tcfg.delta, tcfg.count_noise) > tcfg.epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def _segments(inputs: CentralInputs, cfg, seed: int) -> dict[str, torch.Tensor]:
    """Every user's training events cut into disjoint segments of cfg.segment_len, as
    tensors: one event is in exactly one segment (the unit)."""
    data = SegmentDataset.from_dataset(
        inputs.ds, inputs.split.train, cfg.segment_len, 0, inputs.text_idx, inputs.text_table,
        None, seed=seed, text_dim=cfg.text_dim)
    if not len(data):
        raise ConfigError("no training events in this split")
    batch = collate([data[i] for i in range(len(data))])
    return {"items": batch["items"], "mask": batch["mask"]}


def segment_counts(items: torch.Tensor, mask: torch.Tensor, n_items: int) -> np.ndarray:
    """Per item, the number of segments that hold it: each segment adds 1 to each of its
    distinct items, so one segment moves the count vector by at most sqrt(segment_len) in L2."""
    present = torch.zeros(len(items), n_items)
    present.scatter_(1, items.long(), mask)
    return (present > 0).sum(0).double().numpy()


def noised_features(inputs: CentralInputs, seg: dict[str, torch.Tensor], tcfg: DPTrainConfig
                    ) -> CentralInputs:
    """The inputs with item features over Gaussian-noised segment counts (the count release
    composed into the epsilon); unchanged when count_noise is 0."""
    if not tcfg.count_noise:
        return inputs
    seg_len = seg["items"].shape[1]
    counts = segment_counts(seg["items"], seg["mask"], len(inputs.counts))
    rng = np.random.default_rng([tcfg.seed, 7])
    noisy = counts + rng.normal(0.0, tcfg.count_noise * math.sqrt(seg_len), counts.shape)
    return replace(inputs, counts=noisy,
                   item_feats=item_feature_matrix(inputs.item_vectors, noisy))


def train_prior_dp(model, inputs: CentralInputs, tcfg: DPTrainConfig,
                   seg: dict[str, torch.Tensor] | None = None) -> dict:
    """DP-SGD on the text prior's parameters named by tcfg.train_only (the rest frozen; the
    gate stays at zero, so the neural model never scores): per-segment gradients of the
    prior's sampled loss (the device's: popularity-sampled negatives, logQ) by torch.func, Poisson sampling at q = B / n, clipped and noised
    by Opacus' DPOptimizer, Adam. Leaves the best-validation weights in `model`."""
    from opacus.optimizers import DPOptimizer
    from torch.func import functional_call, grad, vmap

    prior = model.prior
    if prior is None:
        raise ConfigError("--dp-train-only needs the text prior (--text-prior N)")
    wanted = [w.strip() for w in tcfg.train_only.split(",") if w.strip()]
    bad = [w for w in wanted if not w.startswith("prior.")]
    if bad:
        raise ConfigError(f"--dp-train-only {','.join(bad)}: only prior.* parameters train "
                          "this way")
    names = [n for n, _ in prior.named_parameters()
             if any(f"prior.{n}".startswith(w) for w in wanted)]
    if not names:
        raise ConfigError(f"--dp-train-only {tcfg.train_only}: matches no prior parameter")
    for p in model.parameters():
        p.requires_grad_(False)
    trained = {n: p for n, p in prior.named_parameters() if n in names}
    for p in trained.values():
        p.requires_grad_(True)
    seg = seg if seg is not None else _segments(inputs, model.cfg, tcfg.seed)
    n = len(seg["items"])
    q = min(1.0, tcfg.batch_size / n)
    steps = max(1, round(tcfg.epochs / q))
    sigma = calibrate_sigma(tcfg, q, steps)
    feats = model.item_feats
    unit = prior.keys(feats)[:, :-1].detach()
    frozen = {k: v.detach() for k, v in prior.named_parameters() if k not in trained}

    probs = torch.as_tensor(np.maximum(inputs.counts, 0.0) + 1.0)  # the public (noised) counts
    log_q = torch.log(probs / probs.sum()).float()
    n_neg = model.cfg.n_negatives

    def one_loss(params, items, mask, negs):
        return functional_call(prior, {**params, **frozen}, (
            feats, unit, items.unsqueeze(0), mask.unsqueeze(0), negs.unsqueeze(0), log_q))[0]

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0, 0), chunk_size=128)
    opt = DPOptimizer(torch.optim.Adam(list(trained.values()), lr=tcfg.lr),
                      noise_multiplier=sigma, max_grad_norm=tcfg.clip,
                      expected_batch_size=max(1, round(q * n)))
    gen = torch.Generator().manual_seed(tcfg.seed)
    per_epoch = max(1, round(1 / q))
    avg = ParameterAverage(trained, tcfg.ema)
    best, best_state, hist, t0 = -1.0, None, [], time.perf_counter()
    for step in range(1, steps + 1):
        take = torch.rand(n, generator=gen) < q  # Poisson sampling
        opt.zero_grad(set_to_none=True)
        if take.any():
            detached = {k: v.detach() for k, v in trained.items()}
            negs = torch.multinomial(probs, int(take.sum()) * n_neg, replacement=True,
                                     generator=gen).view(-1, n_neg)
            grads = per_example(detached, seg["items"][take], seg["mask"][take], negs)
            for k, p in trained.items():
                p.grad_sample = grads[k]
        else:  # an empty draw still releases the noise alone
            for p in trained.values():
                p.grad_sample = torch.zeros(0, *p.shape)
        opt.step()
        avg.update()
        if step % (per_epoch * tcfg.eval_every) == 0 or step == steps:
            with avg.applied():
                res = evaluate(NeuralScorer(model, inputs), inputs, inputs.split.valid)
                hist.append({"step": step, "valid_ndcg@10": res["ndcg@10"]})
                print(f"step {step}/{steps}: valid NDCG@10 {res['ndcg@10']:.4f}", flush=True)
                if res["ndcg@10"] > best:
                    best, best_state = res["ndcg@10"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return {"history": hist, "noise_multiplier": sigma, "sample_rate": q, "steps": steps,
            "epsilon": _epsilon(sigma, q, steps, tcfg.delta, tcfg.count_noise),
            "trained_parameters": {k: int(p.numel()) for k, p in trained.items()},
            "train_seconds": time.perf_counter() - t0, "train_examples": n}


class ParameterAverage:
    """An exponential moving average of `params` (decay `decay` per update, warmed up as
    min(decay, (1 + t) / (10 + t)) so the start is not pinned to the initialisation);
    `applied()` swaps it into the parameters for evaluation. decay 0 = the last iterate."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"--dp-ema {decay}: expected 0 <= decay < 1")
        self.params, self.decay, self.t = params, decay, 0
        self.avg = {k: p.detach().clone() for k, p in params.items()}

    def update(self) -> None:
        if not self.decay:
            return
        self.t += 1
        d = min(self.decay, (1 + self.t) / (10 + self.t))
        with torch.no_grad():
            for k, p in self.params.items():
                self.avg[k].mul_(d).add_(p.detach(), alpha=1 - d)

    @contextlib.contextmanager
    def applied(self):
        if not self.decay:
            yield
            return
        raw = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.avg[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(raw[k])


def run_dp(ds, name: str, out: Path, encoder, tcfg: DPTrainConfig, split_name: str = "loo",
           **model_overrides) -> dict:
    """One model, one seed, at `tcfg.epsilon`: writes OUT/metrics.json, returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(tcfg.seed)
    inputs = load_inputs(ds, split_name, encoder)
    # the device's loss (sampled negatives): every layer sees the batch dimension, as Opacus needs
    cfg = model_config(name, inputs, **{**model_overrides, "dp": True, "loss": "sampled"})
    if tcfg.train_only:  # the prior alone: its own loss on disjoint segments
        seg = _segments(inputs, cfg, tcfg.seed)
        inputs = noised_features(inputs, seg, tcfg)
        model = build_for(cfg, inputs)
        fit = train_prior_dp(model, inputs, tcfg, seg)
    else:
        for flag, value in (("--dp-count-noise", tcfg.count_noise), ("--dp-ema", tcfg.ema)):
            if value:
                raise ConfigError(f"{flag} needs --dp-train-only (the prior's DP path)")
        model = build_for(cfg, inputs)
        fit = train_dp(model, inputs, tcfg)
    scorer = NeuralScorer(model, inputs)
    info = {"model": name, "dataset": ds.name, "split": inputs.split.name,
            "protocol": inputs.protocol, "dp": {
                **asdict(tcfg), "unit": "one disjoint segment (add/remove one)",
                "accountant": "Opacus RDP, Poisson sampling" + (
                    ", composed with the Gaussian count release" if tcfg.count_noise else ""),
                "model_selection": "best validation epoch (outside the epsilon)",
                "popularity_features": "Gaussian count release inside the epsilon"
                if tcfg.count_noise else "exact training counts (outside the epsilon)"},
            "config": cfg.to_dict(), "parameters": n_parameters(model), **fit,
            "validation": evaluate(scorer, inputs, inputs.split.valid),
            "test": evaluate(scorer, inputs, inputs.split.test)}
    (out / "metrics.json").write_text(json.dumps(info, indent=2, default=_json_default))
    return info


def mean_test(infos: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([i["test"][k] for i in infos])) for k in ("hr@10", "ndcg@10")}
