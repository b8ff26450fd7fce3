"""HTML pages (report.html, audit.html) from Jinja2 templates in simulations/templates/.

Autoescape is on: every value from a run (dataset names, topics, rejection reasons, config)
is escaped by the template engine, never by hand. StrictUndefined makes a misspelt name in a
template an error instead of an empty string. Plots are inline PNG data URIs, so a page is one
self-contained file that reads the same anywhere (no network, no JavaScript).
"""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path
from typing import Any

from fedinterest.shared.optional import require

TEMPLATES = Path(__file__).with_name("templates")


@functools.cache
def _environment():
    jinja2 = require("jinja2", extra="simulation", purpose="HTML reports")
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(template: str, **context: Any) -> str:
    """`templates/<template>` rendered with `context` (autoescaped)."""
    return _environment().get_template(template).render(**context)


def png_uri(fig) -> str:
    """A matplotlib Figure as a data:image/png URI (tight layout, 90 dpi)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot(fig, alt: str, caption: str) -> dict[str, str]:
    """A figure for the templates' `figure` macro."""
    return {"uri": png_uri(fig), "alt": alt, "caption": caption}
