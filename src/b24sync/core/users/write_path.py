"""The users API's writes (create, update, move) answered straight from ASGI.

They are Core's hottest routes, and FastAPI's routing, dependency solving and body handling
cost more CPU than the write itself. This middleware answers a well-formed write on its own,
with the same body models, service calls and error answers as the routes in `endpoints.py`.
Any other request goes on to FastAPI unchanged, which answers it as documented: a body that
does not validate (FastAPI words the 422), a missing or wrong token, a body without
Content-Length, another content type, a query string.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from b24sync.core.db import committing, database_unavailable
from b24sync.core.exceptions import CoreError, database_unavailable_response, error_response
from b24sync.core.middleware import MAX_BODY_BYTES, read_body, replaying, send_body
from b24sync.core.models import User
from b24sync.core.users.schemas import UserCreate, UserMove, UserRead, UserUpdate
from b24sync.core.users.service import WriteGroups, WriteTarget, user_service
from b24sync.serving import bearer_token_matches
from b24sync.settings import Settings

Apply = Callable[[WriteTarget, Settings, int, Any], Awaitable[User]]


@dataclass(frozen=True, slots=True)
class Write:
    body: type[BaseModel]
    apply: Apply
    status: int = 200


async def _create(writes: WriteTarget, settings: Settings, _: int, data: UserCreate) -> User:
    return await user_service.create(writes, settings, data)


CREATE = Write(UserCreate, _create, status=201)
UPDATE = Write(UserUpdate, user_service.update)
MOVE = Write(UserMove, user_service.move)

# /users/{id} and /users/{id}/move, the id as FastAPI's path rule takes it (1..2^63-1).
_USER_PATH = re.compile(r"/users/([1-9][0-9]{0,18})(/move)?")
_MAX_ID = 2**63 - 1


def route(method: str, path: str) -> tuple[Write, int] | None:
    """The write a request's method and path name, with the user id (0 for a create)."""
    if path == "/users":
        return (CREATE, 0) if method == "POST" else None
    match = _USER_PATH.fullmatch(path)
    if match is None or int(match[1]) > _MAX_ID:
        return None
    if match[2] is None:
        return (UPDATE, int(match[1])) if method == "PATCH" else None
    return (MOVE, int(match[1])) if method == "POST" else None


def _validated(model: type[BaseModel], body: bytes | None) -> BaseModel | None:
    """The body read by `model`; None when there is no whole body or the model refuses it."""
    if body is None:
        return None
    try:
        return model.model_validate_json(body)
    except ValidationError:
        return None


class UserWritePath:
    """Inside the access log, in front of the body and query checks and FastAPI's routes;
    reads the app's `state` (settings, groups of writes, sessions) at each request, as the
    routes do (see `dependencies.get_writes`). A write given to the app's groups opens no
    session: opening and closing one cost a tenth of a grouped write's CPU, for nothing."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = route(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if found is None or scope["query_string"] or not self._plain_json(scope):
            await self.app(scope, receive, send)
            return
        write, user_id = found
        messages, body = await read_body(receive, MAX_BODY_BYTES)
        data = _validated(write.body, body)
        if data is None:  # FastAPI answers it, in its words
            await self.app(scope, replaying(messages, receive), send)
            return
        try:
            groups: WriteGroups | None = self.state.write_groups
            if groups is not None:
                user = await write.apply(groups, self.state.settings, user_id, data)
            else:
                async with committing(self.state.sessionmaker) as session:
                    user = await write.apply(session, self.state.settings, user_id, data)
        except CoreError as exc:
            await error_response(exc)(scope, receive, send)
            return
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            await database_unavailable_response(exc)(scope, receive, send)
            return
        await send_body(send, write.status, UserRead.json_of(user))

    def _plain_json(self, scope: Scope) -> bool:
        """A JSON body of announced size within the limit, and the token when one is set."""
        length = content_type = authorization = b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"authorization":
                authorization = value
        settings: Settings = self.state.settings
        if settings.core_api_token is not None and not bearer_token_matches(
            authorization.decode("latin-1"), settings.core_api_token
        ):
            return False
        return (
            length.isdigit()
            and int(length) <= MAX_BODY_BYTES
            and content_type.split(b";")[0].strip().lower() == b"application/json"
        )
