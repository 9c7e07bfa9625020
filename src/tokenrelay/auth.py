"""Client keys: who may call the API.

Keys come from ``TOKENRELAY_API_KEYS`` (comma-separated) and ``TOKENRELAY_API_KEYS_FILE``
(one per line, ``KEY`` or ``KEY NAME``, ``#`` starts a comment); both may be given. A key
is never logged or stored anywhere else: logs and the limits' counters use its name — the
one given in the file, or ``key-`` and the first 8 hex digits of the key's SHA-256, which
tells keys apart without helping anyone guess one. Keys that share a name share limits, so
a client's old and new key can overlap during a rotation.

Matching is constant-time in the key's content: the presented token is compared with every
key by ``hmac.compare_digest``, without stopping at the first match, so neither which key
matched nor how much of a key was right shows in the response time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING

# Parsing lives in .keys, which config also uses to refuse bad keys at start-up; these names
# stay importable from here.
from .keys import ApiKey, key_id, parse_keys, read_keys_file

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["ApiKey", "KeyRing", "bearer_token", "key_id", "load_keys", "parse_keys", "read_keys_file"]


class KeyRing:
    """The configured keys; empty means the API is open."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._keys = tuple(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def match(self, token: bytes) -> ApiKey | None:
        found: ApiKey | None = None
        for key in self._keys:
            # No early exit: every key is compared, whichever one matches.
            if hmac.compare_digest(key.secret, token):
                found = key
        return found


def bearer_token(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (RFC 6750 §2.1)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


def load_keys(settings: Settings) -> KeyRing:
    keys: list[ApiKey] = []
    if settings.api_keys is not None:
        keys.extend(parse_keys(settings.api_keys.get_secret_value()))
    if settings.api_keys_file is not None:
        keys.extend(read_keys_file(settings.api_keys_file))
    unique: dict[bytes, ApiKey] = {}
    for key in keys:
        unique.setdefault(key.secret, key)
    return KeyRing(unique.values())
