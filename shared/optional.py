"""Imports that belong to an optional extra, failing with a message that names the extra.

The core install is the device SDK; Flower, Ray, plotting and the audit's statistics come
with extras (pyproject.toml). `require("ray", extra="simulation")` returns the module, or
raises `MissingExtraError` saying which `pip install` brings it, instead of a bare
`ModuleNotFoundError: No module named 'ray'` deep inside a command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import FedinterestError

# what each extra is for, to say in the message, and the import names it brings
EXTRAS = {
    "flower": "the Flower ClientApp / ServerApp",
    "simulation": "simulations, experiments, benchmarks, reports and plots",
    "audit": "the privacy audit",
}
EXTRA_MODULES = {
    "flower": ("flwr",),
    "simulation": ("flwr", "ray", "matplotlib", "tqdm", "jinja2"),
    "audit": ("flwr", "scipy", "matplotlib", "jinja2"),
}


class MissingExtraError(FedinterestError, ImportError):
    """A module of an optional extra is not installed; the message names the extra."""


def require(*modules: str, extra: str, purpose: str | None = None) -> ModuleType:
    """Import `modules` in turn and return the last one.

    Args:
        modules: import names, e.g. "ray" or "flwr.simulation" (none: all of the extra's).
        extra: the pyproject extra that installs them (a key of EXTRAS).
        purpose: what needs them, for the message (default: what the extra is for).

    Raises:
        MissingExtraError: one of them (or a package it needs) is not installed.
    """
    if not modules:
        modules = EXTRA_MODULES.get(extra, ())
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; expected one of {', '.join(EXTRAS)}")
    module = None
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise missing_extra(e, extra, purpose) from None
    return module


def missing_extra(error: ModuleNotFoundError, extra: str,
                  purpose: str | None = None) -> MissingExtraError:
    """The error to raise for `error` (a failed import of a module of `extra`)."""
    return MissingExtraError(
        f"{purpose or EXTRAS[extra]} needs the '{extra}' extra (module '{error.name}' is not "
        f"installed): pip install 'fedinterest[{extra}]'")
