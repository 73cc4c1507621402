"""The gateway's view of API keys: a short in-process cache in front of the key store, dropped whenever the
store's access version moves (polled every ``poll_s``), so a revoke or update reaches every replica within a
second while a request with a known key never waits on the database."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from mass.access.keys import SECRET_RE, ApiKey, KeyStore, hash_secret
from mass.errors import InvalidApiKey, MassError

log = logging.getLogger(__name__)

MAX_HEADER = 512  # an Authorization header longer than any MASS key is refused unread


def bearer_secret(header: str | None) -> str:
    """The secret of an ``Authorization: Bearer <key>`` header; InvalidApiKey naming what is wrong."""
    if header is None or not header.strip():
        raise InvalidApiKey("missing API key: send it as `Authorization: Bearer mass-...` (create one with "
                            "`mass keys create --name NAME`)")
    if len(header) > MAX_HEADER:
        raise InvalidApiKey(f"Authorization header too long ({len(header)} characters): a MASS key is 61")
    scheme, _, secret = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise InvalidApiKey(f"unsupported Authorization scheme {scheme[:16]!r}: use `Bearer mass-...`")
    secret = secret.strip()
    if not SECRET_RE.fullmatch(secret):
        raise InvalidApiKey("malformed API key: MASS keys look like mass-<12 hex>-<43 characters>")
    return secret


class KeyResolver:
    """Resolves secrets to active keys through a cache that a version poll keeps honest.

    Args:
        store: the key store (the platform database).
        poll_s: how often the access version is read (a change drops the whole cache).
        ttl_s: an entry is re-read after this long even without a version change (a missed poll).
        max_entries: cache bound (unknown secrets are cached too, so guessing does not hammer the database).
    """

    def __init__(self, store: KeyStore, poll_s: float = 0.25, ttl_s: float = 30.0, max_entries: int = 10_000):
        self.store, self.poll_s, self.ttl_s, self.max_entries = store, poll_s, ttl_s, max_entries
        self._cache: OrderedDict[str, tuple[ApiKey | None, float]] = OrderedDict()
        self._version: int | None = None
        self._poller: asyncio.Task | None = None

    async def authenticate(self, header: str | None) -> ApiKey:
        """The active key of an Authorization header; InvalidApiKey (401) otherwise."""
        secret = bearer_secret(header)
        self._ensure_polling()
        digest = hash_secret(secret)
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is None or now - hit[1] > self.ttl_s:
            try:
                key = await asyncio.to_thread(self.store.resolve, secret)
            except MassError:
                if hit is None:  # no answer and nothing known: fail closed
                    raise
                key = hit[0]  # the database is down: keep what was known until it returns
                log.warning("key store unreachable; using the cached entry for key %s", secret[:17])
            self._cache[digest] = (key, now)
            self._cache.move_to_end(digest)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            hit = (key, now)
        if hit[0] is None:
            raise InvalidApiKey("invalid API key: unknown or revoked")
        return hit[0]

    def _ensure_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        failing = False
        while True:
            try:
                version = await asyncio.to_thread(self.store.version)
                if failing:
                    log.warning("key store reachable again")
                failing = False
                if version != self._version:
                    if self._version is not None:
                        log.info("API keys changed (version %s -> %s): key cache dropped", self._version, version)
                    self._cache.clear()
                    self._version = version
            except MassError as exc:
                if not failing:
                    log.warning("cannot poll the key store (%s); cached keys stay valid until it returns", exc)
                failing = True
            await asyncio.sleep(self.poll_s)

    def close(self) -> None:
        """Stop polling."""
        if self._poller is not None:
            self._poller.cancel()
