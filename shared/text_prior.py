"""A public text-similarity prior under the interest model, with a small learned correction.

Why: under DP noise a model must learn everything from a few hundred noisy steps; one that
already ranks well untrained need only learn a correction, and a correction of a few thousand
coordinates carries a fraction of the noise a whole model does (docs/RESULTS.md, issue 15).

An item's score, for a user whose recent items have unit text vectors t_0 (latest), t_1, ...:

    u = sum_{k < window} exp(recency_k) t_k                      (recency = 0: their mean)
    prior(item) = exp(log_scale) cos(u + A B u, t_item) + pop . popularity_features(item)
    score(item) = prior(item) + gate * neural(item)              (neural: InterestModel's own)

Untrained (recency = 0, A = 0, pop = 0, gate = 0) the ranking is exactly the "static, last
`window` items" baseline (simulations/baselines.StaticScorer): mean of the frozen MiniLM
vectors, cosine to every item. A is zero-initialised, B random (LoRA's split), so the first
steps already move A. Which of these parameters a run trains is RunConfig.ddp_train_only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .item_features import POP_DIM


class TextPrior(nn.Module):
    """See the module docstring. `text_dim`: width of the item text vectors (the first
    columns of the item feature matrix; the last POP_DIM are popularity features)."""

    def __init__(self, text_dim: int, window: int, rank: int, temperature: float):
        super().__init__()
        if window < 1 or rank < 0:
            raise ValueError(f"text prior: window {window} must be >= 1 and rank {rank} >= 0")
        self.text_dim = text_dim
        self.recency = nn.Parameter(torch.zeros(window))
        self.pop = nn.Parameter(torch.zeros(POP_DIM))
        self.log_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))
        self.gate = nn.Parameter(torch.zeros(1))
        if rank:  # no zero-size arrays on the wire when there is no adapter
            self.adapter_down = nn.Parameter(torch.randn(rank, text_dim) / math.sqrt(text_dim))
            self.adapter_up = nn.Parameter(torch.zeros(text_dim, rank))
        self.rank = rank

    def keys(self, item_feats: torch.Tensor) -> torch.Tensor:
        """[.., text_dim + 1]: each item's unit text vector and its popularity logit."""
        unit = F.normalize(item_feats[..., :self.text_dim], dim=-1)
        pop = item_feats[..., self.text_dim:] @ self.pop
        return torch.cat([unit, pop.unsqueeze(-1)], dim=-1)

    def queries(self, item_feats: torch.Tensor, items: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        """[B, T, text_dim] unit query after each event of right-padded sequences [B, T];
        query t reads events t, t-1, ... t-window+1 only (causal)."""
        x = F.normalize(item_feats[items][..., :self.text_dim], dim=-1) * mask.unsqueeze(-1)
        weights = self.recency.exp()
        u = x * weights[0]
        for k in range(1, min(len(weights), x.shape[1])):
            u = u + F.pad(x[:, :-k], (0, 0, k, 0)) * weights[k]
        if self.rank:
            u = u + (u @ self.adapter_down.T) @ self.adapter_up.T
        return F.normalize(u, dim=-1)

    def logits(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[.., d] queries x [N, d + 1] rows of `keys()` -> [.., N] prior scores."""
        return self._scale() * (queries @ keys[:, :-1].T) + keys[:, -1]

    def step_logits(self, queries: torch.Tensor, next_keys: torch.Tensor,
                    neg_keys: torch.Tensor) -> torch.Tensor:
        """Training candidates: queries [B, S, d], each step's next item [B, S, d + 1] and the
        example's negatives [B, K, d + 1] -> [B, S, 1 + K] (positive first)."""
        scale = self._scale()
        pos = scale * (queries * next_keys[..., :-1]).sum(-1, keepdim=True) + next_keys[..., -1:]
        neg = scale * (queries @ neg_keys[..., :-1].transpose(1, 2)) + neg_keys[..., -1].unsqueeze(1)
        return torch.cat([pos, neg], dim=-1)

    def forward(self, item_feats: torch.Tensor, unit_text: torch.Tensor, items: torch.Tensor,
                mask: torch.Tensor, negatives: torch.Tensor, log_q: torch.Tensor
                ) -> torch.Tensor:
        """Per-segment loss [B] of the prior alone (gate at zero), as InterestModel's sampled
        loss scores it (what a device trains): each next event against the segment's
        negatives [B, K] drawn with probabilities exp(log_q) [N], logQ-corrected, accidental
        hits masked, summed over the steps / (T - 1). `unit_text` = `keys(item_feats)[:, :-1]`
        (no parameter changes it). A forward that reads every trained parameter, so
        per-example gradients come from torch.func (simulations/central_dp.py)."""
        t = items.shape[1]
        q = self.queries(item_feats, items, mask)[:, :-1]  # [B, T-1, d]
        pop = item_feats[:, self.text_dim:] @ self.pop - log_q  # [N]
        targets = items[:, 1:]
        scale = self._scale()
        pos = scale * (q * unit_text[targets]).sum(-1, keepdim=True) + pop[targets].unsqueeze(-1)
        neg = scale * (q @ unit_text[negatives].transpose(1, 2)) + pop[negatives].unsqueeze(1)
        hit = negatives.unsqueeze(1) == targets.unsqueeze(-1)
        logits = torch.cat([pos, neg.masked_fill(hit, -1e9)], dim=-1)
        rec = torch.logsumexp(logits, -1) - logits[..., 0]
        step = mask[:, :-1] * mask[:, 1:]
        return (rec * step).sum(1) / max(t - 1, 1)

    def _scale(self) -> torch.Tensor:
        return self.log_scale.clamp(0.0, math.log(100.0)).exp()

    def mix(self, prior: torch.Tensor, neural: torch.Tensor) -> torch.Tensor:
        return prior + self.gate * neural
