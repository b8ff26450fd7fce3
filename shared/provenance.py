"""Which code produced a number: the package version and, in a git checkout, the commit.

Every published number must be reproducible; a metrics file that does not name its commit
had to be matched to `git log` by run start times (docs/RESULTS.md, issue 3).
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

_SOURCE = Path(__file__).resolve().parent


def code_version() -> dict:
    """{"fedinterest": version, "git_commit": sha or None, "git_dirty": bool or None}.

    The commit is read from the checkout this module lives in (editable installs); an
    installed wheel has none, and that is said rather than guessed."""
    try:
        version = metadata.version("fedinterest")
    except metadata.PackageNotFoundError:
        version = None
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_SOURCE, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=_SOURCE, capture_output=True, text=True, timeout=10,
                                check=True).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"fedinterest": version, "git_commit": commit, "git_dirty": dirty}
