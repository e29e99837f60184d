"""Helpers shared by the orchestrator and the worker processes.

Nothing here imports gevent or a database driver at module level: the worker imports this
module *after* ``gevent.monkey.patch_all()`` and the orchestrator never patches at all.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Prefix of the one stdout line a worker prints with its JSON result.
RESULT_MARKER = "BENCH_RESULT "


# --------------------------------------------------------------------------- statistics


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def coefficient_of_variation(counts: Sequence[int]) -> float:
    """Population standard deviation over mean (0 for perfectly even counts)."""
    if not counts:
        return math.nan
    mean = sum(counts) / len(counts)
    if mean == 0:
        return math.inf
    return statistics.pstdev(counts) / mean


# --------------------------------------------------------------------------- CPU pinning


def pick_cpu(requested: int | None = None) -> int | None:
    """The CPU to pin to: ``requested`` if allowed, else the highest allowed one."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if requested is not None:
        return requested if requested in allowed else None
    return allowed[-1] if allowed else None


def other_cpu(cpu: int | None) -> int | None:
    """An allowed CPU other than ``cpu`` (the lowest), or ``cpu`` when there is no other."""
    if cpu is None or not hasattr(os, "sched_getaffinity"):
        return cpu
    others = sorted(os.sched_getaffinity(0) - {cpu})
    return others[0] if others else cpu


def pin_self(cpu: int | None, nice: int | None = None) -> bool:
    """Pin the calling process to ``cpu`` (and set its nice value); False if not pinned."""
    if nice is not None:
        set_nice(0, nice)
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return False
    return os.sched_getaffinity(0) == {cpu}


def set_nice(pid: int, nice: int) -> bool:
    """Set a process's nice value (negative needs root); False if refused."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError:
        return False
    return True


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc), best effort."""
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tids = [p.name for p in task_dir.iterdir()]
    except OSError:
        return kids
    for tid in tids:
        try:
            text = (task_dir / tid / "children").read_text()
        except OSError:
            continue
        kids.extend(int(x) for x in text.split())
    return kids


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _is_postgres(pid: int) -> bool:
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        try:
            exe = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return False
    return exe in ("postgres", "postmaster")


def local_postmaster(backend_pid: int | None) -> int | None:
    """The postmaster of a backend if the server runs on this machine, else None.

    ``backend_pid`` comes from ``pg_backend_pid()``; for a remote server that number means
    nothing here, so both it and its parent must be postgres processes.
    """
    if backend_pid is None or not _is_postgres(backend_pid):
        return None
    parent = parent_of(backend_pid)
    return parent if parent is not None and _is_postgres(parent) else None


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _schedstat_ns(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def tree_cpu_ns(root: int | None) -> int | None:
    """CPU time used so far by process ``root``, its live children and its reaped children.

    Live processes are read from ``/proc/<pid>/schedstat`` (nanoseconds); children that
    already exited count through the root's ``cutime + cstime`` (clock ticks), which the
    kernel adds when the root reaps them. The difference of two readings is therefore the
    CPU the whole tree spent in between, even when children come and go (a postmaster's
    backends, gunicorn's worker). None when /proc cannot be read (e.g. a remote server).
    """
    if root is None:
        return None
    own = _schedstat_ns(root)
    if own is None:
        return None
    try:
        fields = Path(f"/proc/{root}/stat").read_text().rsplit(")", 1)[1].split()
        reaped = (int(fields[13]) + int(fields[14])) * 1_000_000_000 // _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None
    total = own + reaped
    for child in children_of(root):
        total += _schedstat_ns(child) or 0
    return total


def _proc_counters(pid: int) -> dict[str, int] | None:
    """user/system CPU (clock ticks, with reaped children) and context switches of one
    live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out = {
            "utime": int(fields[11]) + int(fields[13]),
            "stime": int(fields[12]) + int(fields[14]),
        }
    except (OSError, ValueError, IndexError):
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                out["vcsw"] = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                out["ivcsw"] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def tree_counters(root: int | None) -> dict[str, float] | None:
    """:func:`_proc_counters` summed over ``root`` and its live children.

    CPU comes as ``user_ns``/``sys_ns`` (clock-tick resolution: read differences over
    seconds, not milliseconds); context switches and syscalls of children that exited in
    between are lost, so use it on trees whose children live through the measurement
    (a gunicorn master and its workers, a postmaster with a pool's backends).
    """
    if root is None:
        return None
    own = _proc_counters(root)
    if own is None:
        return None
    total: dict[str, float] = {k: float(v) for k, v in own.items()}
    for child in children_of(root):
        for k, v in (_proc_counters(child) or {}).items():
            total[k] = total.get(k, 0.0) + v
    tick_ns = 1e9 / _CLK_TCK
    total["user_ns"] = total.pop("utime") * tick_ns
    total["sys_ns"] = total.pop("stime") * tick_ns
    return total


def counters_delta(
    before: dict[str, float] | None, after: dict[str, float] | None, n: int, prefix: str
) -> dict[str, float]:
    """Per-request differences of two :func:`tree_counters` readings, keys prefixed."""
    if before is None or after is None:
        return {}
    n = max(1, n)
    names = {
        "user_ns": "user_us",
        "sys_ns": "sys_us",
        "vcsw": "vcsw",
        "ivcsw": "ivcsw",
    }
    out: dict[str, float] = {}
    for key, name in names.items():
        if key in before and key in after:
            scale = 1e3 if key.endswith("_ns") else 1.0
            out[f"{prefix}_{name}"] = (after[key] - before[key]) / scale / n
    return out


@dataclass
class CpuMeter:
    """Client (this process) and server (a process tree) CPU spent between start and stop."""

    server_root: int | None = None
    client0: float = 0.0
    server0: int | None = None
    client_s: float = 0.0
    server_s: float | None = None

    def start(self) -> CpuMeter:
        import time

        self.server0 = tree_cpu_ns(self.server_root)
        self.client0 = time.process_time()
        return self

    def stop(self) -> CpuMeter:
        import time

        self.client_s = time.process_time() - self.client0
        end = tree_cpu_ns(self.server_root)
        self.server_s = (end - self.server0) / 1e9 if end is not None and self.server0 else None
        return self

    def per_op_us(self, ops: int) -> tuple[float, float | None]:
        """(client µs per op, server µs per op or None)."""
        ops = max(1, ops)
        server = self.server_s * 1e6 / ops if self.server_s is not None else None
        return self.client_s * 1e6 / ops, server


@dataclass
class ServerPinning:
    """Affinity applied to a postmaster and its children, restorable afterwards."""

    postmaster: int | None = None
    cpu: int | None = None
    applied: bool = False
    reason: str = ""
    saved: dict[int, set[int]] = field(default_factory=dict)
    nice: int | None = None
    saved_nice: dict[int, int] = field(default_factory=dict)

    def apply(self, postmaster: int | None, cpu: int | None, nice: int | None = None) -> None:
        self.postmaster, self.cpu = postmaster, cpu
        if nice is not None and postmaster is not None:
            # Backends forked later inherit the postmaster's nice value.
            for pid in [postmaster, *children_of(postmaster)]:
                try:
                    self.saved_nice[pid] = os.getpriority(os.PRIO_PROCESS, pid)
                except OSError:
                    continue
                if set_nice(pid, nice):
                    self.nice = nice
        if cpu is None:
            self.reason = "no CPU to pin to"
            return
        if postmaster is None:
            self.reason = "postmaster pid unknown"
            return
        pids = [postmaster, *children_of(postmaster)]
        try:
            for pid in pids:
                try:
                    self.saved[pid] = os.sched_getaffinity(pid)
                    os.sched_setaffinity(pid, {cpu})
                except ProcessLookupError:
                    continue
        except OSError as ex:
            self.reason = f"sched_setaffinity on the server failed: {ex}"
            self.restore()
            return
        self.applied = os.sched_getaffinity(postmaster) == {cpu}
        self.reason = "" if self.applied else "affinity did not stick"

    def restore(self) -> None:
        """Give the postmaster (and its current children) their old affinity back."""
        if self.postmaster is None:
            return
        if self.saved_nice:
            old = self.saved_nice.get(self.postmaster, 0)
            for pid in [self.postmaster, *children_of(self.postmaster)]:
                set_nice(pid, self.saved_nice.get(pid, old))
            self.saved_nice.clear()
        default = self.saved.get(self.postmaster)
        if default is None:
            return
        for pid in [self.postmaster, *children_of(self.postmaster)]:
            try:
                os.sched_setaffinity(pid, self.saved.get(pid, default))
            except OSError:
                continue
        self.saved.clear()
        self.applied = False

    def describe(self) -> str:
        nice = f", nice {self.nice}" if self.nice is not None else ""
        if self.applied:
            return (
                f"server (postmaster {self.postmaster} and its backends) pinned to CPU "
                f"{self.cpu}{nice}"
            )
        return f"server NOT pinned ({self.reason or 'not requested'}){nice}"


# --------------------------------------------------------------------------- worker I/O


def emit_result(payload: dict[str, Any]) -> None:
    """Print the worker's result where the orchestrator looks for it."""
    sys.stdout.write(RESULT_MARKER + json.dumps(payload, default=_json_default) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            parsed: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
            return parsed
    return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return str(obj)


def clean_floats(obj: Any) -> Any:
    """Replace NaN/inf by None recursively (JSON cannot carry them)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_floats(v) for v in obj]
    return obj


def worker_env() -> dict[str, str]:
    """Environment for child processes: the repo importable, no stray PG* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- contenders

#: Contender keys (worker factories live in benchmarks.contenders) and report labels.
CONTENDERS: dict[str, str] = {
    "greenpool": "greenpool",
    "psycopg_pool": "psycopg_pool",
    "sqla_fifo": "SQLAlchemy QueuePool",
    "sqla_lifo": "SQLAlchemy QueuePool LIFO",
    "psycopg2": "psycopg2 pool + psycogreen",
    "naive": "naive gevent Queue pool",
    "nopool": "no pool (connect per use)",
    "greenpool_pw": "greenpool, psycopg's own wait",
}
#: The contender every ratio is computed against.
REFERENCE = "psycopg_pool"

#: Worker scenarios, in the order a worker runs them (spike last, on fresh cold pools).
SCENARIOS: tuple[str, ...] = (
    "acquire_release",
    "select1",
    "held_select1",
    "connect_close",
    "contended",
    "io_bound",
    "cooperation",
    "spike",
)
