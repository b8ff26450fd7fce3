"""The run report: one self-contained HTML file beside results.json.

A researcher should be able to mail report.html to someone and have it read the same
anywhere: plots are PNGs inlined as data URIs, CSS is inline, nothing needs JavaScript or the
network. Every piece of text from the run (config values, dataset names, rejection reasons,
topic names) is HTML-escaped, because datasets and replies come from outside.
"""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime
from html import escape
from pathlib import Path

import numpy as np
from fedinterest.shared.atomic_io import write_text
from fedinterest.shared.errors import ConfigError, DataError, FedinterestError
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

REPORT_NAME = "report.html"
REQUIRED_KEYS = ("config", "dataset", "protocol", "rounds", "privacy")
MAX_TOPICS_PLOTTED = 8  # the rest is drawn as one "other" band so the legend stays readable

CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:.15em 1em}dl.kv dt{color:#555}
dl.kv dd{margin:0}
.protocol{background:#eef4fb;border-left:4px solid #4a7bb7;padding:.4em .8em}
.note{color:#555;font-size:.92em}img{max-width:100%;height:auto}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
"""


def write_report(run_dir: str | Path, n_sample_users: int = 3) -> Path:
    """Write `<run_dir>/report.html` from results.json (and, for the interest timelines, the
    run's device stores); returns its path."""
    if isinstance(n_sample_users, bool) or not isinstance(n_sample_users, int) \
            or n_sample_users < 0:
        raise ConfigError(f"n_sample_users: expected an int >= 0, got {n_sample_users!r}")
    run_dir = Path(run_dir)
    results = load_results(run_dir / "results.json")
    body = "\n".join([
        _header(results),
        _results_section(results),
        _plots_section(results),
        _privacy_section(results),
        _rejections_section(results),
        _timelines_section(run_dir, n_sample_users,
                           bool((results["privacy"].get("event_level") or {}).get("enabled"))),
    ])
    title = f"fedinterest run: {_dataset_name(results)}"
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"</body></html>\n")
    out = run_dir / REPORT_NAME
    write_text(out, page)  # a reader never sees a half-written report
    return out


def load_results(path: str | Path) -> dict:
    """results.json as written by `fedinterest simulate`, with its required keys checked."""
    path = Path(path)
    if not path.is_file():
        raise FedinterestError(f"{path}: results.json not found; pass the run directory of a "
                               "finished `fedinterest simulate`")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(str(path), e.lineno, None, f"not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(str(path), None, None, f"not UTF-8 text ({e.reason})") from None
    if not isinstance(results, dict):
        raise DataError(str(path), None, None, "expected a JSON object at the top level")
    for key in REQUIRED_KEYS:
        if key not in results:
            raise DataError(str(path), None, key, "missing; expected the results.json that "
                                                  "`fedinterest simulate` writes")
    if not isinstance(results["rounds"], list) or not all(
            isinstance(r, dict) and "round" in r for r in results["rounds"]):
        raise DataError(str(path), None, "rounds", "expected a list of objects with 'round'")
    for key in ("config", "privacy"):
        if not isinstance(results[key], dict):
            raise DataError(str(path), None, key, "expected a JSON object")
    return results


# -- formatting helpers ------------------------------------------------------------------------
def _fmt(v, digits: int = 4) -> str:
    """A number as plain text (escape it where it goes into HTML); '–' for values the run
    did not produce."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return "–" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    return "–" if not np.isfinite(v) else f"{v:.{digits}f}"


def _kv(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in pairs
                   if v is not None)
    return f'<dl class="kv">{rows}</dl>'


def _date(ts) -> str | None:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _seconds(s) -> str | None:
    if not isinstance(s, (int, float)):
        return None
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _dataset_name(results: dict) -> str:
    ds = results["dataset"]
    if isinstance(ds, dict):
        return str(ds.get("dataset") or ds.get("spec") or "unknown dataset")
    return str(ds)


def _plain(text: str) -> str:
    """Data text for a matplotlib label: '$' would start mathtext (and fail on bad TeX)."""
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    # Figure + FigureCanvasAgg rather than pyplot: no global backend or figure registry, so
    # this is safe inside a long-running process and leaks nothing between reports.
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and events are counts
    return fig, axes


def figure_html(fig: Figure, alt: str, caption: str) -> str:
    """The figure as an inline PNG: reports and audits are single self-contained files."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{escape(alt)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


# -- sections ------------------------------------------------------------------------------------
def _header(results: dict) -> str:
    cfg = results["config"]
    ds = results["dataset"] if isinstance(results["dataset"], dict) else {}
    t = results.get("timings") or {}
    start, end = _date(ds.get("time_start")), _date(ds.get("time_end"))
    dataset = [
        ("dataset", _dataset_name(results)),
        ("source", ds.get("spec")),
        ("users", ds.get("users")), ("items", ds.get("items")), ("events", ds.get("events")),
        ("events with private text", ds.get("events_with_text")),
        ("time span", f"{start} to {end}" if start and end else None),
    ]
    summary = [
        ("model", cfg.get("model")), ("strategy", cfg.get("strategy")),
        ("rounds (configured)", cfg.get("rounds")),
        ("clients per round", cfg.get("clients_per_round")),
        ("local epochs", cfg.get("local_epochs")), ("learning rate", cfg.get("lr")),
        ("differential privacy", cfg.get("dp")),
        ("secure aggregation", cfg.get("secagg")),
        ("seed", results.get("seed", cfg.get("seed"))),
    ]
    versions = results.get("versions") or {}
    run = [
        ("prepare (embed catalog, provision devices)", _seconds(t.get("prepare_seconds"))),
        ("federated rounds", _seconds(t.get("federated_seconds"))),
        ("total wall time", _seconds(t.get("total_seconds"))),
        ("peak memory (RSS of the runner)",
         f"{results['peak_rss_mb']:.0f} MB" if isinstance(results.get("peak_rss_mb"),
                                                           (int, float)) else None),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or None),
    ]
    full = json.dumps(cfg, indent=2, sort_keys=True)
    return (f"<h1>fedinterest run report: {escape(_dataset_name(results))}</h1>"
            f"<h2>Run</h2>{_kv(dataset)}<h3>Configuration</h3>{_kv(summary)}"
            f"<details><summary>full configuration</summary><pre>{escape(full)}</pre></details>"
            f"<h3>Resources</h3>{_kv(run)}")


COLUMNS = [  # (header, how to get the value from a round row, decimals)
    ("round", lambda r: r.get("round"), 0),
    ("accepted / sampled", None, 0),
    ("failed", lambda r: r.get("failed"), 0),
    ("train loss", lambda r: r.get("train_loss"), 4),
    ("val HR@10", lambda r: (r.get("metrics") or {}).get("val-hr@10"), 4),
    ("val NDCG@10", lambda r: (r.get("metrics") or {}).get("val-ndcg@10"), 4),
    ("test HR@10", lambda r: (r.get("metrics") or {}).get("test-hr@10"), 4),
    ("test NDCG@10", lambda r: (r.get("metrics") or {}).get("test-ndcg@10"), 4),
    ("ε event-level (max over devices)", lambda r: r.get("device_epsilon_max"), 2),
    ("ε user-level", lambda r: r.get("user_epsilon"), 2),
    ("seconds", lambda r: r.get("seconds"), 1),
]


def _results_section(results: dict) -> str:
    rounds = results["rounds"]
    head = "".join(f"<th>{escape(h)}</th>" for h, _, _ in COLUMNS)
    rows = []
    for r in rounds:
        cells = []
        for _, get, digits in COLUMNS:
            if get is None:
                cells.append(f"{_fmt(r.get('accepted'))} / {_fmt(r.get('sampled'))}")
            else:
                cells.append(_fmt(get(r), digits))
        rows.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    users = _last_metric(rounds, "test-users")
    final = results.get("final") or {}
    final_txt = ""
    if final:
        final_txt = ("<p>Last evaluation: " + ", ".join(
            f"{escape(k)} = {escape(_fmt(final[k]))}" for k in
            ("val-hr@10", "val-ndcg@10", "val-mrr@10", "test-hr@10", "test-ndcg@10",
             "test-mrr@10") if k in final) + "</p>")
    if rows:
        table = f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    else:
        table = "<p>No round finished.</p>"
        if results["privacy"].get("user_level"):
            table += ("<p>User-level DP was on, and the server does not start a round that "
                      "would take user-level ε past its budget "
                      f"({escape(_fmt(results['config'].get('user_epsilon'), 2))}): look for "
                      "'stopping before round' in the run's log.</p>")
    evaluated = (f" Evaluated on {users:.0f} devices' held-out events." if users else "")
    return (f"<h2>Results per round</h2>"
            f'<p class="protocol"><b>Evaluation protocol:</b> {escape(str(results["protocol"]))}'
            f".{escape(evaluated)} Validation is the second-to-last event, test the last; model "
            f"selection may use validation only.</p>{table}{final_txt}"
            f'<p class="note">A dash means the value was not produced that round (no '
            f"evaluation scheduled, or that kind of privacy accounting off).</p>")


def _last_metric(rounds: list[dict], key: str):
    for r in reversed(rounds):
        v = (r.get("metrics") or {}).get(key)
        if v is not None:
            return v
    return None


def _series(rounds: list[dict], get) -> tuple[list, list]:
    xs, ys = [], []
    for r in rounds:
        v = get(r)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            xs.append(r["round"])
            ys.append(v)
    return xs, ys


def _plots_section(results: dict) -> str:
    rounds = results["rounds"]
    parts = ["<h2>Plots</h2>"]
    # quality
    fig, (a_ndcg, a_hr) = _figure(10, 3.4, 2)
    drawn = False
    for ax, metric, name in ((a_ndcg, "ndcg@10", "NDCG@10"), (a_hr, "hr@10", "HR@10")):
        for split, style in (("val", "o--"), ("test", "s-")):
            xs, ys = _series(rounds, lambda r, k=f"{split}-{metric}": (r.get("metrics")
                                                                        or {}).get(k))
            if xs:
                ax.plot(xs, ys, style, label=split)
                drawn = True
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if drawn:
        parts.append(figure_html(fig, "validation and test NDCG@10 and HR@10 per round",
                          f"Recommendation quality per round ({results['protocol']})."))
    else:
        parts.append("<p>No round was evaluated, so there is no quality plot.</p>")
    # privacy
    priv = results["privacy"]
    cfg = results["config"]
    ev = priv.get("event_level") or {}
    fig, (ax,) = _figure(7, 3.4)
    drawn, top = False, 0.0
    for get, label, color in ((lambda r: r.get("device_epsilon_max"),
                               "event-level ε (max over devices)", "C0"),
                              (lambda r: r.get("user_epsilon"), "user-level ε", "C1")):
        xs, ys = _series(rounds, get)
        if xs:
            ax.plot(xs, ys, "o-", color=color, label=label)
            drawn, top = True, max([top, *ys])
    if ev.get("enabled") and isinstance(ev.get("budget"), (int, float)):
        ax.axhline(ev["budget"], color="C0", ls=":", label=f"device budget {ev['budget']:g}")
        top = max(top, ev["budget"])
    if priv.get("user_level") and isinstance(cfg.get("user_epsilon"), (int, float)):
        ax.axhline(cfg["user_epsilon"], color="C1", ls=":",
                   label=f"user-level budget {cfg['user_epsilon']:g}")
        top = max(top, cfg["user_epsilon"])
    if drawn:
        ax.set_xlabel("round")
        ax.set_ylabel("ε spent (cumulative)")
        ax.set_ylim(0, max(top, 1e-9) * 1.15)  # budget lines stay inside the frame
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
        parts.append(figure_html(fig, "privacy spent per round",
                          "Cumulative privacy loss per round, with the budgets dotted. The two "
                          "ε protect different units; see the privacy section."))
    else:
        parts.append("<p>No privacy accounting in this run (DP off), so there is no privacy "
                     "plot.</p>")
    # bytes
    down = _series(rounds, lambda r: r.get("bytes_down_per_client"))
    up = _series(rounds, lambda r: r.get("bytes_up_per_client"))
    if down[0] or up[0]:
        top = max(down[1] + up[1] + [1])
        div, unit = next((d, u) for d, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                         if top >= d)
        fig, (ax,) = _figure(7, 3.4)
        for (xs, ys), label, style in ((down, "down (global model)", "o-"),
                                       (up, "up (mean accepted update)", "s--")):
            if xs:
                ax.plot(xs, np.asarray(ys) / div, style, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{unit} per client")
        ax.set_ylim(0, top / div * 1.15)
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
        parts.append(figure_html(fig, "bytes per client per round",
                          "Model arrays sent to and received from each sampled client."))
    return "\n".join(parts)


def _privacy_section(results: dict) -> str:
    priv = results["privacy"]
    cfg = results["config"]
    paras = []
    ev = priv.get("event_level")
    if ev and ev.get("enabled"):
        eps = [float(v) for v in (ev.get("per_device_epsilon") or {}).values()
               if isinstance(v, (int, float))]
        budget = ev.get("budget")
        text = (f"Event-level differential privacy (on-device DP-SGD with Opacus). Unit of "
                f"privacy: {ev.get('unit', 'one training example')}. Each device clips every "
                f"example's gradient to L2 norm {_fmt(ev.get('clip'), 3)} and adds Gaussian "
                f"noise with multiplier {_fmt(ev.get('noise_multiplier'), 3)}; its accountant "
                f"composes every round the device joined, at δ = {ev.get('delta')}. Budget per "
                f"device: ε ≤ {_fmt(budget, 2)}.")
        if eps:
            a = np.asarray(eps)
            text += (f" Across the {len(a)} devices that reported an ε, the spent ε was: "
                     f"max {a.max():.2f}, p95 {np.percentile(a, 95):.2f}, median "
                     f"{np.median(a):.2f}.")
            if isinstance(budget, (int, float)) and a.max() > budget:
                text += f" {int((a > budget).sum())} devices exceeded the budget."
        else:
            text += " No device reported an ε (none trained)."
        paras.append(text)
    else:
        paras.append("Event-level differential privacy was off: local training added no "
                     "noise, and no event-level guarantee holds.")
    ul = priv.get("user_level")
    if ul:
        text = (f"User-level differential privacy (DP-FedAvg on the server). Unit of privacy: "
                f"{ul.get('unit')}; neighbouring datasets: {ul.get('relation')}. Each update is "
                f"clipped to L2 norm {_fmt(ul.get('clip'), 3)} and the aggregate gets Gaussian "
                f"noise with multiplier {_fmt(ul.get('noise_multiplier'), 3)}. Sampling: "
                f"{ul.get('sampling')}. Accountant: {ul.get('accountant')}. After the last "
                f"round ε = {_fmt(ul.get('epsilon'), 2)} at δ = {ul.get('delta')}")
        budget = cfg.get("user_epsilon")
        text += f" (budget {_fmt(budget, 2)})." if budget is not None else "."
        paras.append(text)
    else:
        paras.append("User-level differential privacy was off: a device's whole update is "
                     "not protected as a unit" + (" beyond secure aggregation, which hides "
                                                  "individual updates from the server."
                                                  if cfg.get("secagg") else "."))
    if cfg.get("secagg"):
        paras.append("Secure aggregation (SecAgg+) was on: the server saw only the sum of "
                     "masked updates.")
    pop = priv.get("popularity_release")
    if pop:
        paras.append(
            f"Popularity release: the item counts published with the catalog "
            f"({pop.get('mechanism')}) protect {pop.get('unit')}, with L2 sensitivity "
            f"{_fmt(pop.get('l2_sensitivity'), 2)} "
            f"and noise std {_fmt(pop.get('noise_std'), 2)} (multiplier "
            f"{_fmt(pop.get('noise_multiplier'), 2)}): ε = {_fmt(pop.get('epsilon'), 2)} at "
            f"δ = {pop.get('delta')}. This release is separate from training; a user's total "
            "privacy loss composes it with the guarantees above."
            + (f" It was made once by the run in {pop['reused_from']} and reused here, so "
               "its ε is spent once for both runs." if pop.get("reused_from") else ""))
    else:
        paras.append("No popularity counts were released (the catalog carries zeros).")
    return "<h2>Privacy</h2>" + "".join(f"<p>{escape(p)}</p>" for p in paras)


def _rejections_section(results: dict) -> str:
    rej = results.get("rejections") or []
    if not rej:
        return "<h2>Rejected replies</h2><p>None: every reply passed validation.</p>"
    rows = "".join(
        f"<tr><td>{escape(str(r.get('node_id', r.get('node', '?'))))}</td>"
        f"<td>{escape(str(r.get('round', '?')))}</td>"
        f"<td class=\"l\">{escape(str(r.get('reason', '')))}</td></tr>" for r in rej)
    n = f"{len(rej)} reply was" if len(rej) == 1 else f"{len(rej)} replies were"
    return (f"<h2>Rejected replies</h2><p>{n} rejected before aggregation (not used).</p>"
            f'<table><tr><th>node</th><th>round</th><th class="l">reason</th></tr>'
            f"{rows}</table>")


# -- interest timelines ------------------------------------------------------------------------
def _timelines_section(run_dir: Path, n_users: int, event_dp: bool) -> str:
    head = ("<h2>Interest timelines of sample users</h2><p>These timelines were computed on "
            "the researcher's machine, in simulation: this report opened each sampled "
            "device's encrypted store with its key file through the device SDK "
            "(<code>Device.interests</code>). In a deployment this view exists only on the "
            "user's own device; the server never holds the stores or their keys. Each band "
            "is a topic's share of the user's last 10 events.</p>")
    if n_users == 0:
        return head + "<p>No sample users requested.</p>"
    located = _locate_devices(run_dir)
    if isinstance(located, str):
        return head + f"<p>{escape(located)}</p>"
    catalog_path, devices = located
    from fedinterest.client.device import Device
    from fedinterest.shared.published_catalog import PublishedCatalog

    catalog = PublishedCatalog.load(catalog_path)
    picks = sample_users(sorted(devices), n_users)
    parts = [head]
    for u in picks:
        db = devices[u]
        try:
            with Device.open(db, key_file=db.with_suffix(".key"), catalog=catalog,
                             create=False) as dev:
                data = dev.interests(window=10)
                eps = dev.privacy()["epsilon"] if event_dp else None
        except FedinterestError as e:
            parts.append(f"<h3>user {u}</h3><p>Could not read this device: {escape(str(e))}</p>")
            continue
        parts.append(_timeline_html(u, data, eps))
    return "\n".join(parts)


def sample_users(indices: list[int], k: int) -> list[int]:
    """k user indices evenly spaced over the sorted list (first and last included), so the
    same run always shows the same users."""
    if not indices or k <= 0:
        return []
    pos = np.unique(np.linspace(0, len(indices) - 1, min(k, len(indices))).round().astype(int))
    return [indices[p] for p in pos]


def _locate_devices(run_dir: Path) -> tuple[Path, dict[int, Path]] | str:
    """(catalog path, {user index: store path}) or why they cannot be found. Paths in
    prepared.json may be relative to where the run started, so fall back to run_dir."""
    prep_path = run_dir / "prepared.json"
    if not prep_path.is_file():
        return f"{prep_path} not found: this run directory has no provisioned devices."
    try:
        prep = json.loads(prep_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(str(prep_path), e.lineno, None, f"not valid JSON ({e.msg})") from None
    cat = Path(str(prep.get("catalog_path", "")))
    catalog = next((p for p in (cat, run_dir / "catalog" / cat.name) if p.is_file()), None)
    if catalog is None:
        return f"the published catalog {cat} (from {prep_path}) was not found."
    dd = Path(str(prep.get("devices_dir", "")))
    ddir = next((p for p in (dd, run_dir / "devices") if p.is_dir()), None)
    if ddir is None:
        return f"the devices folder {dd} (from {prep_path}) was not found."
    devices = {}
    for db in ddir.glob("device-*.db"):
        idx = db.stem.removeprefix("device-")
        if idx.isascii() and idx.isdigit() and db.with_suffix(".key").is_file():
            devices[int(idx)] = db
    if not devices:
        return f"no device stores with key files in {ddir}."
    return catalog, devices


def _timeline_html(user: int, data: dict, epsilon: float | None) -> str:
    rows = data["timeline"]
    title = f"user {user}"
    if not rows:
        return f"<h3>{escape(title)}</h3><p>No events in the catalog on this device.</p>"
    vocab = list(data["topics"])
    mat = np.array([[r["topics"].get(t, 0.0) for t in vocab] for r in rows], np.float64)
    order = np.argsort(-mat.sum(0), kind="stable")
    keep = [k for k in order[:MAX_TOPICS_PLOTTED] if mat[:, k].sum() > 0]
    bands = [mat[:, k] for k in keep]
    labels = [_plain(vocab[k]) for k in keep]
    rest = mat[:, order[MAX_TOPICS_PLOTTED:]].sum(1) if len(order) > MAX_TOPICS_PLOTTED else None
    if rest is not None and rest.sum() > 0:
        bands.append(rest)
        labels.append("other")
    fig, (ax,) = _figure(9, 3.2)
    x = np.arange(1, len(rows) + 1)
    if bands:
        ax.stackplot(x, np.vstack(bands), labels=labels)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_xlim(1, max(2, len(rows)))
    ax.set_ylim(0, 1)
    ax.set_xlabel("event number (chronological)")
    ax.set_ylabel("topic share")
    start, end = _date(rows[0]["timestamp"]), _date(rows[-1]["timestamp"])
    ax.set_title(f"{title}: {len(rows)} events, {start} to {end}")
    facts = [f"{len(rows)} events from {start} to {end}"]
    if epsilon is not None:
        facts.append(f"event-level ε spent on this device: {epsilon:.2f}"
                     + (" (it has not trained)" if epsilon == 0 else ""))
    pred = data.get("predicted_next")
    if pred:
        top = sorted(pred.items(), key=lambda kv: -kv[1])[:3]
        facts.append("model's predicted next topics: "
                     + ", ".join(f"{t} ({p:.0%})" for t, p in top))
    return (f"<h3>{escape(title)}</h3><p>{escape('; '.join(facts))}.</p>"
            + figure_html(fig, f"interest timeline of {title}",
                   f"Topic shares over the last 10 events of {title}."))
