"""Load test of the example app: a realistic mix of reads, writes and slow requests.

    locust -f examples/flask_app/locustfile.py --headless -u 100 -r 50 -t 20s \\
        --host http://127.0.0.1:8000 --csv out/locust --html out/report.html

The run fails (exit code 1) when the failure ratio or the 95th percentile latency exceed
``--max-fail-ratio`` / ``--max-p95-ms`` (environment: LOCUST_MAX_FAIL_RATIO,
LOCUST_MAX_P95_MS). ``--summary-json PATH`` writes the final figures for scripts.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

from locust import FastHttpUser, between, events, task

logger = logging.getLogger("locustfile")

PAGES = 20  # the first pages of accounts, where the seeded ones are


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _thresholds(parser: Any) -> None:
    parser.add_argument(
        "--max-fail-ratio",
        type=float,
        default=0.01,
        env_var="LOCUST_MAX_FAIL_RATIO",
        help="fail the run above this ratio of failed requests (default 0.01)",
    )
    parser.add_argument(
        "--max-p95-ms",
        type=float,
        default=1000.0,
        env_var="LOCUST_MAX_P95_MS",
        help="fail the run when the 95th percentile exceeds this (default 1000 ms)",
    )
    parser.add_argument(
        "--summary-json",
        default="",
        env_var="LOCUST_SUMMARY_JSON",
        help="write the final figures (rps, percentiles, failures, per endpoint) here",
    )


def _figures(entry: Any) -> dict[str, Any]:
    return {
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": entry.total_rps,
        "p50": entry.get_response_time_percentile(0.5),
        "p95": entry.get_response_time_percentile(0.95),
        "p99": entry.get_response_time_percentile(0.99),
        "max": entry.max_response_time,
    }


def _write_summary(environment: Any, path: str, problems: list[str]) -> None:
    stats = environment.stats
    summary = {
        "total": _figures(stats.total),
        "endpoints": [
            {"method": e.method, "name": e.name, **_figures(e)}
            for e in sorted(stats.entries.values(), key=lambda e: (e.name, e.method))
        ],
        "passed": not problems,
        "problems": problems,
    }
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _verdict(environment: Any, **_kwargs: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    total = environment.stats.total
    if total.num_requests == 0:
        logger.error("FAIL: no request was made")
        environment.process_exit_code = 1
        return
    p95 = total.get_response_time_percentile(0.95)
    problems = []
    if total.fail_ratio > options.max_fail_ratio:
        problems.append(f"failure ratio {total.fail_ratio:.4f} > {options.max_fail_ratio}")
    if p95 > options.max_p95_ms:
        problems.append(f"p95 {p95:.0f} ms > {options.max_p95_ms:.0f} ms")
    if options.summary_json:
        _write_summary(environment, options.summary_json, problems)
    if problems:
        logger.error("FAIL: %s", "; ".join(problems))
        environment.process_exit_code = 1
    else:
        logger.info(
            "PASS: failure ratio %.4f, p95 %.0f ms (limits %s, %.0f ms)",
            total.fail_ratio,
            p95,
            options.max_fail_ratio,
            options.max_p95_ms,
        )
        environment.process_exit_code = 0


class BankUser(FastHttpUser):
    """A customer browsing accounts and moving money, with some slow reports."""

    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.account_ids = list(range(1, PAGES * 20 + 1))
        with self.client.get(
            "/accounts?per_page=100", name="/accounts?per_page=100", catch_response=True
        ) as response:
            if response.status_code == 200 and response.json()["items"]:
                self.account_ids = [a["id"] for a in response.json()["items"]]
                response.success()

    @task(30)
    def browse(self) -> None:
        page = random.randint(1, PAGES)
        self.client.get(f"/accounts?page={page}&per_page=20", name="/accounts?page=[n]")

    @task(20)
    def show(self) -> None:
        self.client.get(f"/accounts/{random.choice(self.account_ids)}", name="/accounts/[id]")

    @task(20)
    def transfer(self) -> None:
        from_id, to_id = random.sample(self.account_ids, 2)
        body = {"from_id": from_id, "to_id": to_id, "amount": f"{random.randint(1, 5000) / 100}"}
        with self.client.post("/transfers", json=body, catch_response=True) as response:
            if response.status_code in (201, 409):  # 409: not enough money, a valid answer
                response.success()
            else:
                response.failure(f"status {response.status_code}")

    @task(5)
    def open_account(self) -> None:
        self.client.post("/accounts", json={"owner": f"load-{random.randint(1, 10**9)}"})

    @task(15)
    def health(self) -> None:
        self.client.get("/healthz")

    @task(5)
    def slow(self) -> None:
        self.client.get("/slow?seconds=0.2", name="/slow")

    @task(5)
    def report(self) -> None:
        self.client.get("/reports/summary")
