"""What the emulated portal knows about leads: field descriptions and the default lead stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldSpec:
    type: str
    title: str
    read_only: bool = False

    def describe(self, multiple: bool = False) -> dict[str, Any]:
        """The shape `crm.lead.fields` answers with for one field."""
        return {
            "type": self.type,
            "isRequired": False,
            "isReadOnly": self.read_only,
            "isImmutable": False,
            "isMultiple": multiple,
            "isDynamic": False,
            "title": self.title,
        }


# Scalar lead fields in the order a portal returns them. Values are stored as strings (or None).
SCALAR_FIELDS: dict[str, FieldSpec] = {
    "ID": FieldSpec("integer", "ID", read_only=True),
    "TITLE": FieldSpec("string", "Lead name"),
    "HONORIFIC": FieldSpec("crm_status", "Salutation"),
    "NAME": FieldSpec("string", "First name"),
    "SECOND_NAME": FieldSpec("string", "Second name"),
    "LAST_NAME": FieldSpec("string", "Last name"),
    "COMPANY_TITLE": FieldSpec("string", "Company name"),
    "COMPANY_ID": FieldSpec("crm_company", "Company"),
    "CONTACT_ID": FieldSpec("crm_contact", "Contact"),
    "IS_RETURN_CUSTOMER": FieldSpec("char", "Repeat lead", read_only=True),
    "BIRTHDATE": FieldSpec("date", "Date of birth"),
    "SOURCE_ID": FieldSpec("crm_status", "Source"),
    "SOURCE_DESCRIPTION": FieldSpec("string", "Source information"),
    "STATUS_ID": FieldSpec("crm_status", "Stage"),
    "STATUS_DESCRIPTION": FieldSpec("string", "Stage information"),
    "POST": FieldSpec("string", "Position"),
    "COMMENTS": FieldSpec("string", "Comment"),
    "CURRENCY_ID": FieldSpec("crm_currency", "Currency"),
    "OPPORTUNITY": FieldSpec("double", "Total"),
    "IS_MANUAL_OPPORTUNITY": FieldSpec("char", "Manual total"),
    "HAS_PHONE": FieldSpec("char", "Has phone", read_only=True),
    "HAS_EMAIL": FieldSpec("char", "Has email", read_only=True),
    "HAS_IMOL": FieldSpec("char", "Has open channel", read_only=True),
    "ASSIGNED_BY_ID": FieldSpec("user", "Responsible person"),
    "CREATED_BY_ID": FieldSpec("user", "Created by", read_only=True),
    "MODIFY_BY_ID": FieldSpec("user", "Modified by", read_only=True),
    "DATE_CREATE": FieldSpec("datetime", "Created on", read_only=True),
    "DATE_MODIFY": FieldSpec("datetime", "Modified on", read_only=True),
    "DATE_CLOSED": FieldSpec("datetime", "Closed on", read_only=True),
    "STATUS_SEMANTIC_ID": FieldSpec("string", "Status semantics", read_only=True),
    "OPENED": FieldSpec("char", "Available to everyone"),
    "ORIGINATOR_ID": FieldSpec("string", "External source"),
    "ORIGIN_ID": FieldSpec("string", "Item ID in data source"),
    "MOVED_BY_ID": FieldSpec("user", "Stage changed by", read_only=True),
    "MOVED_TIME": FieldSpec("datetime", "Stage changed on", read_only=True),
    "ADDRESS": FieldSpec("string", "Address"),
    "UTM_SOURCE": FieldSpec("string", "Ad system"),
    "UTM_MEDIUM": FieldSpec("string", "Traffic type"),
    "UTM_CAMPAIGN": FieldSpec("string", "Ad campaign UTM"),
    "UTM_CONTENT": FieldSpec("string", "Campaign contents"),
    "UTM_TERM": FieldSpec("string", "Campaign search term"),
    "LAST_ACTIVITY_BY": FieldSpec("user", "Last activity by", read_only=True),
    "LAST_ACTIVITY_TIME": FieldSpec("datetime", "Last activity on", read_only=True),
}

# Multi-fields (`crm_multifield`): lists of {"ID", "VALUE_TYPE", "VALUE", "TYPE_ID"}.
MULTI_FIELDS: dict[str, FieldSpec] = {
    "PHONE": FieldSpec("crm_multifield", "Phone"),
    "EMAIL": FieldSpec("crm_multifield", "E-mail"),
    "WEB": FieldSpec("crm_multifield", "Website"),
    "IM": FieldSpec("crm_multifield", "Messenger"),
}

MULTI_VALUE_TYPES: dict[str, tuple[str, ...]] = {
    "PHONE": ("WORK", "MOBILE", "FAX", "HOME", "PAGER", "MAILING", "OTHER"),
    "EMAIL": ("WORK", "HOME", "MAILING", "OTHER"),
    "WEB": ("WORK", "HOME", "FACEBOOK", "VK", "LIVEJOURNAL", "TWITTER", "OTHER"),
    "IM": ("FACEBOOK", "TELEGRAM", "VK", "SKYPE", "VIBER", "INSTAGRAM", "OPENLINE", "OTHER"),
}

WRITABLE_FIELDS = frozenset(name for name, spec in SCALAR_FIELDS.items() if not spec.read_only)
USER_FIELD_PREFIX = "UF_"
_NUMERIC_TYPES = frozenset({"integer", "double", "user", "crm_company", "crm_contact"})


@dataclass(frozen=True)
class Table:
    """What the list methods need to know about the rows they filter, order and project."""

    scalar_fields: frozenset[str]
    # Compared as numbers ("10" > "9"); every other field compares as text ("007" != "7").
    numeric_fields: frozenset[str]
    default_order: str


LEADS = Table(
    scalar_fields=frozenset(SCALAR_FIELDS),
    numeric_fields=frozenset(
        name for name, spec in SCALAR_FIELDS.items() if spec.type in _NUMERIC_TYPES
    ),
    default_order="ID",
)
STATUSES = Table(
    scalar_fields=frozenset({"ID", "ENTITY_ID", "STATUS_ID", "NAME", "NAME_INIT", "SORT"}),
    numeric_fields=frozenset({"ID", "SORT", "CATEGORY_ID"}),
    default_order="SORT",
)


def field_descriptions() -> dict[str, dict[str, Any]]:
    described = {name: spec.describe() for name, spec in SCALAR_FIELDS.items()}
    described.update({name: spec.describe(multiple=True) for name, spec in MULTI_FIELDS.items()})
    return described


# (STATUS_ID, NAME, SORT, SEMANTICS) of the default lead stages; SEMANTICS None = in process.
LEAD_STAGES: tuple[tuple[str, str, int, str | None], ...] = (
    ("NEW", "Unassigned", 10, None),
    ("IN_PROCESS", "In progress", 20, None),
    ("PROCESSED", "Processed", 30, None),
    ("JUNK", "Junk lead", 40, "F"),
    ("CONVERTED", "Good lead", 50, "S"),
)
LEAD_SOURCES: tuple[tuple[str, str, int], ...] = (
    ("CALL", "Call", 10),
    ("EMAIL", "E-Mail", 20),
    ("WEB", "Website", 30),
    ("ADVERTISING", "Advertising", 40),
    ("PARTNER", "Existing client", 50),
    ("OTHER", "Other", 60),
)


def status_rows() -> list[dict[str, Any]]:
    """All rows of `crm.status.list`: lead stages (ENTITY_ID=STATUS) and sources (SOURCE)."""
    rows: list[dict[str, Any]] = []
    for status_id, name, sort, semantics in LEAD_STAGES:
        rows.append(_status_row(len(rows) + 1, "STATUS", status_id, name, sort, semantics))
    for status_id, name, sort in LEAD_SOURCES:
        rows.append(_status_row(len(rows) + 1, "SOURCE", status_id, name, sort, None))
    return rows


def _status_row(
    row_id: int, entity: str, status_id: str, name: str, sort: int, semantics: str | None
) -> dict[str, Any]:
    return {
        "ID": str(row_id),
        "ENTITY_ID": entity,
        "STATUS_ID": status_id,
        "NAME": name,
        "NAME_INIT": name,
        "SORT": str(sort),
        "SYSTEM": "Y",
        "CATEGORY_ID": None,
        "COLOR": None,
        "SEMANTICS": semantics,
    }


def stage_semantic_id(status_id: str | None) -> str:
    """`STATUS_SEMANTIC_ID` of a lead: P (in process), S (success) or F (failure)."""
    for known_id, _, _, semantics in LEAD_STAGES:
        if known_id == status_id:
            return semantics or "P"
    return "P"
