"""The example Django project under gunicorn -k gevent: load, exhaustion, shutdown.

Used by tests/test_django_gunicorn.py (greenpool, asserting) and by
scripts/compare_django_pools.py (greenpool, django-db-geventpool and Django's own pool,
side by side, recording).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from examples.django_app.seed import ACCOUNTS, migrate_and_seed

__all__ = ["ACCOUNTS", "migrate_and_seed"]
from tests.support import webload
from tests.support.ormsupport import unique_name

APP = "examples.django_app.wsgi:application"


def start(
    dsn: str, log: Path, *, engine: str = "greenpool", workers: int = 2, max_size: int = 4,
    timeout: float = 5.0, psycopg2: bool = False, atomic_requests: bool = False,
) -> webload.Server:  # fmt: skip
    name = unique_name(f"dj-{engine}")
    env = {
        "DATABASE_URL": dsn,
        "GP_DJANGO_ENGINE": engine,
        "GP_DJANGO_MAX_SIZE": str(max_size),
        "GP_DJANGO_TIMEOUT": str(timeout),
        "GP_DJANGO_NAME": name,
    }
    if psycopg2:
        env["GP_DJANGO_PSYCOPG2"] = "1"
    if atomic_requests:
        env["GP_DJANGO_ATOMIC_REQUESTS"] = "1"
    return webload.start(APP, name, log, env, workers=workers)


def pick(rng: random.Random) -> tuple[str, str, Any, tuple[int, ...]]:
    """A mix of reads, transactional writes, slow requests and spawned greenlets."""
    roll = rng.random()
    account = rng.randint(1, ACCOUNTS)
    if roll < 0.40:
        return "GET", f"/accounts/{account}", None, (200,)
    if roll < 0.70:
        body = {"from_id": account, "to_id": account % ACCOUNTS + 1, "amount": "1.25"}
        return "POST", "/transfers", body, (201, 409)
    if roll < 0.80:
        return "GET", "/slow?seconds=0.05", None, (200,)
    if roll < 0.88:
        return "GET", "/spawn?n=2", None, (200,)
    return "GET", "/healthz", None, (200,)


def pick_plain(rng: random.Random) -> tuple[str, str, Any, tuple[int, ...]]:
    """The same mix without spawned greenlets (each request's own connection only)."""
    while True:
        choice = pick(rng)
        if not choice[1].startswith("/spawn"):
            return choice
