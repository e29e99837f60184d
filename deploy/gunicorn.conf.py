"""Gunicorn configuration for a greenpool Flask app under the gevent worker.

    gunicorn -c deploy/gunicorn.conf.py greenpool.examples.flask_app.wsgi:app

The settings and hooks come from :mod:`greenpool.gunicorn` (usable directly as
``gunicorn -c python:greenpool.gunicorn app:app``): the gevent worker, patching in the
master when preloading, psycogreen, the cooperation check in ``post_worker_init``, pools
closed in ``worker_exit``, greenlet stacks in ``worker_abort``, greenpool's log records in
gunicorn's error log. Every value can be overridden with a ``GUNICORN_*`` environment
variable, on the command line, or below.

Like greenpool.gunicorn, this file must not import the app, Flask or a database driver:
gunicorn loads it in the master, before the gevent worker patches the standard library.
"""

from greenpool.gunicorn import *  # noqa: F403

# Overrides for your deployment go here, for example:
# workers = 4
# bind = "0.0.0.0:8000"
# max_requests = 0
