"""The run report: one self-contained HTML file beside results.json.

A researcher should be able to mail report.html to someone and have it read the same
anywhere: plots are PNGs inlined as data URIs, CSS is inline, nothing needs JavaScript or the
network. The page is templates/report.html.j2 (Jinja2, autoescaped: dataset names, topics,
rejection reasons come from outside); this module gathers what it shows.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from fedinterest.shared.atomic_io import write_text
from fedinterest.shared.errors import ConfigError, DataError, FedinterestError

from . import report_plots as plots
from .html import render

REPORT_NAME = "report.html"
REQUIRED_KEYS = ("config", "dataset", "protocol", "rounds", "privacy")


def write_report(run_dir: str | Path, n_sample_users: int = 3,
                 references: list[str | Path] = (), popularity: bool = True) -> Path:
    """Write `<run_dir>/report.html` from results.json (and, for the interest timelines, the
    run's device stores); returns its path.

    Args:
        references: `fedinterest train-central --out` folders (or their metrics.json) whose
            test metrics are drawn as reference lines.
        popularity: compute the popularity reference on the run's dataset (skipped, with a
            note, when the dataset cannot be loaded here).
    """
    if isinstance(n_sample_users, bool) or not isinstance(n_sample_users, int) \
            or n_sample_users < 0:
        raise ConfigError(f"n_sample_users: expected an int >= 0, got {n_sample_users!r}")
    run_dir = Path(run_dir)
    results = load_results(run_dir / "results.json")
    page = render_report(run_dir, results, n_sample_users, references, popularity)
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
    """A number as plain text; '–' for values the run did not produce."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return "–" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    return "–" if not np.isfinite(v) else f"{v:.{digits}f}"


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


# -- the page ------------------------------------------------------------------------------------
def render_report(run_dir: Path, results: dict, n_sample_users: int = 3,
                  references: list[str | Path] = (), popularity: bool = True) -> str:
    """report.html's text (templates/report.html.j2) for a loaded results.json."""
    rounds, priv, cfg = results["rounds"], results["privacy"], results["config"]
    refs, notes = _references(results, references, popularity)
    part = participation(results)
    users = _last_metric(rounds, "test-users")
    final = results.get("final") or {}
    shown = [plots.quality(rounds, str(results["protocol"]), refs),
             plots.participation(part), plots.privacy(rounds, priv, cfg),
             plots.epsilon_histogram(priv), plots.bytes_per_client(rounds)]
    return render(
        "report.html.j2", title=f"fedinterest run: {_dataset_name(results)}",
        dataset_name=_dataset_name(results), run=_run_facts(results),
        protocol=str(results["protocol"]),
        evaluated=f" Evaluated on {users:.0f} devices' held-out events." if users else "",
        rounds=_round_table(rounds, part),
        user_budget=(_fmt(cfg.get("user_epsilon"), 2) if priv.get("user_level") else None),
        final=", ".join(f"{k} = {_fmt(final[k])}" for k in
                        ("val-hr@10", "val-ndcg@10", "val-mrr@10", "test-hr@10",
                         "test-ndcg@10", "test-mrr@10") if k in final),
        references=_reference_table(results, refs, notes),
        plots=[p if isinstance(p, dict) else {"text": p} for p in shown if p is not None],
        privacy=_privacy(results),
        rejections=[(str(r.get("node_id", r.get("node", "?"))), str(r.get("round", "?")),
                     str(r.get("reason", ""))) for r in results.get("rejections") or []],
        timelines=_timelines(run_dir, n_sample_users,
                             bool((priv.get("event_level") or {}).get("enabled"))))


def _run_facts(results: dict) -> dict:
    cfg = results["config"]
    ds = results["dataset"] if isinstance(results["dataset"], dict) else {}
    t = results.get("timings") or {}
    start, end = _date(ds.get("time_start")), _date(ds.get("time_end"))
    versions = results.get("versions") or {}
    rss = results.get("peak_rss_mb")
    return {
        "dataset": [
            ("dataset", _dataset_name(results)), ("source", ds.get("spec")),
            ("users", ds.get("users")), ("items", ds.get("items")), ("events", ds.get("events")),
            ("events with private text", ds.get("events_with_text")),
            ("time span", f"{start} to {end}" if start and end else None)],
        "summary": [
            ("model", cfg.get("model")), ("strategy", cfg.get("strategy")),
            ("rounds (configured)", cfg.get("rounds")),
            ("clients per round", cfg.get("clients_per_round")),
            ("local epochs", cfg.get("local_epochs")), ("learning rate", cfg.get("lr")),
            ("differential privacy", cfg.get("dp")), ("secure aggregation", cfg.get("secagg")),
            ("seed", results.get("seed", cfg.get("seed")))],
        "full_config": json.dumps(cfg, indent=2, sort_keys=True),
        "resources": [
            ("prepare (embed catalog, provision devices)", _seconds(t.get("prepare_seconds"))),
            ("federated rounds", _seconds(t.get("federated_seconds"))),
            ("total wall time", _seconds(t.get("total_seconds"))),
            ("peak memory (RSS of the runner)",
             f"{rss:.0f} MB" if isinstance(rss, (int, float)) else None),
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or None)],
    }


def participation(results: dict) -> list[dict]:
    """Per round: sampled, accepted, rejected (replies the server refused, results.json's
    rejections) and declined (the rest of the failed replies: devices that chose not to
    train, budget spent or too few events; under SecAgg+ dropouts count here too)."""
    rejected: dict = {}
    for r in results.get("rejections") or []:
        rejected[r.get("round")] = rejected.get(r.get("round"), 0) + 1
    rows = []
    for r in results["rounds"]:
        n_rej = rejected.get(r["round"], 0)
        failed = r.get("failed") if isinstance(r.get("failed"), int) else 0
        rows.append({"round": r["round"], "sampled": r.get("sampled") or 0,
                     "accepted": r.get("accepted") or 0, "rejected": n_rej,
                     "declined": max(0, failed - n_rej)})
    return rows


COLUMNS = [  # (header, how to get the value from a round row, decimals)
    ("train loss", lambda r: r.get("train_loss"), 4),
    ("val HR@10", lambda r: (r.get("metrics") or {}).get("val-hr@10"), 4),
    ("val NDCG@10", lambda r: (r.get("metrics") or {}).get("val-ndcg@10"), 4),
    ("test HR@10", lambda r: (r.get("metrics") or {}).get("test-hr@10"), 4),
    ("test NDCG@10", lambda r: (r.get("metrics") or {}).get("test-ndcg@10"), 4),
    ("ε event-level (max over devices)", lambda r: r.get("device_epsilon_max"), 2),
    ("ε user-level", lambda r: r.get("user_epsilon"), 2),
    ("seconds", lambda r: r.get("seconds"), 1),
]


def _round_table(rounds: list[dict], part: list[dict]) -> dict:
    header = ["round", "accepted / sampled", "declined", "rejected",
              *(h for h, _, _ in COLUMNS)]
    rows = [[_fmt(r.get("round")), f"{_fmt(r.get('accepted'))} / {_fmt(r.get('sampled'))}",
             str(p["declined"]), str(p["rejected"]),
             *(_fmt(get(r), digits) for _, get, digits in COLUMNS)]
            for r, p in zip(rounds, part, strict=True)]
    return {"header": header, "rows": rows}


def _last_metric(rounds: list[dict], key: str):
    for r in reversed(rounds):
        v = (r.get("metrics") or {}).get(key)
        if v is not None:
            return v
    return None


# -- references ----------------------------------------------------------------------------------
def _references(results: dict, paths, popularity: bool) -> tuple[list[dict], list[str]]:
    from . import reference

    refs, notes = [], []
    if popularity:
        facts = results["dataset"] if isinstance(results["dataset"], dict) else {}
        try:
            from .data import load_dataset

            if not facts.get("spec"):
                raise FedinterestError("results.json names no dataset spec")
            ds = load_dataset(str(facts["spec"]))
            if facts.get("users") not in (None, ds.n_users) or \
                    facts.get("events") not in (None, len(ds)):
                raise FedinterestError(
                    f"{facts['spec']} loads {ds.n_users} users and {len(ds)} events here, the "
                    f"run had {facts.get('users')} and {facts.get('events')}")
            refs.append(reference.popularity(ds))
        except (FedinterestError, OSError) as e:
            notes.append(f"Popularity reference not computed: {e}")
    refs += [reference.central(p) for p in paths]
    if not paths:
        notes.append("No central model given: `fedinterest report RUN --reference DIR` adds "
                     "the test metrics of a `fedinterest train-central --out DIR` run.")
    return refs, notes


def _reference_table(results: dict, refs: list[dict], notes: list[str]) -> dict:
    final = results.get("final") or {}
    rows = [("this run (federated, last evaluation)", _fmt(final.get("test-hr@10")),
             _fmt(final.get("test-ndcg@10")), f"{_dataset_name(results)}, results.json")]
    rows += [(r["name"], _fmt(r.get("test-hr@10")), _fmt(r.get("test-ndcg@10")), r["source"])
             for r in refs]
    return {"header": ("model", "test HR@10", "test NDCG@10", "source"), "rows": rows,
            "notes": [f"Protocol of every row: {results['protocol']}.", *notes]}


def _privacy(results: dict) -> list[str]:
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
    return paras



# -- interest timelines ------------------------------------------------------------------------
def _timelines(run_dir: Path, n_users: int, event_dp: bool) -> list[dict]:
    if n_users == 0:
        return [{"text": "No sample users requested."}]
    located = _locate_devices(run_dir)
    if isinstance(located, str):
        return [{"text": located}]
    catalog_path, devices = located
    from fedinterest.client.device import Device
    from fedinterest.shared.published_catalog import PublishedCatalog

    catalog = PublishedCatalog.load(catalog_path)
    colours = plots.topic_colours(catalog.topic_vocab())
    out = []
    for u in sample_users(sorted(devices), n_users):
        db = devices[u]
        try:
            with Device.open(db, key_file=db.with_suffix(".key"), catalog=catalog,
                             create=False) as dev:
                data = dev.interests(window=10)
                eps = dev.privacy()["epsilon"] if event_dp else None
        except FedinterestError as e:
            out.append({"title": f"user {u}", "text": f"Could not read this device: {e}"})
            continue
        out.append(_timeline(u, data, eps, colours))
    return out


def sample_users(indices: list[int], k: int) -> list[int]:
    """k user indices evenly spaced over the sorted list (first and last included), so the
    same run always shows the same users."""
    if not indices or k <= 0:
        return []
    pos = np.unique(np.linspace(0, len(indices) - 1, min(k, len(indices))).round().astype(int))
    return [indices[p] for p in pos]


def _locate_devices(run_dir: Path) -> tuple[Path, dict[int, Path]] | str:
    """(catalog path, {user index: store path}) or why they cannot be found. The catalog is
    the one the run's model is bound to (client/model_install.py), else prepared.json's; its
    paths may be relative to where the run started, so fall back to run_dir."""
    prep_path = run_dir / "prepared.json"
    if not prep_path.is_file():
        return f"{prep_path} not found: this run directory has no provisioned devices."
    try:
        prep = json.loads(prep_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(str(prep_path), e.lineno, None, f"not valid JSON ({e.msg})") from None
    from fedinterest.client.model_install import ModelSourceError, catalog_version

    cat = Path(str(prep.get("catalog_path", "")))
    try:  # the devices' models are bound to the catalog the run trained against
        bound = [run_dir / "catalog" / f"catalog-{catalog_version(run_dir)}.npz"]
    except ModelSourceError:
        bound = []
    catalog = next((p for p in (*bound, cat, run_dir / "catalog" / cat.name) if p.is_file()),
                   None)
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


def _timeline(user: int, data: dict, epsilon: float | None, colours: dict) -> dict:
    rows = data["timeline"]
    title = f"user {user}"
    if not rows:
        return {"title": title, "text": "No events in the catalog on this device."}
    start, end = _date(rows[0]["timestamp"]), _date(rows[-1]["timestamp"])
    facts = [f"{len(rows)} events from {start} to {end}"]
    if epsilon is not None:
        facts.append(f"event-level ε spent on this device: {epsilon:.2f}"
                     + (" (it has not trained)" if epsilon == 0 else ""))
    pred = data.get("predicted_next")
    if pred:
        top = sorted(pred.items(), key=lambda kv: -kv[1])[:3]
        facts.append("model's predicted next topics: "
                     + ", ".join(f"{t} ({p:.0%})" for t, p in top))
    return {"title": title, "text": "; ".join(facts) + ".",
            "figure": plots.timeline(f"{title}, {start} to {end}", data, colours)}
