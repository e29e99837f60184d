"""Gunicorn configuration for a greenpool Flask app under the gevent worker.

    gunicorn -c deploy/gunicorn.conf.py examples.flask_app.wsgi:app

Every value can be overridden with an environment variable (GUNICORN_*) or on the
command line. This file never imports the app: gunicorn loads it in each worker, after
the gevent worker has monkey-patched the standard library (or, with preload, in the
master right after the patching done below).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from typing import Any


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_bool(name: str, default: bool) -> bool:
    return _env(name, "1" if default else "0").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- preload
# With preload the master imports the app before forking, while the gevent worker only
# patches after the fork: too late for whatever the app imported (psycopg picks its
# blocking C wait function at import time, a lock created unpatched stays a real lock).
# This file runs in the master before the app is imported, so patch here when preloading.
# Without preload nothing is patched in the master: each worker patches itself first.
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
# overlayfs).
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"

accesslog = _env("GUNICORN_ACCESSLOG", "") or None
# gunicorn >= 27 opens a control socket ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl);
# one path per user, so switch it off when several instances share a user (tests, demo).
control_socket_disable = _env_bool("GUNICORN_NO_CONTROL_SOCKET", False)
loglevel = _env("GUNICORN_LOGLEVEL", "info")


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

    Installs psycogreen (psycopg2's gevent wait callback), then verifies that every
    configured database driver cooperates with gevent. A problem makes the worker fail
    to boot, which stops gunicorn with the reason in the log, instead of serving with a
    driver that blocks the whole worker.
    """
    try:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
    except ImportError:
        pass  # psycopg2 not used

    from greenpool import CooperationError, cooperation_problems

    state = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("greenpool")
    if state is not None:
        problems = state.cooperation_problems()
        required = state.options.require_cooperation is not False
    else:
        try:
            problems = cooperation_problems("psycopg")
        except ImportError:
            problems = []
        required = True
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
    (runs in the worker after graceful shutdown, on max_requests recycling too): the
    Flask extension's, then every other GreenPool (SQLAlchemy engines on GreenQueuePool,
    the greenpool.django backend)."""
    try:
        from greenpool.flask import close_all_pools
    except ImportError:
        pass
    else:
        close_all_pools(timeout=2.0)
    from greenpool import close_all

    close_all(timeout=2.0)


def worker_abort(worker: Any) -> None:
    """SIGABRT from the master: the worker missed its heartbeat for `timeout` seconds,
    which under gevent means something blocked the hub. Log where every greenlet and
    thread is, so the blocking call can be found."""
    from gevent.util import format_run_info

    worker.log.critical(
        "worker %s blocked for %s s; greenlets and threads:\n%s",
        worker.pid,
        worker.cfg.timeout,
        "\n".join(format_run_info()),
    )
