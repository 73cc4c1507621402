"""Model lifecycle: what should be served, as operations on the registry (publish, canary, promote, rollback,
offline, online) that are checked, recorded and announced on the event bus."""

from __future__ import annotations

from mass.lifecycle.operations import Lifecycle, ServingPlan, Step, parse_plan

__all__ = ["Lifecycle", "ServingPlan", "Step", "parse_plan"]
