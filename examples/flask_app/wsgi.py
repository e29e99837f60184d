"""WSGI entry point of the example app::

    gunicorn -c python:greenpool.gunicorn greenpool.examples.flask_app.wsgi:app

(``examples.flask_app.wsgi:app`` from a checkout).

Importing this module opens no connection (pools start in each worker on first use), so
it is safe with ``--preload``.
"""

from __future__ import annotations

from . import create_app

app = create_app()
