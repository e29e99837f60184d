"""Fault scenarios side by side: greenpool and psycopg_pool under the same load and faults.

Not part of the default run (marker ``side_by_side``; about 5 minutes): the figures it
records feed RELIABILITY.md's comparison table.

    python -m pytest -m side_by_side tests/test_side_by_side.py
    python -m tests.support.loadgen render --compare        # the table

Each (pool, scenario) runs in a process of its own (``tests/support/side_by_side.py``),
which patches gevent first and starts its own cluster, bounded by RUN_TIMEOUT: a run that
does not finish is recorded as such. greenpool must finish every scenario with nothing
lost; psycopg_pool's outcome, whatever it is, is what the comparison records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.side_by_side import POOLS, SCENARIOS, record_outside

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 150.0

pytestmark = pytest.mark.side_by_side


@pytest.mark.timeout(RUN_TIMEOUT + 30)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("pool", POOLS)
def test_side_by_side(pool: str, scenario: str, tmp_path: Path) -> None:
    results = Path(os.environ.get("GREENPOOL_FAULT_RESULTS", tmp_path / "results.jsonl"))
    env = {
        **os.environ,
        "GREENPOOL_FAULT_RESULTS": str(results),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.side_by_side", pool, scenario],
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        code = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        code = None
    if code != 0:
        what = f"did not finish within {RUN_TIMEOUT:g} s" if code is None else f"exit {code}"
        os.environ["GREENPOOL_FAULT_RESULTS"] = str(results)
        record_outside(pool, scenario, what)
    if pool == "greenpool":
        assert code == 0, f"greenpool: {SCENARIOS[scenario]}: {code}"
        last = json.loads(results.read_text().splitlines()[-1])
        lost = last["figures"].get("lost")
        assert not lost, last
