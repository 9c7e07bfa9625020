"""The upstream request both HTTP providers share: send, and turn a refusal or an
unreachable upstream into the matching ``UpstreamError`` before any byte is relayed."""

from __future__ import annotations

import httpx
import orjson

from ..errors import UpstreamTimeout, UpstreamUnavailable
from .base import error_for_status

# Compressed SSE would be held back by the decompressor; ask for it plain.
SSE_REQUEST_HEADERS = {
    "content-type": "application/json",
    "accept": "text/event-stream",
    "accept-encoding": "identity",
}


async def send_streaming(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """The response once its status is 200; its body is the caller's to read and close.

    Any other status is read, closed and raised with the upstream's own reason."""
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException:
        raise UpstreamTimeout("upstream did not answer in time") from None
    except httpx.TransportError as exc:
        raise UpstreamUnavailable(f"cannot reach upstream: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        try:
            raw = await response.aread()
        except httpx.HTTPError:
            raw = b""
        finally:
            await response.aclose()
        raise error_for_status(
            response.status_code,
            upstream_reason(raw) or response.reason_phrase,
            retry_after=response.headers.get("retry-after"),
        )
    return response


def upstream_reason(raw: bytes) -> str:
    """The upstream's own explanation from an error body (OpenAI's and Anthropic's
    ``{"error": {"message": …}}`` alike), if it gave one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode("utf-8", "replace").strip()
    if isinstance(body, dict) and "error" in body:
        return error_message(body["error"])
    return ""


def error_message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
