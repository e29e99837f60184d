"""The benchmark suite's quick mode runs end to end (CI smoke; figures are not asserted:
timing targets live in the benchmark report, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# HTTP is the next test's; one paired cycle still exercises the cross-check.
QUICK_CORE = ("--http", "", "--paired-cycles", "1")
BENCHMARK_TIMEOUT = 300  # "--quick" takes about a minute alone, two on a loaded machine


@pytest.mark.slow
@pytest.mark.timeout(BENCHMARK_TIMEOUT + 60)  # the run's own bound fires first
def test_quick_benchmark_runs_and_writes_a_report(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            *QUICK_CORE,
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=BENCHMARK_TIMEOUT,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    reports = list(tmp_path.glob("*-quick/report.md"))
    assert reports, list(tmp_path.iterdir())
    report = reports[0].read_text()
    assert "| greenpool |" in report and "psycopg_pool" in report
    summary = json.loads(reports[0].with_name("summary.json").read_text())
    assert "greenpool" in summary["medians"] and summary["targets"], summary.keys()
    assert "worker exited" not in report
    assert (reports[0].parent / "chart.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_flask_http_quick_runs_every_variant_and_endpoint(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--flask-http",
            # one short burst per variant and endpoint: every code path, in 2/3 the time
            "--http-cycles",
            "1",
            "--http-seconds",
            "0.3",
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    reports = list(tmp_path.glob("*-flask-http-quick/report.md"))
    assert reports, list(tmp_path.iterdir())
    report = reports[0].read_text()
    for heading in ("### SELECT 1", "### pg_sleep(5 ms)", "### short transaction"):
        assert heading in report
    for variant in ("ext:", "raw:", "psycopg_pool_hand:", "psycopg_pool_with:", "no database"):
        assert report.count(variant) >= 3, variant
    assert "Problems during the run" not in report, report
    summary = json.loads(reports[0].with_name("summary.json").read_text())
    assert set(summary["http_endpoints"]) == {"select1", "sleep", "tx"}
