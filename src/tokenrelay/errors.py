"""The errors tokenrelay raises, and the one place they become HTTP responses.

    TokenrelayError                 500 internal_error
    ├── BadRequest                  400 invalid_request
    │   ├── MalformedJSON           400 invalid_json
    │   ├── UnsupportedMediaType    415 unsupported_media_type
    │   ├── PayloadTooLarge         413 payload_too_large
    │   ├── ValidationFailed        422 validation_error
    │   ├── RequestTimeout          408 request_timeout       (headers or body too slow)
    │   └── HeadersTooLarge         431 request_header_too_large
    ├── Forbidden                   403 forbidden             (another site, or an unknown Host)
    ├── NotFound                    404 not_found
    │   └── ModelNotFound           404 model_not_found    (no route serves the model)
    ├── Conflict                    409 conflict
    ├── ServiceUnavailable          503 unavailable
    │   └── Overloaded              503 overloaded            (too many connections at once)
    ├── Unauthorized                401 unauthorized          (no or wrong client key)
    ├── RateLimited                 429 rate_limited          (tokenrelay's own per-key limits)
    └── UpstreamError               502 upstream_error
        ├── UpstreamRejected        400 upstream_rejected_request (upstream 4xx but 401/403/429)
        ├── UpstreamRateLimited     429 upstream_rate_limited
        ├── UpstreamTimeout         504 upstream_timeout
        ├── UpstreamUnavailable     502 upstream_unavailable   (connection refused / reset)
        └── UpstreamProtocolError   502 upstream_protocol_error (malformed stream)

Errors raised before the first byte of a response become a status and the JSON body
``{"error": {"type", "message"}}``; on ``/v1`` the same error renders in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` (``openai_body``), so the official SDKs
raise their own exception types. After the first byte the status is gone: the wire
encoder says it in-band (SSE ``event: error``, a ``data: {"error": …}`` chunk on ``/v1``) or
aborts the body (plain text).
"""

from __future__ import annotations

import orjson


class TokenrelayError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"type": self.type, "message": self.message}}

    def body(self) -> bytes:
        return orjson.dumps(self.to_dict())


class BadRequest(TokenrelayError):
    status = 400
    type = "invalid_request"


class MalformedJSON(BadRequest):
    type = "invalid_json"


class UnsupportedMediaType(BadRequest):
    status = 415
    type = "unsupported_media_type"


class PayloadTooLarge(BadRequest):
    status = 413
    type = "payload_too_large"


class ValidationFailed(BadRequest):
    status = 422
    type = "validation_error"


class RequestTimeout(BadRequest):
    status = 408
    type = "request_timeout"


class HeadersTooLarge(BadRequest):
    status = 431
    type = "request_header_too_large"


class Forbidden(TokenrelayError):
    status = 403
    type = "forbidden"


class NotFound(TokenrelayError):
    status = 404
    type = "not_found"


class Conflict(TokenrelayError):
    status = 409
    type = "conflict"


class ServiceUnavailable(TokenrelayError):
    status = 503
    type = "unavailable"


class Overloaded(ServiceUnavailable):
    type = "overloaded"


class Unauthorized(TokenrelayError):
    """The request carries no client key, or one tokenrelay does not know."""

    status = 401
    type = "unauthorized"


class RateLimited(TokenrelayError):
    """A client key (or address) is over one of tokenrelay's own limits; ``Retry-After`` says
    when to try again. Not ``UpstreamRateLimited``: that is the model API refusing."""

    status = 429
    type = "rate_limited"


class ModelNotFound(NotFound):
    type = "model_not_found"


class UpstreamError(TokenrelayError):
    """The model API refused, failed, or broke its protocol."""

    status = 502
    type = "upstream_error"
    upstream_status: int | None = None
    """The HTTP status the upstream answered with, when it answered with one."""
    reason: str = ""
    """The upstream's own words for that status."""
    request_sent: bool = False
    """The request reached the upstream, which may have started on it: trying again could
    run (and bill) the same answer twice."""


class UpstreamRejected(UpstreamError):
    status = 400
    type = "upstream_rejected_request"


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "upstream_rate_limited"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "upstream_timeout"


class UpstreamUnavailable(UpstreamError):
    type = "upstream_unavailable"


class UpstreamProtocolError(UpstreamError):
    type = "upstream_protocol_error"


def openai_type(exc: TokenrelayError) -> str:
    """OpenAI's error ``type`` for a status: what its SDKs and users expect to read."""
    if exc.status == 401:
        return "authentication_error"
    if exc.status == 403:
        return "permission_error"
    if exc.status == 429:
        return "rate_limit_error"
    if exc.status < 500:
        return "invalid_request_error"
    return "server_error"


def openai_dict(exc: TokenrelayError) -> dict[str, dict[str, str | None]]:
    """The error in OpenAI's shape; tokenrelay's own type is the ``code``."""
    return {"error": {"message": exc.message, "type": openai_type(exc),
                      "param": getattr(exc, "param", None), "code": exc.type}}


def openai_body(exc: TokenrelayError) -> bytes:
    return orjson.dumps(openai_dict(exc))


def error_headers(exc: TokenrelayError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    headers.extend((k.lower().encode(), v.encode()) for k, v in exc.headers.items())
    return headers
