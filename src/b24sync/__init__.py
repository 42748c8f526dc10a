"""b24sync: keeps a user base in sync with Bitrix24 CRM leads."""

__version__ = "0.1.0"
