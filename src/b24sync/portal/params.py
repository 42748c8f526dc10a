"""Request parameters the way Bitrix24 (PHP) reads them: JSON or form-encoded with nested keys.

A form body such as ``fields[PHONE][0][VALUE]=+7700&select[]=ID`` becomes
``{"fields": {"PHONE": [{"VALUE": "+7700"}]}, "select": ["ID"]}``. PHP arrays are ordered maps,
so a map whose keys are exactly ``0..n-1`` turns into a list, as PHP's ``json_encode`` does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

_BRACKETS = re.compile(r"\[([^\]]*)\]")


def _split_key(key: str) -> list[str]:
    """``fields[PHONE][0]`` -> ``["fields", "PHONE", "0"]``; ``select[]`` -> ``["select", ""]``."""
    head, bracket, _ = key.partition("[")
    if not bracket or not head:
        return [key]
    return [head, *_BRACKETS.findall(key[len(head) :])]


def php_lists(value: Any) -> Any:
    """Turns every map keyed exactly ``0..n-1`` into a list, recursively."""
    if isinstance(value, dict):
        converted = {key: php_lists(item) for key, item in value.items()}
        if converted and list(converted) == [str(index) for index in range(len(converted))]:
            return list(converted.values())
        return converted
    if isinstance(value, list):
        return [php_lists(item) for item in value]
    return value


def method_name(raw: str) -> str:
    """Method names are case-insensitive and may end in `.json`."""
    return raw.strip().lower().removesuffix(".json")


def parse_form_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for key, value in pairs:
        path = _split_key(key)
        node = root
        for index, part in enumerate(path):
            last = index == len(path) - 1
            if part == "":
                # `name[]` appends: the next integer key, as PHP does.
                part = str(sum(1 for existing in node if existing.isdigit()))
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
    result: dict[str, Any] = php_lists(root)
    return result


def parse_query(query: str) -> dict[str, Any]:
    return parse_form_pairs(parse_qsl(query, keep_blank_values=True))


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Invalid JSON, or JSON that is not an object, means "no parameters" on a real portal."""
    try:
        decoded = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return decoded if isinstance(decoded, dict) else {}


def parse_body(body: bytes, content_type: str) -> dict[str, Any]:
    if not body.strip():
        return {}
    if "json" in content_type:
        return parse_json_body(body)
    if "x-www-form-urlencoded" in content_type:
        return parse_query(body.decode("utf-8", errors="replace"))
    # Clients that send no content type: JSON when it looks like an object, else form encoding.
    if body.lstrip().startswith(b"{"):
        return parse_json_body(body)
    return parse_query(body.decode("utf-8", errors="replace"))


def merge_params(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Query-string parameters overlaid by body parameters (body wins, maps merge deeply)."""
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            merged[key] = merge_params(current, value)
        else:
            merged[key] = value
    return merged


def as_list(value: Any) -> list[Any]:
    """A PHP array given either as a JSON list or as a map (non-sequential keys) -> its values."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    if value is None or value == "":
        return []
    return [value]


def as_int(value: Any) -> int | None:
    """A positive integer id from a JSON number or a string; None when absent or invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
        return number if number > 0 else None
    return None
