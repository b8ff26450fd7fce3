"""On-device SDK: encrypted store, local embedding, DP training, local scoring, Flower ClientApp.

What an app imports:

    from fedinterest.client import Device, NotReadyError

The names below load on first use (PEP 562), so importing a submodule such as
`fedinterest.client.store` does not pull in torch through `device.py`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .device import Device, Explanation, NotReadyError, Recommendation
    from .model_install import ModelCatalogMismatchError
    from .store import EventValidationError, StoreError

# public name -> submodule that defines it
_EXPORTS = {
    "Device": "device",
    "Recommendation": "device",
    "Explanation": "device",
    "NotReadyError": "device",
    "ModelCatalogMismatchError": "model_install",
    "EventValidationError": "store",
    "StoreError": "store",
}
__all__ = ["Device", "EventValidationError", "Explanation", "ModelCatalogMismatchError",
           "NotReadyError", "Recommendation", "StoreError"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedinterest.client' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
