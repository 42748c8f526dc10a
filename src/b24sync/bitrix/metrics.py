"""Prometheus metrics of the Bitrix service (served on GET /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS = Counter(
    "b24sync_bitrix_events_total",
    "RabbitMQ events by outcome: queued, duplicate, rejected.",
    ["outcome"],
)
JOBS = Counter(
    "b24sync_bitrix_jobs_total",
    "Events' attempts by outcome: success, skipped, retry, error, delayed.",
    ["outcome"],
)
JOB_ATTEMPTS = Histogram(
    "b24sync_bitrix_job_attempts",
    "Attempts an event took until its final reply.",
    buckets=(1, 2, 3, 4, 5, 10),
)
API_CALLS = Counter(
    "b24sync_bitrix_api_calls_total",
    "Bitrix24 REST calls by method and result code (OK on success).",
    ["method", "code"],
)
API_CALL_SECONDS = Histogram(
    "b24sync_bitrix_api_call_seconds",
    "Bitrix24 REST call latency.",
    ["method"],
)
