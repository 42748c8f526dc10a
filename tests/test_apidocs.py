"""`/docs` of Core and of the emulator works offline: every file the page loads is served by
the service itself."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI

from b24sync.core.app import create_app as create_core
from b24sync.portal.app import create_app as create_portal
from b24sync.settings import Settings

# Every address the page refers to: scripts, styles, the icon and the OpenAPI document.
_REFERENCE = re.compile(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""")
_EXPECTED_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.mark.parametrize("create_app", [create_core, create_portal], ids=["core", "portal"])
async def test_docs_page_loads_only_local_files(
    settings: Settings, create_app: Callable[[Settings], FastAPI]
) -> None:
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        page = await http.get("/docs")
        assert page.status_code == 200
        references = [a or b for a, b in _REFERENCE.findall(page.text)]
        assert "/openapi.json" in references
        assets = [url for url in references if url != "/openapi.json"]
        assert {url.rsplit(".", 1)[-1] for url in assets} == {"js", "css", "png"}
        for url in references:
            assert url.startswith("/"), f"/docs loads {url} from elsewhere"
            answer = await http.get(url)
            assert answer.status_code == 200, url
            suffix = "." + url.rsplit(".", 1)[-1]
            expected = _EXPECTED_TYPES.get(suffix, "application/json")
            assert expected in answer.headers["content-type"], url
            assert len(answer.content) > 1000, f"{url} is nearly empty"
        schema = (await http.get("/openapi.json")).json()
        assert schema["openapi"].startswith("3.1")
        # The bundled Swagger UI reads OpenAPI 3.1 (from version 5 on).
        bundle = (await http.get(next(url for url in assets if url.endswith(".js")))).text
        assert re.search(r'"5\.\d+\.\d+"', bundle)
