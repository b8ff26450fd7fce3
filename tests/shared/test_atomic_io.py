"""shared/atomic_io.py: a write replaces the file whole or not at all; bad JSON names its file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from fedinterest.shared import atomic_io
from fedinterest.shared.errors import DataError


def test_write_json_replaces_whole_and_converts_numpy(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    atomic_io.write_json(path, {"x": np.float32(0.5), "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"x": 0.5, "n": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"kept": true}')
    with pytest.raises(TypeError):
        atomic_io.write_json(path, {"bad": object()}, default=atomic_io.jsonable)
    with pytest.raises(OSError):
        atomic_io.write_text(tmp_path / "missing-dir" / "r.txt", "x")
    assert json.loads(path.read_text()) == {"kept": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_mode_makes_a_private_file(tmp_path):
    path = atomic_io.write_text(tmp_path / "export.json", "secret", mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_jsonable_refuses_what_it_does_not_know(tmp_path):
    assert atomic_io.jsonable(np.arange(3)) == [0, 1, 2]
    assert atomic_io.jsonable(Path("a/b")) == "a/b"
    with pytest.raises(TypeError, match="set"):
        atomic_io.jsonable({1})


def test_read_json_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(DataError) as err:
        atomic_io.read_json(bad)
    assert str(bad) in str(err.value) and "line 3" in str(err.value)
    with pytest.raises(DataError, match="file not found"):
        atomic_io.read_json(tmp_path / "absent.json")
    atomic_io.write_json(tmp_path / "ok.json", [1, 2])
    assert atomic_io.read_json(tmp_path / "ok.json") == [1, 2]


def test_a_temp_file_a_killed_writer_left_is_replaced(tmp_path):
    path = tmp_path / "round-0003.json"
    (tmp_path / "round-0003.json.tmp").write_text('{"round": 3, "n_wei')  # torn by a kill
    atomic_io.write_json(path, {"round": 3})
    assert atomic_io.read_json(path) == {"round": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0003.json"]
