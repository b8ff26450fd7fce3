"""Process-level caches of the device SDK, shared by every `Device` in the process: the
built inference model and the catalog through its item tower, per (catalog version, model
config, weights). A simulation worker evaluates hundreds of devices per round with one
global model; a phone keeps its model between calls. Both hold only public data (the global
model, the public catalog) and keep the last two entries, so a long run holds no more."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch

KEEP = 2
_MODELS: dict[tuple, torch.nn.Module] = {}
_EMBEDDINGS: dict[tuple, torch.Tensor] = {}


def weights_digest(weights: list[np.ndarray]) -> str:
    h = hashlib.sha1()
    for w in weights:
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def _keep(cache: dict, key: tuple, value):
    while len(cache) >= KEEP:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def inference_model(key: tuple, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The model built for `key` in this process, or `build()` now. Callers only read it
    (evaluation mode, no training): one object serves every device of the process."""
    hit = _MODELS.get(key)
    return hit if hit is not None else _keep(_MODELS, key, build())


def item_embeddings(key: tuple, model: torch.nn.Module) -> torch.Tensor:
    """`model.item_embeddings()` of the model cached under `key`, computed once."""
    hit = _EMBEDDINGS.get(key)
    if hit is None:
        with torch.inference_mode():
            hit = _keep(_EMBEDDINGS, key, model.item_embeddings())
    return hit
