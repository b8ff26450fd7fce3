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


def federated_model_config(cfg: RunConfig, catalog: PublishedCatalog, dp: bool = False) -> ModelConfig:
    """On-device DP-SGD (dp = event / both) builds the model without the text prior: Opacus
    computes per-sample gradients through hooked module calls, and the prior's parameters
    are used outside its module's forward (shared/text_prior.py)."""
    vocab = catalog_inputs(catalog)[2]
    prior = 0 if cfg.event_dp else cfg.text_prior
    dim = catalog.vectors.shape[1]
    return ModelConfig(
        kind="gru" if cfg.model == "gru-text" else "transformer", item_repr="text",
        n_items=len(catalog), item_feat_dim=dim + POP_DIM, text_dim=dim, hidden=cfg.hidden,
        n_topics=len(vocab), segment_len=cfg.segment_len, context_len=cfg.segment_len,
        n_negatives=cfg.n_negatives, neg_sampling="pop", dp=dp, text_prior=prior,
        prior_rank=cfg.prior_rank)


def negative_probs(catalog: PublishedCatalog) -> np.ndarray:
    """Sampling weights of training negatives: the published DP popularity counts + 1 (noised
    counts can be negative, so clipped at 0 first), as centralized training samples them
    (simulations/central.py). With no counts published yet every item weighs 1: uniform
    sampling, and the model's logQ correction is then a constant that changes no ranking."""
    return np.maximum(np.asarray(catalog.popularity, np.float64), 0.0) + 1.0


# catalog object -> its inputs. A device opens its store (and set_catalog runs) on every
# message, and the catalog loader hands every device of a process the same object; the topic
# matrix alone cost 32 ms per open on ml-latest-small (26 s of a 93 s in-process round).
_INPUTS: dict[int, tuple[PublishedCatalog, tuple[np.ndarray, np.ndarray, list[str]]]] = {}


def catalog_inputs(catalog: PublishedCatalog) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(item feature matrix, topic matrix, topic vocabulary) for the model's catalog buffers.
    Computed once per catalog object; callers must not modify the arrays."""
    hit = _INPUTS.get(id(catalog))
    if hit is not None and hit[0] is catalog:
        return hit[1]
    out = _catalog_inputs(catalog)
    if len(_INPUTS) >= 4:
        _INPUTS.pop(next(iter(_INPUTS)))
    _INPUTS[id(catalog)] = (catalog, out)
    return out


def _catalog_inputs(catalog: PublishedCatalog) -> tuple[np.ndarray, np.ndarray, list[str]]:
    counts = catalog.popularity if np.any(catalog.popularity) else None
    feats = item_feature_matrix(catalog.vectors, counts)
    topics, vocab = topic_matrix(catalog)
    return feats, topics, vocab


def wire_schema(cfg: RunConfig, catalog: PublishedCatalog) -> WireSchema:
    import torch

    torch.manual_seed(0)
    model = build_model(federated_model_config(cfg, catalog))
    return WireSchema.from_named_arrays(
        [(n, np.zeros(s, dtype=d)) for n, s, d in weight_schema(model)])
