"""Gunicorn settings and hooks for a greenpool app under the gevent worker.

    gunicorn -c python:greenpool.gunicorn myapp.wsgi:app

or, to override some values, a config file of your own::

    from greenpool.gunicorn import *   # settings and hooks
    workers = 4

Every value can also be overridden with an environment variable (``GUNICORN_*``, read
when this module is imported) or on the command line. This module never imports the
app, Flask or a database driver: gunicorn loads it in the master, and whatever the
master imports before the gevent worker patches the standard library is imported
unpatched (psycopg picks its blocking C wait function at import time).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from typing import Any

__all__ = [
    "accesslog",
    "bind",
    "child_exit",
    "control_socket_disable",
    "graceful_timeout",
    "keepalive",
    "loglevel",
    "max_requests",
    "max_requests_jitter",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "preload_app",
    "timeout",
    "worker_abort",
    "worker_class",
    "worker_connections",
    "worker_exit",
    "worker_tmp_dir",
    "workers",
]


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_bool(name: str, default: bool) -> bool:
    return _env(name, "1" if default else "0").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- preload
# With preload the master imports the app before forking, while the gevent worker only
# patches after the fork: too late for whatever the app imported (psycopg picks its
# blocking C wait function at import time, a lock created unpatched stays a real lock).
# This module runs in the master before the app is imported, so patch here when
# preloading. Without preload nothing is patched in the master: each worker patches
# itself first.
preload_app = _env_bool("GUNICORN_PRELOAD", False)
if preload_app or "--preload" in sys.argv or "--preload" in _env("GUNICORN_CMD_ARGS", ""):
    from gevent import monkey

    monkey.patch_all()

# --------------------------------------------------------------------------- workers
bind = _env("GUNICORN_BIND", "127.0.0.1:8000")
# One process per core: a gevent worker is a single thread running many greenlets, so
# it uses one core at most. Each worker has its own pools: the database sees up to
# workers x GREENPOOL_MAX_SIZE connections per instance (check with `greenpool budget`).
workers = int(_env("GUNICORN_WORKERS", str(multiprocessing.cpu_count())))
worker_class = "gevent"
# Concurrent clients (greenlets) per worker. Far more than the pool size on purpose:
# requests that never touch the database are not limited by it, and those that do wait
# in the pool's queue for at most GREENPOOL_TIMEOUT, then get a 503.
worker_connections = int(_env("GUNICORN_WORKER_CONNECTIONS", "1000"))

# --------------------------------------------------------------------------- timeouts
# For async workers this is a heartbeat, not a request timeout: a worker is killed (and
# worker_abort below logs every greenlet's stack) when its hub has been blocked this
# long, i.e. when something uncooperative ran. Bound request time with
# GREENPOOL_TIMEOUT and statement_timeout instead.
timeout = int(_env("GUNICORN_TIMEOUT", "30"))
# After SIGTERM: stop accepting, let in-flight requests finish for this long, then exit
# (worker_exit closes the pools). Keep it above GREENPOOL_TIMEOUT plus your slowest
# query, and below your orchestrator's kill timeout (Kubernetes: 30 s by default).
graceful_timeout = int(_env("GUNICORN_GRACEFUL_TIMEOUT", "25"))
# Idle keep-alive connections. Behind a load balancer, set it above the balancer's idle
# timeout so the balancer closes first (no race on a half-closed connection).
keepalive = int(_env("GUNICORN_KEEPALIVE", "5"))

# --------------------------------------------------------------------------- recycling
# Restart each worker after about this many requests (0: never) to bound slow memory
# growth; the jitter keeps workers from restarting - and reconnecting - all at once.
max_requests = int(_env("GUNICORN_MAX_REQUESTS", "10000"))
max_requests_jitter = int(_env("GUNICORN_MAX_REQUESTS_JITTER", str(max(max_requests // 10, 0))))

# The heartbeat file: on tmpfs, a slow or full disk cannot stall it (Docker's /tmp is on
# overlayfs). None: gunicorn's default.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

accesslog = _env("GUNICORN_ACCESSLOG", "") or None
# gunicorn >= 27 opens a control socket ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl);
# one path per user, so switch it off when several instances share a user (tests, demo).
control_socket_disable = _env_bool("GUNICORN_NO_CONTROL_SOCKET", False)
loglevel = _env("GUNICORN_LOGLEVEL", "info")


# --------------------------------------------------------------------------- greenpool
def _cooperation(worker: Any) -> tuple[list[str], bool]:
    """(problems, required) for the worker's app, after preparing its drivers.

    The one place that knows greenpool's Flask extension: an app with one is asked for
    its databases' drivers; any other app is checked for psycopg 3. Each driver is
    prepared first, as a pool does when it opens (for psycopg 3 under gevent: gevent's
    own wait, which also cures psycopg imported before patching), so only what a pool
    would still suffer from is reported.
    """
    from greenpool import cooperation_problems
    from greenpool.drivers import get_driver

    state = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("greenpool")
    if state is not None:
        drivers = {db.driver for db in state.databases.values()}
        required = state.options.require_cooperation is not False
    else:
        drivers, required = {"psycopg"}, True
    for driver in drivers:
        try:
            get_driver(driver).prepare()
        except (ImportError, ValueError) as ex:  # e.g. psycogreen missing: reported below
            worker.log.debug("greenpool: preparing driver %r failed: %s", driver, ex)
    if state is not None:
        problems: list[str] = state.cooperation_problems()
    else:
        try:
            problems = cooperation_problems("psycopg")
        except ImportError:
            problems = []
    return problems, required


def _close_pools(timeout: float) -> None:
    """Close the pools of this process: the Flask extension's, then any other."""
    try:
        from greenpool.flask import close_all_pools
    except ImportError:  # Flask is not installed
        pass
    else:
        close_all_pools(timeout=timeout)
    from greenpool import close_all

    close_all(timeout=timeout)


# --------------------------------------------------------------------------- metrics
# One Prometheus scrape for every worker: start gunicorn with PROMETHEUS_MULTIPROC_DIR
# naming a directory for this instance alone (tmpfs is best). prometheus_client then
# keeps every worker's values in files there and any worker's /metrics answers for all
# (greenpool.prometheus). The master empties the directory when it starts (on_starting)
# and drops an exited worker's gauges (child_exit); its counters stay in the sums.
def _multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def on_starting(server: Any) -> None:
    """In the master, before any worker: create PROMETHEUS_MULTIPROC_DIR (mode 0700) when
    it is set, and remove the value files a previous run left there (their counters
    would add to this run's)."""
    path = _multiproc_dir()
    if path is None:
        return
    os.makedirs(path, mode=0o700, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def child_exit(server: Any, worker: Any) -> None:
    """In the master, after a worker exited (shutdown, recycling, crash): with
    PROMETHEUS_MULTIPROC_DIR set, drop its gauges from the merged scrape."""
    if _multiproc_dir() is None:
        return
    try:
        from greenpool.prometheus import mark_process_dead

        mark_process_dead(worker.pid)
    except Exception as ex:  # prometheus_client missing: nothing was written
        server.log.warning("greenpool: could not drop worker %s's gauges: %s", worker.pid, ex)


# --------------------------------------------------------------------------- hooks
def post_fork(server: Any, worker: Any) -> None:
    """Send greenpool's log records (pool opened/closed, failures, 503s) to gunicorn's
    error log unless the app configured logging for them itself."""
    log = logging.getLogger("greenpool")
    if not log.handlers:
        log.setLevel(_env("GREENPOOL_LOG_LEVEL", "INFO").upper())
        for handler in logging.getLogger("gunicorn.error").handlers:
            log.addHandler(handler)
        log.propagate = False


def post_worker_init(worker: Any) -> None:
    """Runs in the worker after gevent patched it and the app was loaded.

    Installs psycogreen (psycopg2's gevent wait callback), prepares every configured
    driver and verifies that it cooperates with gevent. A problem makes the worker fail
    to boot, which stops gunicorn with the reason in the log, instead of serving with a
    driver that blocks the whole worker (unless the app set
    ``GREENPOOL_REQUIRE_COOPERATION = False``: then it is a warning).
    """
    try:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
    except ImportError:
        pass  # psycopg2 not used

    from greenpool import CooperationError

    problems, required = _cooperation(worker)
    if not problems:
        return
    message = "database driver will block the gevent worker: " + "; ".join(problems)
    if not required:
        worker.log.warning("%s (GREENPOOL_REQUIRE_COOPERATION is False: serving anyway)", message)
        return
    worker.log.critical(message)
    raise CooperationError(message)


def worker_exit(server: Any, worker: Any) -> None:
    """Close the worker's pools so PostgreSQL sees clean disconnects, not dropped sockets
    (runs in the worker after graceful shutdown, on max_requests recycling too); with
    Prometheus metrics on, copy their last figures to the shared files."""
    _close_pools(timeout=2.0)
    metrics = sys.modules.get("greenpool.prometheus")
    if metrics is not None:
        metrics.sync()


def worker_abort(worker: Any) -> None:
    """SIGABRT from the master: the worker missed its heartbeat for ``timeout`` seconds,
    which under gevent means something blocked the hub. Log where every greenlet and
    thread is, so the blocking call can be found."""
    from gevent.util import format_run_info

    worker.log.critical(
        "worker %s blocked for %s s; greenlets and threads:\n%s",
        worker.pid,
        worker.cfg.timeout,
        "\n".join(format_run_info()),
    )
