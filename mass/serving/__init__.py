"""Serving: inference engines and the Ray Serve deployments that host them."""
