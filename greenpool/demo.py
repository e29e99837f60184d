"""``greenpool demo``: the example app under gunicorn -k gevent, loaded by locust.

Steps: a database (``DATABASE_URL`` or ``--conninfo``, else an embedded throwaway
PostgreSQL), the example schema, gunicorn with greenpool's gunicorn settings on
127.0.0.1, a bounded headless locust run, a summary (throughput, latency percentiles,
failures, each worker's pool statistics), then a clean shutdown that checks no connection
is left behind. SIGINT, SIGTERM and SIGHUP all stop gunicorn and locust before exiting.

It runs from an installed wheel: ``pip install 'greenpool[demo]'`` brings Flask,
gunicorn, locust and (on Linux x86_64) the ``pgserver`` wheel's PostgreSQL binaries.
Prefer ``DATABASE_URL`` to ``--conninfo`` for a URL with a password: every user on the
machine can read a command line (``ps``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APP_NAME = "greenpool-demo"
#: The example app, shipped in the wheel from the checkout's examples/flask_app.
APP_PACKAGE = "greenpool.examples.flask_app"
_EXTRAS = ("flask", "gunicorn", "locust")


class DemoError(Exception):
    """The demo could not run; the message says which step failed."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like KeyboardInterrupt, cleaning up on the way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def step(message: str) -> None:
    """Print one line of progress at once."""
    print(f"[demo] {message}", flush=True)


# --------------------------------------------------------------------------- pieces


def _require_extras() -> None:
    missing = [name for name in _EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise DemoError(f"the demo needs {', '.join(missing)}: pip install 'greenpool[demo]'")


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """Turn the first SIGTERM or SIGHUP into :class:`Stopped` (later ones are ignored:
    the shutdown is already under way), so every ``finally`` stops what it started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, _frame: Any) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def embedded_postgres() -> Iterator[str]:
    """A throwaway server on 127.0.0.1 (:mod:`greenpool.embedded`); yields its superuser
    DSN, whose password stays in a 0600 passfile."""
    from greenpool.embedded import EmbeddedPostgres, PgBinariesNotFoundError

    started = time.monotonic()
    try:
        cluster = EmbeddedPostgres(max_connections=100)
    except PgBinariesNotFoundError as ex:
        raise DemoError(f"{ex} (`pip install 'greenpool[demo]'` brings pgserver)") from None
    try:
        cluster.start()
        step(
            f"embedded PostgreSQL ready on {cluster.host}:{cluster.port} "
            f"in {time.monotonic() - started:.1f} s (binaries: {cluster.bindir})"
        )
        yield cluster.dsn()
    finally:
        cluster.destroy()
        step("embedded PostgreSQL stopped and removed")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_json(url: str, timeout: float = 2.0) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Poll ``url`` until it answers 200; fail if ``proc`` exits or time runs out."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"gunicorn exited with code {proc.returncode} while starting")
        try:
            http_json(url, timeout=1.0)
            return
        except (OSError, ValueError):
            time.sleep(0.2)
    raise DemoError(f"gunicorn did not answer {url} in time")


def count_backends(conninfo: str, app_prefix: str) -> int:
    """Client backends whose application_name starts with ``app_prefix``."""
    import psycopg

    from greenpool.conninfo import split_conninfo

    with psycopg.connect(split_conninfo(conninfo).conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND application_name LIKE %s AND pid <> pg_backend_pid()",
            (app_prefix + "%",),
        ).fetchone()
    return int(row[0]) if row else 0


@dataclass
class PoolWatch:
    """The latest /_greenpool/stats answer of each worker process."""

    url: str
    workers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def poll(self) -> dict[str, Any] | None:
        """Fetch once; returns the answer (or None if the server did not answer)."""
        try:
            snapshot: dict[str, Any] = http_json(self.url)
        except (OSError, ValueError):
            return None
        self.workers[int(snapshot["pid"])] = snapshot
        return snapshot

    def settle(self, expected: int, seconds: float) -> None:
        """Poll until ``expected`` workers answered since now, or ``seconds`` passed."""
        fresh: set[int] = set()
        deadline = time.monotonic() + seconds
        while len(fresh) < expected and time.monotonic() < deadline:
            snapshot = self.poll()
            if snapshot is not None:
                fresh.add(int(snapshot["pid"]))

    def progress(self) -> str:
        """One line: connections in use and waiting, summed over the workers seen."""
        in_use = waiting = size = acquires = 0
        for snapshot in self.workers.values():
            for stats in snapshot["databases"].values():
                in_use += stats.get("acquired", 0)
                waiting += stats.get("waiting", 0)
                size += stats.get("max_size", 0)
                acquires += stats.get("acquire_count", 0)
        return (
            f"{len(self.workers)} worker(s) seen: {in_use}/{size} connections in use, "
            f"{waiting} waiting, {acquires} acquires so far"
        )


# --------------------------------------------------------------------------- summary


def read_summary(path: Path) -> dict[str, Any]:
    """The figures the locustfile's quitting hook wrote (``--summary-json``)."""
    try:
        summary: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        raise DemoError(f"locust wrote no summary ({path})") from None
    return summary


def print_summary(summary: dict[str, Any], watch: PoolWatch, args: argparse.Namespace) -> None:
    """The results, as a person wants to read them."""
    total = summary["total"]
    print()
    print("== greenpool demo results ==")
    print(
        f"setup     {args.users} users for {args.duration:g} s against {args.workers} gunicorn "
        f"-k gevent workers, pool max_size {args.max_size} per worker ({args.driver})"
    )
    ratio = total["failures"] / total["requests"] if total["requests"] else 0.0
    print(
        f"requests  {total['requests']} total, {total['rps']:.1f} req/s, "
        f"{total['failures']} failures ({ratio:.2%})"
    )
    print(
        f"latency   p50 {total['p50']:.0f} ms, p95 {total['p95']:.0f} ms, "
        f"p99 {total['p99']:.0f} ms, max {total['max']:.0f} ms"
    )
    print(f"\n{'endpoint':<34}{'reqs':>7}{'fails':>7}{'p50':>9}{'p95':>9}{'p99':>9}")
    for e in summary["endpoints"]:
        name = f"{e['method']} {e['name']}"[:33]
        print(
            f"{name:<34}{e['requests']:>7}{e['failures']:>7}"
            f"{e['p50']:>6.0f} ms{e['p95']:>6.0f} ms{e['p99']:>6.0f} ms"
        )
    print("\npools per worker (from /_greenpool/stats):")
    for pid, snapshot in sorted(watch.workers.items()):
        for label, s in snapshot["databases"].items():
            if not s.get("started"):
                print(f"  pid {pid} {label:<10} not started")
                continue
            print(
                f"  pid {pid} {label:<10} peak acquired {s['peak_acquired']}/{s['max_size']}, "
                f"acquires {s['acquire_count']}, waited {s['empty_acquire_count']} "
                f"({s['acquire_wait_seconds_total']:.2f} s in total), "
                f"timeouts {s['timeout_count']}, connections opened {s['new_conns_count']}"
            )


# --------------------------------------------------------------------------- the run


def _gunicorn(
    args: argparse.Namespace, conninfo: str, port: int, log: Path
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=conninfo,
        FLASK_GREENPOOL_NAME=APP_NAME,
        FLASK_GREENPOOL_MAX_SIZE=str(args.max_size),
        FLASK_GREENPOOL_DRIVER=args.driver,
        GUNICORN_NO_CONTROL_SOCKET="1",  # several gunicorns may run at once (tests)
    )
    argv = [
        sys.executable, "-m", "gunicorn", "--config", "python:greenpool.gunicorn",
        "--workers", str(args.workers), "--bind", f"127.0.0.1:{port}",
        f"{APP_PACKAGE}.wsgi:app",
    ]  # fmt: skip
    with _create_private(log) as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
            start_new_session=True, umask=0o077,
        )  # fmt: skip


def _locustfile() -> Path:
    spec = importlib.util.find_spec(APP_PACKAGE)  # imports greenpool.examples only
    if spec is None or spec.origin is None:
        raise DemoError(f"{APP_PACKAGE} is not installed")
    return Path(spec.origin).parent / "locustfile.py"


def _create_private(path: Path) -> Any:
    """Open ``path`` for writing, created (or truncated) with mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def _locust(args: argparse.Namespace, base_url: str, outdir: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.setdefault("LOCUST_MAX_FAIL_RATIO", str(args.max_fail_ratio))
    env.setdefault("LOCUST_MAX_P95_MS", str(args.max_p95_ms))
    env["LOCUST_SUMMARY_JSON"] = str(outdir / "summary.json")
    argv = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(_locustfile()),
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate or args.users),
        "--run-time",
        f"{args.duration:g}s",
        "--host",
        base_url,
        "--csv",
        str(outdir / "locust"),
        "--html",
        str(outdir / "report.html"),
        "--only-summary",
        "--stop-timeout",
        "5",
        "--loglevel",
        "WARNING",
    ]
    with _create_private(outdir / "locust.log") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=outdir,
            start_new_session=True, umask=0o077,
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> float:
    """Signal ``proc`` and wait; kill it if it outlives ``timeout``. Returns seconds."""
    start = time.monotonic()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            step(f"process {proc.pid} did not stop within {timeout:g} s: killing it")
            _kill_group(proc)
        except BaseException:  # interrupted while waiting: leave nothing running
            _kill_group(proc)
            raise
    return time.monotonic() - start


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s whole session (it was started as a session leader)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _redacted(conninfo: str, error: BaseException) -> str:
    """The error's text, without any password the conninfo holds."""
    from greenpool.conninfo import Redactor, secrets_of, split_conninfo

    text = str(error).strip().replace("\n", " ")
    try:
        return Redactor(secrets_of(conninfo, split_conninfo(conninfo).params, {}))(text)
    except ValueError:
        return f"{type(error).__name__} (the conninfo could not be parsed)"


def run_demo(args: argparse.Namespace, conninfo: str, outdir: Path) -> int:
    """Schema, gunicorn, locust, summary, shutdown; returns the exit code."""
    import psycopg

    setup_conninfo = importlib.import_module(f"{APP_PACKAGE}.schema").setup_conninfo

    step("creating the example schema (idempotent)")
    try:
        accounts = setup_conninfo(conninfo)
    except (psycopg.Error, ValueError) as ex:
        raise DemoError(f"cannot create the example schema: {_redacted(conninfo, ex)}") from None
    step(f"schema ready: {accounts} accounts")

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    gunicorn_log = outdir / "gunicorn.log"
    step(f"starting gunicorn -k gevent, {args.workers} workers, on {base_url}")
    server = _gunicorn(args, conninfo, port, gunicorn_log)
    exit_code = 0
    try:
        wait_http(f"{base_url}/healthz", server, time.monotonic() + 30)
        step(f"gunicorn is serving (log: {gunicorn_log})")
        watch = PoolWatch(f"{base_url}/_greenpool/stats")

        step(f"load: {args.users} locust users for {args.duration:g} s (log: {outdir}/locust.log)")
        started = time.monotonic()
        load = _locust(args, base_url, outdir)
        try:
            next_report = started + args.progress
            while load.poll() is None:
                watch.poll()
                if time.monotonic() >= next_report:
                    elapsed = time.monotonic() - started
                    step(f"  {elapsed:4.0f} s: {watch.progress()}")
                    next_report += args.progress
                time.sleep(0.25)
        finally:
            _stop(load, signal.SIGTERM, args.duration + 30)
        watch.settle(args.workers, 5.0)
        if load.returncode not in (0, 1):
            log_tail = _tail(outdir / "locust.log")
            raise DemoError(f"locust failed (exit {load.returncode}):\n{log_tail}")
        summary = read_summary(outdir / "summary.json")
        print_summary(summary, watch, args)
        if load.returncode != 0 or not summary["passed"]:
            exit_code = 1
            print(f"\nthresholds exceeded: {'; '.join(summary['problems']) or 'see locust.log'}")
    except BaseException:
        if server.poll() is not None or not gunicorn_log.exists():
            print(_tail(gunicorn_log))
        raise
    finally:
        seconds = _stop(server, signal.SIGTERM, 40)
        closed = len(re.findall(r"pool '[^']*' closed", _tail(gunicorn_log, 10_000)))
        left = count_backends(conninfo, APP_NAME)
        print(
            f"\nshutdown  SIGTERM: gunicorn exited in {seconds:.1f} s; "
            f"{closed} pool close(s) logged by worker_exit; "
            f"{left} server connection(s) left with application_name {APP_NAME}*"
        )
        if left:
            exit_code = 1
    print(f"report    {outdir / 'report.html'} (CSV: {outdir}/locust_stats.csv, logs)")
    return exit_code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``greenpool demo`` / ``scripts/demo``."""
    parser.add_argument(
        "--conninfo",
        default=None,
        help="use this database instead of $DATABASE_URL (default: $DATABASE_URL, else an "
        "embedded PostgreSQL); prefer DATABASE_URL for a password: ps shows command lines",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (8 s of load)")
    parser.add_argument("--users", type=int, default=100, help="concurrent locust users")
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per s")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load (20)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--max-size", type=int, default=10, help="pool max_size per worker")
    parser.add_argument("--driver", choices=("psycopg", "psycopg2"), default="psycopg")
    parser.add_argument("--max-fail-ratio", type=float, default=0.0)
    parser.add_argument("--max-p95-ms", type=float, default=2000.0)
    parser.add_argument("--progress", type=float, default=2.0, help="seconds between updates")
    parser.add_argument(
        "--output", type=Path, default=None, help="directory for reports (created 0700)"
    )


def run(args: argparse.Namespace) -> int:
    """Entry point shared by ``greenpool demo`` and ``python -m greenpool.demo``."""
    from greenpool.cli import warn_if_password

    if args.duration is None:
        args.duration = 8.0 if args.quick else 20.0
    warn_if_password("greenpool demo", args.conninfo)
    # Reports, logs and CSVs may show data and settings: only this user may read them
    # (gunicorn and locust inherit the mask).
    old_umask = os.umask(0o077)
    try:
        with _stop_signals_raise():
            return _run(args)
    finally:
        os.umask(old_umask)


def _run(args: argparse.Namespace) -> int:
    try:
        _require_extras()
        outdir = args.output or Path(tempfile.mkdtemp(prefix="greenpool-demo-"))
        outdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            conninfo = args.conninfo or os.environ.get("DATABASE_URL") or None
            if conninfo:
                step("using the database given by --conninfo / DATABASE_URL")
            else:
                step("no database given: starting an embedded PostgreSQL (initdb, 127.0.0.1)")
                conninfo = stack.enter_context(embedded_postgres())
            return run_demo(args, conninfo, outdir)
    except DemoError as ex:
        print(f"[demo] FAILED: {ex}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[demo] interrupted; everything was shut down", file=sys.stderr)
        return 130
    except Stopped as ex:
        name = signal.Signals(ex.signum).name
        print(f"[demo] stopped by {name}; everything was shut down", file=sys.stderr)
        return 128 + ex.signum


def main(argv: list[str] | None = None) -> int:
    """``python -m greenpool.demo [options]``."""
    parser = argparse.ArgumentParser(prog="greenpool demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
