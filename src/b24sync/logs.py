"""Logging for every service: structlog on top of stdlib logging, with secrets masked.

Log lines keep the seed's vocabulary (``[Core] ...``, ``[Bitrix] ...``). The webhook URL is the
Bitrix24 credential, so every rendered line passes through :func:`mask_secrets`. A user's full
name and phone are personal data: unless ``LOG_PII`` is set, every line shows them masked
(:func:`mask_personal`), whether they come as a field of the line or inside a body it quotes.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import logging
import re
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

# `/rest/<user id>/<code>` — the code segment is the secret part of an incoming webhook URL.
_WEBHOOK_PATH = re.compile(r"(/rest/\d+/)([^/\s?#\"'&]+)")
_MASK = "***"
_extra_secrets: set[str] = set()

# Personal data: the fields of a user that name or reach a person.
_PERSONAL_KEYS = frozenset({"full_name", "phone"})
# `"full_name": "..."` or `'phone': '...'` (or a bare number) inside a quoted body: JSON or a
# Python repr, as a message, a reply or a validation error shows it; a value cut short by
# `shorten` runs to the end of the text.
_PERSONAL_FIELD = re.compile(
    r"""(?P<key>(?P<kq>["'])(?P<name>full_name|phone)(?P=kq)\s*:\s*)"""
    r"""(?:(?P<q>["'])(?P<text>(?:\\.|(?!(?P=q)).)*)(?:(?P=q)|$)|(?P<number>\d[\d.]*))"""
)
_PHONE_TAIL = 4  # digits left visible at the end of a phone
_show_personal = False


def register_secret(value: str | None) -> None:
    """Adds a literal value that must never be printed (a token, a password)."""
    if value and len(value) >= 4:
        _extra_secrets.add(value)


def webhook_secret(webhook_url: str) -> str | None:
    """The secret code of `https://PORTAL/rest/USER_ID/CODE/`, or None for another URL."""
    match = _WEBHOOK_PATH.search(webhook_url)
    return match.group(2) if match else None


def mask_secrets(text: str) -> str:
    # Substring tests first: most text holds neither, and they cost a fraction of a search.
    if "/rest/" in text:
        text = _WEBHOOK_PATH.sub(lambda m: m.group(1) + _MASK, text)
    for secret in _extra_secrets:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def mask_name(name: str) -> str:
    """`Иван Иванов` → `И*** И***`: the first letter of each word."""
    return " ".join(word[0] + _MASK for word in name.split())


def mask_phone(phone: str) -> str:
    """`+77001112233` → `+7******2233`: the country's first digit and the last four."""
    head = 2 if phone.startswith("+") else 1
    hidden = len(phone) - head - _PHONE_TAIL
    if hidden < 2:
        return "*" * len(phone)
    return phone[:head] + "*" * hidden + phone[-_PHONE_TAIL:]


def _mask_personal_value(key: str, value: str) -> str:
    return mask_phone(value) if key == "phone" else mask_name(value)


def _mask_field(match: re.Match[str]) -> str:
    name = match["name"]
    number = match["number"]
    if number is not None:
        return match["key"] + _mask_personal_value(name, number)
    quote, text = match["q"], match["text"]
    if quote == '"' and "\\" in text:
        with contextlib.suppress(ValueError):  # a body cut short mid-escape: masked as it is
            text = jsonlib.loads(f'"{text}"')
    masked = _mask_personal_value(name, text)
    if quote == '"' and not (masked.isprintable() and '"' not in masked and "\\" not in masked):
        masked = jsonlib.dumps(masked, ensure_ascii=False)[1:-1]
    return f"{match['key']}{quote}{masked}{quote}"


def mask_personal(text: str) -> str:
    """`text` with the full names and phones of the bodies it quotes masked, unless LOG_PII."""
    if _show_personal or ("full_name" not in text and "phone" not in text):
        return text
    return _PERSONAL_FIELD.sub(_mask_field, text)


def _mask_value(value: Any, key: str = "") -> Any:
    if isinstance(value, str):
        if key in _PERSONAL_KEYS and not _show_personal:
            return _mask_personal_value(key, value)
        return mask_personal(mask_secrets(value))
    if isinstance(value, dict):
        return {name: _mask_value(item, str(name)) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_value(item) for item in value]
    if isinstance(value, BaseException):
        return mask_personal(mask_secrets(f"{type(value).__name__}: {value}"))
    return value


# Added by the processors before masking, never from what a line reports.
_OWN_KEYS = frozenset({"timestamp", "level", "logger"})


def _mask_processor(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if key not in _OWN_KEYS:
            event_dict[key] = _mask_value(value, key)
    return event_dict


class _UtcTimestamp:
    """The processor that stamps each line with the time in UTC, as ISO 8601 to the microsecond
    (`2026-01-01T00:00:00.000000Z`): the date and time of day formatted once a second, at a
    third of the cost of structlog's `TimeStamper`."""

    def __init__(self) -> None:
        # The second and its text, replaced together: lines may come from several threads.
        self._second: tuple[int, str] = (-1, "")

    def __call__(
        self, _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        second, microsecond = divmod(time.time_ns() // 1000, 1_000_000)
        known = self._second
        if known[0] != second:
            known = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._second = known
        event_dict["timestamp"] = f"{known[1]}.{microsecond:06d}Z"
        return event_dict


def render_line(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
    """`<time> [<level>] <event> [<logger>] key=value...`, keys sorted, a traceback below:
    structlog's console layout without colours, at a third of its cost (a line per request
    and per message on the hot paths)."""
    line = f"{event_dict.pop('timestamp', '')} [{event_dict.pop('level', ''):<9}] "
    line += str(event_dict.pop("event", ""))
    logger_name = event_dict.pop("logger", None)
    if logger_name is not None:
        line += f" [{logger_name}]"
    exception = event_dict.pop("exception", None)
    stack = event_dict.pop("stack", None)
    if event_dict:
        line += " " + " ".join(
            f"{key}={value}" if isinstance(value, str) else f"{key}={value!r}"
            for key, value in sorted(event_dict.items())
        )
    for trace in (stack, exception):
        if trace:
            line += "\n" + trace
    return line


class _Stdout:
    """`sys.stdout` as it is at each write, not at configuration: a stdout replaced later (a
    test's capture, say) receives the lines."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def configure_logging(
    level: str = "INFO",
    json: bool = False,
    secrets: Iterable[str] = (),
    *,
    personal_data: bool = False,
) -> None:
    """One format for our lines and third-party ones (uvicorn, aio-pika), masked alike.
    `personal_data` (LOG_PII) shows full names and phones as they are."""
    global _show_personal
    _show_personal = personal_data
    for secret in secrets:
        register_secret(secret)
    renderer: Any = structlog.processors.JSONRenderer(ensure_ascii=False) if json else render_line
    # No context variables are bound anywhere: merging them cost a scan of the task's
    # context on every line.
    shared: list[Any] = [
        structlog.processors.add_log_level,
        _UtcTimestamp(),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, _mask_processor, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line (PrintLogger writes the line and its newline apart: with an
        # unbuffered stdout, two system calls).
        logger_factory=structlog.WriteLoggerFactory(_Stdout()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(_Stdout())
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
