"""The epsilon lower bound of "Privacy Auditing with One (1) Training Run".

Steinke, Nasr and Jagielski, NeurIPS 2023 (arXiv:2305.08846). Setting: m canaries, each
included in the training data independently with probability 1/2 (S_i in {-1, +1}). After one
training run the auditor scores every canary and guesses: "included" for the k_+ highest
scores, "excluded" for the k_- lowest, abstaining on the rest; r = k_+ + k_- guesses of which
v are correct.

Under (eps, delta)-DP, Theorem 5.2 of the paper bounds the number of correct guesses: with
q = e^eps / (1 + e^eps) (the accuracy of eps-DP randomised response),

    P[W >= v] <= P[B >= v] + 2 m delta * max_{i=1..v} P[v > B >= v - i] / i,  B ~ Binomial(r, q)

which is the p-value of the paper's Algorithm 2 (their appendix code, `p_value_DP_audit`).
The lower bound at confidence 1 - beta is the largest eps whose p-value is still below beta:
no (eps, delta)-DP algorithm would give v or more correct guesses with probability beta.

Written out here (scipy for the binomial) because it is a dozen lines and no package installed
here ships it (jax_privacy's `auditing._one_run_p_value` computes the same quantity, but pulls
in JAX). Guesses must be fixed in number before the scores are seen; trying several counts
needs a multiple-testing correction (the caller applies Bonferroni).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v correct of r guesses] for any (eps, delta)-DP algorithm (Theorem 5.2)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    # P[v > Binomial(r, q) >= v - i] = P[B >= v - i] - P[B >= v]
    window = stats.binom.sf(v - i - 1, r, q) - beta
    alpha = float(np.max(window / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95
                        ) -> float:
    """The largest eps refuted at `confidence` by v correct of r guesses among m canaries
    (0.0 when no eps >= 0 is refuted)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    hi = 1.0
    while p_value(m, r, v, hi, delta) < beta:  # p_value grows with eps
        hi *= 2.0
        if hi > 1e3:  # only r correct guesses with delta = 0 get here; the bound is huge
            return hi
    return float(optimize.brentq(lambda e: p_value(m, r, v, e, delta) - beta, 0.0, hi,
                                 xtol=1e-6))


def guess_and_bound(scores: np.ndarray, included: np.ndarray, k_pos: int, k_neg: int,
                    delta: float, confidence: float = 0.95) -> dict:
    """Guess the k_pos highest scores in and the k_neg lowest out; count and bound.

    k_pos and k_neg must be fixed before the scores are seen (the bound assumes it); ties
    are broken by canary index, which the inclusion coin flips are independent of.
    """
    scores = np.asarray(scores, np.float64)
    included = np.asarray(included, bool)
    m = len(scores)
    if len(included) != m or k_pos + k_neg > m or min(k_pos, k_neg) < 0:
        raise ValueError(f"need k_pos + k_neg <= m = {m} and one label per score")
    order = np.argsort(-scores, kind="stable")
    guessed_in, guessed_out = order[:k_pos], order[m - k_neg:] if k_neg else order[:0]
    v = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    r = k_pos + k_neg
    return {"m": m, "guesses": r, "correct": v, "k_pos": k_pos, "k_neg": k_neg,
            "confidence": confidence, "delta": delta,
            "epsilon_lower_bound": epsilon_lower_bound(m, r, v, delta, confidence)}
