"""audit.html: one overall verdict first, then the table of checks, then the statement; every
value from the run escaped by the template engine."""

from __future__ import annotations

import pytest
from fedinterest.simulations.audit.page import overall_verdict, render_html

EVIL = "<img src=x onerror=alert(1)>"


def _check(key: str, verdict: str, title: str | None = None) -> dict:
    return {"number": "1", "key": key, "title": title or key, "verdict": verdict,
            "reason": f"because {EVIL}", "seconds": 1.25, "details": {"note": EVIL}}


def _audit(checks: list[dict]) -> dict:
    return {"run_dir": f"/runs/{EVIL}", "generated": "2026-12-03T09:00:00+00:00",
            "seconds": 12.0, "checks": checks,
            "statement": {"paragraphs": [{"heading": "Event level", "text": f"eps {EVIL}"}],
                          "not_covered": [f"evaluation metrics {EVIL}"]},
            "versions": {"python": "3.11", "flwr": EVIL}, "config": {"dataset": EVIL},
            "config_sha256": "ab" * 32, "config_source": "the round config"}


@pytest.mark.parametrize(("verdicts", "overall"), [
    (["pass", "fail", "inconclusive"], "fail"),
    (["pass", "inconclusive", "not applicable"], "inconclusive"),
    (["pass", "not applicable"], "pass"),
    (["not applicable"], "not applicable"),
])
def test_overall_verdict_is_the_worst_applicable_one(verdicts, overall):
    checks = [_check(f"c{i}", v) for i, v in enumerate(verdicts)]
    assert overall_verdict(checks)["verdict"] == overall


def test_page_opens_with_the_verdict_and_the_table_and_escapes_everything():
    html = render_html(_audit([_check("egress", "pass", "What left the devices"),
                               _check("canary", "fail", "Canary membership")]))
    verdict, table = html.index('id="overall-verdict"'), html.index('id="checks"')
    assert verdict < table < html.index("Differential privacy statement")
    assert "Overall verdict: fail." in html and "1 of 2 checks failed: Canary membership" in html
    assert EVIL not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script" not in html and 'href="#check-canary"' in html
