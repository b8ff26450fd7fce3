"""The federated model both sides build from the run config and the published catalog.

Server and devices must construct the identical architecture (the wire schema is derived from
it), so this is the one place that maps (RunConfig, catalog) -> ModelConfig and item inputs.
"""

from __future__ import annotations

import numpy as np

from .config import RunConfig
from .item_features import POP_DIM, item_feature_matrix, topic_matrix
from .model import ModelConfig, build_model, weight_schema
from .published_catalog import PublishedCatalog
from .wire import WireSchema


def model_config(cfg: RunConfig, catalog: PublishedCatalog, dp: bool = False) -> ModelConfig:
    _, vocab = topic_matrix(catalog)
    dim = catalog.vectors.shape[1]
    return ModelConfig(
        kind="gru" if cfg.model == "gru-text" else "transformer", item_repr="text",
        n_items=len(catalog), item_feat_dim=dim + POP_DIM, text_dim=dim, hidden=cfg.hidden,
        n_topics=len(vocab), segment_len=cfg.segment_len, context_len=cfg.segment_len,
        n_negatives=cfg.n_negatives, dp=dp)


def catalog_inputs(catalog: PublishedCatalog) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(item feature matrix, topic matrix, topic vocabulary) for the model's catalog buffers."""
    counts = catalog.popularity if np.any(catalog.popularity) else None
    feats = item_feature_matrix(catalog.vectors, counts)
    topics, vocab = topic_matrix(catalog)
    return feats, topics, vocab


def wire_schema(cfg: RunConfig, catalog: PublishedCatalog) -> WireSchema:
    import torch

    torch.manual_seed(0)
    model = build_model(model_config(cfg, catalog))
    return WireSchema.from_named_arrays(
        [(n, np.zeros(s, dtype=d)) for n, s, d in weight_schema(model)])
