"""The one-run canary audit (Steinke, Nasr, Jagielski 2023) of distributed DP: what the
decoded noisy sums reveal about a contribution inserted into a round.

The server of a distributed-DP run sees only each round's decoded sum (shared/distributed_dp.py).
The audit replays that release with the run's parameters through the same code the devices and
the server run (clipping bound, `integer_contribution`: conditional rounding and a Skellam share
per device, `encode_payload` mod Q, Flower's SecAgg+ sum, `decode_sum`) and inserts gradient
canaries: canary i is the clipped contribution C s_i e_j (a random sign s_i on coordinate j of
the trained payload), included in its round with probability 1/2. A canary is one unit (a
segment at event level, a device's update at user level), the strongest contribution the
mechanism admits: the guarantee holds for every clipped vector, so a canary the sum reveals
beyond the claim is a defect of the mechanism as implemented (an under-sized noise share, a
rounding that breaks the sensitivity bound, a decode that drops noise).
Each round carries one canary per coordinate (so canaries do not overlap) beside the other
devices' clipped contributions, which the auditor knows and subtracts (DP holds against an
adversary who knows every other contribution). Score: s_i times the decoded coordinate.
Each canary is in one round only, so its claimed epsilon is one round's (unsampled, no count:
the round alone). The same releases without noise are the positive control.
Power (default world, 600 replayed releases of 31 canaries, seed 0): the honest noise gives a
lower bound of 1.9 against the claimed 4.69; noise shares of a third of the stated size give
5.2 and fail; half the stated size gives 3.8 and passes (the one-run bound is loose by design;
tests/privacy/test_distributed_dp.py's variance test is the sharp check for under-noising).
Data-level canaries (a crafted event in a device's history, through the model's gradient) are
weaker than these and not run here.
"""

from __future__ import annotations

import time

import numpy as np
from fedinterest.shared.distributed_dp import (
    DDPParams,
    decode_sum,
    encode_payload,
    integer_contribution,
    params_for,
)
from fedinterest.shared.distributed_dp_accounting import ddp_epsilon
from fedinterest.simulations.audit.checks import INCONCLUSIVE, CheckResult
from fedinterest.simulations.audit.evidence import AuditRun

TITLE = "Canary membership audit of the distributed-DP release (one run, gradient canaries)"


def released_sums(params: DDPParams, contributions: list[list[np.ndarray]],
                  rng: np.random.Generator) -> np.ndarray:
    """What the server decodes from one round: each device's clipped vectors rounded, its
    noise share added, encoded mod Q; the payloads summed as SecAgg+ does; decoded and scaled
    back (one row per round)."""
    n = len(contributions)
    payloads = [encode_payload(integer_contribution(c, params, rng), [(params.dim,)])[0]
                for c in contributions]
    mean = np.sum(payloads, axis=0) / n  # Flower's unmasked mean of the payloads
    return decode_sum([mean], n).astype(np.float64) / params.scale


def canary_scores(params: DDPParams, devices: int, rounds: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, included) of `rounds` x dim canaries under `params` (see the module doc)."""
    d, c = params.dim, params.clip
    included = rng.random(rounds * d) < 0.5
    signs = rng.choice([-1.0, 1.0], rounds * d)
    scores = np.zeros(rounds * d)
    for r in range(rounds):
        background = []
        for _ in range(devices):
            v = rng.standard_normal(d)
            background.append(v * (c * rng.random() / np.linalg.norm(v)))
        contributions = [[b] for b in background]
        idx = np.arange(r * d, (r + 1) * d)
        for i in idx[included[idx]]:
            unit = np.zeros(d)
            unit[i - r * d] = signs[i] * c
            contributions[int(i) % devices].append(unit)  # canaries spread over the devices
        release = released_sums(params, contributions, rng) - np.sum(background, axis=0)
        scores[idx] = signs[idx] * release
    return scores, included


RELEASES = 600  # replayed releases (each with one canary per trained coordinate)


def check_ddp_canaries(run: AuditRun, rounds: int = RELEASES, seed: int = 0,
                       confidence: float = 0.95) -> CheckResult:
    """The audit's verdict: fail when the noisy releases prove more than one round's claimed
    epsilon, inconclusive when the control without noise shows no leakage."""
    from fedinterest.simulations.audit.attacks import _bounds, _canary_verdict

    cfg = run.config
    stmt = ((run.results or {}).get("privacy", {}) or {}).get("distributed") or {}
    dim = int(stmt.get("dim") or 0)
    if dim <= 0:
        return CheckResult("canary", TITLE, INCONCLUSIVE, "results.json records no "
                           "distributed-DP statement (the run did not finish)", {})
    t0 = time.time()
    params = params_for(cfg, dim)
    claimed = ddp_epsilon(params, 1.0, 1, cfg.delta)
    runs, raw = {}, {}
    for name, p in (("dp", params), ("control", DDPParams(params.clip, 0.0,
                                                          params.min_contributions,
                                                          params.scale, params.dim))):
        scores, included = canary_scores(p, cfg.clients_per_round, rounds,
                                         np.random.default_rng(seed))
        runs[name] = _bounds(scores, included, cfg.delta, confidence)
        raw[name] = scores.tolist()
    runs["dp"]["claimed_epsilon"] = claimed
    details = {"canaries": rounds * dim, "rounds": rounds, "devices_per_round":
               cfg.clients_per_round, "dim": dim, "clip": params.clip,
               "noise_multiplier": params.noise_multiplier,
               "min_contributions": params.min_contributions, "scale": params.scale,
               "claimed_epsilon_per_canary": claimed, "dp": runs["dp"],
               "control": runs["control"], "included": included.tolist(), "scores": raw,
               "seconds": time.time() - t0,
               "paper": "Steinke, Nasr, Jagielski: Privacy Auditing with One (1) Training "
                        "Run, NeurIPS 2023, arXiv:2305.08846"}
    result = _canary_verdict(TITLE, runs["dp"], runs["control"], rounds * dim, confidence,
                             details)
    result.title = TITLE
    return result

