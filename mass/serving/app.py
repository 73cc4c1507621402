"""Build the Serve application (gateway + one deployment per served model) from ``AppArgs``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mass.config import load_config
from mass.serving.args import AppArgs


def build_app(args: AppArgs | dict[str, Any]):
    """A bound Serve application for ``args`` (validated; ConfigError names the bad field)."""
    from mass.gateway.app import Gateway
    from mass.serving.deployments import actor_options, bind_app_models

    if not isinstance(args, AppArgs):
        args = load_config(AppArgs, data=args)
    handles = bind_app_models(args)
    gw = args.gateway
    return Gateway.options(ray_actor_options=actor_options(gw.num_cpus),
                           max_ongoing_requests=gw.max_ongoing_requests).bind(handles, args.model_dump())


def load_app_args(path: str | Path, overrides: list[str] | None = None) -> AppArgs:
    """``AppArgs`` from a YAML file (either the args themselves or a Serve config's first app args)."""
    from mass.config import read_yaml

    data = read_yaml(path)
    if "applications" in data:
        data = (data["applications"] or [{}])[0].get("args", {})
    return load_config(AppArgs, data=data, overrides=overrides)
