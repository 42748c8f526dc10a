"""Bitrix24 calls of concurrent jobs, sent together as `batch` requests.

A `batch` carries up to 50 commands and counts as one request against the portal's limit, so
on a plan of 2 requests a second it lets many jobs advance at once. Calls are grouped by
`batching.Coalescer`: a lone call goes out as it is, calls made while a request is out leave
together in the next one. Each caller gets its own command's result or error; a failure of
the whole request (a timeout, the portal down, a limit that did not clear) fails every
command in it, each under its own method name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from b24sync.batching import Coalescer
from b24sync.bitrix.client import BitrixClient, BitrixError

# Bitrix24's limit of commands in one batch.
MAX_BATCH_COMMANDS = 50

Call = tuple[str, dict[str, Any]]


def query_string(params: Mapping[str, Any]) -> str:
    """Parameters as a batch command's query, the way PHP's `http_build_query` writes them:
    `filter[=ORIGIN_ID]=5&fields[PHONE][0][VALUE]=%2B7700...`. Nulls and empty lists are left
    out, as PHP leaves them out."""
    pairs: list[tuple[str, str]] = []

    def add(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for name, item in value.items():
                add(f"{key}[{name}]", item)
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                add(f"{key}[{index}]", item)
        elif isinstance(value, bool):
            pairs.append((key, "1" if value else "0"))
        elif value is not None:
            pairs.append((key, str(value)))

    for name, value in params.items():
        add(str(name), value)
    return urlencode(pairs)


class BatchingClient:
    """`BitrixClient`'s `call` and `request`, with concurrent calls sent as one `batch`."""

    def __init__(self, client: BitrixClient, *, max_commands: int = MAX_BATCH_COMMANDS) -> None:
        self._client = client
        # One request out at a time: calls pile up behind it (and behind the rate limit) and
        # the next request takes them all.
        self._calls: Coalescer[Call, dict[str, Any] | BitrixError] = Coalescer(
            self._send, max_in_flight=1, max_items=min(max_commands, MAX_BATCH_COMMANDS)
        )

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return (await self.request(method, params))["result"]

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The command's answer: `result`, and `time` when the portal told it. A command that
        hit a limit inside a batch waits for it and goes again, as a lone call would."""
        waits = 0
        while True:
            outcome = await self._calls.submit((method, params or {}))
            if not isinstance(outcome, BitrixError):
                return outcome
            in_batch = isinstance(outcome, BatchCommandError)
            if not (in_batch and await self._client.wait_out_limit(outcome, waits, heard=True)):
                raise outcome
            waits += 1

    async def _send(self, calls: list[Call]) -> list[dict[str, Any] | BitrixError]:
        if len(calls) == 1:
            method, params = calls[0]
            try:
                return [await self._client.request(method, params)]
            except BitrixError as err:
                return [err]
        commands = {
            f"c{n}": f"{method}?{query_string(params)}" for n, (method, params) in enumerate(calls)
        }
        try:
            answer = await self._client.call("batch", {"halt": 0, "cmd": commands})
        except BitrixError as err:
            return [_as_command_error(err, method) for method, _ in calls]
        return [_command_outcome(answer, f"c{n}", method) for n, (method, _) in enumerate(calls)]


class BatchCommandError(BitrixError):
    """A command's own error inside a batch that went through."""


def _as_command_error(err: BitrixError, method: str) -> BitrixError:
    return BitrixError(
        method,
        err.code,
        err.description,
        http_status=err.http_status,
        transient=err.transient,
        retry_after_s=err.retry_after_s,
    )


def _section(answer: Any, name: str) -> dict[str, Any]:
    # An empty section comes as `[]` (PHP's empty array).
    section = answer.get(name) if isinstance(answer, dict) else None
    return section if isinstance(section, dict) else {}


def _command_outcome(answer: Any, key: str, method: str) -> dict[str, Any] | BitrixError:
    results, errors = _section(answer, "result"), _section(answer, "result_error")
    if key in errors:
        error = errors[key] if isinstance(errors[key], dict) else {}
        return BatchCommandError.from_answer(method, error, http_status=None)
    if key not in results:
        return BatchCommandError(
            method,
            "BATCH_NO_ANSWER",
            "the batch answered nothing for this command",
            http_status=None,
            transient=True,
        )
    outcome: dict[str, Any] = {"result": results[key]}
    timing = _section(answer, "result_time").get(key)
    if timing is not None:
        outcome["time"] = timing
    return outcome
