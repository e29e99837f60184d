"""The benchmark suite's quick mode runs end to end (CI smoke; figures are not asserted:
timing targets live in the benchmark report, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK_TIMEOUT = 300  # "--quick" takes about a minute alone, two on a loaded machine


@pytest.mark.slow
@pytest.mark.timeout(BENCHMARK_TIMEOUT + 60)  # the run's own bound fires first
def test_quick_benchmark_runs_and_writes_a_report(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--results-dir", str(tmp_path)],
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
