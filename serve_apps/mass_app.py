"""Serve entry point: ``serve run serve_apps/configs/demo.yaml`` or ``serve deploy`` of the same file."""

from mass.app import build_app


def app_builder(args: dict):
    """Build the MASS application (gateway + model deployments) from the config's ``args``."""
    return build_app(args)
