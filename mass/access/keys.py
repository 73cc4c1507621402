"""API keys: created with a secret shown once (``mass-<id>-<secret>``), stored as a SHA-256, with the models
they may call, their rate limits and token budget; listed, shown, updated, rotated and revoked."""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from mass.config import MassConfig
from mass.errors import InvalidRequest, KeyNotFound

SECRET_RE = re.compile(r"mass-([0-9a-f]{12})-[A-Za-z0-9_-]{43}")
_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_BUDGET_RE = re.compile(r"^\s*(\d+)\s*/\s*(day|month)\s*$")


def hash_secret(secret: str) -> str:
    """The stored form of a secret: its SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_budget(text: str | None) -> tuple[int | None, str | None]:
    """``"1000000/day"`` -> (1000000, "day"); None or "none" -> (None, None)."""
    if text is None or str(text).strip().lower() in ("", "none", "unlimited"):
        return None, None
    match = _BUDGET_RE.match(str(text))
    if not match or int(match.group(1)) < 1:
        raise InvalidRequest(f"budget {text!r} is not TOKENS/day or TOKENS/month (e.g. 1000000/day)",
                             field="budget_tokens")
    return int(match.group(1)), match.group(2)


class _Limits(MassConfig):
    model_config = ConfigDict(strict=True)  # an HTTP body's `admin: 0` or `rpm: "5"` is refused, not coerced

    models: list[str] | None = Field(None, description="Glob patterns of the model ids the key may call "
                                                       "(`tiny-gpt`, `minilm*`; `*` is every model).")
    rpm: int | None = Field(None, ge=1, description="Requests per minute (sliding 60 s window); null: no limit.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute, prompt + completion; null: no limit.")
    max_parallel: int | None = Field(None, ge=1, description="Requests in flight at once; null: no limit.")
    budget: str | None = Field(None, description="Token budget per calendar day or month (UTC), "
                                                 "`TOKENS/day` or `TOKENS/month`; null: no budget.")
    admin: bool | None = Field(None, description="Admin keys may call /admin/* (manage keys, read usage).")

    @field_validator("models")
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        patterns = [p.strip() for p in value if p and p.strip()]
        if not patterns:
            raise ValueError("give at least one model pattern (`*` allows every model)")
        bad = [p for p in patterns if not re.fullmatch(r"[A-Za-z0-9._*?\[\]/@:-]+", p)]
        if bad:
            raise ValueError(f"model patterns may hold letters, digits, . _ - / @ : and the globs * ? []; got {bad}")
        return patterns

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: str | None) -> str | None:
        tokens, period = parse_budget(value)
        return None if tokens is None else f"{tokens}/{period}"


class KeySpec(_Limits):
    """A new key: its name and what it may do."""

    name: str = Field(..., pattern=_NAME_RE, description="Unique name (team or service), e.g. team-a.")
    models: list[str] = Field(["*"], description="Glob patterns of the model ids the key may call.")
    admin: bool = Field(False, description="Admin keys may call /admin/* (manage keys, read usage).")


class KeyUpdate(_Limits):
    """Changes to a key: only the fields given change (null clears a limit)."""

    name: str | None = Field(None, pattern=_NAME_RE, description="A new unique name.")

    @model_validator(mode="after")
    def _something(self) -> "KeyUpdate":
        if not self.model_fields_set:
            raise ValueError("nothing to update: give at least one of name, models, rpm, tpm, max_parallel, "
                             "budget, admin")
        cleared = sorted(f for f in ("name", "models", "admin") if f in self.model_fields_set
                         and getattr(self, f) is None)
        if cleared:
            raise ValueError(f"{', '.join(cleared)} cannot be null (only limits and the budget can be cleared)")
        return self


@dataclass(frozen=True)
class ApiKey:
    """A key as the platform knows it (never with its secret)."""

    id: str
    name: str
    models: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_tokens: int | None
    budget_period: Literal["day", "month"] | None
    admin: bool
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        """False once revoked."""
        return self.revoked_at is None

    @property
    def limited(self) -> bool:
        """True when any limit or budget applies to the key."""
        return any(v is not None for v in (self.rpm, self.tpm, self.max_parallel, self.budget_tokens))

    @property
    def prefix(self) -> str:
        """The visible part of the secret, for people to tell keys apart."""
        return f"mass-{self.id}-…"

    def allows(self, model: str) -> bool:
        """True when one of the key's patterns matches ``model``."""
        return any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without any secret."""
        budget = f"{self.budget_tokens}/{self.budget_period}" if self.budget_tokens else None
        return {"id": self.id, "name": self.name, "prefix": self.prefix, "models": list(self.models),
                "rpm": self.rpm, "tpm": self.tpm, "max_parallel": self.max_parallel, "budget": budget,
                "admin": self.admin, "status": "active" if self.active else "revoked",
                "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at),
                "revoked_at": _iso(self.revoked_at)}


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat(timespec="seconds")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _row_to_key(row) -> ApiKey:
    m = row._mapping
    return ApiKey(id=m["id"], name=m["name"], models=tuple(m["models"].split(",")), rpm=m["rpm"], tpm=m["tpm"],
                  max_parallel=m["max_parallel"], budget_tokens=m["budget_tokens"],
                  budget_period=m["budget_period"], admin=bool(m["admin"]), created_at=m["created_at"],
                  updated_at=m["updated_at"], revoked_at=m["revoked_at"])


def _columns(limits: _Limits, fields: set[str]) -> dict[str, Any]:
    """Table columns for the given fields of a spec or update."""
    out: dict[str, Any] = {}
    for name in fields:
        value = getattr(limits, name)
        if name == "models":
            out["models"] = ",".join(value)
        elif name == "budget":
            out["budget_tokens"], out["budget_period"] = parse_budget(value)
        else:
            out[name] = value
    return out


class KeyStore:
    """API keys in the platform database (``url``: default ``MASS_DATABASE_URL``)."""

    def __init__(self, url: str | None = None) -> None:
        from mass.access.db import database_url

        self.url = database_url(url)

    def _tx(self, what: str):
        from mass.access.db import transaction

        return transaction(self.url, what)

    @staticmethod
    def _bump(conn) -> None:
        from mass.access.schema import access_state

        conn.execute(access_state.update().where(access_state.c.id == 1)
                     .values(version=access_state.c.version + 1))

    def create(self, spec: KeySpec | dict[str, Any]) -> tuple[ApiKey, str]:
        """A new key and its secret (shown this once; only its hash is kept). InvalidRequest when the name
        is taken."""
        from mass.access.schema import api_keys

        spec = spec if isinstance(spec, KeySpec) else _validate(KeySpec, spec)
        key_id, now = secrets.token_hex(6), _now()
        secret = f"mass-{key_id}-{secrets.token_urlsafe(32)}"
        row = {"id": key_id, "name": spec.name, "secret_sha256": hash_secret(secret), "created_at": now,
               "updated_at": now, "revoked_at": None,
               **_columns(spec, {"models", "rpm", "tpm", "max_parallel", "budget", "admin"})}
        with self._tx("create a key") as conn:
            self._unique_name(conn, spec.name)
            conn.execute(api_keys.insert().values(**row))
            self._bump(conn)
        return self.get(key_id), secret

    def _unique_name(self, conn, name: str, except_id: str | None = None) -> None:
        from mass.access.schema import api_keys

        found = conn.execute(api_keys.select().where(api_keys.c.name == name)).first()
        if found is not None and found._mapping["id"] != except_id:
            state = "revoked" if found._mapping["revoked_at"] else "active"
            raise InvalidRequest(f"a key named {name!r} already exists ({state}, id {found._mapping['id']}); "
                                 "choose another name", field="name")

    def list(self, include_revoked: bool = True) -> list[ApiKey]:
        """Every key, oldest first."""
        from mass.access.schema import api_keys

        query = api_keys.select().order_by(api_keys.c.created_at, api_keys.c.id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self._tx("list keys") as conn:
            return [_row_to_key(r) for r in conn.execute(query)]

    def get(self, ref: str) -> ApiKey:
        """The key named ``ref`` (its name, its id, or its ``mass-<id>`` prefix); KeyNotFound otherwise."""
        from mass.access.schema import api_keys

        key_id = _id_of(ref)
        with self._tx("read a key") as conn:
            row = conn.execute(api_keys.select().where(
                (api_keys.c.name == ref) | (api_keys.c.id == key_id))).first()
        if row is None:
            raise KeyNotFound(f"no API key named {ref!r} (give its name or id; `mass keys list` shows them)",
                              field="key")
        return _row_to_key(row)

    def update(self, ref: str, changes: KeyUpdate | dict[str, Any]) -> ApiKey:
        """Apply ``changes`` to a key; every gateway replica sees them within a second."""
        from mass.access.schema import api_keys

        changes = changes if isinstance(changes, KeyUpdate) else _validate(KeyUpdate, changes)
        key = self.get(ref)
        values = _columns(changes, set(changes.model_fields_set))
        with self._tx("update a key") as conn:
            if "name" in values:
                self._unique_name(conn, values["name"], except_id=key.id)
            conn.execute(api_keys.update().where(api_keys.c.id == key.id).values(**values, updated_at=_now()))
            self._bump(conn)
        return self.get(key.id)

    def revoke(self, ref: str) -> ApiKey:
        """Revoke a key for good (idempotent); every gateway replica refuses it within a second."""
        from mass.access.schema import api_keys

        key = self.get(ref)
        if key.active:
            now = _now()
            with self._tx("revoke a key") as conn:
                conn.execute(api_keys.update().where(api_keys.c.id == key.id)
                             .values(revoked_at=now, updated_at=now))
                self._bump(conn)
        return self.get(key.id)

    def rotate(self, ref: str) -> tuple[ApiKey, str]:
        """A new secret for an active key (same id, name, limits and usage); the old secret stops working
        within a second."""
        from mass.access.schema import api_keys

        key = self.get(ref)
        if not key.active:
            raise InvalidRequest(f"key {key.name!r} is revoked; create a new key instead", field="key")
        secret = f"mass-{key.id}-{secrets.token_urlsafe(32)}"
        with self._tx("rotate a key") as conn:
            conn.execute(api_keys.update().where(api_keys.c.id == key.id)
                         .values(secret_sha256=hash_secret(secret), updated_at=_now()))
            self._bump(conn)
        return self.get(key.id), secret

    def resolve(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, or None (malformed, unknown or revoked)."""
        from mass.access.schema import api_keys

        if not SECRET_RE.fullmatch(secret):
            return None
        with self._tx("look up a key") as conn:
            row = conn.execute(api_keys.select().where(api_keys.c.secret_sha256 == hash_secret(secret))).first()
        key = None if row is None else _row_to_key(row)
        return key if key is not None and key.active else None

    def version(self) -> int:
        """The access version counter: it moves whenever any key changes."""
        from mass.access.schema import access_state

        with self._tx("read the access version") as conn:
            return int(conn.execute(access_state.select().where(access_state.c.id == 1)).first()._mapping["version"])


def _id_of(ref: str) -> str:
    """The id inside ``mass-<id>-…`` or ``mass-<id>``, else ``ref`` itself."""
    match = re.match(r"^mass-([0-9a-f]{12})(-|$)", ref)
    return match.group(1) if match else ref


def _validate(model, data: dict[str, Any]):
    from mass.config import load_config

    return load_config(model, data=data)
