"""The admin API (admin keys only)."""
