"""Inference engines: plain Python objects that Serve deployments wrap (testable without Ray)."""
