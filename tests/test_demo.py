"""The demo command: its quick mode against the test cluster, its signals, its files."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from greenpool.cli import main

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DATABASE_URL", None)
    return env


@pytest.mark.slow
def test_demo_quick(dsn: str, tmp_path: Path) -> None:
    outdir = tmp_path / "new" / "reports"  # created by the demo, 0700 all the way
    result = subprocess.run(
        [
            sys.executable, "-m", "greenpool.demo", "--quick", "--users", "50",
            "--output", str(outdir), "--progress", "1",
        ],
        capture_output=True, text=True, timeout=120, env={**_env(), "DATABASE_URL": dsn},
        cwd=tmp_path,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "[demo] gunicorn is serving" in out
    assert re.search(r"\[demo\]\s+\d+ s: 2 worker\(s\) seen", out), out  # progress
    figures = re.search(r"requests  (\d+) total, ([\d.]+) req/s, 0 failures", out)
    assert figures and int(figures.group(1)) > 100, out
    assert re.search(r"latency   p50 \d+ ms, p95 \d+ ms, p99 \d+ ms", out), out
    assert re.search(r"pid \d+ default +peak acquired \d+/10", out), out
    assert "0 server connection(s) left" in out
    assert (outdir / "report.html").exists() and (outdir / "summary.json").exists()
    assert "--conninfo" not in result.stderr  # DATABASE_URL: no warning
    # the reports and logs are this user's alone
    created = [tmp_path / "new", *(tmp_path / "new").rglob("*")]
    loose = {
        str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in created
        if stat.S_IMODE(p.stat().st_mode) & 0o077
    }
    assert not loose, loose
    assert {"gunicorn.log", "locust.log", "summary.json", "report.html"} <= {
        p.name for p in created
    }


# --------------------------------------------------------------------------- signals


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat_line.rsplit(")", 1)[-1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.fixture
def reaper() -> Iterator[set[int]]:
    """Pids to SIGKILL at teardown if the demo left them behind."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_demo_stops_gunicorn_and_locust_on(
    signum: int, dsn: str, tmp_path: Path, reaper: set[int]
) -> None:
    log = tmp_path / "demo.out"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [
                sys.executable, "-m", "greenpool.demo", "--duration", "120", "--users", "5",
                "--workers", "1", "--output", str(tmp_path / "out"), "--progress", "60",
            ],
            stdout=out, stderr=subprocess.STDOUT, env={**_env(), "DATABASE_URL": dsn},
            cwd=tmp_path,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "[demo] load:" not in log.read_text():
            assert demo.poll() is None and time.monotonic() < deadline, log.read_text()
            gevent.sleep(0.1)
        children: set[int] = set()
        while len(children) < 3:  # gunicorn master + worker, locust
            assert time.monotonic() < deadline, (children, log.read_text())
            children = _children(demo.pid)
            gevent.sleep(0.1)
        reaper |= children
        demo.send_signal(signum)
        assert demo.wait(60) == 128 + signum, log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert not [pid for pid in children if _alive(pid)], "orphans left running"
    text = log.read_text()
    assert f"stopped by {signal.Signals(signum).name}" in text, text
    assert "0 server connection(s) left" in text, text


# --------------------------------------------------------------------------- options


def test_demo_warns_about_a_password_on_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    secret = "Sup3r-S3cret-demo"
    code = main(
        ["demo", "--conninfo", f"postgresql://u:{secret}@127.0.0.1:1/db?connect_timeout=2",
         "--output", str(tmp_path / "out")]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2  # nothing listens on port 1: the schema step fails, cleanly
    assert "--conninfo holds a password" in captured.err and "DATABASE_URL" in captured.err
    assert "cannot create the example schema" in captured.err
    assert secret not in captured.out + captured.err


def test_demo_help_prefers_database_url(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "prefer DATABASE_URL" in text
