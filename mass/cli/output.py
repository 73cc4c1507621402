"""Rendering for the CLI: plain tables for people, one JSON document for scripts."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Iterable

from mass.errors import MassError


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    """A left-aligned text table."""
    rows = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _metrics(metrics: dict[str, float]) -> str:
    keys = [k for k in ("val_loss", "test_loss", "test_perplexity", "dim") if k in metrics]
    keys += sorted(k for k in metrics if k not in keys and k not in ("initial_val_loss", "val_perplexity",
                                                                      "train_loss"))
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys[:4])


def models_table(models: list) -> str:
    """The registry table: one row per version, newest first within a model."""
    rows = []
    for model in models:
        for v in model.versions:
            rows.append([v.name, v.version, ",".join(v.aliases), v.status, v.task, human_size(v.size_bytes),
                         v.lineage.get("method", ""), _metrics(v.metrics),
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created_at))])
    if not rows:
        return "no registered models (train one with `mass train`, or `mass models import-minilm`)"
    return table(["MODEL", "VERSION", "ALIASES", "STATUS", "TASK", "SIZE", "METHOD", "METRICS", "CREATED"], rows)


def version_detail(info) -> str:
    """Every field of one version, one per line."""
    d = info.to_dict()
    lines = [f"{k:12} {d[k]}" for k in ("ref", "status", "task", "aliases", "run_id", "source", "description")]
    lines.append(f"{'size':12} {human_size(info.size_bytes)}")
    lines += [f"{'metric':12} {k} = {v:.6g}" for k, v in sorted(info.metrics.items())]
    lines += [f"{'lineage':12} {k} = {v}" for k, v in sorted(info.lineage.items())]
    if info.config:
        lines.append(f"{'config':12} {json.dumps(info.config, sort_keys=True)}")
    return "\n".join(lines)


def emit(output: str, data: Any, text: str) -> None:
    """Print ``text`` for people or ``data`` as one JSON document when ``output == 'json'``."""
    print(json.dumps(data, default=str) if output == "json" else text, flush=True)


def report_error(exc: MassError, as_json: bool) -> int:
    """The one way a command or job reports a MassError: one ``error: ...`` line on stderr, plus its JSON on
    stdout for scripts when ``as_json``; returns the exit code of its kind."""
    print(f"error: {exc.message}", file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps({"error": exc.to_dict()}, default=str), flush=True)
    return exc.exit_code


def keys_table(keys: list[dict[str, Any]]) -> str:
    """API keys, one row each (never a secret)."""
    if not keys:
        return "no API keys yet: `mass keys create --name NAME`"
    rows = [[k["name"], k["prefix"], k["status"], ",".join(k["models"]), k["rpm"] or "-", k["tpm"] or "-",
             k["max_parallel"] or "-", k["budget"] or "-", "yes" if k["admin"] else "", k["created_at"]]
            for k in keys]
    return table(["NAME", "KEY", "STATUS", "MODELS", "RPM", "TPM", "PARALLEL", "BUDGET", "ADMIN", "CREATED"], rows)


def key_detail(key: dict[str, Any]) -> str:
    """One key, a field per line."""
    fields = ["name", "id", "prefix", "status", "models", "rpm", "tpm", "max_parallel", "budget", "admin",
              "created_at", "updated_at", "revoked_at"]
    width = max(map(len, fields))
    lines = []
    for f in fields:
        value = key.get(f)
        value = ",".join(value) if isinstance(value, list) else ("-" if value is None else value)
        lines.append(f"{f.ljust(width)}  {value}")
    return "\n".join(lines)


def usage_table(rows: list[dict[str, Any]], by: str | None) -> str:
    """Ledger rollups, one row per group."""
    if not rows:
        return "no requests in that span"
    head = [by.upper()] if by else []
    cols = ["requests", "refused", "prompt_tokens", "completion_tokens", "total_tokens", "latency_ms", "overhead_ms"]
    body = [[*([r[by] if r[by] is not None else "-"] if by else []), *(r[c] for c in cols)] for r in rows]
    return table(head + ["REQUESTS", "REFUSED", "PROMPT", "COMPLETION", "TOTAL", "LATENCY_MS", "OVERHEAD_MS"], body)
