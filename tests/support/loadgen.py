"""A bounded load generator for the fault scenarios, and the results file they write.

``LoadGen`` runs N greenlets (default 200) that loop ``acquire -> query -> release`` over
any pool with a ``connection(timeout=...)`` context manager (greenpool and psycopg_pool
both qualify). Every loop is bounded in count (``max_ops`` per worker) and in time
(``duration``), and every operation is bounded by a guard timer: an operation still
running after ``guard`` seconds is recorded as ``HUNG`` (a test failure, never a hang of
the suite).

Per operation it records the outcome (``ok`` or the exception's class name), the time spent
waiting for the pool and the total latency, bucketed by the *phase* the test is in when
the operation starts (``lg.phase = "outage"``). Latencies go into fixed-size log
histograms rather than lists so that a long soak does not grow memory (the soak measures
RSS). On every acquire it also checks that the connection is not already held by another
worker (``duplicated``; a worker holds its connection until its release has returned) and
is clean (``bad_state``: not idle, closed or broken).

Results: :func:`record_result` prints a scenario's figures and appends one JSON line to
``$GREENPOOL_FAULT_RESULTS`` (default ``<tmpdir>/greenpool-fault-results.jsonl``);
``python -m tests.support.loadgen render [--compare] [FILE]`` turns the latest line per scenario
into the Markdown tables of RELIABILITY.md (``--compare``: the side-by-side runs of
``tests/test_side_by_side.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import gevent
from gevent import Greenlet, GreenletExit
from gevent.event import Event

RESULTS_ENV = "GREENPOOL_FAULT_RESULTS"
HUNG = "HUNG"
QUERY_TIMEOUT = "QueryTimeout"
KILLED = "Killed"
CUT = "Cut"  # the operation's own random gevent.Timeout (chaos) fired


class PoolLike(Protocol):
    def connection(self, timeout: float | None = None) -> Any: ...


# --------------------------------------------------------------------------- histogram


class Histogram:
    """Log-bucketed latency histogram (2% resolution from 10 µs up); constant memory."""

    _BASE = 1e-5
    _STEP = math.log(1.02)

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.n = 0
        self.max = 0.0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        bucket = 0 if seconds <= self._BASE else int(math.log(seconds / self._BASE) / self._STEP)
        self.counts[bucket] += 1
        self.n += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """Upper edge of the bucket holding quantile ``q`` (0 when empty)."""
        if not self.n:
            return 0.0
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(self.max, self._BASE * math.exp((bucket + 1) * self._STEP))
        return self.max

    def summary(self) -> dict[str, float]:
        return {
            "n": self.n,
            "p50_ms": round(self.quantile(0.50) * 1e3, 2),
            "p99_ms": round(self.quantile(0.99) * 1e3, 2),
            "max_ms": round(self.max * 1e3, 2),
        }


# --------------------------------------------------------------------------- load generator


def select_one(conn: Any) -> None:
    conn.execute("SELECT 1").fetchone()


def transaction_status_ok(conn: Any) -> bool:
    """A psycopg 3 connection fit to be handed out: open, unbroken, no transaction."""
    from psycopg.pq import TransactionStatus

    return (
        not conn.closed
        and not conn.broken
        and conn.pgconn.transaction_status == TransactionStatus.IDLE
    )


class LoadGen:
    """N greenlets looping acquire -> query -> release, bounded in count and time."""

    def __init__(
        self,
        pool: PoolLike,
        *,
        workers: int = 200,
        timeout: float = 1.0,
        query: Callable[[Any], None] = select_one,
        duration: float = 10.0,
        max_ops: int = 100_000,
        query_timeout: float | None = None,
        guard: float | None = None,
        think: float = 0.0,
        check_conn: Callable[[Any], bool] | None = transaction_status_ok,
        cut: Callable[[random.Random], float | None] | None = None,
        seed: int = 0,
    ) -> None:
        self.pool = pool
        self.workers = workers
        self.timeout = timeout
        self.query = query
        self.duration = duration
        self.max_ops = max_ops
        self.query_timeout = query_timeout
        # Guard: beyond acquire timeout + query bound + slack the operation "hung".
        self.guard = guard if guard is not None else timeout + (query_timeout or 10.0) + 5.0
        self.think = think
        self.check_conn = check_conn
        # cut(rng) -> seconds: a gevent.Timeout around the whole operation, so that it is
        # interrupted at a random point (waiting, checking, querying or releasing).
        self.cut = cut
        self.rng = random.Random(seed)
        self.phase = "run"
        self.counts: Counter[tuple[str, str]] = Counter()
        self.waits: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.latencies: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.per_worker_errors: Counter[int] = Counter()
        self.duplicated = 0
        self.bad_state = 0
        self.ops = 0
        self.last_ok = 0.0
        self.first_ok: float | None = None
        self.timeout_waits = Histogram()  # how long PoolTimeout-ed acquires took
        self.errors_seen: dict[tuple[str, str], str] = {}  # (phase, outcome) -> a message
        self._held: set[int] = set()
        self._ok_event = Event()
        self._ok_event.set()  # not armed
        self._stop = Event()
        self._greenlets: dict[int, Greenlet] = {}
        self._deadline = 0.0
        self._t0 = 0.0

    # -- control ---------------------------------------------------------------------

    def start(self) -> LoadGen:
        self._t0 = time.monotonic()
        self._deadline = self._t0 + self.duration
        for i in range(self.workers):
            self.spawn_worker(i)
        return self

    def spawn_worker(self, i: int) -> Greenlet:
        g = gevent.spawn(self._worker, i)
        self._greenlets[i] = g
        return g

    def greenlet(self, i: int) -> Greenlet:
        return self._greenlets[i]

    def stop(self, timeout: float | None = None) -> None:
        """Ask every worker to finish its current operation and wait (bounded) for them."""
        self._stop.set()
        limit = timeout if timeout is not None else self.guard + 5.0
        gevent.joinall(list(self._greenlets.values()), timeout=limit)
        alive = [g for g in self._greenlets.values() if not g.dead]
        if alive:
            gevent.killall(alive, block=True, timeout=5)
            raise AssertionError(f"{len(alive)} load workers still running {limit:g} s after stop")

    def run(self) -> LoadGen:
        """Start, run for ``duration`` (or until every worker did ``max_ops``), stop."""
        self.start()
        gevent.joinall(list(self._greenlets.values()), timeout=self.duration + self.guard + 5)
        self.stop()
        return self

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def arm(self) -> None:
        """Start watching for the next successful operation (see :meth:`wait_ok`)."""
        self.first_ok = None
        self._ok_event.clear()

    def wait_ok(self, timeout: float) -> float | None:
        """Monotonic time of the first success since :meth:`arm` (waiting up to timeout)."""
        if self._ok_event.wait(timeout):
            return self.first_ok
        return None

    # -- the worker ------------------------------------------------------------------

    def _worker(self, i: int) -> None:
        n = 0
        while n < self.max_ops and not self._stop.is_set() and time.monotonic() < self._deadline:
            n += 1
            self._one(i)
            if self.think:
                gevent.sleep(self.rng.uniform(0, 2 * self.think))
            else:
                gevent.sleep(0)  # let others run even when the pool never blocks

    def _one(self, i: int) -> None:
        phase = self.phase
        t0 = time.monotonic()
        waited: float | None = None
        guard = gevent.Timeout(self.guard)
        cut_after = self.cut(self.rng) if self.cut is not None else None
        cut = gevent.Timeout(cut_after) if cut_after is not None else None
        bound: gevent.Timeout | None = None
        outcome = "ok"
        message = ""
        held: Any = None
        guard.start()
        if cut is not None:
            cut.start()
        try:
            # The connection counts as held until the release has returned: a pool that
            # lent it to someone else while this borrower's release (rollback, reset)
            # still runs has lent it twice.
            with self.pool.connection(timeout=self.timeout) as conn:
                held = conn
                waited = time.monotonic() - t0
                self._on_acquire(conn)
                if self.query_timeout is not None:
                    # The documented way to bound a borrower's own work: a gevent.Timeout
                    # covering the query and the commit/release that follows it.
                    bound = gevent.Timeout(self.query_timeout)
                    bound.start()
                self.query(conn)
        except gevent.Timeout as ex:
            if ex is guard:
                outcome, message = HUNG, f"still running after {self.guard:g} s"
            elif ex is cut:
                outcome = CUT
            elif ex is bound:
                outcome = QUERY_TIMEOUT
                message = f"query + release exceeded {self.query_timeout:g} s (gevent.Timeout)"
            else:
                raise  # somebody else's timeout: not ours to swallow
        except GreenletExit:
            self._record(i, phase, KILLED, t0, waited, "")
            raise
        except Exception as ex:
            outcome, message = type(ex).__name__, str(ex)
        finally:
            if held is not None:
                self._held.discard(id(held))
            guard.close()
            if cut is not None:
                cut.close()
            if bound is not None:
                bound.close()
        self._record(i, phase, outcome, t0, waited, message)

    def _on_acquire(self, conn: Any) -> None:
        key = id(conn)
        if key in self._held:
            self.duplicated += 1
        self._held.add(key)
        if self.check_conn is not None and not self.check_conn(conn):
            self.bad_state += 1

    def _record(
        self, i: int, phase: str, outcome: str, t0: float, waited: float | None, message: str
    ) -> None:
        now = time.monotonic()
        self.ops += 1
        self.counts[(phase, outcome)] += 1
        self.latencies[phase].add(now - t0)
        if waited is not None:
            self.waits[phase].add(waited)
        elif outcome not in (KILLED, HUNG, CUT):
            # Never got a connection: the whole operation was the acquire.
            self.waits[phase].add(now - t0)
        if outcome == "ok":
            self.last_ok = now
            if not self._ok_event.is_set():
                self.first_ok = now
                self._ok_event.set()
        elif outcome not in (KILLED, CUT):
            self.per_worker_errors[i] += 1
            self.errors_seen.setdefault((phase, outcome), message[:300])
            if outcome == "PoolTimeout":
                self.timeout_waits.add(now - t0)

    # -- results ---------------------------------------------------------------------

    def outcomes(self, phase: str | None = None) -> Counter[str]:
        out: Counter[str] = Counter()
        for (p, outcome), n in self.counts.items():
            if phase is None or p == phase:
                out[outcome] += n
        return out

    def wait_hist(self, phase: str | None = None) -> Histogram:
        return self._merged(self.waits, phase)

    def latency_hist(self, phase: str | None = None) -> Histogram:
        return self._merged(self.latencies, phase)

    @staticmethod
    def _merged(hists: dict[str, Histogram], phase: str | None) -> Histogram:
        if phase is not None:
            return hists.get(phase) or Histogram()
        merged = Histogram()
        for h in hists.values():
            merged.merge(h)
        return merged

    def summary(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "outcomes": dict(self.outcomes()),
            "by_phase": {
                phase: dict(self.outcomes(phase)) for phase in sorted({p for p, _ in self.counts})
            },
            "wait": self.wait_hist().summary(),
            "latency": self.latency_hist().summary(),
            "duplicated": self.duplicated,
            "bad_state": self.bad_state,
        }


# --------------------------------------------------------------------------- helpers


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def results_path() -> Path:
    return Path(
        os.environ.get(RESULTS_ENV)
        or os.path.join(tempfile.gettempdir(), "greenpool-fault-results.jsonl")
    )


def _git_rev() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    return ""


def record_result(
    scenario: str,
    figures: dict[str, Any],
    *,
    pool: str = "greenpool",
    guarantee: str = "",
    headline: str = "",
    rerun: str = "",
) -> dict[str, Any]:
    """Print a scenario's figures and append them as one JSON line to the results file."""
    line = {
        "scenario": scenario,
        "pool": pool,
        "guarantee": guarantee,
        "headline": headline,
        "figures": figures,
        "rerun": rerun,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git": _git_rev(),
        "cpus": os.cpu_count(),
    }
    text = json.dumps(line, sort_keys=True, default=str)
    print(f"\n[fault-results] {text}")
    with contextlib.suppress(OSError):
        path = results_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(text + "\n")
    return line


def _latest(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    with path.open() as f:
        for raw in f:
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                latest[(line["scenario"], line["pool"])] = line
    return latest


def _scenario_key(scenario: str) -> tuple[int, str]:
    head = scenario.split(".", 1)[0]
    digits = "".join(c for c in head if c.isdigit())
    return (int(digits) if digits else 99, scenario)


def render(path: Path, *, compare: bool = False) -> str:
    """Markdown table of the latest result per scenario.

    Default: the pytest scenarios (pool "greenpool"). ``compare``: the runs of
    tests/test_side_by_side.py, greenpool and psycopg_pool side by side.
    """
    latest = _latest(path)
    if compare:
        scenarios = sorted(
            {s for s, pool in latest if pool in ("greenpool-compare", "psycopg_pool")},
            key=_scenario_key,
        )
        rows = [
            "| Scenario | greenpool | psycopg_pool 3.3 |",
            "|---|---|---|",
        ]
        for scenario in scenarios:
            ours = latest.get((scenario, "greenpool-compare"), {})
            theirs = latest.get((scenario, "psycopg_pool"), {})
            rows.append(
                f"| {scenario} | {ours.get('headline', '—')} | {theirs.get('headline', '—')} |"
            )
        return "\n".join(rows)
    scenarios = sorted({s for s, pool in latest if pool == "greenpool"}, key=_scenario_key)
    rows = [
        "| Scenario | Guaranteed | Measured | Rerun |",
        "|---|---|---|---|",
    ]
    for scenario in scenarios:
        line = latest[(scenario, "greenpool")]
        rerun = f"`{line['rerun']}`" if line.get("rerun") else ""
        rows.append(f"| {scenario} | {line['guarantee']} | {line['headline']} | {rerun} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    args = list(argv)
    if not args or args[0] != "render":
        usage = "usage: python -m tests.support.loadgen render [--compare] [RESULTS.jsonl]"
        print(usage, file=sys.stderr)
        return 2
    compare = "--compare" in args
    rest = [a for a in args[1:] if a != "--compare"]
    path = Path(rest[0]) if rest else results_path()
    print(render(path, compare=compare))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
