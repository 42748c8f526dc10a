from __future__ import annotations

import json

import pytest
import structlog

from b24sync.logs import configure_logging, get_logger, mask_secrets, shorten, webhook_secret

WEBHOOK = "https://example.bitrix24.kz/rest/17/sj4byqtjd3p5j3wq/crm.lead.add.json"


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
        configure_logging("DEBUG")
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
