"""The speed-up benchmark's pieces: the rate counts only train-only rounds, and a commit's
tree is importable as `fedinterest` from the shim `extract` builds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedinterest.simulations.bench.client_round import rate_of
from fedinterest.simulations.bench.versus import extract

REPO = Path(__file__).resolve().parents[3]


def test_rate_leaves_the_evaluated_round_out():
    rounds = [{"round": 2, "accepted": 100, "evaluated": False, "wall_s": 10.0, "cpu_s": 5.0},
              {"round": 3, "accepted": 100, "evaluated": False, "wall_s": 30.0, "cpu_s": 15.0},
              {"round": 4, "accepted": 100, "evaluated": True, "wall_s": 90.0, "cpu_s": 60.0}]
    r = rate_of(rounds)
    assert r["accepted"] == 200 and r["rounds_timed"] == 2
    assert r["client_rounds_per_cpu_second"] == pytest.approx(10.0)
    assert r["client_rounds_per_second"] == pytest.approx(5.0)
    assert r["evaluated_round_cpu_seconds"] == 60.0
    only = rate_of(rounds[2:])  # every round evaluated: all of them count
    assert only["rounds_timed"] == 1 and only["client_rounds_per_cpu_second"] == pytest.approx(
        100 / 60)


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git work tree")
def test_extract_makes_a_commits_tree_importable(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], check=True,
                           capture_output=True, text=True).stdout.split()[0]
    pythonpath = extract(first, tmp_path / "tree")
    found = subprocess.run(
        [sys.executable, "-c", "import fedinterest.shared as s; print(s.__path__[0])"],
        env={**os.environ, "PYTHONPATH": pythonpath}, check=True, capture_output=True,
        text=True).stdout.strip()
    assert Path(found).resolve() == (tmp_path / "tree" / "tree" / "shared").resolve()
