"""Count the instructions of a child's measured loop under callgrind.

The child starts uninstrumented (``--instr-atstart=no``: start-up and warm-up run fast),
prints ``READY`` and waits for a line on stdin; ``callgrind_control -i on`` then counts
until it prints ``DONE``, when counting is switched off again. Used by
benchmarks.flask_instructions and benchmarks.orm_instructions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def control(pid: int, what: str) -> None:
    """``callgrind_control -i on|off PID``."""
    proc = subprocess.run(
        ["callgrind_control", "-i", what, str(pid)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"callgrind_control -i {what} failed: {proc.stdout} {proc.stderr}")


def count_marked(case: str, child_argv: list[str], out: Path, errfile: Path) -> int:
    """Instructions between the child's READY and DONE (``child_argv``: what follows
    ``python``, e.g. ``["-m", "benchmarks.orm_instructions", "--child", ...]``)."""
    with errfile.open("w+") as err:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out}", sys.executable, *child_argv],
            cwd=REPO,
            # A fixed hash seed: dict probing and set order otherwise change the count of a
            # case by several thousand instructions from one run to the next.
            env={**os.environ, "PYTHONHASHSEED": "0"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            for expect, switch in (("READY", "on"), ("DONE", "off")):
                line = proc.stdout.readline()
                if line.strip() != expect:
                    raise RuntimeError(f"{case}: child said {line!r} instead of {expect}")
                control(proc.pid, switch)
                proc.stdin.write("\n")
                proc.stdin.flush()
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read()
    found = re.search(r"Collected : (\d+)", stderr)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{case}: callgrind run failed:\n{stderr[-2000:]}")
    return int(found.group(1))


def have_valgrind() -> bool:
    """True if valgrind is on PATH; otherwise says how to get it, on stderr."""
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return False
    return True


def parse_cases(ap: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated cases of ``--cases``; an argparse error names unknown ones."""
    cases = [c for c in text.split(",") if c]
    unknown = set(cases) - set(known)
    if unknown:
        ap.error(f"unknown case(s): {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    return cases


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[str]:
    """``dsn``, or a throwaway embedded PostgreSQL's (destroyed on exit)."""
    if dsn is not None:
        yield dsn
        return
    from greenpool.embedded import EmbeddedPostgres

    cluster = EmbeddedPostgres()
    cluster.start()
    try:
        yield cluster.admin_dsn
    finally:
        cluster.destroy()
