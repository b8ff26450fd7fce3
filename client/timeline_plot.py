"""The interest timeline as a PNG (`Device.interests(png=...)`); matplotlib is the
'simulation' extra, not part of the device core."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fedinterest.shared.optional import require


def plot_timeline(data: dict, png: str | Path) -> None:
    rows = data["timeline"]
    vocab = data["topics"]
    if not rows:
        from .device import NotReadyError

        raise NotReadyError("no events: nothing to plot")
    require("matplotlib", extra="simulation", purpose="Device.interests(png=...)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mat = np.array([[r["topics"].get(t, 0.0) for t in vocab] for r in rows])
    keep = np.argsort(-mat.sum(0))[:8]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.stackplot(np.arange(len(rows)), mat[:, keep].T, labels=[vocab[k] for k in keep])
    ax.set_xlabel("event")
    ax.set_ylabel("share of recent events")
    ax.set_title("interest timeline")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
