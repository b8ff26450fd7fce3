"""audit.html from templates/audit.html.j2: one overall verdict and the table of checks at
the top, then the formal DP statement, each check's reason, plot and evidence, versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fedinterest.simulations.audit.checks import FAIL, INCONCLUSIVE, NOT_APPLICABLE, PASS
from fedinterest.simulations.html import plot, render
from fedinterest.simulations.report_plots import figure

EVIDENCE_CHARS = 200_000  # per check: the page stays loadable; audit.json holds everything


def overall_verdict(checks: list[dict]) -> dict[str, str]:
    """fail if any check failed; else inconclusive if any was; else pass if any passed."""
    by = {v: [c["title"] for c in checks if c["verdict"] == v]
          for v in (FAIL, INCONCLUSIVE, PASS, NOT_APPLICABLE)}
    if by[FAIL]:
        return {"verdict": FAIL, "css": "fail",
                "reason": f"{len(by[FAIL])} of {len(checks)} checks failed: "
                          + "; ".join(by[FAIL]) + "."}
    if by[INCONCLUSIVE]:
        return {"verdict": INCONCLUSIVE, "css": "inconclusive",
                "reason": "no check failed, but these could not decide: "
                          + "; ".join(by[INCONCLUSIVE]) + "."}
    if by[PASS]:
        na = f" ({len(by[NOT_APPLICABLE])} not applicable to this run)" \
            if by[NOT_APPLICABLE] else ""
        return {"verdict": PASS, "css": "pass",
                "reason": f"every applicable check passed: {len(by[PASS])} of "
                          f"{len(checks)}{na}."}
    return {"verdict": NOT_APPLICABLE, "css": "not-applicable",
            "reason": "no check applied to this run."}


def render_html(audit: dict, json_default=str) -> str:
    checks = [{**c, "figure": _figure_for(c),
               "evidence": json.dumps(_without_scores(c["details"]), indent=1,
                                      default=json_default)[:EVIDENCE_CHARS]}
              for c in audit["checks"]]
    versions = [*((k, str(v)) for k, v in audit["versions"].items()),
                ("config sha256", f"{audit['config_sha256']} ({audit['config_source']})")]
    name = Path(audit["run_dir"]).name
    return render("audit.html.j2", title=f"privacy audit: {name}", run_name=name,
                  run_dir=audit["run_dir"], generated=audit["generated"],
                  seconds=audit["seconds"], overall=overall_verdict(audit["checks"]),
                  checks=checks, statement=audit["statement"], versions=versions,
                  config=json.dumps(audit["config"], indent=1, sort_keys=True))


def _without_scores(details: dict) -> dict:
    return {k: v for k, v in details.items() if k != "scores"}


def _figure_for(check: dict) -> dict | None:
    d = check.get("details") or {}
    if check["key"] == "accounting" and (d.get("event_level") or {}).get("per_device"):
        eps = [r["epsilon"] for r in d["event_level"]["per_device"]]
        fig, (ax,) = figure(4.5, 3.0)
        ax.hist(eps, bins=min(30, max(5, len(eps) // 2)), color="#4a7bb7")
        ax.set_xlabel("event-level epsilon (recomputed from the device's ledger)")
        ax.set_ylabel("devices")
        return plot(fig, "histogram of per-device epsilon",
                    "Per-device event-level epsilon, composed over every round it joined.")
    if check["key"] == "canary" and d.get("scores"):
        s = d["scores"]
        inc = np.asarray(s["included"], bool)
        fig, axes = figure(9.0, 3.0, 2)
        for ax, name in zip(axes, ("control", "dp"), strict=True):
            v = np.asarray(s[name])
            bins = np.linspace(v.min(), v.max(), 25) if v.max() > v.min() else 10
            ax.hist(v[inc], bins=bins, alpha=.6, label="included", color="#b03a2e")
            ax.hist(v[~inc], bins=bins, alpha=.6, label="excluded", color="#4a7bb7")
            ax.set_title("without DP (control)" if name == "control" else "with DP")
            ax.set_xlabel("canary loss before minus after training")
            ax.legend()
        return plot(fig, "canary score histograms", "Canary scores: included canaries should "
                    "stand out without DP and must not with DP.")
    return None
