"""A Bitrix24 portal emulator: the REST methods b24sync uses, with the portal's limits and
failures. Entry points live in :mod:`b24sync.portal.main`."""
