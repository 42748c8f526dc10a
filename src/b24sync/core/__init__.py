"""Core: the users HTTP API, the transactional outbox relay and the Bitrix reply consumer."""
