"""Aggregate worker results into medians, ratios, target verdicts, a markdown table and a chart."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import CONTENDERS, REFERENCE, median

HTTP_LABELS = {
    "greenpool": "greenpool",
    "greenpool_pw": "greenpool, psycopg's own wait",
    "psycopg_pool": "psycopg_pool",
    "nopool": "connect per request",
    "ext": "ext: Flask extension, db.conn",
    "raw": "raw: core pool, with pool.connection()",
    "raw_hand": "raw_hand: core pool, getconn + teardown putconn",
    "psycopg_pool_hand": "psycopg_pool_hand: getconn + teardown putconn",
    "psycopg_pool_with": "psycopg_pool_with: with pool.connection()",
    "nodb": "no database (the app alone)",
}
HTTP_ENDPOINT_LABELS = {
    "select1": "SELECT 1",
    "sleep": "pg_sleep(5 ms)",
    "tx": "short transaction (BEGIN, SELECT ... FOR UPDATE, UPDATE, COMMIT)",
}


def http_reference(variants: Sequence[str]) -> str:
    """The HTTP variant every ratio is computed against."""
    return "psycopg_pool_hand" if "psycopg_pool_hand" in variants else REFERENCE


def merge_http_extras(
    agg: dict[str, dict[str, dict[str, float]]], extras: dict[str, dict[str, Any]]
) -> None:
    """Add the pooled p50/p99 and the paired ratio to the per-burst medians."""
    for v, extra in extras.items():
        for key in ("p50_ms", "p99_ms", "rps_paired_ratio", "dbside_us", "dbside_paired_ratio"):
            val = extra.get(key)
            if v in agg and isinstance(val, (int, float)):
                agg[v][key] = {"median": float(val), "min": float(val), "max": float(val)}


def http_endpoints_markdown(
    endpoints: dict[str, dict[str, dict[str, dict[str, float]]]], meta: dict[str, Any]
) -> list[str]:
    """Per endpoint: every variant's req/s, latency and CPU per request, the database-side
    CPU above the no-database floor, and the ratios to the reference variant."""
    if not endpoints:
        return []
    lines = [
        "",
        f"## HTTP per endpoint (Flask on gunicorn -k gevent, {meta.get('http_workers', 1)} "
        f"worker(s); {meta.get('http_concurrency')} keep-alive clients on loopback)",
        "",
        f"Per endpoint, all apps are driven in turn by one load generator ("
        f"{meta.get('http_bursts')}); req/s and CPU per request are medians over bursts, "
        "p50/p99 over all requests, the paired ratio is the median over cycles of req/s "
        "divided by the reference's in the same cycle. *app CPU* is gunicorn's process tree "
        "(user + system), *PG* the server's. *DB-side* = app + PG CPU per request minus the "
        "`nodb` floor's (the same app answering without a database) in the same cycle, "
        "median over cycles, and its ratio is the median of the per-cycle ratios (the floor "
        "itself drifts by 20-40% between bursts on a shared machine): everything the "
        "database path costs (pool, driver, waits, the hub's extra turns, the kernel's "
        "socket work, PostgreSQL). The user/system split has clock-tick "
        "resolution (10 ms per burst: coarse in --quick); context switches are voluntary + "
        "involuntary, per request, in the app's processes.",
        "",
    ]
    summary_rows: list[list[str]] = []
    for endpoint, http in endpoints.items():
        variants = [v for v in HTTP_LABELS if v in http]
        ref = http_reference(variants)
        floor_app = _get(http, "nodb", "app_cpu_us")

        def total(v: str, http: dict[str, dict[str, dict[str, float]]] = http) -> float:
            return _get(http, v, "app_cpu_us") + _get(http, v, "pg_cpu_us")

        def dbside(v: str, http: dict[str, dict[str, dict[str, float]]] = http) -> float:
            """Median over cycles of (app + PG) minus the same cycle's floor."""
            return _get(http, v, "dbside_us") if v != "nodb" else math.nan

        def db_ratio(v: str, http: dict[str, dict[str, dict[str, float]]] = http) -> float:
            """Median over cycles of the per-cycle ratio to the reference."""
            return _get(http, v, "dbside_paired_ratio") if v != "nodb" else math.nan

        lines += [f"### {HTTP_ENDPOINT_LABELS.get(endpoint, endpoint)}", ""]
        lines += _table(
            [
                "variant",
                "req/s",
                f"paired ratio to {ref}",
                "p50 ms",
                "p99 ms",
                "app CPU µs/req (user + sys)",
                "PG CPU µs/req",
                "app above floor µs",
                "DB-side µs/req",
                f"DB-side ratio to {ref}",
                "ctx switches/req",
                "errors",
                "loadgen CPU µs/req",
            ],
            [
                [
                    HTTP_LABELS[v],
                    _fmt(_get(http, v, "rps"), 0),
                    f"{_fmt(_get(http, v, 'rps_paired_ratio'), 2)}x",
                    _fmt(_get(http, v, "p50_ms"), 2),
                    _fmt(_get(http, v, "p99_ms"), 2),
                    f"{_fmt(_get(http, v, 'app_cpu_us'))} ("
                    f"{_fmt(_get(http, v, 'app_user_us'))} + {_fmt(_get(http, v, 'app_sys_us'))})",
                    _fmt(_get(http, v, "pg_cpu_us")),
                    _fmt(_get(http, v, "app_cpu_us") - floor_app) if v != "nodb" else "-",
                    _fmt(dbside(v)),
                    f"{_fmt(db_ratio(v), 2)}x" if v != "nodb" else "-",
                    _fmt(_get(http, v, "app_vcsw") + _get(http, v, "app_ivcsw"), 2),
                    _fmt(_get(http, v, "errors", "max"), 0),
                    _fmt(_get(http, v, "loadgen_cpu_us")),
                ]
                for v in variants
            ],
        )
        lines.append("")
        if "ext" in http and ref in http:
            ratio = db_ratio("ext")
            p99, p99_ref = _get(http, "ext", "p99_ms"), _get(http, ref, "p99_ms")
            summary_rows.append(
                [
                    HTTP_ENDPOINT_LABELS.get(endpoint, endpoint).split(" (")[0],
                    f"{_fmt(_get(http, 'ext', 'rps_paired_ratio'), 2)}x",
                    f"{_fmt(dbside('ext'))} vs {_fmt(dbside(ref))} = {_fmt(ratio, 2)}x",
                    "**met**" if ratio <= 0.7 else "**missed**" if ratio == ratio else "-",
                    f"{_fmt(p99, 2)} vs {_fmt(p99_ref, 2)} ms",
                    f"{_fmt(_get(http, 'ext', 'app_cpu_us') - _get(http, 'raw', 'app_cpu_us'))}"
                    if "raw" in http
                    else "-",
                ]
            )
    if summary_rows:
        lines += ["### ext against psycopg_pool wired by hand", ""]
        lines += _table(
            [
                "endpoint",
                "req/s ext / psycopg_pool_hand (paired)",
                "DB-side CPU µs/req, ext vs psycopg_pool_hand",
                "target <= 0.7x",
                "p99 ext vs psycopg_pool_hand",
                "app CPU ext - raw µs/req (noisy: see benchmarks.flask_instructions)",
            ],
            summary_rows,
        )
        lines.append("")
    return lines


def http_limit(
    agg: dict[str, dict[str, dict[str, float]]], http: dict[str, dict[str, dict[str, float]]]
) -> str:
    """What 1.2x psycopg_pool's req/s demands, in CPU per request, against the app's floor.

    With the apps CPU-bound on one CPU, req/s is 1 / (app + PostgreSQL CPU per request). The
    same app without a database sets the floor no pool can go under; the rest is the
    database work a pool and its driver may spend.
    """

    def total(v: str) -> float:
        return _get(http, v, "app_cpu_us") + _get(http, v, "pg_cpu_us")

    ref, floor, g = total(REFERENCE), _get(http, "nodb", "app_cpu_us"), total("greenpool")
    if any(math.isnan(x) for x in (ref, floor, g)):
        return ""
    budget = ref / 1.2 - floor
    held = _cpu(agg, "greenpool", "held_select1")
    text = (
        f"The same app without a database costs {_fmt(floor)} µs of CPU per request, so no "
        f"pool can exceed {_fmt(ref / floor, 2)}x psycopg_pool's {_fmt(ref)} µs. 1.2x leaves "
        f"{_fmt(budget)} µs per request for all the database work (pool, driver, wait, "
        f"PostgreSQL); greenpool spends {_fmt(g - floor)} µs, psycopg_pool {_fmt(ref - floor)}"
    )
    if not math.isnan(held):
        text += f"; a bare SELECT 1 on a held psycopg 3 connection alone costs {_fmt(held)} µs"
    return text + "."


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{contender: {metric: {median, min, max, n}}} over rounds."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        per = values.setdefault(run["contender"], {})
        for key, val in run.get("metrics", {}).items():
            if isinstance(val, (int, float)) and not isinstance(val, bool) and val is not None:
                per.setdefault(key, []).append(float(val))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for contender, metrics in values.items():
        out[contender] = {
            k: {"median": median(v), "min": min(v), "max": max(v), "n": float(len(v))}
            for k, v in metrics.items()
        }
    return out


def _get(
    agg: dict[str, dict[str, dict[str, float]]], who: str, metric: str, stat: str = "median"
) -> float:
    try:
        return agg[who][metric][stat]
    except KeyError:
        return math.nan


def _fmt(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000 and digits <= 1:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ratio(value: float, ref: float) -> str:
    if any(isinstance(x, float) and (math.isnan(x) or x == 0) for x in (value, ref)):
        return "-"
    return f"{value / ref:.2f}x"


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured
    cpu_view: str = ""  # the same comparison in CPU time per operation, when it applies
    paired_view: str = ""  # the same comparison from the in-process interleaved cross-check


def _cpu(agg: dict[str, dict[str, dict[str, float]]], who: str, prefix: str) -> float:
    """Client + server CPU µs per operation of a one-greenlet scenario."""
    return _get(agg, who, f"{prefix}_client_cpu_us") + _get(agg, who, f"{prefix}_server_cpu_us")


def _paired(
    paired: dict[str, dict[str, dict[str, float]]] | None,
    who: str,
    metric: str,
    unit: str,
    digits: int = 1,
) -> str:
    if not paired or who not in paired or metric not in paired[who]:
        return ""
    m = paired[who][metric]
    return f"{_fmt(m['median'], digits)} {unit}, {_fmt(m['ratio'], 2)}x psycopg_pool"


def evaluate_targets(
    agg: dict[str, dict[str, dict[str, float]]],
    http: dict[str, dict[str, dict[str, float]]],
    paired: dict[str, dict[str, dict[str, float]]] | None = None,
) -> list[Target]:
    """Verdicts on the issue's targets, from wall-clock medians (the CPU view is a cross-check:
    it is far less sensitive to other work sharing the CPU)."""
    g, ref = "greenpool", REFERENCE
    out: list[Target] = []

    def have(*vals: float) -> bool:
        return all(not math.isnan(v) for v in vals)

    a, b = _get(agg, g, "acq_rel_us"), _get(agg, ref, "acq_rel_us")
    ca, cb = _get(agg, g, "acq_rel_client_cpu_us"), _get(agg, ref, "acq_rel_client_cpu_us")
    out.append(
        Target(
            "uncontended acquire+release",
            "<= 0.30x psycopg_pool's time",
            f"{_fmt(a, 2)} µs vs {_fmt(b, 2)} µs = {_ratio(a, b)}",
            (a <= 0.3 * b) if have(a, b) else None,
            f"client CPU {_fmt(ca, 2)} vs {_fmt(cb, 2)} µs = {_ratio(ca, cb)}",
            _paired(paired, g, "acq_rel_us", "µs", 2),
        )
    )
    ops, ops_ref = _get(agg, g, "contended_ops_per_s"), _get(agg, ref, "contended_ops_per_s")
    po, po_ref = _get(agg, g, "contended_ops_per_cpu_s"), _get(agg, ref, "contended_ops_per_cpu_s")
    out.append(
        Target(
            "contended SELECT 1 throughput",
            ">= 1.5x psycopg_pool",
            f"{_fmt(ops)} vs {_fmt(ops_ref)} ops/s = {_ratio(ops, ops_ref)}",
            (ops >= 1.5 * ops_ref) if have(ops, ops_ref) else None,
            f"{_fmt(po)} vs {_fmt(po_ref)} ops per CPU-second = {_ratio(po, po_ref)}",
            _paired(paired, g, "contended_ops_per_s", "ops/s", 0),
        )
    )
    starved = _get(agg, g, "contended_starved", "max")
    cv = _get(agg, g, "contended_cv", "max")
    out.append(
        Target(
            "contended fairness",
            "no greenlet starved, CV <= 0.05 (worst round)",
            f"starved {_fmt(starved, 0)}, CV {_fmt(cv, 3)}",
            (starved == 0 and cv <= 0.05) if have(starved, cv) else None,
            ""
            if not paired or g not in paired
            else f"worst window: starved {_fmt(paired[g]['contended_starved']['max'], 0)}, "
            f"CV {_fmt(paired[g]['contended_cv']['max'], 3)}",
        )
    )
    p99, p99_ref = _get(agg, g, "contended_wait_p99_ms"), _get(agg, ref, "contended_wait_p99_ms")
    out.append(
        Target(
            "contended p99 acquire wait",
            "<= psycopg_pool's",
            f"{_fmt(p99, 2)} ms vs {_fmt(p99_ref, 2)} ms",
            (p99 <= p99_ref) if have(p99, p99_ref) else None,
            "",
            _paired(paired, g, "contended_wait_p99_ms", "ms", 2),
        )
    )
    pct = _get(agg, g, "io_pct_of_ceiling")
    out.append(
        Target(
            "I/O bound (pg_sleep 5 ms)",
            ">= 95% of ceiling",
            f"{_fmt(pct)}% of ceiling",
            (pct >= 95.0) if have(pct) else None,
            "",
            ""
            if not paired or g not in paired or "io_pct_of_ceiling" not in paired[g]
            else f"{_fmt(paired[g]['io_pct_of_ceiling']['median'])}% of ceiling, "
            f"{_fmt(paired[g]['io_ops_per_s']['ratio'], 2)}x psycopg_pool's ops/s",
        )
    )
    peak = _get(agg, g, "spike_peak_backends", "max")
    opened = _get(agg, g, "spike_opened", "max")
    out.append(
        Target(
            "spike: backends",
            "never > max_size (10)",
            f"peak {_fmt(peak, 0)} at once, {_fmt(opened, 0)} opened (worst round)",
            (peak <= 10 and opened <= 10) if have(peak, opened) else None,
        )
    )
    sp, sp_ref = _get(agg, g, "spike_ms"), _get(agg, ref, "spike_ms")
    out.append(
        Target(
            "spike: time to serve 100",
            "<= psycopg_pool's",
            f"{_fmt(sp)} ms vs {_fmt(sp_ref)} ms = {_ratio(sp, sp_ref)}",
            (sp <= sp_ref) if have(sp, sp_ref) else None,
        )
    )
    q3, q2 = _get(agg, g, "select1_us"), _get(agg, "psycopg2", "select1_us")
    c3, c2 = _cpu(agg, g, "select1"), _cpu(agg, "psycopg2", "select1")
    out.append(
        Target(
            "query via greenpool/psycopg 3 vs psycopg2+psycogreen",
            "<= 1.25x (acquire+SELECT 1+release)",
            f"{_fmt(q3)} µs vs {_fmt(q2)} µs = {_ratio(q3, q2)}",
            (q3 <= 1.25 * q2) if have(q3, q2) else None,
            f"client+server CPU {_fmt(c3)} vs {_fmt(c2)} µs = {_ratio(c3, c2)}",
            ""
            if not paired or g not in paired or "select1_vs_psycopg2" not in paired[g]
            else f"{_fmt(paired[g]['select1_us']['median'])} µs, "
            f"{_fmt(paired[g]['select1_vs_psycopg2']['median'], 2)}x psycopg2's",
        )
    )
    rps, rps_ref = _get(http, g, "rps"), _get(http, ref, "rps")
    rps_np = _get(http, "nopool", "rps")
    http_pair = _get(http, g, "rps_paired_ratio")  # median of per-cycle ratios: steadier
    vs_ref = http_pair if not math.isnan(http_pair) else (rps / rps_ref if rps_ref else math.nan)
    rc, rc_ref, rc_np = (_get(http, w, "req_per_cpu_s") for w in (g, ref, "nopool"))
    out.append(
        Target(
            "HTTP req/s",
            ">= 1.2x psycopg_pool and >= 5x connect-per-request",
            f"{_fmt(rps)} vs {_fmt(rps_ref)} (paired ratio {_fmt(vs_ref, 2)}x) and "
            f"{_fmt(rps_np)} ({_ratio(rps, rps_np)})",
            (vs_ref >= 1.2 and rps >= 5 * rps_np) if have(vs_ref, rps, rps_np) else None,
            f"req per CPU-second (app + server) {_fmt(rc)} vs {_fmt(rc_ref)} "
            f"({_ratio(rc, rc_ref)}) and {_fmt(rc_np)} ({_ratio(rc, rc_np)})",
        )
    )
    p, p_ref, p_np = (_get(http, w, "p99_ms") for w in (g, ref, "nopool"))
    out.append(
        Target(
            "HTTP p99",
            "lower than psycopg_pool's and connect-per-request's",
            f"{_fmt(p, 2)} ms vs {_fmt(p_ref, 2)} ms and {_fmt(p_np, 2)} ms",
            (p < p_ref and p < p_np) if have(p, p_ref, p_np) else None,
        )
    )
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def markdown(
    agg: dict[str, dict[str, dict[str, float]]],
    http: dict[str, dict[str, dict[str, float]]],
    targets: Sequence[Target],
    meta: dict[str, Any],
    chart_name: str | None,
    paired: dict[str, dict[str, dict[str, float]]] | None = None,
    endpoints: dict[str, dict[str, dict[str, dict[str, float]]]] | None = None,
) -> str:
    order = [c for c in CONTENDERS if c in agg]
    ref = REFERENCE
    lines: list[str] = [
        f"# greenpool benchmark ({meta.get('mode', '?')} mode)",
        "",
        f"- when: {meta.get('when')}; rounds: {meta.get('rounds')} "
        f"(contenders alternate A B C … per round; medians over rounds; ratios are to "
        f"{ref})",
        f"- machine: {meta.get('machine')}",
        f"- versions: {meta.get('versions')}",
        f"- server: {meta.get('server')}",
        f"- pinning: {meta.get('pinning')}",
        f"- load: {meta.get('load')}",
        f"- psycopg wait function per contender: {meta.get('wait_funcs')}",
        "- every pool lends autocommit connections (SELECT 1 = one round trip, nothing to "
        "commit/roll back on release); pool size 10; 200 greenlets in the contended rows",
        "",
    ]
    if chart_name:
        lines += [f"![chart]({chart_name})", ""]

    if agg:  # worker rounds ran (not with --flask-http)
        lines += ["## Targets", ""]
        verdict = {True: "**met**", False: "**missed**", None: "not measured"}
        lines += _table(
            [
                "target",
                "goal",
                "measured (wall clock, medians)",
                "verdict",
                "CPU-cost view",
                "paired cross-check",
            ],
            [
                [t.name, t.goal, t.measured, verdict[t.met], t.cpu_view, t.paired_view]
                for t in targets
            ],
        )

        def r(who: str, metric: str, digits: int = 1, ratio: bool = True) -> list[str]:
            v = _get(agg, who, metric)
            cells = [_fmt(v, digits)]
            if ratio:
                cells.append(_ratio(v, _get(agg, ref, metric)))
            return cells

        def cpu_pair(who: str, prefix: str) -> str:
            cli = _get(agg, who, f"{prefix}_client_cpu_us")
            srv = _get(agg, who, f"{prefix}_server_cpu_us")
            return f"{_fmt(cli, 1)} + {_fmt(srv, 1)}"

        lines += [
            "",
            "## One greenlet (lower is better)",
            "",
            "Wall-clock µs per operation, and the CPU it cost as client + server µs (the CPU "
            "columns hardly move when other work shares the CPU; wall clock does).",
            "",
        ]
        lines += _table(
            [
                "contender",
                "acquire+release µs",
                "ratio",
                "client CPU µs",
                "acquire+SELECT 1+release µs",
                "ratio",
                "CPU µs (client + server)",
                "SELECT 1 on held conn µs",
                "CPU µs (client + server)",
                "raw connect+close ms",
            ],
            [
                [
                    CONTENDERS[c],
                    *r(c, "acq_rel_us", 2),
                    *r(c, "acq_rel_client_cpu_us", 2, False),
                    *r(c, "select1_us"),
                    cpu_pair(c, "select1"),
                    *r(c, "held_select1_us", 1, False),
                    cpu_pair(c, "held_select1"),
                    *r(c, "connect_close_ms", 2, False),
                ]
                for c in order
            ],
        )
        lines += ["", "## Contended SELECT 1 (200 greenlets, 10 connections)", ""]
        lines += _table(
            [
                "contender",
                "ops/s",
                "ratio",
                "wait p50 ms",
                "wait p99 ms",
                "wait max ms",
                "CV of per-greenlet ops",
                "starved (of 200)",
                "CPU µs/op (client + server)",
                "ops per CPU-s",
                "ratio",
                "errors",
            ],
            [
                [
                    CONTENDERS[c],
                    *r(c, "contended_ops_per_s", 0),
                    *r(c, "contended_wait_p50_ms", 2, False),
                    *r(c, "contended_wait_p99_ms", 2, False),
                    *r(c, "contended_wait_max_ms", 1, False),
                    *r(c, "contended_cv", 3, False),
                    *r(c, "contended_starved", 0, False),
                    cpu_pair(c, "contended"),
                    *r(c, "contended_ops_per_cpu_s", 0),
                    *r(c, "contended_errors", 0, False),
                ]
                for c in order
            ],
        )
        lines += ["", "## I/O bound (pg_sleep(0.005), 200 greenlets, 10 connections)", ""]
        lines += _table(
            ["contender", "ops/s", "ceiling ops/s", "% of ceiling", "one call ms", "starved"],
            [
                [
                    CONTENDERS[c],
                    *r(c, "io_ops_per_s", 0, False),
                    *r(c, "io_ceiling", 0, False),
                    *r(c, "io_pct_of_ceiling", 1, False),
                    *r(c, "io_one_call_ms", 2, False),
                    *r(c, "io_starved", 0, False),
                ]
                for c in order
            ],
        )
        lines += ["", "## Spike on a cold pool (100 requests, max 10) and cooperation check", ""]
        lines += _table(
            [
                "contender",
                "spike ms",
                "ratio",
                "peak backends at once",
                "backends opened",
                "10 x pg_sleep(0.2) wall ms",
            ],
            [
                [
                    CONTENDERS[c],
                    *r(c, "spike_ms"),
                    _fmt(_get(agg, c, "spike_peak_backends", "max"), 0),
                    _fmt(_get(agg, c, "spike_opened", "max"), 0),
                    *r(c, "coop_wall_ms", 1, False),
                ]
                for c in order
            ],
        )
    if http:
        hv = [v for v in HTTP_LABELS if v in http]
        lines += [
            "",
            f"## HTTP end to end (Flask on gunicorn -k gevent, 1 worker; "
            f"{meta.get('http_concurrency')} keep-alive clients on loopback)",
            "",
            f"All apps run at once; the load generator alternates bursts between them "
            f"({meta.get('http_bursts')}). req/s and CPU are medians over bursts, p50/p99 over "
            "all requests, the paired ratio is the median over cycles of req/s divided by "
            "psycopg_pool's in the same cycle. The apps share one CPU with PostgreSQL; the "
            "load generator runs on another (see pinning above) so that its own CPU, "
            "in the last column, is not taken from the apps.",
            "",
        ]
        limit = http_limit(agg, http)
        if limit:
            lines += [limit, ""]
        lines += _table(
            [
                "app on",
                "req/s",
                "paired ratio",
                "p50 ms",
                "p99 ms",
                "CPU µs/req (app + PostgreSQL)",
                "req per CPU-s",
                "ratio",
                "errors",
                "load generator CPU µs/req",
            ],
            [
                [
                    HTTP_LABELS[v],
                    _fmt(_get(http, v, "rps"), 0),
                    f"{_fmt(_get(http, v, 'rps_paired_ratio'), 2)}x",
                    _fmt(_get(http, v, "p50_ms"), 2),
                    _fmt(_get(http, v, "p99_ms"), 2),
                    f"{_fmt(_get(http, v, 'app_cpu_us'))} + {_fmt(_get(http, v, 'pg_cpu_us'))}",
                    _fmt(_get(http, v, "req_per_cpu_s"), 0),
                    _ratio(_get(http, v, "req_per_cpu_s"), _get(http, ref, "req_per_cpu_s")),
                    _fmt(_get(http, v, "errors", "max"), 0),
                    _fmt(_get(http, v, "loadgen_cpu_us")),
                ]
                for v in hv
            ],
        )
    lines += http_endpoints_markdown(endpoints or {}, meta)
    if paired:
        lines += [
            "",
            "## Paired cross-check (every pool in one process, interleaved)",
            "",
            f"All pools open at once in one gevent process; each cycle runs every pool in a "
            f"shuffled order ({meta.get('paired')}). Values are medians over cycles; ratios "
            "are medians of the per-cycle ratio to psycopg_pool, so load that drifts over "
            "seconds cancels out. psycopg's wait function is switched per pool.",
            "",
        ]
        pm = [c for c in CONTENDERS if c in paired]

        def pc(who: str, metric: str, digits: int = 1, ratio: bool = True) -> list[str]:
            m = paired[who][metric]
            cells = [_fmt(m["median"], digits)]
            if ratio:
                cells.append(f"{_fmt(m['ratio'], 2)}x")
            return cells

        lines += _table(
            [
                "contender",
                "acquire+release µs",
                "ratio",
                "client CPU µs",
                "acquire+SELECT 1+release µs",
                "ratio",
                "contended ops/s",
                "ratio",
                "p99 wait ms",
                "worst CV",
                "worst starved",
                "pg_sleep % of ceiling",
                "ratio",
            ],
            [
                [
                    CONTENDERS[c],
                    *pc(c, "acq_rel_us", 2),
                    *pc(c, "acq_rel_client_cpu_us", 2, False),
                    *pc(c, "select1_us"),
                    *pc(c, "contended_ops_per_s", 0),
                    *pc(c, "contended_wait_p99_ms", 2, False),
                    _fmt(paired[c]["contended_cv"]["max"], 3),
                    _fmt(paired[c]["contended_starved"]["max"], 0),
                    *pc(c, "io_pct_of_ceiling", 1, False),
                    f"{_fmt(paired[c]['io_ops_per_s']['ratio'], 2)}x",
                ]
                for c in pm
            ],
        )
    problems = meta.get("problems") or []
    if problems:
        lines += ["", "## Problems during the run", ""] + [f"- {p}" for p in problems]
    lines.append("")
    return "\n".join(lines)


def chart(
    agg: dict[str, dict[str, dict[str, float]]],
    http: dict[str, dict[str, dict[str, float]]],
    path: Path,
    title: str,
) -> None:
    """Eight panels of bars (median, whiskers min-max over rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [c for c in CONTENDERS if c in agg]
    panels: list[tuple[str, str, dict[str, dict[str, dict[str, float]]], list[str], bool]] = [
        ("acquire+release (µs, log)", "acq_rel_us", agg, order, True),
        ("acquire+SELECT 1+release (µs, log)", "select1_us", agg, order, True),
        ("contended SELECT 1 (ops/s)", "contended_ops_per_s", agg, order, False),
        ("pg_sleep(5ms): % of ceiling", "io_pct_of_ceiling", agg, order, False),
        ("contended SELECT 1: ops per CPU-second", "contended_ops_per_cpu_s", agg, order, False),
        ("spike, 100 requests (ms)", "spike_ms", agg, order, False),
        ("HTTP (req/s)", "rps", http, [v for v in HTTP_LABELS if v in http], False),
        (
            "HTTP: req per CPU-second",
            "req_per_cpu_s",
            http,
            [v for v in HTTP_LABELS if v in http],
            False,
        ),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(22, 9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (ptitle, metric, data, who, log) in zip(axes.flat, panels, strict=True):
        labels = [CONTENDERS.get(w, HTTP_LABELS.get(w, w)) for w in who]
        meds = [_get(data, w, metric) for w in who]
        lows = [m - _get(data, w, metric, "min") for w, m in zip(who, meds, strict=True)]
        highs = [_get(data, w, metric, "max") - m for w, m in zip(who, meds, strict=True)]
        clean = [0.0 if math.isnan(m) else m for m in meds]
        err = [
            [0.0 if math.isnan(x) else x for x in lows],
            [0.0 if math.isnan(x) else x for x in highs],
        ]
        bar_colors = [
            colors[list(CONTENDERS).index(w) % len(colors)] if w in CONTENDERS else colors[0]
            for w in who
        ]
        ax.barh(range(len(who)), clean, xerr=err, color=bar_colors, capsize=3)
        ax.set_yticks(range(len(who)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(ptitle, fontsize=10)
        if log and any(m > 0 for m in clean):
            ax.set_xscale("log")
        for i, m in enumerate(meds):
            if not math.isnan(m):
                at = m + (0.0 if math.isnan(highs[i]) else highs[i])
                ax.text(at, i, f" {m:,.0f}" if m >= 100 else f" {m:.3g}", va="center", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
