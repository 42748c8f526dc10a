"""The inspection and control API under `/admin/` (no webhook needed); see `main.py`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from b24sync.portal.faults import FaultConfig, ScriptedFault
from b24sync.portal.state import Portal
from b24sync.serving import health_answer


def admin_router(portal: Portal) -> APIRouter:
    router = APIRouter()

    def faults_view() -> dict[str, Any]:
        faults = portal.faults
        return {
            **faults.config.model_dump(),
            "outage_remaining_s": round(faults.outage_remaining_s(), 3),
            "script": [fault.model_dump() for fault in faults.script],
        }

    @router.get("/healthz")
    async def healthz() -> dict[str, str | int]:
        return health_answer()

    @router.get("/admin/leads")
    async def leads() -> list[dict[str, Any]]:
        return portal.store.all()

    @router.get("/admin/leads/{lead_id}")
    async def lead(lead_id: int) -> dict[str, Any]:
        found = portal.store.get(lead_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"lead {lead_id} not found")
        return found

    @router.get("/admin/stats")
    async def stats() -> dict[str, Any]:
        bucket = portal.bucket
        return {
            **portal.stats.snapshot(),
            "bucket": None
            if bucket is None
            else {
                "level": round(bucket.level, 3),
                "capacity": bucket.capacity,
                "drain_per_s": bucket.drain_per_s,
            },
        }

    @router.get("/admin/calls")
    async def calls() -> list[dict[str, Any]]:
        return list(portal.stats.calls)

    @router.post("/admin/reset")
    async def reset() -> dict[str, str]:
        await portal.reset()
        return {"status": "reset"}

    @router.get("/admin/faults")
    async def get_faults() -> dict[str, Any]:
        return faults_view()

    @router.put("/admin/faults")
    async def put_faults(config: FaultConfig) -> dict[str, Any]:
        portal.faults.configure(config)
        return faults_view()

    @router.get("/admin/faults/script")
    async def get_script() -> list[dict[str, Any]]:
        return [fault.model_dump() for fault in portal.faults.script]

    @router.post("/admin/faults/script")
    async def add_script(fault: ScriptedFault) -> list[dict[str, Any]]:
        portal.faults.add_script(fault)
        return await get_script()

    @router.delete("/admin/faults/script")
    async def clear_script() -> list[dict[str, Any]]:
        portal.faults.script.clear()
        return []

    return router
