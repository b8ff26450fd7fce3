"""Which code produced a number: library versions and, in a git checkout, the commit.

Every published number must be reproducible; a metrics file that does not name its commit
had to be matched to `git log` by run start times (docs/RESULTS.md, issue 3). One function
serves results.json, metrics.json and audit.json so they name the same things.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

_SOURCE = Path(__file__).resolve().parent
DISTRIBUTIONS = ("fedinterest", "torch", "opacus", "flwr", "dp-accounting", "numpy", "scipy",
                 "cryptography", "transformers")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=_SOURCE, capture_output=True, text=True,
                              timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Python and library versions, plus `fedinterest_commit` and `fedinterest_dirty`
    (uncommitted changes to tracked files) read from the checkout this module lives in
    (editable installs); an installed wheel has no checkout, and that is said (None) rather
    than guessed."""
    out: dict = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    out["fedinterest_commit"] = (commit.strip() or None) if commit else None
    out["fedinterest_dirty"] = bool(status.strip()) if status is not None else None
    return out
