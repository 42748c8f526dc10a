"""All configuration, read from the environment and `.env` (names fixed by the contract)."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_STAGES = ["NEW", "IN_PROCESS", "PROCESSED", "JUNK", "CONVERTED"]
# The client-side bucket (burst, requests a second) of each Bitrix24 plan; none when unlimited.
BITRIX_PLANS: dict[str, tuple[int, float]] = {"standard": (45, 2.0), "enterprise": (240, 5.0)}
# An incoming webhook's path: /rest/<user id>/<code>, the trailing slash optional.
_WEBHOOK_PATH = re.compile(r"/rest/\d+/[^/]+/?")
# The first field of each group of Settings below, in their order: `settings_by_group` reads
# the groups from here (the `--help` of every command lists the settings it reads).
GROUP_STARTS = {
    "port": "core",
    "rabbitmq_url": "messaging",
    "redis_url": "bitrix",
    "portal_port": "portal",
    "log_level": "logging",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    # --- Core -----------------------------------------------------------------------------
    port: int = 3000
    # Interface the HTTP servers of Core and the Bitrix service bind to.
    host: str = "0.0.0.0"  # noqa: S104 - services are meant to be reachable in a container
    database_url: str = "postgresql://postgres:postgres@localhost:5432/core_db"
    core_api_token: SecretStr | None = None
    default_phone_region: str = "KZ"
    # Allowed stages; comma-separated in the environment (STAGES=NEW,IN_PROCESS,...).
    stages: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    outbox_batch_size: int = 200
    outbox_poll_interval_s: float = 1.0
    # The longest a relay woken soon after a batch that sent several events waits before the next,
    # so that under heavy load the events of those milliseconds leave in one batch (one
    # transaction, one confirm) instead of a few each. The wait is 2 ms per event of the last
    # batch (outbox/relay.py, BATCH_GAP_PER_EVENT_S): a trickle leaves within milliseconds.
    outbox_batch_gap_ms: float = Field(default=50.0, ge=0, le=1000)
    # Uvicorn worker processes; each runs a reply consumer and, unless outbox_relay_process is
    # set, a relay (one publishes at a time).
    core_workers: int = 1
    # Run the outbox relay in a process of its own instead of in every HTTP worker, so that
    # publishing keeps up while the HTTP workers are saturated (see core/outbox/process.py):
    # in the HTTP worker, under full load, the outbox fell 5-9 s behind (bench/core_api.py).
    outbox_relay_process: bool = True
    # A user's latest event still unanswered this long after it was published is sent again
    # (same message_id; the wait doubles with each resend, up to a day). 0 turns resending off.
    # Short enough that jobs lost with Redis's data are sent again within a couple of minutes.
    sync_resend_after_s: float = 60.0
    # A user whose latest change failed for a transient reason is sent again by Core (a new
    # event) after sync_retry_initial_s, doubling with each retry up to sync_retry_max_s
    # (±20% jitter); at most sync_retry_batch users per pass of the relay. While retries
    # wait, one of them goes early every sync_retry_probe_s: its success (the portal is back)
    # brings the others forward. 0 for sync_retry_initial_s turns Core's retries off.
    sync_retry_initial_s: float = 30.0
    sync_retry_max_s: float = 3600.0
    sync_retry_batch: int = 200
    sync_retry_probe_s: float = 10.0
    # For a Bitrix service that needs the lead id in every update and move (the original
    # NestJS one): a user's updates and moves wait in the outbox until the create's reply
    # brings the lead id, and a change of a user whose create failed is sent as a create.
    hold_until_lead_id: bool = False
    # Grouped create statements running at once; creates that arrive meanwhile wait and are
    # written together by the next one (see core/users/repository.py). One at a time makes
    # fuller groups: fewer round trips per write, and more writes a second, not fewer.
    create_groups_in_flight: int = Field(default=1, ge=1)
    # The same for updates and moves: one statement (two for users not known) for the changes that
    # arrive meanwhile (see `grouped_changes` in core/users/service.py). Two: a group holds no lock
    # between its statements, so the next one runs while it waits.
    change_groups_in_flight: int = Field(default=2, ge=1)
    # Rows of users the groups of changes keep as last written or read, so that the next change
    # of such a user is one round trip, not a read and a write (0: none kept).
    change_row_cache: int = Field(default=4096, ge=0)
    db_pool_size: int = 20
    db_max_overflow: int = 10
    # Replies Core handles at once, applied in groups of up to this many to a transaction (one
    # group at a time). A group's BEGIN, read and COMMIT are shared by its replies: under load,
    # larger groups cost Core less per reply.
    reply_concurrency: int = Field(default=32, ge=1, le=256)

    # --- Messaging ------------------------------------------------------------------------
    rabbitmq_url: str = "amqp://guest:guest@localhost:5672"
    rabbitmq_queue: str = "bitrix_queue"
    rabbitmq_reply_queue: str = "bitrix.responses"
    rabbitmq_prefetch: int = 50
    # "quorum" on a RabbitMQ cluster (replicated queues); every service must use the same.
    rabbitmq_queue_type: Literal["classic", "quorum"] = "classic"

    # --- Bitrix service -------------------------------------------------------------------
    redis_url: str = "redis://localhost:6379"
    bitrix_webhook_url: SecretStr | None = None
    bitrix_http_port: int = 3001
    # When set, the Bitrix service's /metrics requires `Authorization: Bearer <token>`
    # (/healthz and /readyz stay open for probes).
    bitrix_http_token: SecretStr | None = None
    bullmq_queue: str = "bitrix_jobs"
    bullmq_prefix: str = "bull"
    job_attempts: int = 3
    job_backoff_ms: int = 2000
    job_remove_on_complete: int = 10
    job_remove_on_fail: int = 5
    # Bitrix24 stage id for each Core stage; identity for stages not listed (JSON object).
    stage_map: dict[str, str] = Field(default_factory=dict)
    originator_id: str = "b24sync"
    phone_value_type: str = "WORK"
    bitrix_timeout_s: float = 30.0
    # The portal's plan sets the client-side leaky bucket that every process shares through
    # Redis: standard (45 requests of burst, 2 a second: a little under the portal's 50, so a
    # request that reaches the portal late, next to the following one, cannot tip its full
    # bucket over), enterprise (240, 5 a second), unlimited (no bucket). bitrix_rate_burst and
    # bitrix_rate_per_s override the plan's numbers.
    bitrix_plan: Literal["standard", "enterprise", "unlimited"] = "standard"
    bitrix_rate_burst: int | None = None
    bitrix_rate_per_s: float | None = None
    # Commands in one `batch` request (one request against the limit; 50 at most). Ready work
    # leaves in requests this full as fast as the bucket allows; a lone change leaves at once.
    bitrix_batch_size: int = 50
    # Requests one process has out at once: a request that hangs holds only its own commands.
    bitrix_requests_in_flight: int = 4
    # BullMQ jobs one process holds at once, each carrying up to rabbitmq_prefetch events that
    # wait in the sync engine to be merged per user and sent in batches. After a kill -9 they
    # come back to the queue as stalled jobs.
    bitrix_max_jobs: int = 200
    # An event body larger than this is refused (a real one is well under 1 KB).
    bitrix_event_max_bytes: int = 16384
    shutdown_timeout_s: float = 25.0
    # Rate-limit answers never fail a change: QUERY_LIMIT_EXCEEDED waits bitrix_limit_wait_s x
    # 1.5^n, OPERATION_TIME_LIMIT until the method's `operating_reset_at` (or
    # bitrix_operation_limit_wait_s when unknown), each wait capped at bitrix_limit_max_wait_s.
    # A single `BitrixClient.request` (b24sync reconcile) gives up after bitrix_limit_max_waits.
    bitrix_limit_wait_s: float = 1.0
    bitrix_operation_limit_wait_s: float = 10.0
    bitrix_limit_max_waits: int = 5
    bitrix_limit_max_wait_s: float = 60.0  # cap of one wait, whatever the reset time says
    # BullMQ worker: a job whose lock is not renewed within job_lock_duration_ms (worker died) is
    # moved back to wait by the stalled-job check that runs every job_stalled_interval_ms.
    job_lock_duration_ms: int = 30000
    job_stalled_interval_ms: int = 30000
    job_max_stalled_count: int = 1
    # A process writes a user's lead only under the user's lease in Redis (TTL
    # user_lease_ttl_ms, renewed while its write is in flight), so a process killed mid-write
    # blocks its users for at most that long. A job of a user leased by another process goes
    # back to the queue for user_busy_delay_ms, without spending an attempt.
    user_lease_ttl_ms: int = 10000
    user_busy_delay_ms: int = 1000

    # --- Portal emulator ------------------------------------------------------------------
    portal_port: int = 3100
    portal_host: str = "127.0.0.1"
    # Where the other services reach the emulator (unset: http://127.0.0.1:PORTAL_PORT); in
    # Compose, the emulator's own container.
    portal_url: str | None = None
    portal_webhook: SecretStr = SecretStr("1/b24sync-local")
    portal_rate_limit: Literal["standard", "enterprise", "off"] = "standard"
    portal_state_file: str | None = None
    # Overrides of the plan's bucket (burst, drain per second), e.g. a small bucket in tests.
    portal_rate_burst: int | None = None
    portal_rate_per_s: float | None = None
    # Operating-time limit per method over a sliding window; None turns it off. Each call counts
    # its measured time plus portal_operating_cost_s (simulated execution time).
    portal_operating_limit_s: float | None = 480.0
    portal_operating_window_s: float = 600.0
    portal_operating_cost_s: float = 0.0
    # Faults injected from the start (changeable at run time through /admin/faults).
    portal_latency_ms: int = 0
    portal_error_rate: float = 0.0
    portal_timeout_rate: float = 0.0
    portal_timeout_delay_s: float = 35.0
    portal_outage_s: float = 0.0
    portal_outage_mode: Literal["html", "connection"] = "html"

    # --- Logging --------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = False
    # Full names and phones in log lines as they are; masked otherwise (`И*** И***`,
    # `+7******2233`).
    log_pii: bool = False
    # One line per HTTP request to Core: method, path, status, duration.
    access_log: bool = True

    @field_validator("stages", mode="before")
    @classmethod
    def _split_stages(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("bitrix_webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: SecretStr | None) -> SecretStr | None:
        # The message never repeats the URL: its last segment is the secret code.
        if value is None:
            return value
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL; expected https://PORTAL/rest/USER_ID/CODE/")
        if not _WEBHOOK_PATH.fullmatch(parts.path):
            raise ValueError(
                "not an incoming webhook's path; expected https://PORTAL/rest/USER_ID/CODE/"
            )
        return value

    @property
    def portal_base_url(self) -> str:
        """Where the emulator answers, for the services beside it."""
        return (self.portal_url or f"http://127.0.0.1:{self.portal_port}").rstrip("/")

    @property
    def portal_webhook_url(self) -> str:
        """The emulator's own webhook URL, used when no real portal is configured."""
        return f"{self.portal_base_url}/rest/{self.portal_webhook.get_secret_value()}"

    @property
    def bitrix_bucket(self) -> tuple[int, float] | None:
        """The client-side bucket (burst, requests a second) for BITRIX_PLAN and its overrides;
        None on the unlimited plan without overrides."""
        burst, per_s = BITRIX_PLANS.get(self.bitrix_plan) or (None, None)
        burst = self.bitrix_rate_burst or burst
        per_s = self.bitrix_rate_per_s or per_s
        if burst is None or per_s is None:
            return None
        return burst, per_s

    @property
    def effective_webhook_url(self) -> str:
        if self.bitrix_webhook_url is not None:
            return self.bitrix_webhook_url.get_secret_value()
        return self.portal_webhook_url


def settings_by_group() -> dict[str, list[str]]:
    """The names of the settings of each group (core, messaging, bitrix, portal, logging)."""
    groups: dict[str, list[str]] = {}
    group = ""
    for name in Settings.model_fields:
        group = GROUP_STARTS.get(name, group)
        groups.setdefault(group, []).append(name)
    return groups


@lru_cache
def get_settings() -> Settings:
    return Settings()
