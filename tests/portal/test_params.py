"""How request parameters are read: PHP-style nested form keys, JSON, and their merge."""

from __future__ import annotations

from b24sync.portal.params import merge_params, parse_body, parse_query


def test_nested_keys_and_appends_become_maps_and_lists() -> None:
    parsed = parse_query(
        "fields[NAME]=Ivan&fields[PHONE][0][VALUE]=%2B7700&fields[PHONE][0][VALUE_TYPE]=WORK"
        "&select[]=ID&select[]=PHONE&filter[%3EID]=5&order[ID]=DESC"
    )
    assert parsed == {
        "fields": {"NAME": "Ivan", "PHONE": [{"VALUE": "+7700", "VALUE_TYPE": "WORK"}]},
        "select": ["ID", "PHONE"],
        "filter": {">ID": "5"},
        "order": {"ID": "DESC"},
    }


def test_non_sequential_keys_stay_a_map() -> None:
    parsed = parse_query("fields[PHONE][n0][VALUE]=1&fields[PHONE][n1][VALUE]=2&ids[3]=x")
    assert parsed == {
        "fields": {"PHONE": {"n0": {"VALUE": "1"}, "n1": {"VALUE": "2"}}},
        "ids": {"3": "x"},
    }


def test_bodies_by_content_type() -> None:
    assert parse_body(b'{"id": 5}', "application/json") == {"id": 5}
    assert parse_body(b"{broken", "application/json") == {}
    assert parse_body(b"[1, 2]", "application/json") == {}
    assert parse_body(b"id=5", "application/x-www-form-urlencoded; charset=utf-8") == {"id": "5"}
    assert parse_body(b'{"id": 5}', "") == {"id": 5}
    assert parse_body(b"id=5", "") == {"id": "5"}


def test_body_overrides_the_query_string_key_by_key() -> None:
    merged = merge_params(
        {"id": "1", "fields": {"NAME": "a", "TITLE": "t"}}, {"fields": {"NAME": "b"}}
    )
    assert merged == {"id": "1", "fields": {"NAME": "b", "TITLE": "t"}}
