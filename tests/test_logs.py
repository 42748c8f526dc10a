from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from b24sync.logs import (
    configure_logging,
    get_logger,
    mask_name,
    mask_personal,
    mask_phone,
    mask_secrets,
    shorten,
    webhook_secret,
)

WEBHOOK = "https://example.bitrix24.kz/rest/17/sj4byqtjd3p5j3wq/crm.lead.add.json"
EVENT = {
    "pattern": "user_created",
    "data": {
        "action": "create_card",
        "user": {"id": 1, "full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"},
    },
}


def _logged(capsys: pytest.CaptureFixture[str], *, personal_data: bool) -> dict[str, Any]:
    """One line of each shape that carries personal data, as LOG_JSON renders it."""
    configure_logging("INFO", json=True, personal_data=personal_data)
    try:
        get_logger("test").info(
            "[Core] About to emit message to BITRIX_SERVICE: "
            + json.dumps(EVENT, ensure_ascii=False),
            escaped=json.dumps(EVENT),  # ensure_ascii: the name as \\u escapes
            python=repr(EVENT["data"]),  # a dict as Python prints it
            full_name="Пётр Петров",
            phone="+77009998877",
        )
        line = capsys.readouterr().out.strip().splitlines()[-1]
    finally:
        structlog.reset_defaults()
        configure_logging("DEBUG")  # as tests/conftest.py set it
    record: dict[str, Any] = json.loads(line)
    return record


def test_mask_hides_the_webhook_code() -> None:
    masked = mask_secrets(f"POST {WEBHOOK} failed")
    assert "sj4byqtjd3p5j3wq" not in masked
    assert "/rest/17/***/crm.lead.add.json" in masked


def test_log_lines_never_carry_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", json=True, secrets=["token-value-123"])
    try:
        get_logger("test").info(
            "[Bitrix] Calling Bitrix24 API",
            url=WEBHOOK,
            nested={"headers": ["Bearer token-value-123"]},
            error=RuntimeError(f"connect failed for {WEBHOOK}"),
        )
        line = capsys.readouterr().out.strip().splitlines()[-1]
    finally:
        structlog.reset_defaults()
        configure_logging("DEBUG")  # as tests/conftest.py set it
    record = json.loads(line)
    assert record["event"] == "[Bitrix] Calling Bitrix24 API"
    assert "sj4byqtjd3p5j3wq" not in line
    assert "token-value-123" not in line
    assert record["nested"] == {"headers": ["Bearer ***"]}


def test_webhook_secret() -> None:
    assert (
        webhook_secret("https://b24-x.bitrix24.kz/rest/1/sj4byqtjd3p5j3wq/") == "sj4byqtjd3p5j3wq"
    )
    assert webhook_secret("http://127.0.0.1:3100/rest/1/b24sync-local") == "b24sync-local"
    assert webhook_secret("http://127.0.0.1:3100/") is None


def test_shorten_keeps_short_text_as_it_is() -> None:
    assert shorten("Иван Иванов", 11) == "Иван Иванов"
    assert shorten("", 0) == ""


def test_shorten_cuts_and_says_how_much() -> None:
    assert shorten("x" * 8_000_000, 10) == "xxxxxxxxxx… (7999990 more characters)"
    assert shorten("Иван Иванов", 4) == "Иван… (7 more characters)"


def test_masks_of_names_and_phones() -> None:
    assert mask_name("Иван Иванов") == "И*** И***"
    assert mask_name(" Пользователь  без телефона ") == "П*** б*** т***"
    assert mask_phone("+77001112233") == "+7******2233"
    assert mask_phone("87001112233") == "8******2233"
    assert mask_phone("+7700") == "*****"  # too short to show any of it


def test_personal_data_is_masked_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    record = _logged(capsys, personal_data=False)
    rendered = json.dumps(record, ensure_ascii=False)
    for value in ("Иван", "Иванов", "+77001112233", "7001112233", "Пётр", "+77009998877"):
        assert value not in rendered
    assert "\\u0418\\u0432\\u0430\\u043d" not in rendered  # "Иван", escaped
    assert record["event"] == (
        '[Core] About to emit message to BITRIX_SERVICE: {"pattern": "user_created", "data": '
        '{"action": "create_card", "user": {"id": 1, "full_name": "И*** И***", '
        '"phone": "+7******2233", "stage": "NEW"}}}'
    )
    assert json.loads(record["escaped"])["data"]["user"]["full_name"] == "И*** И***"
    assert "'full_name': 'И*** И***', 'phone': '+7******2233'" in record["python"]
    assert (record["full_name"], record["phone"]) == ("П*** П***", "+7******8877")


def test_personal_data_is_shown_with_log_pii(capsys: pytest.CaptureFixture[str]) -> None:
    record = _logged(capsys, personal_data=True)
    assert record["event"].endswith(json.dumps(EVENT, ensure_ascii=False))
    assert json.loads(record["escaped"]) == EVENT
    assert (record["full_name"], record["phone"]) == ("Пётр Петров", "+77009998877")


def test_a_body_cut_short_stays_masked() -> None:
    cut = shorten(json.dumps(EVENT, ensure_ascii=False), 100)
    assert "Иван" in cut
    assert "Иван" not in mask_personal(cut)


class _Writes:
    """A stdout that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_a_line_leaves_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an unbuffered stdout each write is a system call: a line and its newline go
    together."""
    stdout = _Writes()
    monkeypatch.setattr("sys.stdout", stdout)
    configure_logging("INFO")
    try:
        get_logger("test").info("[Core] Request", status=201)
    finally:
        structlog.reset_defaults()
        configure_logging("DEBUG")  # as tests/conftest.py set it
    assert len(stdout.writes) == 1
    assert stdout.writes[0].endswith(" status=201\n")
    assert "[Core] Request" in stdout.writes[0]


def test_a_line_is_stamped_in_utc_to_the_microsecond(monkeypatch: pytest.MonkeyPatch) -> None:
    stdout = _Writes()
    monkeypatch.setattr("sys.stdout", stdout)
    configure_logging("INFO")
    try:
        before = datetime.now(UTC)
        get_logger("test").info("[Core] Request", status=201)
        after = datetime.now(UTC)
    finally:
        structlog.reset_defaults()
        configure_logging("DEBUG")  # as tests/conftest.py set it
    stamp = stdout.writes[0].split(" ", 1)[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert before - timedelta(microseconds=1) <= datetime.fromisoformat(stamp) <= after


def test_a_masked_name_that_needs_escaping_stays_valid_json() -> None:
    body = json.dumps({"user": {"full_name": '"Ivan" \\ Ivanov', "phone": "+77001112233"}})
    masked = json.loads(mask_personal(body))
    assert masked["user"] == {"full_name": '"*** \\*** I***', "phone": "+7******2233"}
