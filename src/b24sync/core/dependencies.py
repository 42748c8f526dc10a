"""Dependencies shared by Core's routes: settings, the request session, where the request's
writes go, the API token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.core.db import committing, get_db_session
from b24sync.core.exceptions import UnauthorizedError
from b24sync.core.users.service import WriteGroups, WriteTarget
from b24sync.serving import bearer_token_matches
from b24sync.settings import Settings


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
# scope="function": the session commits right after the endpoint, before the response is sent.
SessionDep = Annotated[AsyncSession, Depends(get_db_session, scope="function")]


async def get_writes(request: Request) -> AsyncIterator[WriteTarget]:
    """The app's groups of writes; without them (an app not started through its lifespan, as
    in a test whose requests stay in its transaction), the request's session."""
    groups: WriteGroups | None = request.app.state.write_groups
    if groups is not None:
        yield groups
        return
    async with committing(request.app.state.sessionmaker) as session:
        yield session


WritesDep = Annotated[WriteTarget, Depends(get_writes, scope="function")]


async def require_token(request: Request, settings: SettingsDep) -> None:
    """With CORE_API_TOKEN set, every API route needs ``Authorization: Bearer <token>``."""
    if settings.core_api_token is None:
        return
    if not bearer_token_matches(request.headers.get("authorization", ""), settings.core_api_token):
        raise UnauthorizedError("Missing or invalid bearer token")
