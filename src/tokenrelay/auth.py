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

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings


@dataclass(frozen=True, slots=True)
class ApiKey:
    secret: bytes
    name: str

    def __repr__(self) -> str:  # never print the secret, not even in a traceback
        return f"ApiKey(name={self.name!r})"


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


def key_id(secret: bytes) -> str:
    return "key-" + hashlib.sha256(secret).hexdigest()[:8]


def bearer_token(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (RFC 6750 §2.1)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


def _check(secret: str, where: str) -> bytes:
    if not secret.isascii() or not secret.isprintable() or any(c.isspace() or c == "," for c in secret):
        raise ValueError(f"{where}: a key must be printable ASCII without spaces or commas")
    return secret.encode()


def read_keys_file(path: Path) -> list[ApiKey]:
    """The keys in ``path``; a missing file or a malformed line is an error naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        secret, _, name = line.partition(" ")
        raw = _check(secret, f"{path} line {number}")
        keys.append(ApiKey(raw, name.strip() or key_id(raw)))
    return keys


def parse_keys(text: str) -> list[ApiKey]:
    """The keys of ``TOKENRELAY_API_KEYS``: comma-separated, named by their hash."""
    keys = []
    for secret in text.split(","):
        if secret.strip():
            raw = _check(secret.strip(), "TOKENRELAY_API_KEYS")
            keys.append(ApiKey(raw, key_id(raw)))
    return keys


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
