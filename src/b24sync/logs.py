"""Logging for every service: structlog on top of stdlib logging, with secrets masked.

Log lines keep the seed's vocabulary (``[Core] ...``, ``[Bitrix] ...``). The webhook URL is the
Bitrix24 credential, so every rendered line passes through :func:`mask_secrets`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

# `/rest/<user id>/<code>` — the code segment is the secret part of an incoming webhook URL.
_WEBHOOK_PATH = re.compile(r"(/rest/\d+/)([^/\s?#\"'&]+)")
_MASK = "***"
_extra_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Adds a literal value that must never be printed (a token, a password)."""
    if value and len(value) >= 4:
        _extra_secrets.add(value)


def webhook_secret(webhook_url: str) -> str | None:
    """The secret code of `https://PORTAL/rest/USER_ID/CODE/`, or None for another URL."""
    match = _WEBHOOK_PATH.search(webhook_url)
    return match.group(2) if match else None


def mask_secrets(text: str) -> str:
    text = _WEBHOOK_PATH.sub(lambda m: m.group(1) + _MASK, text)
    for secret in _extra_secrets:
        text = text.replace(secret, _MASK)
    return text


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {key: _mask_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_value(item) for item in value]
    if isinstance(value, BaseException):
        return mask_secrets(f"{type(value).__name__}: {value}")
    return value


def _mask_processor(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = _mask_value(value)
    return event_dict


def configure_logging(level: str = "INFO", json: bool = False, secrets: Iterable[str] = ()) -> None:
    """One format for our lines and third-party ones (uvicorn, aio-pika), masked alike."""
    for secret in secrets:
        register_secret(secret)
    renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, _mask_processor, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _mask_processor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO (the URL holds the webhook code); httpcore's
    # DEBUG trace is noise.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def shorten(text: str, limit: int) -> str:
    """The first `limit` characters of `text`, saying how many more there were.

    For log lines that carry message bodies or field values: one line stays readable and
    bounded, whatever size of input a producer sent.
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
