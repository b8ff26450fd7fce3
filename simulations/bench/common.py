"""The benchmark harness: arms timed side by side, results as JSON and a row in
docs/BENCHMARKS.md.

Why side by side: the machine is shared, so a ratio is only meaningful when both arms see the
same noise. `alternate` runs the arms in turn (A B A B ...) and every benchmark reports the
median of its repetitions and the ratio of the medians, never a number against a remembered
baseline. Each result records the load average when it started and ended and the torch thread
count, so a reader can judge how noisy the machine was.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedinterest.shared import atomic_io

DEFAULT_OUT_DIR = Path("runs/bench")
DOC_START = "<!-- bench:results:start -->"
DOC_END = "<!-- bench:results:end -->"
DOC_HEADER = ("| benchmark | measured | result (median) | ratio (target) | load avg (1 min) "
              "start -> end | when | command |\n| --- | --- | --- | --- | --- | --- | --- |")


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared: say how busy it was)."""
    return [round(x, 2) for x in os.getloadavg()]


def alternate(arms: Sequence[tuple[str, Callable[[], float | None]]], reps: int,
              warmup: int = 0, cpu: dict[str, list[float]] | None = None
              ) -> dict[str, list[float]]:
    """Seconds per repetition of each arm, the arms run in turn (A B A B ...) so that load
    changes on the machine hit every arm alike. An arm returns its own elapsed seconds (to
    leave its setup out) or None to be timed as a whole. `warmup` rounds are run and dropped.
    `cpu`, when given, receives each call's process CPU seconds (all threads of this
    process): unlike wall time it does not grow when other users' processes preempt ours.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    times: dict[str, list[float]] = {name: [] for name, _ in arms}
    if cpu is not None:
        cpu.update({name: [] for name, _ in arms})
    for rep in range(warmup + reps):
        for name, fn in arms:
            start, start_cpu = time.perf_counter(), time.process_time()
            got = fn()
            elapsed = time.perf_counter() - start if got is None else float(got)
            if rep >= warmup:
                times[name].append(elapsed)
                if cpu is not None:
                    cpu[name].append(time.process_time() - start_cpu)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation (numpy's default)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, float), q))


@dataclass
class BenchResult:
    """What one benchmark found. `summary`, `ratio` and `target` make its row in the doc."""

    name: str
    measured: str  # one line: what was timed, on what data
    command: str  # the exact command that reproduces it
    summary: str  # the headline numbers, e.g. "ours 9.1 s, plain 12.3 s (n=3)"
    ratio: str  # e.g. "1.35 (>= 1.3: met)"
    data: dict = field(default_factory=dict)  # everything else, for the JSON
    load_start: list[float] = field(default_factory=load_average)
    load_end: list[float] = field(default_factory=list)
    started: str = field(default_factory=lambda: _now())

    def finish(self) -> BenchResult:
        self.load_end = load_average()
        return self

    def to_dict(self) -> dict:
        return {"name": self.name, "measured": self.measured, "command": self.command,
                "summary": self.summary, "ratio": self.ratio, "started": self.started,
                "finished": _now(), "load_average_start": self.load_start,
                "load_average_end": self.load_end, "cpu_count": os.cpu_count(),
                "machine": environment(), **self.data}

    def doc_row(self) -> str:
        cells = [self.name, self.measured, self.summary, self.ratio,
                 f"{self.load_start[0]:.1f} -> {(self.load_end or self.load_start)[0]:.1f}",
                 self.started[:16].replace("T", " ") + " UTC", f"`{self.command}`"]
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cpu_count": os.cpu_count()}


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    """'1.42 (>= 1.3: met)' or '0.91 (>= 1.3: missed by 30%)'."""
    if higher_is_better:
        met = value >= target
        gap = (target - value) / target
        rel = ">="
    else:
        met = value <= target
        gap = (value - target) / target
        rel = "<="
    status = "met" if met else f"missed by {gap:.0%}"
    return f"{value:.3g} ({rel} {target:g}: {status})"


def write_result(result: BenchResult, out: str | Path | None) -> Path:
    """Writes the result to `out` (default runs/bench/<name>.json) atomically; returns the path."""
    path = Path(out) if out else DEFAULT_OUT_DIR / f"{result.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_io.write_json(path, result.to_dict(), default=atomic_io.jsonable)
    return path


def update_doc(doc: str | Path, result: BenchResult) -> Path:
    """Replaces this benchmark's row in the results table of `doc` (between the
    DOC_START/DOC_END markers), or adds it; creates the table (and the file) if missing.
    The rest of the document (the analysis) is left as written."""
    path = Path(doc)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if DOC_START not in text or DOC_END not in text:
        text = text.rstrip("\n") + f"\n\n{DOC_START}\n{DOC_HEADER}\n{DOC_END}\n"
    head, rest = text.split(DOC_START, 1)
    table, tail = rest.split(DOC_END, 1)
    rows = [r for r in table.strip("\n").splitlines() if r.startswith("|")][2:]
    key = re.compile(rf"^\|\s*{re.escape(result.name)}\s*\|")
    new_row = result.doc_row()
    for i, row in enumerate(rows):
        if key.match(row):
            rows[i] = new_row
            break
    else:
        rows.append(new_row)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join([DOC_HEADER, *rows])
    atomic_io.write_text(path, f"{head}{DOC_START}\n{body}\n{DOC_END}{tail}")
    return path


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"
