"""Reading a request's JSON body: refused early when it is not JSON or too large, before a
byte of it is parsed. Shared by every route that takes a body."""

from __future__ import annotations

from starlette.requests import Request

from ..errors import PayloadTooLarge, UnsupportedMediaType

# text/plain is what fetch() sends for a string body when no Content-Type is set — as the
# original design's client does — so it is read as JSON too; forms, XML and the like are not.
JSON_MEDIA_TYPES = frozenset({"application/json", "text/plain", ""})


async def read_json_body(request: Request, limit: int) -> bytes:
    """The request body, refused early when it is not JSON or larger than ``limit``."""
    content_type = request.headers.get("content-type", "")
    media = content_type.partition(";")[0].strip().lower()
    if media not in JSON_MEDIA_TYPES and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"send the body as JSON with 'Content-Type: application/json' (got {content_type or 'none'!r})"
        )
    too_large = PayloadTooLarge(f"request body is larger than {limit} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)
