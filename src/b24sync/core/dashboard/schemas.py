"""What the dashboard's own routes answer."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DashboardConfig(BaseModel):
    lead_url: str | None = Field(
        description="the lead's page on the portal with `{id}` for its id; None on the emulator"
    )
    emulator: bool = Field(description="Bitrix24 is the built-in emulator: its board is shown")
    stages: list[str]


class LeadCard(BaseModel):
    id: int
    title: str
    phone: str | None
    user_id: int | None = Field(description="the Core user the lead belongs to (ORIGIN_ID)")


class StageColumn(BaseModel):
    stage: str = Field(description="Core's stage, or the lead's STATUS_ID when none maps to it")
    status_id: str
    count: int
    leads: list[LeadCard] = Field(description="the newest leads first, at most a page")


class LeadBoard(BaseModel):
    columns: list[StageColumn]
    error: str | None = Field(description="why the emulator's leads could not be read")
