"""Reading deploy/grafana-dashboard.json's PromQL: which metrics and labels each query
names, checked against what a scrape exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*(\w+)\s*\)")


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    """The dashboard model."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                where = f"panel {panel.get('title')!r} {target.get('refId')}"
                found.append((where, target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            found.append((f"variable {variable['name']!r}", text))
    return found


def names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression refers to."""
    text = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    text = re.sub(r"\$\{?\w+\}?", "x", text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    labels: set[str] = set()
    metrics: set[str] = set()
    for metric, label in _LABEL_VALUES.findall(text):
        metrics.add(metric)
        labels.add(label)
    text = _LABEL_VALUES.sub("", text)
    for block in _MATCHERS.findall(text):
        labels.update(_MATCHER_LABEL.findall(block))
    text = _MATCHERS.sub(" ", text)
    for _keyword, block in _GROUPING.findall(text):
        labels.update(label.strip() for label in block.split(",") if label.strip())
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    for ident, call in _IDENT.findall(text):
        if call or ident.lower() in _KEYWORDS:
            continue
        metrics.add(ident)
    return metrics, labels


def exported(exposition: str) -> dict[str, set[str]]:
    """Sample name -> label names, from a Prometheus text exposition."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def problems(dashboard: dict[str, Any], samples: dict[str, set[str]]) -> list[str]:
    """What in the dashboard's queries the scrape does not have: unknown metrics, and
    labels some of a query's metrics lack."""
    found: list[str] = []
    for where, expr in queries(dashboard):
        metrics, labels = names(expr)
        if not metrics:
            found.append(f"{where}: names no metric: {expr}")
        for metric in sorted(metrics):
            if metric not in samples:
                found.append(f"{where}: {metric} is not exported")
                continue
            missing = labels - samples[metric]
            if missing:
                found.append(f"{where}: {metric} has no label {sorted(missing)}")
    return found
