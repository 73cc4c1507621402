"""The OpenAI-compatible gateway: one folder per endpoint family (router, protocol, serving)."""
