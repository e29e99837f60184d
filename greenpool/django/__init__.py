"""Django's PostgreSQL backend on greenpool: ``"ENGINE": "greenpool.django"``.

    DATABASES = {"default": {
        "ENGINE": "greenpool.django",
        "NAME": "app", "USER": "app", "HOST": "db",
        "OPTIONS": {"pool": {"min_size": 2, "max_size": 10, "timeout": 5}},
    }}
    MIDDLEWARE = ["greenpool.django.middleware.PoolExhaustedMiddleware", ...]

Under gevent (gunicorn -k gevent) each greenlet has its own Django connection, borrowed
from the process's pool at its first query and given back when the request ends (or
when the greenlet ends). Without gevent's patching (``manage.py`` commands, the threaded
development server) the backend behaves like Django's own, one connection per thread.
This module imports nothing from Django, so settings files and gunicorn hooks can import
it. See docs/django.md.
"""

from __future__ import annotations

from greenpool.django.pools import close_pools, get_pool
from greenpool.django.settings import database_from_conninfo

__all__ = ["close_pools", "database_from_conninfo", "get_pool"]
