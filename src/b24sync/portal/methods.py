"""The REST methods the emulator serves, and `batch` on top of them."""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from b24sync.portal.errors import (
    PortalError,
    crm_error,
    invalid_id,
    method_not_found,
    not_found,
    operation_time_limit,
)
from b24sync.portal.fields import LEADS, STATUSES, field_descriptions, status_rows
from b24sync.portal.params import as_int, as_list, method_name, parse_query
from b24sync.portal.query import apply_filter, apply_order, equal_to, paginate, select_fields
from b24sync.portal.state import Portal

MAX_BATCH_COMMANDS = 50
MAX_DUPLICATE_VALUES = 20
MAX_IMPORT_ITEMS = 20
LEAD_ENTITY_TYPE_ID = 1
# Methods that change data: the ones a random "timeout after write" fault applies to.
WRITE_METHODS = frozenset(
    {"crm.lead.add", "crm.lead.update", "crm.lead.delete", "crm.item.batchimport", "batch"}
)


@dataclass(frozen=True)
class MethodResult:
    result: Any
    total: int | None = None
    next: int | None = None


@dataclass(frozen=True)
class Executed:
    outcome: MethodResult
    processing_s: float


Handler = Callable[[Portal, dict[str, Any]], Awaitable[MethodResult]]
_METHODS: dict[str, Handler] = {}


def _method(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _METHODS[name] = handler
        return handler

    return register


async def call_method(portal: Portal, name: str, params: dict[str, Any]) -> Executed:
    """Runs one method under the operating-time limit. CRM methods read their parameters
    case-insensitively (`id` and `ID`), so the top-level keys are lowered here."""
    handler = _METHODS.get(name)
    if handler is None:
        raise method_not_found()
    if portal.operating.is_blocked(name):
        raise operation_time_limit()
    started = time.perf_counter()
    try:
        outcome = await handler(portal, {str(key).lower(): value for key, value in params.items()})
    finally:
        processing_s = time.perf_counter() - started
        portal.operating.record(name, processing_s)
    return Executed(outcome, processing_s)


# --- crm.lead.* -----------------------------------------------------------------------------


def _lead_id(params: dict[str, Any]) -> int:
    lead_id = as_int(params.get("id"))
    if lead_id is None:
        raise invalid_id()
    return lead_id


def _fields(params: dict[str, Any]) -> dict[str, Any]:
    fields = params.get("fields", {})
    if not isinstance(fields, dict):
        raise crm_error("Parameter 'fields' must be array.")
    return fields


@_method("crm.lead.add")
async def _lead_add(portal: Portal, params: dict[str, Any]) -> MethodResult:
    return MethodResult(await portal.store.add(_fields(params)))


@_method("crm.lead.update")
async def _lead_update(portal: Portal, params: dict[str, Any]) -> MethodResult:
    lead_id = _lead_id(params)
    if not await portal.store.update(lead_id, _fields(params)):
        raise not_found()
    return MethodResult(True)


@_method("crm.lead.get")
async def _lead_get(portal: Portal, params: dict[str, Any]) -> MethodResult:
    lead = portal.store.get(_lead_id(params))
    if lead is None:
        raise not_found()
    return MethodResult(lead)


@_method("crm.lead.delete")
async def _lead_delete(portal: Portal, params: dict[str, Any]) -> MethodResult:
    if not await portal.store.delete(_lead_id(params)):
        raise not_found()
    return MethodResult(True)


@_method("crm.lead.list")
async def _lead_list(portal: Portal, params: dict[str, Any]) -> MethodResult:
    origin_ids = equal_to(params.get("filter"), "ORIGIN_ID", LEADS)
    candidates = portal.store.scan() if origin_ids is None else portal.store.with_origin(origin_ids)
    rows = apply_filter(candidates, params.get("filter"), LEADS)
    rows = apply_order(rows, params.get("order"), LEADS)
    page = paginate(rows, params.get("start", 0))
    select = params.get("select")
    return MethodResult(
        [copy.deepcopy(select_fields(row, select, LEADS)) for row in page.rows],
        page.total,
        page.next,
    )


@_method("crm.lead.fields")
async def _lead_fields(portal: Portal, params: dict[str, Any]) -> MethodResult:
    return MethodResult(field_descriptions())


@_method("crm.status.list")
async def _status_list(portal: Portal, params: dict[str, Any]) -> MethodResult:
    rows = apply_filter(status_rows(), params.get("filter"), STATUSES)
    page = paginate(apply_order(rows, params.get("order"), STATUSES), params.get("start"))
    return MethodResult(page.rows, page.total, page.next)


# --- crm.item.batchImport ------------------------------------------------------------------

# The lead fields `crm.item.*` names in camelCase, as `crm.lead.*` names them.
_ITEM_FIELDS = {
    "title": "TITLE",
    "honorific": "HONORIFIC",
    "name": "NAME",
    "secondName": "SECOND_NAME",
    "lastName": "LAST_NAME",
    "birthdate": "BIRTHDATE",
    "companyTitle": "COMPANY_TITLE",
    "sourceId": "SOURCE_ID",
    "sourceDescription": "SOURCE_DESCRIPTION",
    "stageId": "STATUS_ID",
    "statusDescription": "STATUS_DESCRIPTION",
    "post": "POST",
    "comments": "COMMENTS",
    "opened": "OPENED",
    "assignedById": "ASSIGNED_BY_ID",
    "originatorId": "ORIGINATOR_ID",
    "originId": "ORIGIN_ID",
}


def _lead_fields_of_item(item: dict[str, Any]) -> dict[str, Any]:
    """A `crm.item` lead (camelCase fields; phones and e-mails in `fm`, each with `typeId`,
    `valueType`, `value`) as the fields `crm.lead.add` takes. Unknown fields are dropped."""
    fields = {_ITEM_FIELDS[key]: value for key, value in item.items() if key in _ITEM_FIELDS}
    for entry in as_list(item.get("fm")):
        if isinstance(entry, dict):
            kind = str(entry.get("typeId") or "").upper()
            value = {"VALUE": entry.get("value"), "VALUE_TYPE": entry.get("valueType")}
            fields.setdefault(kind, []).append(value)
    return fields


@_method("crm.item.batchimport")
async def _item_batch_import(portal: Portal, params: dict[str, Any]) -> MethodResult:
    """Up to 20 new items of one type in one call (only leads live here, `entityTypeId` 1).
    Each item gets its own answer: `{"item": {"id": N}}` or an error."""
    if as_int(params.get("entitytypeid")) != LEAD_ENTITY_TYPE_ID:
        raise PortalError(400, "NOT_FOUND", "Smart process not found")
    items = as_list(params.get("data"))
    if len(items) > MAX_IMPORT_ITEMS:
        raise PortalError(
            400,
            "MAX_IMPORT_BATCH_SIZE_EXCEEDED",
            f"You cannot import more than {MAX_IMPORT_ITEMS} items",
        )
    answers: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            answers.append(
                {
                    "error": "CRM_FIELD_ERROR_VALUE_NOT_VALID",
                    "error_description": "Item fields must be an object",
                }
            )
            continue
        answers.append({"item": {"id": await portal.store.add(_lead_fields_of_item(item))}})
    return MethodResult({"items": answers})


# --- crm.duplicate.findbycomm ---------------------------------------------------------------


def _communication_key(kind: str, value: Any) -> str:
    """Duplicates are matched on the digits of a phone (an `#extension` is ignored) and on the
    lower-cased e-mail. "+7 700..." and "8 700..." stay different numbers."""
    text = str(value).strip()
    if kind == "PHONE":
        return "".join(char for char in text.partition("#")[0] if char.isdigit())
    return text.lower()


@_method("crm.duplicate.findbycomm")
async def _find_duplicates(portal: Portal, params: dict[str, Any]) -> MethodResult:
    kind = str(params.get("type", "")).upper()
    if kind not in ("PHONE", "EMAIL"):
        raise crm_error("Communication type is not defined or not supported.")
    values = as_list(params.get("values"))
    if not values:
        raise crm_error("Parameter 'values' must be array.")
    if len(values) > MAX_DUPLICATE_VALUES:
        raise crm_error(f"Too many communication values: {MAX_DUPLICATE_VALUES} at most.")
    entity_type = str(params.get("entity_type") or "LEAD").upper()
    if entity_type not in ("LEAD", "CONTACT", "COMPANY"):
        raise crm_error(f"Entity type '{entity_type}' is not supported in current context.")
    wanted = {_communication_key(kind, value) for value in values} - {""}
    lead_ids = [
        int(lead["ID"])
        for lead in portal.store.scan()
        if any(_communication_key(kind, entry["VALUE"]) in wanted for entry in lead.get(kind, []))
    ]
    # Only leads live on this portal; an empty answer is `[]`, as PHP encodes an empty array.
    if entity_type != "LEAD" or not lead_ids:
        return MethodResult([])
    return MethodResult({"LEAD": lead_ids})


# --- batch ----------------------------------------------------------------------------------

_REFERENCE = re.compile(r"\$result\[([^\]]+)\]((?:\[[^\]]*\])*)")
_MISSING = object()


def php_map(mapping: dict[str, Any]) -> Any:
    """PHP's json_encode of an array: `[]` when empty, a list when keyed 0..n-1, else a map."""
    if list(mapping) == [str(index) for index in range(len(mapping))]:
        return list(mapping.values())
    return mapping


def _lookup(results: dict[str, Any], key: str, path: str) -> Any:
    node: Any = results.get(key, _MISSING)
    for part in re.findall(r"\[([^\]]*)\]", path):
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _resolve(value: Any, results: dict[str, Any]) -> Any:
    """Substitutes `$result[key]` and `$result[key][FIELD]...` with earlier results; a whole
    value that is one reference takes the referenced value as it is (a list stays a list)."""
    if isinstance(value, dict):
        return {key: _resolve(item, results) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, results) for item in value]
    if not isinstance(value, str) or "$result[" not in value:
        return value
    whole = _REFERENCE.fullmatch(value)
    if whole:
        found = _lookup(results, whole.group(1), whole.group(2))
        return value if found is _MISSING else found

    def substitute(match: re.Match[str]) -> str:
        found = _lookup(results, match.group(1), match.group(2))
        return match.group(0) if found is _MISSING else str(found)

    return _REFERENCE.sub(substitute, value)


def _commands(raw: Any) -> dict[str, str]:
    if isinstance(raw, list):
        return {str(index): str(command) for index, command in enumerate(raw)}
    if isinstance(raw, dict):
        return {str(key): str(command) for key, command in raw.items()}
    return {}


@_method("batch")
async def _batch(portal: Portal, params: dict[str, Any]) -> MethodResult:
    commands = _commands(params.get("cmd"))
    halt = str(params.get("halt", "0")).strip().lower() in ("1", "true", "y")
    results: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    totals: dict[str, Any] = {}
    nexts: dict[str, Any] = {}
    times: dict[str, Any] = {}
    for key, command in list(commands.items())[:MAX_BATCH_COMMANDS]:
        raw_name, _, query = command.partition("?")
        name = method_name(raw_name)
        sub_params = _resolve(parse_query(query), results)
        started = time.time()
        try:
            if name == "batch":
                raise PortalError(
                    400, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage"
                )
            executed = await call_method(portal, name, sub_params)
        except PortalError as error:
            portal.stats.record(name, error.outcome, sub_params)
            errors[key] = error.body()
            if halt:
                break
            continue
        portal.stats.record(name, "ok", sub_params)
        results[key] = executed.outcome.result
        if executed.outcome.total is not None:
            totals[key] = executed.outcome.total
        if executed.outcome.next is not None:
            nexts[key] = executed.outcome.next
        times[key] = portal.time_info(name, started, executed.processing_s)
    for key in list(commands)[MAX_BATCH_COMMANDS:]:
        errors[key] = PortalError(
            400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded"
        ).body()
    return MethodResult(
        {
            "result": php_map(results),
            "result_error": php_map(errors),
            "result_total": php_map(totals),
            "result_next": php_map(nexts),
            "result_time": php_map(times),
        }
    )
