"""Secrets as they arrive from the environment and files: client keys parsed, and any secret
checked for what copying it in tends to add.

Both ``config`` (to refuse a bad value at start-up) and ``auth`` (to build the key ring)
use this module, which imports nothing else of tokenrelay's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

_NAMED = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", " ": "a space"}


@dataclass(frozen=True, slots=True)
class ApiKey:
    secret: bytes
    name: str

    def __repr__(self) -> str:  # never print the secret, not even in a traceback
        return f"ApiKey(name={self.name!r})"


def secret_flaw(value: str) -> str | None:
    """What is wrong with a secret and what to do, in words that never quote it; None if
    nothing.

    A secret read from a file usually keeps the file's last newline (``echo`` writes one, and
    so does a Kubernetes secret made from such a file). It would pass into an HTTP header
    and fail every request, so it is refused where it is configured instead."""
    if not value:
        return None
    if value.endswith("\n"):
        return "the value ends with a newline, as a secret read from a file often does; remove it"
    for end, where in ((value[-1], "ends with"), (value[0], "starts with")):
        if end.isspace() or not end.isprintable():
            return f"the value {where} {_describe_char(end)}; remove it"
    for position, char in enumerate(value, 1):
        if not char.isprintable():
            return f"the value contains {_describe_char(char)} (character {position}); remove it"
        if not char.isascii():
            return (f"the value contains the non-ASCII character U+{ord(char):04X} (character {position}); "
                    "keys are ASCII: was it copied from a formatted document?")
    return None


def _describe_char(char: str) -> str:
    return _NAMED.get(char) or f"the control character U+{ord(char):04X}"


def key_id(secret: bytes) -> str:
    return "key-" + hashlib.sha256(secret).hexdigest()[:8]


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
    """The keys of ``TOKENRELAY_API_KEYS``: comma-separated, named by their hash.

    Spaces around the commas are allowed; a newline or other control character anywhere is
    refused rather than stripped, since it means the value was read from a file by mistake."""
    for char in text:
        if not char.isprintable() and char != " ":
            where = "ends with" if text.rstrip(" ").endswith(char) else "contains"
            raise ValueError(f"the value {where} {_describe_char(char)}; remove it (the keys are not shown)")
    keys = []
    for secret in text.split(","):
        if secret.strip():
            raw = _check(secret.strip(), "TOKENRELAY_API_KEYS")
            keys.append(ApiKey(raw, key_id(raw)))
    return keys
