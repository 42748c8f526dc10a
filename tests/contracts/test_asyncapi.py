"""docs/asyncapi.yaml is what `b24sync.contracts.asyncapi` makes from the models, and what it
says (channels, messages, examples) is what the services really read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from b24sync.bitrix.consumer import parse
from b24sync.contracts import Pattern, parse_reply
from b24sync.contracts.asyncapi import DEFAULT_PATH, document, main, render

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / DEFAULT_PATH
REFRESH = "make asyncapi (python -m b24sync.contracts.asyncapi)"


def test_committed_document_is_up_to_date() -> None:
    assert COMMITTED.exists(), f"{DEFAULT_PATH} is missing: run `{REFRESH}`"
    assert COMMITTED.read_text(encoding="utf-8") == render(), (
        f"{DEFAULT_PATH} is out of date with src/b24sync/contracts: run `{REFRESH}` and commit it"
    )


def test_main_writes_the_document(tmp_path: Path) -> None:
    target = tmp_path / "asyncapi.yaml"
    assert main([str(target)]) == 0
    assert yaml.safe_load(target.read_text(encoding="utf-8")) == document()


def test_channels_and_messages() -> None:
    spec = yaml.safe_load(render())
    assert spec["asyncapi"] == "3.0.0"
    channels = spec["channels"]
    assert channels["bitrix_queue"]["address"] == "bitrix_queue"
    assert channels["bitrix_responses"]["address"] == "bitrix.responses"
    assert set(channels["bitrix_queue"]["messages"]) == {pattern.value for pattern in Pattern}
    messages = spec["components"]["messages"]
    for name in ("user_created", "user_updated", "user_moved"):
        assert messages[name]["payload"]["properties"]["pattern"]["const"] == name
        assert "message_id" in messages[name]["headers"]["properties"]
    assert "correlation_id" in messages["reply"]["headers"]["properties"]
    assert messages["reply"]["payload"]["properties"]["pattern"]["const"] == "bitrix.responses"
    # Every reference points at something in the document.
    for ref in _references(spec):
        node: Any = spec
        for key in ref.removeprefix("#/").split("/"):
            assert key in node, f"{ref} points at nothing"
            node = node[key]


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


def _examples(name: str) -> list[dict[str, Any]]:
    examples: list[dict[str, Any]] = document()["components"]["messages"][name]["examples"]
    return examples


@pytest.mark.parametrize("name", [pattern.value for pattern in Pattern])
def test_event_examples_are_read_by_the_bitrix_service(name: str) -> None:
    for example in _examples(name):
        event = parse(json.dumps(example["payload"]).encode())
        assert event.pattern.value == name


def test_reply_examples_are_read_by_core() -> None:
    statuses = [parse_reply(json.dumps(e["payload"])).status.value for e in _examples("reply")]
    assert statuses == ["success", "error"]
