"""The interest-evolution model: the one definition used by central training, devices and server.

Per event the input is  item_tower(item features) + Linear([private text vector, has_text])
+ gap embedding; a GRU (or a causal Transformer) runs over the sequence and its state at step
t is the user's interest after event t. A candidate item scores
    scale * <normalize(query(state)), normalize(item_tower(item features))>
(`score="dot"`, central only: <query(state), item vector>, as SASRec) and a topic head
predicts the distribution over topics of the next event.

Built for Opacus (DP-SGD on the device):
- every trainable layer sees the batch dimension: in training each example is scored only
  against its own candidates (its next items + its own sampled negatives), never against other
  examples' items, so one example's gradient depends on that example alone; the full catalog
  is ranked only at inference;
- `ModelConfig.dp=True` swaps nn.GRU for HoistedGRU, the same maths as Opacus-friendly
  layers (same state_dict keys; the weight list is ordered by name, so both give the same
  wire schema);
- attention is built from nn.Linear layers; the learned temperature is a tiny leaf module
  (Opacus computes its per-sample gradient with functorch).
The public catalog tensors (item features, topic matrix, sampling log-probabilities) are
non-persistent buffers: they are not in the state_dict and never travel with the weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .item_features import POP_DIM
from .sequences import N_GAP_BUCKETS, N_RATING_BUCKETS
from .text_prior import TextPrior
from .transformer import TransformerEncoder

KINDS = ("gru", "transformer")
ITEM_REPRS = ("text", "id", "hybrid")
LOSSES = ("sampled", "full")
SCORES = ("cosine", "dot")
POSITIONS = ("after_norm", "before_norm")
BLOCKS = ("pre_ln", "post_ln")
NEG_SAMPLING = ("uniform", "pop")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model (JSON-able; stored next to every checkpoint)."""

    kind: str = "gru"  # "gru" | "transformer"
    item_repr: str = "text"  # "text": item tower over features; "id": learned ID embeddings;
    # "hybrid": the text tower plus an ID embedding for warm items only (central only)
    n_items: int = 0  # catalog size (sizes the ID table; checked against item features)
    item_feat_dim: int = 384 + POP_DIM  # width of the item feature matrix (text vec + pop)
    text_dim: int = 384  # width of private text vectors
    hidden: int = 64
    tower_width: int = 0  # hidden width of the text tower's MLP (0 = 2 * hidden)
    tower_residual: bool = False  # add a linear projection of the item features to the MLP
    warm_min_count: int = 5  # hybrid: items with fewer training interactions get no ID row
    n_topics: int = 0  # 0 = no topic head
    segment_len: int = 50  # events per training example (disjoint segments)
    context_len: int = 50  # events the model reads at inference (the most recent ones)
    n_negatives: int = 256  # sampled negatives per example ("sampled" loss)
    neg_sampling: str = "uniform"  # "uniform" | "pop" (with logQ correction)
    loss: str = "sampled"  # "sampled" (device-compatible) | "full" softmax (central)
    n_layers: int = 1
    n_heads: int = 2  # transformer only
    dropout: float = 0.2
    # dropout on the interest state before the query/score (None = `dropout`); SASRec and
    # RecBole drop nothing there: 0 lets the blocks take dropout 0.5 as theirs do
    output_dropout: float | None = None
    temperature: float = 0.07  # initial; learned
    score: str = "cosine"  # "cosine" (learned temperature) | "dot": SASRec's inner product
    # of the query and the raw item vector (full loss only: central)
    topic_weight: float = 0.1  # weight of the next-topic loss
    # transformer only (the defaults keep the federated model and its wire schema):
    # "after_norm": positions at N(0, 1) added after the input LayerNorm; "before_norm":
    # SASRec's, at N(0, 0.02), summed with the event vector before the input LayerNorm
    positions: str = "after_norm"
    block: str = "pre_ln"  # "pre_ln" + a final LayerNorm | "post_ln" (SASRec/BERT, no final)
    ffn_inner: int = 0  # width of a block's feed-forward layer (0 = 2 * hidden)
    init_std: float = 0.0  # > 0: the blocks' Linear weights N(0, init_std), biases 0 (SASRec)
    use_gap: bool = True  # time-gap bucket embedding as an event input
    use_private_text: bool = True
    use_rating: bool = True  # rating bucket embedding as an event input (0 = no rating)
    dp: bool = False  # use HoistedGRU (for DP-SGD with Opacus hooks)
    # > 0: score = text-similarity prior over the last `text_prior` items + gate x the model
    # above (shared/text_prior.py); untrained it ranks as the static text baseline
    text_prior: int = 0
    prior_rank: int = 0  # rank of the prior's zero-initialised query adapter

    def __post_init__(self) -> None:
        for name, allowed in (("kind", KINDS), ("item_repr", ITEM_REPRS), ("loss", LOSSES),
                              ("neg_sampling", NEG_SAMPLING), ("score", SCORES),
                              ("positions", POSITIONS), ("block", BLOCKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; "
                                 f"expected one of {allowed}")
        if self.item_repr in ("id", "hybrid") and self.n_items < 1:
            raise ValueError(f"ModelConfig.n_items must be set for item_repr={self.item_repr!r}")
        if self.score == "dot" and self.loss != "full":
            raise ValueError("ModelConfig.score='dot' needs loss='full' (central training)")
        if self.output_dropout is not None and not 0.0 <= self.output_dropout < 1.0:
            raise ValueError(f"ModelConfig.output_dropout={self.output_dropout}; expected a "
                             "probability in [0, 1) or None")
        if self.hidden % max(self.n_heads, 1):
            raise ValueError("ModelConfig.hidden must be divisible by n_heads")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


class LogitScale(nn.Module):
    """Learned inverse temperature, exp(log_scale) clamped to [1, 100]. A leaf module of its
    own so Opacus can compute its per-sample gradient (functorch)."""

    def __init__(self, temperature: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.log_scale.clamp(0.0, math.log(100.0)).exp()


class TextItemTower(nn.Module):
    """MLP over the public item features (frozen text vector + popularity): no per-item
    parameters, so it embeds items it never saw. With `residual`, a linear projection of the
    features is added: the MLP then learns a correction to a map that keeps the text
    geometry (what the cold items need)."""

    def __init__(self, in_dim: int, hidden: int, dropout: float, width: int = 0,
                 residual: bool = False):
        super().__init__()
        width = width or 2 * hidden
        self.fc1 = nn.Linear(in_dim, width)
        self.fc2 = nn.Linear(width, hidden)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(in_dim, hidden) if residual else None

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.drop(F.gelu(self.fc1(feats))))
        return out if self.proj is None else out + self.proj(feats)


class HoistedGRU(nn.Module):
    """nn.GRU's maths (batch first, zero initial state, unidirectional) written for Opacus'
    hook mode, used for DP training in place of opacus.layers.DPGRU.

    Why not DPGRU: it calls both of a layer's projections once per time step, so Opacus'
    per-sample-gradient hooks fire 2 x T times per layer. Here the input projection of every
    step runs as one nn.Linear call over the whole sequence (its per-sample gradient sums over
    time, as Opacus' Linear grad sampler does for 3-D inputs) and only the recurrent projection
    runs per step, as an Opacus RNNLinear (whose per-sample gradients accumulate over calls).
    The DP step costs 1.77-1.80x a plain step against DPGRU's 2.02-2.06x, measured side by
    side (`fedinterest bench dp-step`, docs/BENCHMARKS.md).

    The projections are submodules `ih_l{k}` / `hh_l{k}`; the state_dict hooks below name
    their tensors as nn.GRU does (weight_ih_l0, bias_hh_l0, ...), so checkpoints and the wire
    schema are those of nn.GRU. Parameters are not re-registered under nn.GRU's names at this
    level (as Opacus' RenameParamsMixin would): Opacus would then see a module with its own
    parameters and no grad sampler, and fall back to functorch for the whole GRU."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0):
        from opacus.layers.dp_rnn import RNNLinear  # lazily: only DP training needs Opacus

        super().__init__()
        self.hidden_size, self.num_layers, self.dropout = hidden_size, num_layers, dropout
        for k in range(num_layers):
            self.add_module(f"ih_l{k}", nn.Linear(input_size if k == 0 else hidden_size,
                                                  3 * hidden_size))
            self.add_module(f"hh_l{k}", RNNLinear(hidden_size, 3 * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)  # nn.GRU's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        self.register_state_dict_post_hook(_gru_names_out)
        self.register_load_state_dict_pre_hook(_gru_names_in)

    def _renames(self) -> dict[str, str]:
        """{submodule key: nn.GRU key}, e.g. "ih_l0.weight": "weight_ih_l0"."""
        return {f"{proj}_l{k}.{kind}": f"{kind}_{proj}_l{k}" for k in range(self.num_layers)
                for proj in ("ih", "hh") for kind in ("weight", "bias")}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """[B, T, input] -> ([B, T, hidden], None); nn.GRU also returns the last state, which
        nothing here uses."""
        h_size = self.hidden_size
        for k in range(self.num_layers):
            if k and self.training and self.dropout:
                x = F.dropout(x, self.dropout)  # between layers, as nn.GRU
            gates_x = getattr(self, f"ih_l{k}")(x)  # [B, T, 3H]: every step in one call
            hh = getattr(self, f"hh_l{k}")
            h = x.new_zeros(x.shape[0], h_size)
            out = []
            for t in range(x.shape[1]):
                xr, xz, xn = gates_x[:, t].split(h_size, 1)
                hr, hz, hn = hh(h).split(h_size, 1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                h = (1 - z) * torch.tanh(xn + r * hn) + z * h
                out.append(h)
            x = torch.stack(out, 1)
        return x, None


def _gru_names_out(module: HoistedGRU, state_dict: dict, prefix: str, _meta) -> None:
    for ours, gru in module._renames().items():
        if prefix + ours in state_dict:
            state_dict[prefix + gru] = state_dict.pop(prefix + ours)


def _gru_names_in(module: HoistedGRU, state_dict: dict, prefix: str, *_args) -> None:
    for ours, gru in module._renames().items():
        if prefix + gru in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + gru)


class GRUEncoder(nn.Module):
    """nn.GRU, or HoistedGRU (the same maths, built for Opacus) when cfg.dp; both give the
    same state_dict keys, so the wire schema does not depend on cfg.dp."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dropout = cfg.dropout if cfg.n_layers > 1 else 0.0
        if cfg.dp:
            self.gru = HoistedGRU(cfg.hidden, cfg.hidden, cfg.n_layers, dropout)
        else:
            self.gru = nn.GRU(cfg.hidden, cfg.hidden, num_layers=cfg.n_layers,
                              batch_first=True, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


def _as_tensor(a, dtype=torch.float32) -> torch.Tensor:
    return a.to(dtype) if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a), dtype=dtype)


class InterestModel(nn.Module):
    """See the module docstring. Batches follow `fedinterest.shared.sequences`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        if cfg.item_repr in ("text", "hybrid"):
            self.item_tower = TextItemTower(cfg.item_feat_dim, h, cfg.dropout, cfg.tower_width,
                                            cfg.tower_residual)
        if cfg.item_repr == "id":
            self.item_emb = nn.Embedding(cfg.n_items, h)
            # small, as SASRec's: items are scored by cosine, so a short initial vector
            # turns faster under Adam's fixed-size steps
            nn.init.normal_(self.item_emb.weight, std=0.02)
        if cfg.item_repr == "hybrid":  # starts as the text model: ID rows begin at zero
            self.item_emb = nn.Embedding(cfg.n_items, h)
            nn.init.zeros_(self.item_emb.weight)
            # 1.0 for warm items (set by attach_catalog from the training counts); stored
            # with the weights so a checkpoint ranks as it was trained
            self.register_buffer("warm", torch.zeros(cfg.n_items))
        if cfg.use_private_text:
            self.text_in = nn.Linear(cfg.text_dim + 1, h)
        if cfg.use_gap:
            self.gap_emb = nn.Embedding(N_GAP_BUCKETS, h)
            # small, like position embeddings: at N(0, 1) the gap would drown the item signal
            nn.init.normal_(self.gap_emb.weight, std=0.02)
        if cfg.use_rating:
            self.rating_emb = nn.Embedding(N_RATING_BUCKETS, h)
            nn.init.normal_(self.rating_emb.weight, std=0.02)
        self.in_norm = nn.LayerNorm(h)
        self.drop = nn.Dropout(cfg.dropout)
        self.out_drop = nn.Dropout(cfg.dropout if cfg.output_dropout is None
                                   else cfg.output_dropout)
        self.encoder = GRUEncoder(cfg) if cfg.kind == "gru" else TransformerEncoder(cfg)
        self.query = nn.Linear(h, h)
        self.scale = LogitScale(cfg.temperature)
        if cfg.n_topics:
            self.topic_head = nn.Linear(h, cfg.n_topics)
        self.prior = (TextPrior(cfg.text_dim, cfg.text_prior, cfg.prior_rank, cfg.temperature)
                      if cfg.text_prior else None)
        # public catalog tensors: buffers kept out of the state_dict (see attach_catalog)
        self.register_buffer("item_feats", torch.zeros(0, cfg.item_feat_dim), persistent=False)
        self.register_buffer("topic_dist", torch.zeros(0, cfg.n_topics), persistent=False)
        self.register_buffer("log_q", torch.zeros(0), persistent=False)

    # -- catalog ---------------------------------------------------------------------------
    def attach_catalog(self, item_feats=None, topic_dist=None, neg_probs=None,
                       counts=None) -> InterestModel:
        """Public per-item tensors used in training: item features [N, F] (text model),
        topic distributions [N, n_topics] (topic head), the negative-sampling
        probabilities [N] (logQ correction when cfg.neg_sampling == "pop") and, for the
        hybrid model, the training interaction counts [N] that decide which items are warm."""
        n = self.cfg.n_items or None
        if item_feats is not None:
            f = _as_tensor(item_feats)
            if f.ndim != 2 or f.shape[1] != self.cfg.item_feat_dim:
                raise ValueError(f"item features must be [N, {self.cfg.item_feat_dim}], "
                                 f"got {tuple(f.shape)}")
            if n and len(f) != n:
                raise ValueError(f"item features have {len(f)} rows, config says {n} items")
            self.item_feats = f
        if topic_dist is not None:
            t = _as_tensor(topic_dist)
            if t.ndim != 2 or t.shape[1] != self.cfg.n_topics:
                raise ValueError(f"topic matrix must be [N, {self.cfg.n_topics}]")
            self.topic_dist = t
        if neg_probs is not None:
            p = _as_tensor(neg_probs, torch.float64)
            self.log_q = torch.log(p / p.sum()).float()
        if counts is not None and self.cfg.item_repr == "hybrid":
            c = _as_tensor(counts)
            if len(c) != self.cfg.n_items:
                raise ValueError(f"counts have {len(c)} rows, config says {self.cfg.n_items}")
            self.warm = (c >= self.cfg.warm_min_count).float()
        return self

    # -- representations -------------------------------------------------------------------
    def _items_raw(self, idx: torch.Tensor) -> torch.Tensor:
        """Unnormalised item vectors for catalog indices of any shape [..] -> [.., H]."""
        if self.cfg.item_repr == "id":
            return self.item_emb(idx)
        if not len(self.item_feats):
            raise RuntimeError("text model: call attach_catalog(item_feats=...) first")
        out = self.item_tower(self.item_feats[idx])
        if self.cfg.item_repr == "hybrid":
            out = out + self.item_emb(idx) * self.warm[idx].unsqueeze(-1)
        return out

    def _all_items_raw(self) -> torch.Tensor:
        """[N, H] unnormalised vectors of every catalog item (full softmax, inference)."""
        if self.cfg.item_repr == "id":
            return self.item_emb.weight
        if not len(self.item_feats):
            raise RuntimeError("text model: call attach_catalog(item_feats=...) first")
        out = self.item_tower(self.item_feats)
        if self.cfg.item_repr == "hybrid":
            out = out + self.item_emb.weight * self.warm.unsqueeze(-1)
        return out

    def encode(self, batch: dict[str, torch.Tensor], item_raw: torch.Tensor | None = None
               ) -> torch.Tensor:
        """[B, T, H] interest states; state t depends only on events 0..t."""
        items = batch["items"]
        if item_raw is None:
            item_raw = self._items_raw(items)
        x = item_raw
        if self.cfg.use_gap:
            x = x + self.gap_emb(batch["gaps"])
        if self.cfg.use_private_text:
            has = batch["has_text"].unsqueeze(-1)
            x = x + self.text_in(torch.cat([batch["text"] * has, has], dim=-1))
        if self.cfg.use_rating and "rating" in batch:
            x = x + self.rating_emb(batch["rating"])
        if self.cfg.kind == "transformer" and self.cfg.positions == "before_norm":
            x = x + self.encoder.position_vectors(x)
        return self.encoder(self.drop(self.in_norm(x)))

    def item_embeddings(self, item_feats=None) -> torch.Tensor:
        """[N, H] normalised embeddings of every catalog item (inference; full ranking).
        `item_feats` defaults to the attached matrix; ignored by the ID model."""
        if self.cfg.item_repr == "id":
            e = self.item_emb.weight
        else:
            f = self.item_feats if item_feats is None else _as_tensor(item_feats)
            e = self.item_tower(f)
            if self.cfg.item_repr == "hybrid":
                e = e + self.item_emb.weight * self.warm.unsqueeze(-1)
        e = self._output_items(e)
        if self.prior is not None:  # [N, H + text_dim + 1]: the prior's keys ride along
            f = self.item_feats if item_feats is None else _as_tensor(item_feats)
            e = torch.cat([e, self.prior.keys(f)], dim=-1)
        return e

    def user_state(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, H] interest state after each history's last real event (right-padded batch
        from `sequences.inference_input` + `collate`; an unbatched input gives [H])."""
        single = batch["items"].ndim == 1
        if single:
            batch = {k: v.unsqueeze(0) for k, v in batch.items()}
        states = self.encode(batch)
        last = (batch["mask"].sum(1).long() - 1).clamp(min=0)
        out = states[torch.arange(len(states)), last]
        if self.prior is not None:  # [B, H + text_dim]: the prior's query rides along
            pq = self.prior.queries(self.item_feats, batch["items"], batch["mask"])
            out = torch.cat([out, pq[torch.arange(len(pq)), last]], dim=-1)
        return out[0] if single else out

    def score(self, states: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        """[B, N] scores of every item in `item_emb` (from `item_embeddings`) for each state."""
        h = self.cfg.hidden
        neural = self._scaled_queries(states[..., :h]) @ item_emb[:, :h].T
        if self.prior is None:
            return neural
        return self.prior.mix(self.prior.logits(states[..., h:], item_emb[:, h:]), neural)

    def _output_items(self, raw: torch.Tensor) -> torch.Tensor:
        """Item vectors as the score reads them: unit length (cosine) or as they are (dot)."""
        return raw if self.cfg.score == "dot" else F.normalize(raw, dim=-1)

    def _scaled_queries(self, states: torch.Tensor) -> torch.Tensor:
        """Queries whose inner product with `_output_items` is the logit: unit length times
        the learned inverse temperature (cosine), or the raw query (dot)."""
        q = self.query(states)
        return q if self.cfg.score == "dot" else self.scale(F.normalize(q, dim=-1))

    def topic_distribution(self, states: torch.Tensor) -> torch.Tensor:
        """[B, n_topics] predicted topic distribution of the next events."""
        return F.softmax(self.topic_head(states[..., :self.cfg.hidden]), dim=-1)

    # -- training --------------------------------------------------------------------------
    def example_losses(self, batch: dict[str, torch.Tensor], dedupe_items: bool = False
                       ) -> tuple[torch.Tensor, dict]:
        """Per-example loss [B] (sum over the example's steps / (segment_len - 1), i.e.
        token-weighted) and a dict of float statistics.

        dedupe_items: run the item tower once per distinct item of the batch (central training
        speed-up, same loss up to dropout masks). Not for DP: the tower then no longer sees the
        batch dimension, so Opacus could not compute per-sample gradients."""
        items, mask = batch["items"], batch["mask"]
        b, t = items.shape
        step = mask[:, :-1] * mask[:, 1:]  # step s predicts event s + 1
        if "target_mask" in batch:  # overlapping windows: count only this window's targets
            step = step * batch["target_mask"][:, 1:]
        targets = items[:, 1:]
        if self.cfg.loss == "sampled":
            negs = batch["negatives"]
            idx = torch.cat([items, negs], dim=1)
            if dedupe_items:
                uniq, inverse = torch.unique(idx, return_inverse=True)
                raw = self._items_raw(uniq)[inverse]
            else:
                raw = self._items_raw(idx)  # one tower pass, batch dimension first
            states = self.encode(batch, item_raw=raw[:, :t])
            q = F.normalize(self.query(self.out_drop(states[:, :-1])), dim=-1)
            e = F.normalize(raw, dim=-1)
            pos = (q * e[:, 1:t]).sum(-1, keepdim=True)  # [B, T-1, 1]
            neg = q @ e[:, t:].transpose(1, 2)  # [B, T-1, K]
            logits = self.scale(torch.cat([pos, neg], dim=-1))
            if self.prior is not None:
                keys = self.prior.keys(self.item_feats[idx])
                pq = self.prior.queries(self.item_feats, items, mask)[:, :-1]
                logits = self.prior.mix(self.prior.step_logits(pq, keys[:, 1:t], keys[:, t:]),
                                        logits)
            if self.cfg.neg_sampling == "pop" and len(self.log_q):
                logits = logits - torch.cat(
                    [self.log_q[targets].unsqueeze(-1),
                     self.log_q[negs].unsqueeze(1).expand(-1, t - 1, -1)], dim=-1)
            hit = negs.unsqueeze(1) == targets.unsqueeze(-1)  # accidental hits
            logits = torch.cat([logits[..., :1], logits[..., 1:].masked_fill(hit, -1e9)], -1)
            rec = torch.logsumexp(logits, -1) - logits[..., 0]
        else:
            all_raw = self._all_items_raw()  # every catalog item once per batch
            states = self.encode(batch, item_raw=all_raw[items])
            sel = step.bool()  # full softmax only where there is a next event
            # the learned scale multiplies the queries, not the [S, N] logits: the same
            # numbers, an [S, H] product instead of an [S, N] one
            q = self._scaled_queries(self.out_drop(states[:, :-1])[sel])
            logits = q @ self._output_items(all_raw).T  # [S, N]
            if self.prior is not None:
                pq = self.prior.queries(self.item_feats, items, mask)[:, :-1][sel]
                logits = self.prior.mix(self.prior.logits(pq, self.prior.keys(self.item_feats)),
                                        logits)
            rec = torch.zeros(b, t - 1, dtype=logits.dtype)
            rec[sel] = F.cross_entropy(logits, targets[sel], reduction="none")
        denom = max(t - 1, 1)
        loss = (rec * step).sum(1) / denom
        stats = {"rec_loss": float((rec * step).detach().sum() / step.sum().clamp(min=1))}
        if self.cfg.n_topics and self.cfg.topic_weight > 0 and len(self.topic_dist):
            target = self.topic_dist[targets]  # [B, T-1, n_topics]
            tstep = step * (target.sum(-1) > 0)
            logp = F.log_softmax(self.topic_head(states[:, :-1]), dim=-1)
            tl = -(target * logp).sum(-1)
            loss = loss + self.cfg.topic_weight * (tl * tstep).sum(1) / denom
            stats["topic_loss"] = float((tl * tstep).detach().sum() / tstep.sum().clamp(min=1))
        stats["steps"] = float(step.sum())
        return loss, stats

    def loss(self, batch: dict[str, torch.Tensor], dedupe_items: bool = False
             ) -> tuple[torch.Tensor, dict]:
        """Mean of `example_losses` over the batch (what Opacus' loss_reduction="mean" expects)."""
        per_example, stats = self.example_losses(batch, dedupe_items)
        return per_example.mean(), stats

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Same as `loss`: Opacus' GradSampleModule forwards only calls, not other methods,
        so DP training calls `private_model(batch)`."""
        return self.loss(batch)


def build_model(cfg: ModelConfig) -> InterestModel:
    return InterestModel(cfg)


# -- weights as the federated wire format ---------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside an Opacus GradSampleModule (or the model itself)."""
    return getattr(model, "_module", model)


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # sorted by name: nn.GRU and HoistedGRU order their keys differently, names are the same
    return sorted(_unwrap(model).state_dict().items())


def weight_schema(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """[(name, shape, dtype)] of every array `get_weights` returns, in that order."""
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in
            _named_tensors(model)]


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's weights as numpy arrays (copies), ordered as `weight_schema`."""
    return [v.detach().cpu().numpy().copy() for _, v in _named_tensors(model)]


def set_weights(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Loads arrays ordered as `weight_schema`; shapes are checked, nothing is broadcast."""
    schema = weight_schema(model)
    if len(arrays) != len(schema):
        raise ValueError(f"expected {len(schema)} arrays, got {len(arrays)}")
    state = {}
    for (name, shape, _), a in zip(schema, arrays):
        a = np.asarray(a)
        if tuple(a.shape) != shape:
            raise ValueError(f"weight {name}: expected shape {shape}, got {tuple(a.shape)}")
        state[name] = torch.as_tensor(a.copy())
    _unwrap(model).load_state_dict(state, strict=True)


def n_parameters(model: nn.Module) -> int:
    return sum(int(np.prod(s)) for _, s, _ in weight_schema(model))


def save_checkpoint(model: InterestModel, path: str | Path) -> None:
    """Config + state_dict (no catalog tensors) in one torch file."""
    m = _unwrap(model)
    torch.save({"config": m.cfg.to_dict(), "state_dict": m.state_dict()}, str(path))


def load_checkpoint(path: str | Path) -> InterestModel:
    blob = torch.load(str(path), map_location="cpu", weights_only=True)
    model = build_model(ModelConfig.from_dict(blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model


def config_json(cfg: ModelConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)
