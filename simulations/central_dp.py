"""Central DP-SGD reference: a trusted curator trains on every user's segments with Opacus at a
target epsilon. The same unit (one disjoint segment, add/remove one) and delta as the event-level
federated modes, so it is the upper bound any federated scheme reaches at that epsilon.

Poisson sampling at q = B / n over all training segments, `epochs / q` steps, noise multiplier
calibrated by Opacus' RDP accountant to `epsilon` at `delta` (get_noise_multiplier), per-segment
clipping to `clip`, Adam (post-processing of the noisy gradients). Validation NDCG@10 picks the
reported epoch, as every central row does; that choice reads held-out events and is outside the
epsilon (as is customary, and said in metrics.json).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.model import n_parameters
from fedinterest.shared.sequences import SegmentDataset

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


def train_dp(model, inputs: CentralInputs, tcfg: DPTrainConfig) -> dict:
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


def _epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """The spent epsilon, recomputed from (sigma, q, steps) with Opacus' RDP analysis."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta))


def run_dp(ds, name: str, out: Path, encoder, tcfg: DPTrainConfig, split_name: str = "loo",
           **model_overrides) -> dict:
    """One model, one seed, at `tcfg.epsilon`: writes OUT/metrics.json, returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(tcfg.seed)
    inputs = load_inputs(ds, split_name, encoder)
    # the device's loss (sampled negatives): every layer sees the batch dimension, as Opacus needs
    cfg = model_config(name, inputs, **{**model_overrides, "dp": True, "loss": "sampled"})
    model = build_for(cfg, inputs)
    fit = train_dp(model, inputs, tcfg)
    scorer = NeuralScorer(model, inputs)
    info = {"model": name, "dataset": ds.name, "split": inputs.split.name,
            "protocol": inputs.protocol, "dp": {
                **asdict(tcfg), "unit": "one disjoint segment (add/remove one)",
                "accountant": "Opacus RDP, Poisson sampling",
                "model_selection": "best validation epoch (outside the epsilon)"},
            "config": cfg.to_dict(), "parameters": n_parameters(model), **fit,
            "validation": evaluate(scorer, inputs, inputs.split.valid),
            "test": evaluate(scorer, inputs, inputs.split.test)}
    (out / "metrics.json").write_text(json.dumps(info, indent=2, default=_json_default))
    return info


def mean_test(infos: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([i["test"][k] for i in infos])) for k in ("hr@10", "ndcg@10")}
