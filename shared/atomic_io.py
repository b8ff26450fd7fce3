"""Crash-safe file writes and a JSON reader with errors that name the file.

Every file the project writes for others to read (checkpoints, catalogs, run records,
reports, exports) goes through `write_bytes`: the data lands in a temporary file in the
same directory, is fsync'ed, then `os.replace`s the target, so a reader (or a restart
after a crash) sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fedinterest.shared.errors import DataError


def write_bytes(path: str | Path, data: bytes, *, mode: int = 0o666) -> Path:
    """Atomically replaces `path` with `data`; returns the path.

    `mode` is the new file's permission (the umask still applies), e.g. 0o600 for a file
    holding private text. The temporary file is `<name>.tmp`: one a killed writer left behind
    is replaced by the next write of the same file, and a failed write removes its own."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # O_EXCL below: never write through a planted link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str, *, mode: int = 0o666) -> Path:
    """`write_bytes` for UTF-8 text."""
    return write_bytes(path, text.encode("utf-8"), mode=mode)


def write_json(path: str | Path, obj: Any, *, default: Callable[[Any], Any] | None = float,
               ensure_ascii: bool = True, mode: int = 0o666) -> Path:
    """Atomically writes `obj` as indented JSON (newline-terminated); `default` converts
    values json cannot (numpy scalars by default)."""
    text = json.dumps(obj, indent=2, default=default, ensure_ascii=ensure_ascii) + "\n"
    return write_text(path, text, mode=mode)


def jsonable(value: Any) -> Any:
    """A `default` for json.dumps that writes numpy scalars and arrays as numbers and lists
    and paths as strings, and refuses anything else."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def read_json(path: str | Path) -> Any:
    """Reads a JSON file; a missing or malformed file raises DataError naming it (and the
    line of a syntax error)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(str(path), None, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(path), None, None, f"cannot read it ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(str(path), e.lineno, None, f"not valid JSON ({e.msg})") from None


def fsync_dir(directory: Path) -> None:
    """Makes the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
