"""Bitrix24's `batch` method: many commands in one request.

A `batch` carries up to 50 commands and counts as one request against the portal's limit. The
answer is HTTP 200 even when commands fail: each command has its own result or error (and its
`next`, `total` and `time`), keyed by the name it was given. A failure of the whole request (a
timeout, the portal down, a limit answer) is every command's failure, each under its own
method name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from b24sync.bitrix.client import BitrixClient, BitrixError

# Bitrix24's limit of commands in one batch.
MAX_BATCH_COMMANDS = 50

Call = tuple[str, dict[str, Any]]
# A command's answer: `result`, and `next`, `total`, `time` when the portal told them.
Answer = dict[str, Any]


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


def batch_params(calls: Sequence[Call]) -> dict[str, Any]:
    """The parameters of one `batch` request carrying `calls`, named c0, c1, ..."""
    return {
        "halt": 0,
        "cmd": {
            f"c{n}": f"{method}?{query_string(params)}" for n, (method, params) in enumerate(calls)
        },
    }


def command_outcomes(answer: Any, calls: Sequence[Call]) -> list[Answer | BitrixError]:
    """Each call's answer or error, from the `result` of a `batch` request made with
    `batch_params(calls)`; a command's own error is a `BatchCommandError`."""
    return [_command_outcome(answer, f"c{n}", method) for n, (method, _) in enumerate(calls)]


def as_command_error(err: BitrixError, method: str) -> BitrixError:
    """The failure of a whole request, as the failure of one of its commands."""
    return BitrixError(
        method,
        err.code,
        err.description,
        http_status=err.http_status,
        transient=err.transient,
        retry_after_s=err.retry_after_s,
    )


async def send_batch(client: BitrixClient, calls: Sequence[Call]) -> list[Answer | BitrixError]:
    """The calls as one `batch` request through `client.call` (which waits out limit answers
    of the whole request): for each, its answer or its error."""
    try:
        answer = await client.call("batch", batch_params(calls))
    except BitrixError as err:
        return [as_command_error(err, method) for method, _ in calls]
    return command_outcomes(answer, calls)


class BatchCommandError(BitrixError):
    """A command's own error inside a batch that went through."""


def _section(answer: Any, name: str) -> dict[str, Any]:
    # An empty section comes as `[]` (PHP's empty array).
    section = answer.get(name) if isinstance(answer, dict) else None
    return section if isinstance(section, dict) else {}


def _command_outcome(answer: Any, key: str, method: str) -> Answer | BitrixError:
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
    outcome: Answer = {"result": results[key]}
    for name in ("next", "total", "time"):
        value = _section(answer, f"result_{name}").get(key)
        if value is not None:
            outcome[name] = value
    return outcome
