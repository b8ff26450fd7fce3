"""The ClientApp as Flower's runtime loads it (`flwr run .`, SuperNodes; pyproject's
[tool.flwr.app.components]): every message goes to client_app.app, in a process whose log
output is set up by shared/flower_logging.py.

A ClientApp of its own, not client_app.app re-exported: Flower's simulation loads the app
once and pickles it to its Ray actors, and unpickling imports the modules of the registered
handlers. The handlers here are this module's, so each actor imports it and sets up its
logging; tests and `fedinterest simulate` import client_app.app, and their logging stays
theirs.
"""

from __future__ import annotations

from fedinterest.shared.flower_logging import configure_flower_logging
from fedinterest.shared.optional import missing_extra

try:  # the 'flower' extra, like client_app.py
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
except ModuleNotFoundError as e:
    raise missing_extra(e, "flower", "the Flower ClientApp") from None

from . import client_app

configure_flower_logging()

app = ClientApp()


def _handle(msg: Message, ctx: Context) -> Message:
    return client_app.app(msg, ctx)  # its mods, then its handler for the message type


for _register in (app.train(), app.evaluate(), app.query()):  # what client_app.app handles
    _register(_handle)

__all__ = ["app"]
