"""Is database I/O going to cooperate with gevent, or block the whole hub?"""

from __future__ import annotations

from greenpool.drivers import get_driver
from greenpool.errors import CooperationError


def cooperation_problems(driver: str = "psycopg") -> list[str]:
    """Reasons why ``driver``'s waits would block the hub; empty when all is well."""
    return get_driver(driver).cooperation_problems()


def check_cooperation(driver: str = "psycopg") -> None:
    """Raise CooperationError naming the problem if ``driver`` would block the hub.

    Typical causes: gevent's monkey-patching never ran, or psycopg was imported before
    ``gevent.monkey.patch_all()``, so it kept its blocking C wait function.
    """
    problems = cooperation_problems(driver)
    if problems:
        raise CooperationError("; ".join(problems))
