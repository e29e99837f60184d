"""WSGI entry point: ``gunicorn -c deploy/gunicorn.conf.py examples.flask_app.wsgi:app``.

Importing this module opens no connection (pools start in each worker on first use), so
it is safe with ``--preload``.
"""

from __future__ import annotations

from examples.flask_app import create_app

app = create_app()
