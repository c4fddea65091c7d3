"""Gantry's Python SDK: Modal's API on your own GPU hosts. Change `import modal` to
`import gantry as modal`, then `gantry run app.py` or `gantry deploy app.py`.

Functions run in containers of the cluster, started by its agents; their code is uploaded
by content hash and mounted read-only at `/root`, and arguments and results travel
pickled (the client's and the image's Python minor versions must match)."""

from . import exception
from ._app import App
from ._functions import Cls, Function
from ._image import Image
from ._invoke import FunctionCall, enable_output
from ._objects import Secret, Volume
from ._partial import (
    asgi_app,
    batched,
    concurrent,
    enter,
    exit,
    fastapi_endpoint,
    method,
    parameter,
    web_endpoint,
    web_server,
    wsgi_app,
)
from ._schedule import Cron, Period, Retries

__version__ = "0.1.0"

#: Modal's older name for App.
Stub = App


def is_local() -> bool:
    """False inside a function's container, True everywhere else."""
    from . import _container

    return not _container.IN_CONTAINER


__all__ = [
    "App",
    "Cls",
    "Cron",
    "Function",
    "FunctionCall",
    "Image",
    "Period",
    "Retries",
    "Secret",
    "Volume",
    "asgi_app",
    "batched",
    "concurrent",
    "enable_output",
    "enter",
    "exception",
    "exit",
    "fastapi_endpoint",
    "is_local",
    "method",
    "parameter",
    "web_endpoint",
    "web_server",
    "wsgi_app",
]
