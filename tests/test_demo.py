"""The demo command, in its quick mode, against the test cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_quick(dsn: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [
            sys.executable, "-m", "greenpool.demo", "--quick", "--conninfo", dsn,
            "--users", "50", "--output", str(tmp_path), "--progress", "1",
        ],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
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
    assert (tmp_path / "report.html").exists() and (tmp_path / "summary.json").exists()


def test_demo_needs_a_checkout_message() -> None:
    from greenpool import demo

    assert demo.REPO == REPO  # editable install: examples/ and tests/support/ are found
