"""Thin Ray Serve application builders; the logic lives in ``mass.serving`` and ``mass.gateway``."""
