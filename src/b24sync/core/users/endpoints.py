"""HTTP routes of the users API (the seed's three requests plus reads)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response, status

from b24sync.core.dependencies import SessionDep, SettingsDep, WritesDep
from b24sync.core.models import SyncStatus, User
from b24sync.core.sync.service import resync_service
from b24sync.core.users.schemas import (
    CREATE_EXAMPLE,
    MOVE_EXAMPLE,
    UPDATE_EXAMPLE,
    Pagination,
    Stage,
    UserCreate,
    UserEvent,
    UserHistory,
    UserList,
    UserMove,
    UserRead,
    UserUpdate,
)
from b24sync.core.users.service import UserNotFoundError, user_service

router = APIRouter(prefix="/users", tags=["users"])

UserId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The user's id")]

_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Body that cannot be read as JSON"},
    413: {"description": "Body larger than 16 KiB"},
}
_ERRORS: dict[int | str, dict[str, Any]] = {404: {"description": "No such user"}, **_BODY_ERRORS}


def _user_response(user: User, status_code: int = status.HTTP_200_OK) -> Response:
    """The user as `UserRead` reads it, serialised once: returning the model would have
    FastAPI validate it again against response_model (which still documents the body)."""
    return Response(UserRead.json_of(user), status_code=status_code, media_type="application/json")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=UserRead,
    summary="Create a user",
    responses=_BODY_ERRORS,
)
async def create_user(
    writes: WritesDep,
    settings: SettingsDep,
    data: Annotated[
        UserCreate,
        Body(
            openapi_examples={
                "seed": {
                    "summary": "Создание пользователя",
                    "value": CREATE_EXAMPLE,
                },
                "no_phone": {
                    "summary": "Пользователь без телефона — отклоняется (422)",
                    "value": {"full_name": "Пользователь без телефона", "stage": "NEW"},
                },
            }
        ),
    ],
) -> Response:
    user = await user_service.create(writes, settings, data)
    return _user_response(user, status.HTTP_201_CREATED)


@router.get("", response_model=UserList, summary="List users")
async def list_users(
    session: SessionDep,
    stage: Annotated[Stage | None, Query()] = None,
    sync_status: Annotated[SyncStatus | None, Query()] = None,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    search: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            description="part of the name (any case), or digits of the phone",
        ),
    ] = None,
) -> UserList:
    users, total, max_page = await user_service.list(
        session, stage=stage, sync_status=sync_status, page=page, limit=limit, search=search
    )
    return UserList(
        items=[UserRead.from_user(user) for user in users],
        pagination=Pagination(total_count=total, max_page=max_page),
    )


@router.get("/{id}", response_model=UserRead, summary="Get a user", responses={404: _ERRORS[404]})
async def get_user(id: UserId, session: SessionDep) -> UserRead:
    return UserRead.from_user(await user_service.get(session, id))


@router.get(
    "/{id}/history",
    response_model=UserHistory,
    summary="The user's changes sent to Bitrix24 and their answers",
    responses={404: _ERRORS[404]},
)
async def user_history(
    id: UserId,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> UserHistory:
    events = await user_service.history(session, id, limit)
    return UserHistory(user_id=id, events=[UserEvent.from_event(event) for event in events])


@router.patch(
    "/{id}",
    response_model=UserRead,
    summary="Update a user (fields left out keep their value)",
    responses=_ERRORS,
)
async def update_user(
    id: UserId,
    writes: WritesDep,
    settings: SettingsDep,
    data: Annotated[
        UserUpdate,
        Body(
            openapi_examples={
                "seed": {
                    "summary": "Обновление пользователя",
                    "value": UPDATE_EXAMPLE,
                }
            }
        ),
    ],
) -> Response:
    return _user_response(await user_service.update(writes, settings, id, data))


@router.post(
    "/{id}/move",
    response_model=UserRead,
    summary="Move a user to another stage",
    responses=_ERRORS,
)
async def move_user(
    id: UserId,
    writes: WritesDep,
    settings: SettingsDep,
    data: Annotated[
        UserMove,
        Body(
            openapi_examples={
                "seed": {
                    "summary": "Перемещение пользователя на новый этап",
                    "value": MOVE_EXAMPLE,
                }
            }
        ),
    ],
) -> Response:
    return _user_response(await user_service.move(writes, settings, id, data))


@router.post(
    "/{id}/resync",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=UserRead,
    summary="Send the user again as it is now",
    responses={404: _ERRORS[404]},
)
async def resync_user(
    id: UserId,
    session: SessionDep,
    settings: SettingsDep,
    force: Annotated[
        bool,
        Query(description="every field, applied even over a version Bitrix24 holds as newer"),
    ] = False,
) -> UserRead:
    """A new event (a create while the lead id is unknown, an update otherwise); the user is
    pending until its answer. For a failure that waits for a change, or a lead edited by hand."""
    if not await resync_service.resync(session, settings, [id], force=force):
        raise UserNotFoundError(id)
    return UserRead.from_user(await user_service.get(session, id))
