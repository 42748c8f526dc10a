"""docs/grafana: every metric the Grafana dashboard and the alert rules query is one that Core's
and the Bitrix service's /metrics really export (scraped from the apps), and every b24sync metric
is on the dashboard."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

import b24sync.bitrix.metrics  # noqa: F401 - registers the Bitrix service's metrics
from b24sync.bitrix.http import create_app as create_bitrix_http

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "b24sync.json"
ALERTS = ROOT / "docs" / "grafana" / "alerts.yml"
# Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up"}
# The names each type of metric family exports its samples under.
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
}
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
_PROMQL_WORDS |= {"unless", "bool", "offset", "le"}


def _exported(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",))}
    return names


def _sample_names_of(family: str) -> set[str]:
    return {family + suffix for suffixes in _SAMPLE_SUFFIXES.values() for suffix in suffixes}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: what is left once strings, label
    matchers, durations, grouping clauses and function calls are taken out."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    identifiers = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", expr)
    return set(identifiers) - _PROMQL_WORDS


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])]


def _alert_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [str(rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


async def _ready() -> dict[str, bool | str]:
    return {"redis": True}


def test_metric_names_of_an_expression() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, method) (rate(b24sync_bitrix_api_call_seconds_bucket"
        '{job=~"$bitrix_job", code="x"}[$__rate_interval]))) / max(up) > 1e3'
    )
    assert metric_names(expr) == {"b24sync_bitrix_api_call_seconds_bucket", "up"}


async def test_dashboard_and_alerts_use_exported_metrics(client: httpx.AsyncClient) -> None:
    core = await client.get("/metrics")
    assert core.status_code == 200
    transport = httpx.ASGITransport(app=create_bitrix_http(_ready))
    async with httpx.AsyncClient(transport=transport, base_url="http://bitrix") as http:
        bitrix = await http.get("/metrics")
    assert bitrix.status_code == 200
    exported = _exported(core.text) | _exported(bitrix.text)

    dashboard = _dashboard_expressions()
    alerts = _alert_expressions()
    assert dashboard
    assert alerts
    for expr in dashboard + alerts:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - exported - PROMETHEUS_OWN
        assert not unknown, f"{expr!r} uses metrics nobody exports: {unknown}"
    ours = {
        family.name
        for text in (core.text, bitrix.text)
        for family in text_string_to_metric_families(text)
        # (the text parser reads the `_created` series of an unlabelled histogram as a family)
        if family.name.startswith("b24sync_") and not family.name.endswith("_created")
    }
    shown = set().union(*(metric_names(expr) for expr in dashboard))
    missing = {name for name in ours if not shown & _sample_names_of(name)}
    assert not missing, f"the dashboard does not show {missing}"
