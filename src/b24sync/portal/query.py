"""`*.list` semantics shared by the list methods: filter, order, select and `start` paging."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from b24sync.portal.fields import MULTI_FIELDS, USER_FIELD_PREFIX, Table
from b24sync.portal.params import as_int, as_list

PAGE_SIZE = 50
Row = dict[str, Any]

# Longest prefixes first, so that `!=` is not read as `!` + `=FIELD`.
_PREFIXES = ("!@", "!%", "!=", ">=", "<=", "=", "!", ">", "<", "@", "%")
_ORDER_CHECKS: dict[str, Callable[[int], bool]] = {
    ">": lambda order: order > 0,
    ">=": lambda order: order >= 0,
    "<": lambda order: order < 0,
    "<=": lambda order: order <= 0,
}


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_empty(value: Any) -> bool:
    return value is None or value == ""


@dataclass(frozen=True)
class _Condition:
    field: str
    operator: str
    expected: Any
    numeric: bool

    def holds(self, row: Row) -> bool:
        values = self._values(row)
        if self.operator in ("=", "@", "!", "!=", "!@"):
            pairs = ((value, option) for value in values or [None] for option in self.options())
            found = any(self._equal(value, option) for value, option in pairs)
            return found if self.operator in ("=", "@") else not found
        if self.operator in ("%", "!%"):
            needle = str(self.expected).lower()
            found = any(value is not None and needle in str(value).lower() for value in values)
            return found if self.operator == "%" else not found
        check = _ORDER_CHECKS[self.operator]
        return any(not _is_empty(value) and check(self._compare(value)) for value in values)

    def _values(self, row: Row) -> list[Any]:
        """One value per multi-field entry (PHONE, EMAIL...), else the field's value."""
        value = row.get(self.field)
        if self.field in MULTI_FIELDS:
            return [entry["VALUE"] for entry in value or []]
        return [value]

    def options(self) -> list[Any]:
        """The values an equality test accepts: a list means IN; `@` also takes "a,b,c"."""
        if isinstance(self.expected, list | dict):
            return as_list(self.expected)
        if self.operator in ("@", "!@") and isinstance(self.expected, str):
            return self.expected.split(",")
        return [self.expected]

    def _equal(self, value: Any, option: Any) -> bool:
        if _is_empty(option):
            return _is_empty(value)
        if _is_empty(value):
            return False
        if self.numeric:
            return _number(value) == _number(option)
        # The portal trims filter values; it does not normalise them otherwise.
        return str(value) == str(option).strip()

    def _compare(self, value: Any) -> int:
        left_number, right_number = _number(value), _number(self.expected)
        if self.numeric and left_number is not None and right_number is not None:
            return (left_number > right_number) - (left_number < right_number)
        left, right = str(value), str(self.expected).strip()
        return (left > right) - (left < right)


def _conditions(filter_params: Any, table: Table) -> list[_Condition]:
    if not isinstance(filter_params, dict):
        return []
    conditions = []
    for key, expected in filter_params.items():
        operator = next((prefix for prefix in _PREFIXES if key.startswith(prefix)), "")
        field = key[len(operator) :].strip().upper()
        numeric = field in table.numeric_fields
        conditions.append(_Condition(field, operator or "=", expected, numeric))
    return conditions


def equal_to(filter_params: Any, field: str, table: Table) -> list[str] | None:
    """The values a filter requires `field` to equal (`=`, `@` or no prefix), trimmed as the
    portal trims them; None when it does not pin the field down."""
    for condition in _conditions(filter_params, table):
        if condition.field == field and condition.operator in ("=", "@"):
            options = condition.options()
            if any(_is_empty(option) for option in options):
                return None  # "is empty" matches leads the values cannot name
            return [str(option).strip() for option in options]
    return None


def apply_filter(rows: Iterable[Row], filter_params: Any, table: Table) -> list[Row]:
    conditions = _conditions(filter_params, table)
    return [row for row in rows if all(condition.holds(row) for condition in conditions)]


def apply_order(rows: list[Row], order_params: Any, table: Table) -> list[Row]:
    """Sorts by the `order` map (ASC/DESC per field); ties keep the table's default order."""

    def sort_key(field: str) -> Callable[[Row], tuple[int, float, str]]:
        numeric = field in table.numeric_fields

        def key(row: Row) -> tuple[int, float, str]:
            value = row.get(field)
            # Empty values first in ascending order, as the portal's SQL does.
            if _is_empty(value) or isinstance(value, list | dict):
                return (0, 0.0, "")
            number = _number(value) if numeric else None
            return (1, number, "") if number is not None else (2, 0.0, str(value))

        return key

    ordered = sorted(rows, key=sort_key(table.default_order))
    items = list(order_params.items()) if isinstance(order_params, dict) else []
    # Stable sorts, least significant key first.
    for field, direction in reversed(items):
        descending = str(direction).upper() == "DESC"
        ordered.sort(key=sort_key(str(field).upper()), reverse=descending)
    return ordered


def select_fields(row: Row, select: Any, table: Table) -> Row:
    """Projects a row: `*` (or no select) = all scalar fields, without multi-fields and UF_*;
    those come only when named (`PHONE`, `EMAIL`, `UF_*`, `UF_CRM_X`). ID is always there."""
    names = {str(name).upper() for name in as_list(select)} or {"*"}
    wanted = {"ID"} | (names - {"*", "UF_*"})
    if "*" in names:
        wanted |= table.scalar_fields
    return {
        key: value
        for key, value in row.items()
        if key in wanted or ("UF_*" in names and key.startswith(USER_FIELD_PREFIX))
    }


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    total: int | None
    next: int | None


def paginate(rows: list[Row], start: Any) -> Page:
    """Pages of 50. `next` only when more rows remain; `start=-1` skips the count (no total,
    no next) — the fast way to walk a large table with `>ID` filters."""
    if str(start).strip() == "-1":
        return Page(rows[:PAGE_SIZE], None, None)
    offset = as_int(start) or 0
    page = rows[offset : offset + PAGE_SIZE]
    remaining = offset + PAGE_SIZE < len(rows)
    return Page(page, len(rows), offset + PAGE_SIZE if remaining else None)
