"""The whole system in one test: Core on its own database, the Bitrix service and the
emulator, sharing the test's queues and Redis prefix. The fixtures are those of the Core and
Bitrix suites."""

from tests.bitrix.conftest import admin, fast_settings, portal, redis_client, start_service
from tests.core.conftest import database_url

__all__ = ["admin", "database_url", "fast_settings", "portal", "redis_client", "start_service"]
