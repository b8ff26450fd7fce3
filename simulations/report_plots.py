"""The plots of report.html, each a dict for the templates' `figure` macro (or a sentence
saying why there is none). Figure + FigureCanvasAgg rather than pyplot: no global backend or
figure registry, so this is safe in a long-running process and leaks nothing between reports.
"""

from __future__ import annotations

import numpy as np
from fedinterest.shared.optional import require

from .html import plot

MAX_TOPICS_PLOTTED = 8  # the rest is drawn as one "other" band so the legend stays readable
OTHER_COLOUR = "#b0b0b0"


def figure(width: float, height: float, ncols: int = 1):
    require("matplotlib", extra="simulation", purpose="the report's plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and events are counts
    return fig, axes


def plain(text) -> str:
    """Data text for a matplotlib label: '$' would start mathtext (and fail on bad TeX)."""
    return str(text).replace("$", r"\$")


def series(rounds: list[dict], get) -> tuple[list, list]:
    xs, ys = [], []
    for r in rounds:
        v = get(r)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            xs.append(r["round"])
            ys.append(v)
    return xs, ys


def quality(rounds: list[dict], protocol: str, references: list[dict]) -> dict | str:
    """Validation and test NDCG@10 / HR@10 per round, each reference's test value dashed."""
    fig, axes = figure(10, 3.6, 2)
    drawn = False
    for ax, metric, name in ((axes[0], "ndcg@10", "NDCG@10"), (axes[1], "hr@10", "HR@10")):
        for split, style in (("val", "o--"), ("test", "s-")):
            xs, ys = series(rounds, lambda r, k=f"{split}-{metric}": (r.get("metrics")
                                                                       or {}).get(k))
            if xs:
                ax.plot(xs, ys, style, label=f"{split} (this run)")
                drawn = True
        for i, ref in enumerate(references):
            v = ref.get(f"test-{metric}")
            if isinstance(v, (int, float)):
                ax.axhline(v, color=f"C{i + 2}", ls=":", label=f"test, {plain(ref['name'])}")
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not drawn:
        return "No round was evaluated, so there is no quality plot."
    return plot(fig, "validation and test NDCG@10 and HR@10 per round, with reference lines",
                f"Recommendation quality per round ({protocol}). Dotted: the references' test "
                "values (table above).")


def participation(rows: list[dict]) -> dict | str:
    """Per round: accepted, declined and rejected replies of the sampled devices."""
    if not rows:
        return "No round finished, so there is no participation plot."
    fig, (ax,) = figure(7, 3.2)
    x = np.array([r["round"] for r in rows])
    bottom = np.zeros(len(rows))
    for key, label, colour in (("accepted", "accepted", "#2e7d32"),
                               ("declined", "declined (device's choice)", "#f9a825"),
                               ("rejected", "rejected by the server", "#c62828")):
        h = np.array([r[key] for r in rows], float)
        ax.bar(x, h, bottom=bottom, color=colour, label=label, width=.8)
        bottom += h
    ax.plot(x, [r["sampled"] for r in rows], "k_", ms=18, label="sampled")
    ax.set_xlabel("round")
    ax.set_ylabel("devices")
    ax.legend(fontsize=8, loc="lower right")
    return plot(fig, "participation per round",
                "Sampled devices per round: accepted replies, devices that declined (budget "
                "spent or too few events) and replies the server rejected.")


def privacy(rounds: list[dict], priv: dict, cfg: dict) -> dict | str:
    ev = priv.get("event_level") or {}
    fig, (ax,) = figure(7, 3.4)
    drawn, top = False, 0.0
    for get, label, colour in ((lambda r: r.get("device_epsilon_max"),
                                "event-level ε (max over devices)", "C0"),
                               (lambda r: r.get("user_epsilon"), "user-level ε", "C1")):
        xs, ys = series(rounds, get)
        if xs:
            ax.plot(xs, ys, "o-", color=colour, label=label)
            drawn, top = True, max([top, *ys])
    if ev.get("enabled") and isinstance(ev.get("budget"), (int, float)):
        ax.axhline(ev["budget"], color="C0", ls=":", label=f"device budget {ev['budget']:g}")
        top = max(top, ev["budget"])
    if priv.get("user_level") and isinstance(cfg.get("user_epsilon"), (int, float)):
        ax.axhline(cfg["user_epsilon"], color="C1", ls=":",
                   label=f"user-level budget {cfg['user_epsilon']:g}")
        top = max(top, cfg["user_epsilon"])
    if not drawn:
        return "No privacy accounting in this run (DP off), so there is no privacy plot."
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (cumulative)")
    ax.set_ylim(0, max(top, 1e-9) * 1.15)  # budget lines stay inside the frame
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    return plot(fig, "privacy spent per round",
                "Cumulative privacy loss per round, with the budgets dotted. The two ε protect "
                "different units; see the privacy section.")


def epsilon_histogram(priv: dict) -> dict | None:
    """How the event-level ε spent is spread over the devices that reported one."""
    ev = priv.get("event_level") or {}
    eps = [float(v) for v in (ev.get("per_device_epsilon") or {}).values()
           if isinstance(v, (int, float)) and np.isfinite(v)]
    if not ev.get("enabled") or not eps:
        return None
    fig, (ax,) = figure(7, 3.2)
    ax.hist(eps, bins=min(30, max(5, len(eps) // 3)), color="C0", alpha=.8)
    if isinstance(ev.get("budget"), (int, float)):
        ax.axvline(ev["budget"], color="C3", ls=":", label=f"budget {ev['budget']:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"event-level ε spent (δ = {ev.get('delta')})")
    ax.set_ylabel("devices")
    return plot(fig, "per-device event-level epsilon histogram",
                f"Event-level ε spent by each of the {len(eps)} devices that reported one "
                "(unit: one training segment; composed over every round the device joined).")


def bytes_per_client(rounds: list[dict]) -> dict | None:
    down = series(rounds, lambda r: r.get("bytes_down_per_client"))
    up = series(rounds, lambda r: r.get("bytes_up_per_client"))
    if not (down[0] or up[0]):
        return None
    top = max(down[1] + up[1] + [1])
    div, unit = next((d, u) for d, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                     if top >= d)
    fig, (ax,) = figure(7, 3.4)
    for (xs, ys), label, style in ((down, "down (global model)", "o-"),
                                   (up, "up (mean accepted update)", "s--")):
        if xs:
            ax.plot(xs, np.asarray(ys) / div, style, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{unit} per client")
    ax.set_ylim(0, top / div * 1.15)
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    return plot(fig, "bytes per client per round",
                "Model arrays sent to and received from each sampled client.")


def topic_colours(vocab: list[str]) -> dict[str, str]:
    """One colour per topic of the catalog's vocabulary, the same for every user."""
    require("matplotlib", extra="simulation", purpose="the report's plots")
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab20"]
    return {t: to_hex(cmap(i % cmap.N)) for i, t in enumerate(sorted(vocab))}


def timeline(title: str, data: dict, colours: dict[str, str]) -> dict:
    rows = data["timeline"]
    vocab = list(data["topics"])
    mat = np.array([[r["topics"].get(t, 0.0) for t in vocab] for r in rows], np.float64)
    order = np.argsort(-mat.sum(0), kind="stable")
    keep = [k for k in order[:MAX_TOPICS_PLOTTED] if mat[:, k].sum() > 0]
    bands = [mat[:, k] for k in keep]
    labels = [plain(vocab[k]) for k in keep]
    band_colours = [colours.get(vocab[k], OTHER_COLOUR) for k in keep]
    rest = mat[:, order[MAX_TOPICS_PLOTTED:]].sum(1) if len(order) > MAX_TOPICS_PLOTTED else None
    if rest is not None and rest.sum() > 0:
        bands.append(rest)
        labels.append("other")
        band_colours.append(OTHER_COLOUR)
    fig, (ax,) = figure(9, 3.2)
    x = np.arange(1, len(rows) + 1)
    if bands:
        ax.stackplot(x, np.vstack(bands), labels=labels, colors=band_colours)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_xlim(1, max(2, len(rows)))
    ax.set_ylim(0, 1)
    ax.set_xlabel("event number (chronological)")
    ax.set_ylabel("topic share")
    ax.set_title(plain(f"{title}: {len(rows)} events"))
    return plot(fig, f"interest timeline of {title}",
                f"Topic shares over the last 10 events of {title}.")
