"""The service proxy's access layer: API keys, their limits and budgets, and the usage ledger, kept in the
platform database (SQLAlchemy + Alembic; sqlite under ``MASS_HOME`` or PostgreSQL)."""

from mass.access.keys import ApiKey, KeySpec, KeyStore

__all__ = ["ApiKey", "KeySpec", "KeyStore"]
