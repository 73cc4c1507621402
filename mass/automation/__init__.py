"""Automation: trigger rules that start jobs on events (and, later, schedules), with dedupe and run history."""
