"""The pipeline at a glance: users by sync state, the outbox, the Bitrix service's queue and its
Bitrix24 requests, recent failures (`GET /sync/pipeline`, the dashboard, `b24sync status`)."""
