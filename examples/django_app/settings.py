"""Settings of the example Django project (accounts and transfers) on greenpool.

Environment:
- ``DATABASE_URL``: a libpq key=value string (``host=... port=... user=... dbname=...``).
- ``GP_DJANGO_ENGINE``: ``greenpool`` (default), ``geventpool`` (django-db-geventpool),
  ``django`` (Django's own psycopg_pool pool, Django >= 5.1) or ``plain`` (no pool).
- ``GP_DJANGO_MAX_SIZE`` (4), ``GP_DJANGO_TIMEOUT`` (5 s): the pool's cap and wait.
- ``GP_DJANGO_NAME``: application_name of the connections (and the pool's name).
- ``GP_DJANGO_PSYCOPG2=1``: hide psycopg 3, so Django (and the pool) use psycopg2.
- ``GP_DJANGO_ATOMIC_REQUESTS=1``: ``ATOMIC_REQUESTS`` on.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("GP_DJANGO_PSYCOPG2") == "1":
    sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django falls back to psycopg2


def _dsn(text: str) -> dict[str, object]:
    """Django's connection settings from a libpq URL or key=value string (libpq reads it)."""
    from greenpool.django.settings import database_from_conninfo

    return database_from_conninfo(text)


ENGINE = os.environ.get("GP_DJANGO_ENGINE", "greenpool")
MAX_SIZE = int(os.environ.get("GP_DJANGO_MAX_SIZE", "4"))
TIMEOUT = float(os.environ.get("GP_DJANGO_TIMEOUT", "5"))
APP_NAME = os.environ.get("GP_DJANGO_NAME", "greenpool-django-example")


def _database() -> dict[str, object]:
    base: dict[str, object] = {**_dsn(os.environ.get("DATABASE_URL", "")), "CONN_MAX_AGE": 0}
    extra = base.pop("OPTIONS")
    options: dict[str, object] = {**extra, "application_name": APP_NAME}  # type: ignore[dict-item]
    if ENGINE == "greenpool":
        base["ENGINE"] = "greenpool.django"
        options["pool"] = {
            "min_size": 1,
            "max_size": MAX_SIZE,
            "timeout": TIMEOUT,
            "name": APP_NAME,
        }
    elif ENGINE == "geventpool":
        backend = (
            "postgresql_psycopg2" if os.environ.get("GP_DJANGO_PSYCOPG2") else "postgresql_psycopg3"
        )
        base["ENGINE"] = f"django_db_geventpool.backends.{backend}"
        options.update(MAX_CONNS=MAX_SIZE, REUSE_CONNS=MAX_SIZE)
    elif ENGINE == "django":
        base["ENGINE"] = "django.db.backends.postgresql"
        options["pool"] = {"min_size": 1, "max_size": MAX_SIZE, "timeout": TIMEOUT}
    else:
        base["ENGINE"] = "django.db.backends.postgresql"
    base["OPTIONS"] = options
    return base


DATABASES = {"default": _database()}
# GP_DJANGO_ATOMIC_REQUESTS=1: every view runs in a transaction (borrowing before it runs).
DATABASES["default"]["ATOMIC_REQUESTS"] = os.environ.get("GP_DJANGO_ATOMIC_REQUESTS") == "1"

SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "examples.django_app.urls"
INSTALLED_APPS = ["examples.django_app.bank"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
MIDDLEWARE = ["greenpool.django.middleware.PoolExhaustedMiddleware"]
GREENPOOL_RETRY_AFTER = 2
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "greenpool": {"handlers": ["console"], "level": "INFO"},
        "django.request": {"handlers": ["console"], "level": "ERROR"},
    },
}
