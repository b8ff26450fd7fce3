"""report.html and audit.html in a real browser (headless Chromium, Debian's `chromium`
package): every plot decodes, and no text runs out of its box or widens the page, at a
desktop and a narrow window. The pages carry no script; the test adds one to a copy that
measures the laid-out page and writes the result into the DOM, which `--dump-dom` prints."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fedinterest.simulations.audit.page import render_html
from fedinterest.simulations.report import write_report

from tests.simulations.test_report import _provision, _write, fake_results

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="no Chromium here (Debian: apt-get install -y chromium)")

LONG = "unbroken_" * 40  # a long dataset name / reason with no break opportunity
MEASURE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => i.complete && i.naturalWidth > 0);
  const overflowing = [];
  for (const el of document.body.querySelectorAll('*')) {
    const style = getComputedStyle(el);
    if (style.display === 'inline' || ['auto', 'scroll', 'hidden'].includes(style.overflowX))
      continue;  // inline boxes have no width of their own; scroll containers may be wider
    if (el.closest('details:not([open])')) continue;  // collapsed: not laid out
    if (el.scrollWidth > el.clientWidth + 1)
      overflowing.push(el.tagName + ': ' + el.textContent.trim().slice(0, 60));
  }
  const doc = document.documentElement;
  const out = document.createElement('pre');
  out.id = 'measured';
  out.textContent = JSON.stringify({images, overflowing,
                                    page: [doc.scrollWidth, doc.clientWidth]});
  document.body.appendChild(out);
});
</script>"""


def measure(page: Path, tmp_path: Path, width: int) -> dict:
    probe = tmp_path / f"probe-{width}-{page.name}"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"),
                     encoding="utf-8")
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--window-size={width},900", "--virtual-time-budget=10000",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=180, check=False)
    found = re.search(r'<pre id="measured">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, f"no measurement in Chromium's DOM (exit {done.returncode}): " \
                  f"{done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")
                      .replace("&lt;", "<").replace("&gt;", ">"))


def _check(result: dict, n_images: int) -> None:
    assert result["images"] == [True] * n_images, result["images"]
    assert result["overflowing"] == []
    scroll_width, client_width = result["page"]
    assert scroll_width <= client_width, "the page is wider than the window"


@pytest.mark.parametrize("width", [1200, 700])
def test_report_renders_in_chromium(tmp_path, width):
    res = fake_results(rejections=[{"round": 2, "node_id": 4242, "reason": LONG}])
    res["dataset"]["dataset"] = LONG
    run_dir = _write(tmp_path / "run", res)
    _provision(run_dir)
    page = write_report(run_dir, n_sample_users=2, popularity=False)
    _check(measure(page, tmp_path, width), n_images=5 + 2)


@pytest.mark.parametrize("width", [1200, 700])
def test_audit_renders_in_chromium(tmp_path, width):
    checks = [
        {"number": "1", "key": "egress", "title": "What left the devices", "verdict": "pass",
         "reason": LONG, "seconds": 3.0, "details": {"messages": 10, "note": LONG}},
        {"number": "2", "key": "accounting", "title": "Epsilon recomputed",
         "verdict": "fail", "reason": "claimed 9 > recomputed 6", "seconds": 1.0,
         "details": {"event_level": {"per_device": [{"epsilon": 1 + i / 10}
                                                    for i in range(20)]}}},
    ]
    audit = {"run_dir": f"/runs/{LONG}", "generated": "2026-12-03T09:00:00+00:00",
             "seconds": 4.0, "checks": checks,
             "statement": {"paragraphs": [{"heading": "Event level", "text": LONG}],
                           "not_covered": [LONG]},
             "versions": {"python": "3.11", "flwr": "1.42.0"}, "config": {"dataset": LONG},
             "config_sha256": "ab" * 32, "config_source": "the round config"}
    page = tmp_path / "audit.html"
    page.write_text(render_html(audit), encoding="utf-8")
    _check(measure(page, tmp_path, width), n_images=1)
