"""WSGI entry point of the Flask-SQLAlchemy example.

    gunicorn -c deploy/gunicorn.conf.py examples.flask_sqlalchemy_app.wsgi:app
"""

from __future__ import annotations

from examples.flask_sqlalchemy_app import create_app

app = create_app()
