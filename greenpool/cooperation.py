"""Is database I/O going to cooperate with gevent, or block the whole hub?

The one place that answers it: the pool warns at open, the Flask extension refuses to
serve, and the gunicorn hooks refuse to boot, all from :func:`cooperation_problems`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from greenpool.errors import CooperationError


def gevent_patched(module: str) -> bool:
    """Whether gevent has monkey-patched the standard library module ``module``."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched(module))


def cooperation_problems(driver: Any = "psycopg", *, prepare: bool = True) -> list[str]:
    """Reasons why ``driver``'s waits would block the hub; empty when all is well.

    With ``prepare`` (the default) the driver is first set up the way a pool sets it up
    when it opens (psycogreen's wait callback for psycopg2, gevent's own wait functions for
    psycopg 3), so the answer is what a pool in this process will actually do: psycopg
    imported before ``monkey.patch_all()`` is cured by that set-up and is no problem.
    """
    from greenpool.drivers import get_driver

    adapter = get_driver(driver)
    if prepare and gevent_patched("socket"):
        adapter.prepare()
    return adapter.cooperation_problems()


def check_cooperation(driver: Any = "psycopg") -> None:
    """Raise CooperationError naming the problem if ``driver`` would block the hub.

    Typical cause: gevent's monkey-patching never ran (gunicorn's gevent worker does it;
    scripts must call ``gevent.monkey.patch_all()`` first thing).
    """
    problems = cooperation_problems(driver)
    if problems:
        raise CooperationError("; ".join(problems))


def under_gunicorn() -> bool:
    """True in a gunicorn master or worker (gunicorn sets SERVER_SOFTWARE)."""
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn")


def cooperation_required(setting: bool | None) -> bool:
    """Whether an uncooperative driver is an error (True) or a warning (False).

    ``None`` ("auto") requires cooperation when serving: under gunicorn, or once gevent
    has patched the socket module (a half-patched process is the dangerous case). Plain
    scripts, CLI commands and unpatched tests only get a warning.
    """
    if setting is not None:
        return setting
    return under_gunicorn() or gevent_patched("socket")
