"""GET /v1/models, /healthz, /readyz."""
