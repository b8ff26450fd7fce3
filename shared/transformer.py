"""The causal Transformer encoder of `InterestModel` (shared/model.py): SASRec's design,
built from nn.Linear layers so that Opacus computes per-sample gradients.

Two block layouts share one set of parameters (the same state_dict keys): pre-LN with a final
LayerNorm (the default, what the federated model uses) and post-LN as SASRec/BERT (RecBole's
SASRec). Learned positions are counted from the window start; where they join the input is
`ModelConfig.positions`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import ModelConfig


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention from nn.Linear layers (Opacus computes per-sample grads)."""

    def __init__(self, hidden: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.n_heads, h // self.n_heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(b, t, h))


class Block(nn.Module):
    """Transformer block: pre-LN (LayerNorm before each sublayer) or post-LN (after each
    residual sum, as SASRec/BERT); the same parameters either way."""

    def __init__(self, hidden: int, n_heads: int, dropout: float, inner: int = 0,
                 post_ln: bool = False):
        super().__init__()
        inner = inner or 2 * hidden
        self.post_ln = post_ln
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, n_heads, dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:
            x = self.ln1(x + self.drop(self.attn(x)))
            return self.ln2(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class TransformerEncoder(nn.Module):
    """SASRec-style: learned positions counted from the window start, causal mask, blocks
    (pre-LN + a final LayerNorm by default, or post-LN). With cfg.positions "before_norm"
    the model adds `position_vectors` to its input before the input LayerNorm and `forward`
    adds none."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pos = nn.Embedding(max(cfg.segment_len, cfg.context_len), cfg.hidden)
        self.pos_after_norm = cfg.positions == "after_norm"
        if not self.pos_after_norm:
            nn.init.normal_(self.pos.weight, std=0.02)  # SASRec: a small offset of the item
        post = cfg.block == "post_ln"
        self.blocks = nn.ModuleList(
            Block(cfg.hidden, cfg.n_heads, cfg.dropout, cfg.ffn_inner, post)
            for _ in range(cfg.n_layers))
        self.ln = nn.Identity() if post else nn.LayerNorm(cfg.hidden)
        if cfg.init_std > 0:
            for m in self.blocks.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=cfg.init_std)
                    nn.init.zeros_(m.bias)

    def position_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H] learned vectors of positions 0..T-1 for an input [B, T, H]."""
        b, t, _ = x.shape
        if t > self.pos.num_embeddings:
            raise ValueError(f"transformer reads at most {self.pos.num_embeddings} events "
                             f"(max(segment_len, context_len)); got a window of {t}")
        # batch-first for Opacus; contiguous (repeat, not expand): Opacus' ghost clipping
        # calls .view on the embedding's input
        return self.pos(torch.arange(t, device=x.device).repeat(b, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_after_norm:
            x = x + self.position_vectors(x)
        for block in self.blocks:
            x = block(x)
        return self.ln(x)
